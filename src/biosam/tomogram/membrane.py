"""Where a dark membrane lies around a mask: mean intensity in shells at signed distance from its edge.

A vesicle's bilayer is a dark band around its lumen. The mean of the image in
shells inside and outside a mask's edge (:func:`edge_profile`) shows it as a
dip; :func:`membrane_fit` finds the dip, how much darker it is than what lies
beyond, and how far the mask must grow to take in the membrane. SAM outlines
either the lumen or the whole vesicle, so the band is looked for on both
sides of the edge.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__ = ["edge_profile", "membrane_contrast", "membrane_fit"]


def edge_profile(
    image: np.ndarray, mask: np.ndarray, reach: float, spacing: float | tuple[float, ...] = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``image`` in shells at signed distance from the edge of ``mask`` (2D or 3D).

    Distances are in the units of ``spacing`` (negative inside the mask),
    binned one smallest-spacing wide, out to ``reach`` on both sides. Returns
    the bin centres and the mean in each bin (NaN where a bin is empty).
    """
    step = float(np.min(spacing))
    n = int(math.ceil(reach / step))
    if not mask.any():
        return (np.arange(2 * n + 1) - n) * step, np.full(2 * n + 1, np.nan)
    # Only voxels within reach of the mask matter: work in its box, widened by the reach.
    margin = np.ceil(reach / np.broadcast_to(np.asarray(spacing, np.float64), (mask.ndim,))).astype(int) + 1
    box = tuple(slice(max(0, b.start - m), b.stop + m) for b, m in zip(ndi.find_objects(mask.astype(np.uint8))[0], margin))
    image, mask = image[box], mask[box]
    inside = ndi.distance_transform_edt(mask, sampling=spacing)
    outside = ndi.distance_transform_edt(~mask, sampling=spacing)
    # Pixel centres next to the edge are half a pixel from it.
    signed = np.where(mask, 0.5 * step - inside, outside - 0.5 * step)
    bins = np.rint(signed / step).astype(np.int64) + n
    near = (bins >= 0) & (bins <= 2 * n)
    sums = np.bincount(bins[near], weights=image[near].astype(np.float64), minlength=2 * n + 1)
    counts = np.bincount(bins[near], minlength=2 * n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return (np.arange(2 * n + 1) - n) * step, np.where(counts > 0, means, np.nan)


def membrane_fit(distances: np.ndarray, means: np.ndarray, membrane: float) -> tuple[float, float]:
    """Where a dark membrane lies in an edge profile: ``(contrast, growth)``.

    The darkest band (the profile smoothed over most of a membrane's width)
    within a membrane's width of the edge is the membrane's middle;
    ``contrast`` is how much brighter the band one to two membrane widths
    beyond it is (NaN if unknown), ``growth`` how far the mask must grow to
    take in the membrane's outer half (>= 0).
    """
    valid = np.isfinite(means)
    if valid.sum() < 3:
        return float("nan"), 0.0
    # Smoothed over most of a membrane's width, the two leaflets of a bilayer merge into one band
    # whose darkest point is the bilayer's middle.
    step = float(distances[1] - distances[0])
    window = np.ones(max(3, int(round(0.7 * membrane / step)) | 1))
    smooth = np.convolve(np.where(valid, means, 0.0), window, "same")
    weight = np.convolve(valid.astype(np.float64), window, "same")
    smooth = np.where(weight > 0, smooth / np.maximum(weight, 1), np.nan)
    search = (distances >= -membrane) & (distances <= membrane + 2 * step) & valid
    if not search.any():
        return float("nan"), 0.0
    centre = distances[search][np.nanargmin(smooth[search])]
    beyond = (distances >= centre + membrane) & (distances <= centre + 2 * membrane) & valid
    contrast = float(np.mean(means[beyond]) - smooth[distances == centre][0]) if beyond.any() else float("nan")
    return contrast, max(0.0, float(centre + membrane / 2))


def membrane_contrast(image: np.ndarray, mask: np.ndarray, membrane_px: float) -> float:
    """How much darker than its surroundings the membrane at the edge of a 2D mask is (units of ``image``).

    The membrane is the darkest band within ``membrane_px`` of the mask's edge
    (inside or out, so a mask of the lumen and one of the whole vesicle both
    work); the contrast is the mean of the band one to two membrane widths
    further out minus the band's. NaN for an empty mask.
    """
    if not mask.any():
        return float("nan")
    width = max(1.0, float(membrane_px))
    distances, means = edge_profile(image, mask, 3 * width + 2)
    return membrane_fit(distances, means, width)[0]
