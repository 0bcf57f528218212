"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel.

nibabel indexes voxels (i, j, k[, t]); biosam arrays are (k, j, i) = ZYX (or
TZYX), so data are transposed on read and back on write. Uncompressed files
stay memory-mapped unless the header asks for intensity scaling. Labels are
written with the input's header (affine, qform/sform codes, units) or, for a
DICOM series, from its affine, so they open aligned in ITK-SNAP and 3D Slicer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from biosam.errors import InputError
from biosam.io.files import atomic_path, check_output_path
from biosam.io.meta import ImageMeta, unit_factor
from biosam.labels import label_dtype
from biosam.io.mrc import check_labels

SUFFIXES = (".nii", ".nii.gz")

_AXES = {2: "YX", 3: "ZYX", 4: "TZYX"}
# NIfTI xyz unit -> (our unit, factor to it, factor to mm for the affine). 'unknown' is read as mm,
# as ITK-SNAP and Slicer do.
_UNITS = {"mm": ("millimeter", 1.0, 1.0), "micron": ("micrometer", 1.0, 1e-3), "meter": ("millimeter", 1e3, 1e3)}
# Our unit -> NIfTI unit, for labels of an image that has spacing but no affine (smaller units as micron).
_NIFTI_UNITS = {"millimeter": ("mm", "millimeter"), "micrometer": ("micron", "micrometer"),
                "nanometer": ("micron", "micrometer"), "angstrom": ("micron", "micrometer")}


def swap_ijk(affine: Any) -> np.ndarray:
    """Reorder a 4x4 affine's columns between index orders (i, j, k) and (z, y, x) = (k, j, i).

    The swap is its own inverse.
    """
    return np.asarray(affine, dtype=np.float64)[:, [2, 1, 0, 3]]


def read(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read a NIfTI image as ``YX``, ``ZYX`` or ``TZYX`` with values scaled as nibabel scales them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found. Check the path and spelling.")
    try:
        img = nib.load(path)
        # A memmap when the file is uncompressed and unscaled; scl_slope/inter applied otherwise.
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(
            f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc}). The file may be truncated or not "
            "NIfTI; check it with nibabel's nib-ls and re-export it."
        ) from exc
    if data.ndim not in _AXES or data.size == 0:
        raise InputError(f"{path}: cannot use a NIfTI image of shape {data.shape}; biosam reads 2D, 3D and 3D+time.")
    data = data.T  # (i, j, k[, t]) -> ([t,] k, j, i)
    header = img.header
    unit, scale, to_mm = _UNITS.get(header.get_xyzt_units()[0], _UNITS["mm"])
    zooms = header.get_zooms()
    spatial = [a for a in _AXES[data.ndim] if a != "T"]
    spacing = {a: float(zooms["XYZ".index(a)]) * scale for a in spatial}
    affine = swap_ijk(img.affine)
    affine[:3] *= to_mm
    meta = ImageMeta(
        str(path), "nifti", _AXES[data.ndim], tuple(data.shape), data.dtype.str, spacing, unit,
        affine=affine, extra={"header": header.copy()},
    )
    return data, meta


def _affine_from_spacing(like: ImageMeta | None) -> tuple[np.ndarray, str]:
    # An image without an affine (TIFF, MRC, Zarr): axis-aligned voxels of its size, in a NIfTI unit.
    spacing = like.spacing if like is not None else {}
    origin = like.origin if like is not None else {}
    ours = like.unit if like is not None else None
    unit, as_unit = _NIFTI_UNITS.get(ours, ("unknown", None))
    scale = unit_factor(ours, as_unit) if as_unit else 1.0
    affine = np.diag([spacing.get(a, 1.0) * scale for a in "XYZ"] + [1.0])
    affine[:3, 3] = [origin.get(a, 0.0) * scale for a in "XYZ"]
    return affine, unit


def write_labels(
    path: str | os.PathLike, labels: Any, like: ImageMeta | None = None, overwrite: bool = False
) -> Path:
    """Write labels as NIfTI with ``like``'s header or affine (a DICOM series' affine works too)."""
    path = check_output_path(path, SUFFIXES, overwrite, source=like.path if like is not None else None)
    labels = check_labels(path, labels, like)
    top = int(labels.max()) if labels.size else 0
    data = labels.astype(label_dtype(top), copy=False).T  # ([t,] z, y, x) -> (i, j, k[, t])
    header = like.extra.get("header") if like is not None else None
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header derives from it
        image_type = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        # affine=None keeps the header's qform and sform (matrices and codes) exactly as read.
        img = image_type(data, None, header=header)
    else:
        if like is not None and like.affine is not None:
            affine, unit, code = swap_ijk(like.affine), "mm", "scanner"
        else:
            (affine, unit), code = _affine_from_spacing(like), "aligned"
        img = nib.Nifti1Image(data, affine)
        # Both forms: readers differ in which one they trust.
        img.set_sform(affine, code=code)
        img.set_qform(affine, code=code)
        img.header.set_xyzt_units(xyz=unit)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(None, None)  # labels are stored as they are, never scaled
    img.header.set_intent("label")
    img.header["cal_min"], img.header["cal_max"] = 0, top
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
