"""DICOM through pydicom: one file, or a folder holding a series of slices.

Slices are ordered by their position along the slice normal and checked for a
consistent size, orientation, pixel spacing and slice spacing. Stored values
are converted with RescaleSlope/RescaleIntercept (Hounsfield units for CT).
The affine maps (z, y, x) indices to RAS+ mm (DICOM's patient space is LPS).
biosam does not write DICOM: labels for a series go to NIfTI
(:func:`biosam.io.nifti.write_labels` with the series' metadata as ``like``).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from biosam.errors import InputError
from biosam.io.meta import ImageMeta

log = logging.getLogger(__name__)

SUFFIXES = (".dcm", ".dicom")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SAME = 1e-4  # direction cosines and pixel spacings that differ less than this are equal
_DUPLICATE_MM = 1e-3  # slices closer than this along the normal are the same position
_GAP_TOLERANCE = 0.01  # a slice gap may differ from the usual spacing by this fraction


def _dcmread(file: Path, where: Path, header_only: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(file, stop_before_pixels=header_only)
    except InvalidDicomError:
        raise
    except Exception as exc:  # pydicom raises many types for damaged files
        raise InputError(
            f"{where}: {file.name} is a damaged DICOM file ({type(exc).__name__}: {exc}); remove it or re-export "
            "the series."
        ) from exc


def _pixels(file: Path, where: Path) -> tuple[np.ndarray, Dataset]:
    ds = _dcmread(file, where)
    try:
        return ds.pixel_array, ds
    except Exception as exc:  # truncated pixel data, or a compression without its decoder installed
        raise InputError(f"{where}: cannot decode the pixels of {file.name} ({type(exc).__name__}: {exc}).") from exc


def _rescale(raw: np.ndarray, datasets: list[Dataset]) -> np.ndarray:
    """Stored values of a stack (one slice per dataset) -> modality values (HU for CT).

    Unchanged without rescaling, int16 for an integral shift that fits, float32 otherwise.
    """
    slopes = [float(ds.get("RescaleSlope") or 1.0) for ds in datasets]
    inters = [float(ds.get("RescaleIntercept") or 0.0) for ds in datasets]
    if all(s == 1 for s in slopes) and all(i == 0 for i in inters):
        return raw
    if all(s == 1 for s in slopes) and all(i == round(i) for i in inters):
        low, high = int(raw.min()) + min(inters), int(raw.max()) + max(inters)
        if np.iinfo(np.int16).min <= low and high <= np.iinfo(np.int16).max:
            return np.stack([(r.astype(np.int32) + int(i)).astype(np.int16) for r, i in zip(raw, inters)])
    # float64 like pydicom's apply_rescale, then float32: HU need no more precision.
    return np.stack([(r * s + i).astype(np.float32) for r, s, i in zip(raw, slopes, inters)])


def _vector(ds: Dataset, tag: str, file: Path, where: Path) -> np.ndarray:
    if tag not in ds or ds.get(tag) is None:
        raise InputError(f"{where}: {file.name} has no {tag}, so its slice cannot be placed in 3D.")
    return np.asarray([float(v) for v in ds.get(tag)], dtype=np.float64)


def _affine(orientation: np.ndarray, pixel_spacing: np.ndarray, first: np.ndarray, step: np.ndarray) -> np.ndarray:
    """(z, y, x) indices -> RAS+ mm; ``step`` is the move from one slice to the next (LPS)."""
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = orientation[3:] * pixel_spacing[0]  # down a column: row index, spacing between rows
    lps[:3, 2] = orientation[:3] * pixel_spacing[1]  # along a row: column index
    lps[:3, 3] = first
    return _LPS_TO_RAS @ lps


def _read_file(path: Path) -> tuple[np.ndarray, ImageMeta]:
    try:
        raw, ds = _pixels(path, path.parent)
    except InvalidDicomError as exc:
        raise InputError(
            f"{path}: not a DICOM file (no DICOM file header); point to a .dcm file or a series folder."
        ) from exc
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = raw.ndim - (2 if samples == 1 else 3)  # 1 for a multi-frame file
    axes = "Z" * frames + "YX" + "C" * (samples > 1)
    if samples > 1:
        data = raw  # colour images carry no rescale
    else:
        stack = raw.reshape(-1, *raw.shape[-2:])
        data = _rescale(stack, [ds] * len(stack)).reshape(raw.shape)
    spacing, affine = {}, None
    if "PixelSpacing" in ds:
        spacing = {"Y": float(ds.PixelSpacing[0]), "X": float(ds.PixelSpacing[1])}
        if "ImageOrientationPatient" in ds and "ImagePositionPatient" in ds and not frames:
            orientation = _vector(ds, "ImageOrientationPatient", path, path.parent)
            thickness = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
            normal = np.cross(orientation[:3], orientation[3:])
            affine = _affine(orientation, np.array([spacing["Y"], spacing["X"]]),
                             _vector(ds, "ImagePositionPatient", path, path.parent), normal * thickness)
    meta = ImageMeta(
        str(path), "dicom", axes, tuple(data.shape), data.dtype.str, spacing, "millimeter" if spacing else None,
        affine=affine, extra={"series_uid": str(ds.get("SeriesInstanceUID", "")) or None, "files": [str(path)],
                              "modality": ds.get("Modality")},
    )
    return data, meta


def _pick_series(folder: Path, found: dict[str, list[tuple[Path, Dataset]]], series_uid: str | None) -> str:
    def listing() -> str:
        return "; ".join(
            f"{uid} ({len(items)} files, {items[0][1].get('Modality', '?')} "
            f"'{items[0][1].get('SeriesDescription', '')}')" for uid, items in found.items()
        )

    if series_uid is not None:
        if series_uid not in found:
            raise InputError(f"{folder}: no series with SeriesInstanceUID {series_uid}; the folder holds: {listing()}.")
        return series_uid
    if len(found) > 1:
        raise InputError(
            f"{folder}: holds {len(found)} DICOM series: {listing()}. Choose one with --series UID (series_uid= in Python), or move "
            "each series to its own folder."
        )
    return next(iter(found))


def _read_series(folder: Path, series_uid: str | None) -> tuple[np.ndarray, ImageMeta]:
    found: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = _dcmread(file, folder, header_only=True)
        except InvalidDicomError:
            log.debug("%s: skipping %s, not a DICOM file", folder, file.name)
            continue
        if "Rows" not in ds or "SeriesInstanceUID" not in ds:
            log.info("%s: skipping %s, a DICOM file without an image", folder, file.name)
            continue
        found[str(ds.SeriesInstanceUID)].append((file, ds))
    if not found:
        raise InputError(
            f"{folder}: no DICOM images found in this folder. Point to the folder holding the series' files."
        )
    uid = _pick_series(folder, found, series_uid)
    items = found[uid]
    if len(items) == 1:
        return _read_file(items[0][0])

    first_file, first = items[0]
    orientation = _vector(first, "ImageOrientationPatient", first_file, folder)
    pixel_spacing = _vector(first, "PixelSpacing", first_file, folder)
    for file, ds in items:
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise InputError(f"{folder}: {file.name} is {ds.Rows}x{ds.Columns} pixels but {first_file.name} is "
                             f"{first.Rows}x{first.Columns}; a series needs slices of one size.")
        if not np.allclose(_vector(ds, "ImageOrientationPatient", file, folder), orientation, atol=_SAME):
            raise InputError(f"{folder}: {file.name} is oriented differently from {first_file.name} "
                             "(ImageOrientationPatient); the folder may mix localizer and axial slices.")
        if not np.allclose(_vector(ds, "PixelSpacing", file, folder), pixel_spacing, atol=_SAME):
            raise InputError(f"{folder}: {file.name} has a different PixelSpacing from {first_file.name}.")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([_vector(ds, "ImagePositionPatient", file, folder) for file, ds in items])
    order = np.argsort(positions @ normal, kind="stable")
    items, positions = [items[i] for i in order], positions[order]
    gaps = np.diff(positions @ normal)
    for n, gap in enumerate(gaps):
        if gap < _DUPLICATE_MM:
            raise InputError(f"{folder}: {items[n][0].name} and {items[n + 1][0].name} are at the same position; "
                             "remove duplicates or split the acquisitions into separate folders.")
    spacing_z = float(np.median(gaps))
    for n, gap in enumerate(gaps):
        if abs(gap - spacing_z) > _GAP_TOLERANCE * spacing_z:
            raise InputError(
                f"{folder}: slices are not evenly spaced: {gap:.3f} mm between {items[n][0].name} and "
                f"{items[n + 1][0].name}, where the others are {spacing_z:.3f} mm apart (a missing slice?). "
                "Re-export the complete series."
            )
    step = (positions[-1] - positions[0]) / (len(items) - 1)
    if np.linalg.norm(np.cross(step, normal)) > _GAP_TOLERANCE * spacing_z:
        log.warning("%s: slices are sheared (gantry tilt?); the affine keeps the shear.", folder)

    raws, datasets = [], []
    for file, _ in items:
        raw, ds = _pixels(file, folder)
        if raw.shape != (first.Rows, first.Columns):
            raise InputError(f"{folder}: {file.name} holds pixels of shape {raw.shape}, not one "
                             f"{first.Rows}x{first.Columns} slice.")
        raws.append(raw)
        datasets.append(ds)
    data = _rescale(np.stack(raws), datasets)
    meta = ImageMeta(
        str(folder), "dicom", "ZYX", tuple(data.shape), data.dtype.str,
        {"Z": spacing_z, "Y": float(pixel_spacing[0]), "X": float(pixel_spacing[1])}, "millimeter",
        affine=_affine(orientation, pixel_spacing, positions[0], step),
        extra={"series_uid": uid, "files": [str(file) for file, _ in items], "modality": first.get("Modality")},
    )
    return data, meta


def read(path: str | os.PathLike, series_uid: str | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read a DICOM file (``YX``) or a folder holding one series (``ZYX``; pick one with ``series_uid``)."""
    path = Path(path)
    if path.is_dir():
        return _read_series(path, series_uid)
    if not path.is_file():
        raise InputError(f"{path}: file or folder not found. Check the path and spelling.")
    return _read_file(path)


def write_labels(
    path: str | os.PathLike, labels: Any, like: ImageMeta | None = None, overwrite: bool = False
) -> Path:
    """Refuse: DICOM output is not supported; labels for a DICOM image go to NIfTI."""
    raise InputError(
        f"{path}: biosam does not write DICOM. Write the labels as .nii.gz instead: they keep the series' position "
        "and orientation and open aligned with it in 3D Slicer and ITK-SNAP."
    )
