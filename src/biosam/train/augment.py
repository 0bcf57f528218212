"""Intensity augmentation: one raw image as other microscopes and cameras might have stored it.

Applied to the raw pixels before the normalisation that inference uses
(:func:`biosam.prompting.intensity.normalize_intensity`), so the decoder learns
what survives that normalisation: gamma, a background offset, blur, noise, and
storage into few grey levels (a dim 8-bit image) or many (16-bit).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomly re-exposed copy of a grey ``(H, W)`` or colour ``(H, W, C)`` image, as uint8 or uint16.

    The copy keeps the image's content and geometry; only its grey values change.
    """
    x = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(x, (0.5, 99.9))
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    x = x ** np.float32(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # gamma
    if rng.random() < 0.3:  # out of focus
        sigma = rng.uniform(0.5, 2.0)
        x = ndimage.gaussian_filter(x, (sigma, sigma, 0)[: x.ndim])
    x = rng.uniform(0.0, 0.3) * rng.random() + x * rng.uniform(0.4, 1.0)  # background offset, contrast
    if rng.random() < 0.6:  # camera noise, relative to the signal range
        x = x + rng.normal(0.0, rng.uniform(0.005, 0.08), x.shape).astype(np.float32)
    x = np.clip(x, 0.0, 1.0)
    if rng.random() < 0.5:  # 8-bit: from dim (brightest pixel 10) to full range
        peak, dtype = np.exp(rng.uniform(np.log(10.0), np.log(255.0))), np.uint8
    else:
        peak, dtype = np.exp(rng.uniform(np.log(200.0), np.log(65535.0))), np.uint16
    return np.rint(x * peak).astype(dtype)


def store_as(image: np.ndarray, dtype: type, peak: float) -> np.ndarray:
    """``image`` rescaled from its own min-max to ``0..peak`` and rounded to ``dtype``: the same picture
    as another camera would have stored it (e.g. dim 8-bit with ``peak=50``, or 16-bit)."""
    x = np.asarray(image, dtype=np.float64)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    return np.rint(x * peak).astype(dtype)
