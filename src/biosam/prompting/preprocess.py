"""Turning user images into model inputs, and model outputs back into image pixels.

Two steps, kept apart so that a crop of an image is preprocessed exactly like
the whole image:

1. :func:`biosam.prompting.intensity.normalize_intensity` maps any 2D image
   (grayscale, RGB, multichannel; any dtype) to an RGB float array in [0, 255].
2. :func:`model_input` applies the preprocessing each model family was trained
   with (see ``MODEL_ZOO.md``):

   - ``sam`` (Meta SAM, micro-sam, MobileSAM): resize the longest side to the
     model size, subtract the ImageNet pixel mean and divide by the std (0-255
     scale), pad bottom/right with zeros.
   - ``medsam``: square resize to the model size (aspect ratio not kept),
     min-max to [0, 1].
   - ``lite_medsam``: resize the longest side to the model size, min-max to
     [0, 1], pad bottom/right with zeros.
   - ``sam2`` (SAM 2 / 2.1, MedSAM2): square resize to the model size (aspect
     ratio not kept), scale to [0, 1], subtract the ImageNet mean and divide by
     the std (0-1 scale).

Resampling uses torch's antialiased bilinear (bicubic for MedSAM) interpolation
in place of the authors' PIL/OpenCV/scikit-image calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from biosam.errors import InputError

PREPROCESSINGS = ("sam", "medsam", "lite_medsam", "sam2")
# Pixel mean and std of the `sam` (0-255 scale) and `sam2` (0-1 scale) preprocessings; the bioimage.io
# export writes them into its packages' preprocessing steps.
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)
# Preprocessings that stretch the image to the square input instead of padding it.
_SQUARE = ("medsam", "sam2")
# Side of the decoder logits the prompting code exchanges: every SAM v1 model's, and SAM 2's at
# 1024 px (a 512 px SAM 2 model's 128 px logits are handed over repeated 2x, see logits_to_image).
LOW_RES = 256


@dataclass(frozen=True)
class Frame:
    """Geometry linking original image pixels to a model's square input.

    ``resized`` is the (height, width) the image occupies inside the
    ``input_size`` square before padding.
    """

    image_shape: tuple[int, int]
    input_size: int
    resized: tuple[int, int]

    @classmethod
    def create(cls, image_shape: tuple[int, int], input_size: int, preprocessing: str, extent: int | None = None) -> Frame:
        """The frame of an image; with ``extent``, a smaller image is scaled as if it were the top-left part
        of an ``extent``-pixel square (so an edge tile keeps the scale of a full tile) instead of enlarged."""
        h, w = image_shape
        if preprocessing in _SQUARE:
            return cls((h, w), input_size, (input_size, input_size))
        check_proportions((h, w), input_size, preprocessing)
        scale = input_size / max(h, w, extent or 0)
        # Same rounding as the reference ResizeLongestSide transform; at least 1 px for a thin tile in a large extent.
        return cls((h, w), input_size, (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))))

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Factors from original (x, y) pixels to model-input pixels."""
        return self.resized[1] / self.image_shape[1], self.resized[0] / self.image_shape[0]

    def to_model(self, coords: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` (x, y) points, or ``(..., 4)`` boxes, into the model frame."""
        coords = np.asarray(coords, dtype=np.float64)
        sx, sy = self.scale_xy
        factors = np.array([sx, sy] * (coords.shape[-1] // 2))
        return coords * factors

    @property
    def low_res_per_px(self) -> tuple[float, float]:
        """Pixels of the 256 px decoder grid per original (x, y) pixel."""
        sx, sy = self.scale_xy
        f = LOW_RES / self.input_size
        return sx * f, sy * f

    @property
    def low_res_extent(self) -> tuple[int, int]:
        """How many rows and columns of the 256 px decoder grid have their centres on the image (the rest: padding)."""
        h, w = (max(1, math.ceil(r * LOW_RES / self.input_size - 0.5)) for r in self.resized)
        return h, w


def check_proportions(
    image_shape: tuple[int, int], input_size: int, preprocessing: str, model: str | None = None
) -> None:
    """Refuse an image too elongated for a model that keeps the aspect ratio.

    Such a model (``sam``, ``lite_medsam`` preprocessing) fits the long side to
    its ``input_size`` px input; an image whose short side would then be under
    one pixel has nothing left to segment (a 3 x 100000 px strip). Models that
    stretch the image to a square take any shape. :class:`InputError` says how
    long the image may be at its width; callers add the file name.
    """
    h, w = image_shape
    if preprocessing in _SQUARE or min(h, w) < 1:
        return
    short, long = min(h, w), max(h, w)
    if int(short * input_size / long + 0.5) >= 1:
        return
    side = "height" if h < w else "width"
    model = f" '{model}'" if model else ""
    raise InputError(
        f"the image is {h} x {w} px (height x width), too elongated for the model{model}: fitted to its "
        f"{input_size} px input, its {side} would be under one pixel. At a {side} of {short} px it may be at most "
        f"{2 * short * input_size} px long; crop it into shorter pieces."
    )


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(), x.amax()
    return (x - lo) / torch.clamp(hi - lo, min=1e-8)


def model_input(rgb: np.ndarray, frame: Frame, preprocessing: str) -> torch.Tensor:
    """Build the ``(1, 3, S, S)`` float32 model input from a normalised RGB image."""
    if preprocessing not in PREPROCESSINGS:
        raise InputError(f"unknown preprocessing '{preprocessing}'; expected one of {PREPROCESSINGS}.")
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    mode = "bicubic" if preprocessing == "medsam" else "bilinear"
    if tuple(x.shape[-2:]) != frame.resized:
        x = F.interpolate(x, size=frame.resized, mode=mode, align_corners=False, antialias=True)
        x = x.clamp(0.0, 255.0)
    if preprocessing == "sam":
        mean = torch.tensor(SAM_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(SAM_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    elif preprocessing == "sam2":
        mean = torch.tensor(SAM2_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(SAM2_STD).view(1, 3, 1, 1)
        x = (x / 255.0 - mean) / std
    else:
        x = _minmax(x)
    s = frame.input_size
    return F.pad(x, (0, s - x.shape[-1], 0, s - x.shape[-2]))


def logits_to_image(low_res: torch.Tensor, frame: Frame, preprocessing: str) -> torch.Tensor:
    """Resample ``(N, C, 256, 256)`` decoder logits to ``(N, C, H, W)`` image logits."""
    if preprocessing == "sam2":
        native = frame.input_size // 4
        if low_res.shape[-1] > native and low_res.shape[-1] % native == 0:
            # A 512 px model's logits, repeated 2x onto the 256 px frame: take the originals back.
            step = low_res.shape[-1] // native
            low_res = low_res[..., ::step, ::step]
    if preprocessing in _SQUARE:
        # MedSAM's and SAM 2's authors resize the low-resolution logits straight to the image size.
        return F.interpolate(low_res, size=frame.image_shape, mode="bilinear", align_corners=False)
    s = frame.input_size
    x = F.interpolate(low_res, size=(s, s), mode="bilinear", align_corners=False)
    x = x[..., : frame.resized[0], : frame.resized[1]]
    return F.interpolate(x, size=frame.image_shape, mode="bilinear", align_corners=False)


def crop_to_low_res(
    crop_logits: torch.Tensor, crop: tuple[int, int, int, int], frame: Frame, fill: float = -20.0
) -> torch.Tensor:
    """Place ``(N, C, h, w)`` logits of the crop ``(x0, y0, x1, y1)`` into the whole image's 256 px decoder frame.

    Used to express masks found in a zoomed crop as low-resolution logits of the
    whole image (usable as a mask prompt); everything outside the crop and the
    padding get a confident background logit.
    """
    sx, sy = frame.scale_xy
    f = LOW_RES / frame.input_size
    x0, y0, x1, y1 = crop
    lx0, ly0 = int(round(x0 * sx * f)), int(round(y0 * sy * f))
    lx1 = min(LOW_RES, max(lx0 + 1, int(round(x1 * sx * f))))
    ly1 = min(LOW_RES, max(ly0 + 1, int(round(y1 * sy * f))))
    out = crop_logits.new_full((*crop_logits.shape[:2], LOW_RES, LOW_RES), fill)
    out[..., ly0:ly1, lx0:lx1] = F.interpolate(
        crop_logits, size=(ly1 - ly0, lx1 - lx0), mode="bilinear", align_corners=False, antialias=True
    )
    return out


def resample_to_frame(
    values: torch.Tensor, per_px: tuple[float, float], frame: Frame, offset: tuple[float, float] = (0, 0),
    fill: float = -20.0,
) -> torch.Tensor:
    """Sample ``(N, C, h, w)`` maps laid over an image onto the 256 px decoder grid of ``frame``.

    The maps start at the image's top-left corner with ``per_px`` (x, y) map
    pixels per image pixel: ``(1, 1)`` for an image-size map,
    :attr:`Frame.low_res_per_px` for another frame's decoder logits. ``frame``
    is the whole image (``offset`` (0, 0)) or a crop whose top-left corner lies
    at ``offset`` image pixels. Grid points on the frame's padding get ``fill``.
    """
    h, w = values.shape[-2:]
    sx, sy = frame.scale_xy
    centres = (torch.arange(LOW_RES, dtype=torch.float64) + 0.5) * frame.input_size / LOW_RES  # model-input pixels
    # grid_sample (align_corners=False) puts map edges at -1 and 1
    gx = (centres / sx + offset[0]) * per_px[0] / w * 2 - 1
    gy = (centres / sy + offset[1]) * per_px[1] / h * 2 - 1
    grid = torch.stack([gx[None, :].expand(LOW_RES, -1), gy[:, None].expand(-1, LOW_RES)], dim=-1)
    grid = grid.to(values.device, values.dtype).expand(len(values), -1, -1, -1)
    out = F.grid_sample(values, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rows, cols = frame.low_res_extent
    out[..., rows:, :] = fill
    out[..., :, cols:] = fill
    return out


#: The logit a mask prompt made from a binary mask (:func:`mask_logits`) gives inside (+) and outside (-) the mask.
MASK_LOGIT = 10.0


def mask_logits(mask: np.ndarray, frame: Frame) -> np.ndarray:
    """A binary ``(H, W)`` mask of the image as ``(256, 256)`` decoder logits of ``frame``, usable as a mask prompt."""
    values = torch.from_numpy(np.where(np.asarray(mask, bool), MASK_LOGIT, -MASK_LOGIT).astype(np.float32))
    return resample_to_frame(values[None, None], (1.0, 1.0), frame, fill=-MASK_LOGIT)[0, 0].numpy()
