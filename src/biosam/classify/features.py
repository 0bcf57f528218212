"""What the mask classifier sees of a candidate: frozen SAM features of a crop, masked in and out.

Each candidate mask gets a square crop of the image around its box
(``context`` times the box's longer side, at least ``min_side`` pixels; edge
pixels repeat beyond the image), which the model embeds like any image. The
mask, cropped the same way, is averaged onto the embedding grid; the top-level
features (256 channels, SAM v1 and SAM 2 alike) times the mask and times its
complement are concatenated and average-pooled to ``pooled`` x ``pooled``.
One embedding per candidate is the price of looking at every candidate at full
detail, whatever its size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from biosam.errors import InputError
from biosam.prompting.preprocess import Frame, model_input
from biosam.settings import check, whole, within

# Channels of the top-level image features (SAM v1's whole embedding, SAM 2's first block of its packed one).
FEATURE_CHANNELS = 256


@dataclass(frozen=True)
class CropSettings:
    """How candidates are cropped: ``context`` x the box's longer side, at least ``min_side`` px;
    masked features pooled to ``pooled`` x ``pooled``."""

    context: float = 2.0
    min_side: int = 24
    pooled: int = 32

    def __post_init__(self) -> None:
        check("crop settings", [within("context", self.context, 1.0, math.inf), whole("min_side", self.min_side, 4),
                                whole("pooled", self.pooled, 8)])

    def to_dict(self) -> dict:
        return asdict(self)


def crop_window(mask: np.ndarray, settings: CropSettings) -> tuple[int, int, int]:
    """``(y0, x0, side)`` of the square crop around a 2D mask (may reach beyond the image)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise InputError("an empty candidate mask cannot be classified.")
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    side = int(max(settings.min_side, round(settings.context * max(h, w))))
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    return int(round(cy - side / 2)), int(round(cx - side / 2)), side


def _take(array: np.ndarray, y0: int, x0: int, side: int, fill_outside: bool) -> np.ndarray:
    ys, xs = np.arange(y0, y0 + side), np.arange(x0, x0 + side)
    crop = array[np.ix_(np.clip(ys, 0, array.shape[0] - 1), np.clip(xs, 0, array.shape[1] - 1))]
    if not fill_outside:
        inside = ((ys >= 0) & (ys < array.shape[0]))[:, None] & ((xs >= 0) & (xs < array.shape[1]))[None, :]
        crop = crop * inside
    return crop


def as_rgb(view: np.ndarray) -> np.ndarray:
    """A 2D (gray) or (H, W, 3) image with values 0-255 as float32 RGB."""
    view = np.asarray(view, dtype=np.float32)
    if view.ndim == 2:
        view = np.repeat(view[..., None], 3, axis=-1)
    if view.ndim != 3 or view.shape[-1] != 3:
        raise InputError(f"the classifier's image must be 2D gray or RGB, got shape {view.shape}.")
    return view


def crops(view: np.ndarray, mask: np.ndarray, settings: CropSettings) -> tuple[np.ndarray, np.ndarray]:
    """The RGB crop (side, side, 3) and mask crop (side, side) float32 of one candidate."""
    y0, x0, side = crop_window(mask, settings)
    return _take(view, y0, x0, side, True), _take(mask.astype(np.float32), y0, x0, side, False)


def augment(crop: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flip/90° turn, intensity scale and shift, Gaussian noise and blur of an RGB crop (0-255)."""
    k = int(rng.integers(8))
    crop, mask = np.rot90(crop, k % 4), np.rot90(mask, k % 4)
    if k >= 4:
        crop, mask = crop[:, ::-1], mask[:, ::-1]
    crop = crop * rng.uniform(0.8, 1.25) + rng.uniform(-20, 20)
    sigma = rng.uniform(0, 1.2)
    if sigma > 0.3:
        crop = ndi.gaussian_filter(crop, (sigma, sigma, 0))
    crop = crop + rng.normal(0, rng.uniform(0, 8), crop.shape)
    return np.clip(crop, 0, 255).astype(np.float32), np.ascontiguousarray(mask)


@torch.inference_mode()
def masked_features(
    model: torch.nn.Module,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    settings: CropSettings,
    batch_size: int = 8,
) -> torch.Tensor:
    """``(N, 512, pooled, pooled)`` float32 features of ``(rgb crop, mask crop)`` pairs, on the CPU."""
    preprocessing, size = model.info.preprocessing, int(model.image_size)
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        images = torch.cat([model_input(c, Frame.create(c.shape[:2], size, preprocessing), preprocessing)
                            for c, _ in chunk])
        embedding = model.embed(images.to(model.device))[:, :FEATURE_CHANNELS].float()
        grid = embedding.shape[-2:]
        # The crop is square, so it fills the model input whatever the preprocessing: the grid covers it exactly.
        masks = torch.cat([F.interpolate(torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None],
                                         size=grid, mode="area") for _, m in chunk]).to(embedding.device)
        both = torch.cat([embedding * masks, embedding * (1 - masks)], dim=1)
        out.append(F.adaptive_avg_pool2d(both, settings.pooled).cpu())
    if not out:
        return torch.zeros(0, 2 * FEATURE_CHANNELS, settings.pooled, settings.pooled)
    return torch.cat(out)
