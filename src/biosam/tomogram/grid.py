"""The tomogram as the vesicle finder sees it: one physical voxel size, dense material dark.

Tomograms come at 5-20 Å per voxel and in both contrast conventions; the
trained parts of the pipeline have seen one of each. :func:`working_volume`
resamples a tomogram to :data:`WORKING_VOXEL_A` and turns it dark-dense
(detected with :func:`detect_polarity` unless given); :func:`to_input_grid`
takes labels found there back to the input's voxels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from biosam.errors import InputError
from biosam.io.voxel_size import VoxelSize

logger = logging.getLogger(__name__)

#: Voxel size (Å) the vesicle finder works at.
WORKING_VOXEL_A = 10.0
#: The same, as the voxel size of the working grid.
WORKING_VOXEL = VoxelSize.of(WORKING_VOXEL_A)
POLARITY_CHOICES = ("auto", "dark", "bright")
#: Skewness above which a tomogram counts as dense-is-bright (dense material is sparse, so it forms the tail).
_BRIGHT_SKEW = 0.05


@dataclass(frozen=True)
class WorkingGrid:
    """How a tomogram was brought to the working grid: ``zoom`` per axis (working / input voxels), its
    ``input_shape``, and the ``polarity`` it had (``"dark"`` or ``"bright"``) with the ``skew`` measured."""

    zoom: tuple[float, float, float]
    input_shape: tuple[int, int, int]
    polarity: str
    skew: float | None


def polarity_skew(volume: np.ndarray) -> float:
    """Skewness of the tomogram's middle half in z, averaged over 5 slices and high-passed in-plane.

    Membranes, proteins and gold are sparse and denser than their surroundings, so
    they form the tail of the histogram: negative skew when dense is dark.
    """
    depth = volume.shape[0]
    middle = np.asarray(volume[depth // 4 : max(depth // 4 + 1, 3 * depth // 4)], np.float32)
    step = max(1, int(np.ceil(max(middle.shape[1:]) / 512)))  # a subsample is plenty
    middle = middle[:, ::step, ::step]
    slab = ndi.uniform_filter1d(middle, min(5, middle.shape[0]), axis=0)
    detail = slab - ndi.gaussian_filter(slab, (0, 20 / step, 20 / step))
    return float(stats.skew(detail.ravel()))


def detect_polarity(volume: np.ndarray) -> tuple[str, float]:
    """``("dark" | "bright", skew)``: which way dense material goes in ``volume`` (see :func:`polarity_skew`)."""
    skew = polarity_skew(volume)
    return ("bright" if skew > _BRIGHT_SKEW else "dark"), skew


def resolve_polarity(volume: np.ndarray, polarity: str) -> tuple[str, float | None]:
    """``polarity`` checked, and for ``"auto"`` detected (logged): ``("dark" | "bright", skew or None)``."""
    if polarity not in POLARITY_CHOICES:
        raise InputError(f"polarity must be one of {', '.join(POLARITY_CHOICES)}, got {polarity!r}.")
    if polarity != "auto":
        return polarity, None
    polarity, skew = detect_polarity(volume)
    logger.info("contrast polarity: dense is %s (skew %.3f)", polarity, skew)
    return polarity, skew


def working_volume(volume: np.ndarray, voxel_size: VoxelSize | float | tuple[float, float, float],
                   polarity: str = "auto", working_a: float = WORKING_VOXEL_A) -> tuple[np.ndarray, WorkingGrid]:
    """``volume`` of ``voxel_size`` (Å) resampled (linear) to ``working_a`` Å voxels and made dense-is-dark, float32."""
    volume = np.asarray(volume)
    polarity, skew = resolve_polarity(volume, polarity)
    zoom = tuple(s / working_a for s in VoxelSize.of(voxel_size).angstrom)
    out = np.asarray(volume, np.float32)
    if any(abs(z - 1) > 1e-3 for z in zoom):
        out = ndi.zoom(out, zoom, order=1, mode="nearest", grid_mode=True)
    if polarity == "bright":
        out = np.negative(out)
    return out, WorkingGrid(zoom, tuple(volume.shape), polarity, skew)


def to_input_grid(labels: np.ndarray, grid: WorkingGrid) -> np.ndarray:
    """Labels from the working grid back on the input's voxels (nearest neighbour)."""
    if labels.shape == grid.input_shape:
        return labels
    coords = [(np.arange(n) + 0.5) * (m / n) - 0.5 for n, m in zip(grid.input_shape, labels.shape)]
    index = [np.clip(np.rint(c).astype(np.int64), 0, m - 1) for c, m in zip(coords, labels.shape)]
    return labels[np.ix_(*index)]
