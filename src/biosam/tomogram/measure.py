"""Measurements of segmented vesicles: position, volume, diameters, z-extent and score.

Units: positions in Å (voxel index times voxel size along each axis, the
convention of copick picks), volumes in nm³, lengths in nm. Voxel sizes may
differ between axes.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from biosam.errors import InputError
from biosam.io.files import atomic_path, check_output_path
from biosam.io.voxel_size import VoxelSize

__all__ = ["COLUMNS", "fit_sphere", "measure_vesicles", "write_measurements"]

# Column names and what each holds, in the order of the CSV.
COLUMNS = {
    "label": "object id in the label volume",
    "centroid_z_A": "centroid z, Å",
    "centroid_y_A": "centroid y, Å",
    "centroid_x_A": "centroid x, Å",
    "volume_nm3": "volume, nm³",
    "equivalent_diameter_nm": "diameter of the ball of the same volume, nm",
    "fitted_diameter_nm": "diameter of the sphere fitted to the object's surface, nm",
    "z_first": "first slice",
    "z_last": "last slice",
    "z_extent_nm": "extent along z, nm",
    "mean_score": "mean SAM predicted IoU over the object's slices",
}


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through ``(n, 3)`` points: ``(centre, radius)``.

    Solves the linear form ``|p|² = 2 c·p + (r² - |c|²)``; needs at least 4
    points not all on one plane.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) < 4:
        raise InputError(f"a sphere fit needs at least 4 points, got {len(points)}.")
    a = np.column_stack([2 * points, np.ones(len(points))])
    b = np.einsum("ij,ij->i", points, points)
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    centre, d = solution[:3], solution[3]
    return centre, float(math.sqrt(max(d + centre @ centre, 0.0)))


def _surface_points(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Physical positions of an object's outer surface voxels (face-connected to the background)."""
    padded = np.pad(mask, 1)
    surface = padded & ~ndi.binary_erosion(padded)
    return (np.argwhere(surface) - 1) * spacing


def measure_vesicles(
    labels: np.ndarray, voxel_size: VoxelSize | float | tuple[float, float, float], scores: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """One row per object of ``labels`` ``(Z, Y, X)``: the columns of :data:`COLUMNS` as NumPy arrays.

    ``voxel_size``: a :class:`~biosam.io.voxel_size.VoxelSize`, or one number
    or ``(z, y, x)`` in Å; ``scores`` ``(N, Z)`` predicted IoU per object and
    slice (NaN where absent), row ``k`` for label ``k + 1``; without it
    ``mean_score`` is NaN. The fitted diameter comes
    from a least-squares sphere through the surface voxels, each taken half a
    voxel outwards (voxel centres lie inside the surface).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"expected a label volume (Z, Y, X), got shape {labels.shape}.")
    voxel = VoxelSize.of(voxel_size)
    spacing, spacing_nm = np.asarray(voxel.angstrom), np.asarray(voxel.nm)
    voxel_nm3 = voxel.voxel_nm3
    boxes = ndi.find_objects(labels)
    rows: dict[str, list] = {name: [] for name in COLUMNS}
    for index, box in enumerate(boxes):
        if box is None:
            continue
        label = index + 1
        mask = labels[box] == label
        coords = np.argwhere(mask) + [s.start for s in box]
        count = len(coords)
        volume = count * voxel_nm3
        centroid = coords.mean(axis=0) * spacing
        surface = _surface_points(mask, spacing_nm)
        if len(surface) >= 4:
            _, radius = fit_sphere(surface)
            fitted = 2 * (radius + 0.5 * float(np.mean(spacing_nm)))
        else:
            fitted = float("nan")
        z_first, z_last = int(coords[:, 0].min()), int(coords[:, 0].max())
        score = float("nan")
        if scores is not None and index < len(scores):
            row = np.asarray(scores[index], dtype=np.float64)
            if np.any(np.isfinite(row)):
                score = float(np.nanmean(row))
        values = (label, *centroid, volume, (6 * volume / math.pi) ** (1 / 3), fitted, z_first, z_last,
                  (z_last - z_first + 1) * spacing_nm[0], score)
        for name, value in zip(COLUMNS, values):
            rows[name].append(value)
    types = {"label": np.int64, "z_first": np.int64, "z_last": np.int64}
    return {name: np.asarray(values, dtype=types.get(name, np.float64)) for name, values in rows.items()}


def write_measurements(path: str | os.PathLike, table: dict[str, np.ndarray], overwrite: bool = False) -> Path:
    """Write a table of :func:`measure_vesicles` as CSV (atomically; refuses an existing file unless ``overwrite``)."""
    path = check_output_path(path, (".csv",), overwrite)
    missing = [name for name in COLUMNS if name not in table]
    if missing:
        raise InputError(f"{path}: the table lacks the column(s) {', '.join(missing)}.")
    n = len(table["label"])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(list(COLUMNS))
            for i in range(n):
                writer.writerow([_cell(table[name][i]) for name in COLUMNS])
    return path


def _cell(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    return "" if math.isnan(value) else f"{value:.6g}"
