"""Resampling shared by decoder training and automatic segmentation, so both see the same pixels.

Images and maps are resized bilinearly, anti-aliased when shrinking; label
images by nearest neighbour with pixel centres mapped back (no new ids).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """``shape[:2]`` times ``scale``, rounded, at least one pixel."""
    return tuple(max(1, int(round(n * scale))) for n in shape[:2])


def _bilinear(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    shrink = shape[0] < x.shape[-2] or shape[1] < x.shape[-1]
    return F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=shrink)


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` image resized to ``shape``; integer images stay integer (rounded, clipped)."""
    shape = tuple(shape)
    if tuple(image.shape[:2]) == shape:
        return image
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    x = x[None, None] if image.ndim == 2 else x.permute(2, 0, 1)[None]
    out = _bilinear(x, shape)[0]
    out = (out[0] if image.ndim == 2 else out.permute(1, 2, 0)).numpy()
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype, copy=False)


def resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(C, H, W)`` float maps resized to ``(C, *shape)``."""
    if tuple(maps.shape[-2:]) == tuple(shape):
        return maps
    return _bilinear(torch.from_numpy(np.ascontiguousarray(maps))[None], tuple(shape))[0].numpy()


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image to ``shape``."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(int), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]
