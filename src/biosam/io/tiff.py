"""TIFF through tifffile: plain stacks, ImageJ hyperstacks, OME-TIFF, BigTIFF.

Axes and voxel size come from the ImageJ or OME metadata where present.
Uncompressed files are memory-mapped, so a large stack is read slice by slice.
Labels are written as ImageJ hyperstacks (``.tif``) or OME-TIFF (``.ome.tif``)
carrying the input's voxel size, so they open aligned in Fiji and napari.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile

from biosam.errors import InputError
from biosam.io.files import atomic_path, check_output_path, suffix_of
from biosam.io.meta import ImageMeta, label_dtype

SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff")

# tifffile axis codes -> ours. 'S' (samples) are colour channels; 'I' and 'Q'
# (image sequence, unknown) are how plain multi-page stacks come back.
_AXIS_CODES = {"T": "T", "C": "C", "S": "C", "Z": "Z", "Y": "Y", "X": "X", "I": "Z", "Q": "Z"}
_UNITS = {
    "micron": "micrometer", "um": "micrometer", "µm": "micrometer", "\\u00B5m": "micrometer", "micrometer": "micrometer",
    "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
    "Å": "angstrom", "A": "angstrom", "angstrom": "angstrom",
}
_IMAGEJ_UNITS = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm", "angstrom": "Å"}
_OME_UNITS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "angstrom": "Å"}


def _our_axes(codes: str, path: Path) -> str:
    mapped = "".join(_AXIS_CODES.get(c, "?") for c in codes)
    if "?" in mapped or len(set(mapped)) != len(mapped):
        raise InputError(
            f"{path}: cannot tell what the TIFF axes '{codes}' are; say it with --axes (letters from TCZYX, "
            "e.g. --axes ZYX or --axes YXC)."
        )
    return mapped


def _imagej_geometry(tif: tifffile.TiffFile, axes: str) -> tuple[dict[str, float], str | None]:
    meta = tif.imagej_metadata or {}
    page = tif.pages.first
    spacing: dict[str, float] = {}
    xres, yres = (page.resolution if page.resolution else (1.0, 1.0))
    if xres > 0 and yres > 0 and (xres, yres) != (1.0, 1.0):
        spacing["X"], spacing["Y"] = 1.0 / xres, 1.0 / yres
    if "Z" in axes and meta.get("spacing"):
        spacing["Z"] = float(meta["spacing"])
    unit = _UNITS.get(str(meta.get("unit", "")).strip())
    return spacing, unit if spacing else None


def _ome_geometry(tif: tifffile.TiffFile) -> tuple[dict[str, float], str | None, list[str] | None]:
    ome = tifffile.xml2dict(tif.ome_metadata).get("OME", {})
    image = ome.get("Image", {})
    pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
    spacing, unit = {}, None
    for axis in "XYZ":
        size = pixels.get(f"PhysicalSize{axis}")
        if size:
            spacing[axis] = float(size)
            unit = _UNITS.get(str(pixels.get(f"PhysicalSize{axis}Unit", "µm")), unit)
    channels = pixels.get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    names = [str(c.get("Name")) for c in channels if isinstance(c, dict) and c.get("Name")]
    return spacing, unit, names if names and len(names) == len(channels) else None


def read(path: str | os.PathLike, axes: str | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read the first image series of a TIFF file (memory-mapped when uncompressed)."""
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            found = _our_axes(series.axes, path) if axes is None else axes.upper()
            if tif.is_ome:
                spacing, unit, names = _ome_geometry(tif)
                kind = "ome-tiff"
            else:
                (spacing, unit), names = _imagej_geometry(tif, found), None
                kind = "imagej-tiff" if tif.is_imagej else "tiff"
            # dataoffset is set only for uncompressed, contiguous data: map it instead of loading it.
            data = tifffile.memmap(path, series=0, mode="r") if series.dataoffset is not None else series.asarray()
    except InputError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise InputError(
            f"{path}: cannot be read as TIFF ({type(exc).__name__}: {exc}). The file may be truncated or not a "
            "TIFF; re-export it."
        ) from exc
    if len(found) != data.ndim:
        raise InputError(f"{path}: --axes '{found}' has {len(found)} letters but the image has {data.ndim} dimensions {data.shape}.")
    if data.size == 0:
        raise InputError(f"{path}: the image is empty (shape {data.shape}).")
    meta = ImageMeta(str(path), kind, found, tuple(data.shape), data.dtype.str, spacing, unit, channel_names=names)
    return data, meta


def write_labels(
    path: str | os.PathLike, labels: np.ndarray, like: ImageMeta | None = None, overwrite: bool = False
) -> Path:
    """Write labels as an ImageJ hyperstack (``.tif``) or OME-TIFF (``.ome.tif``) with ``like``'s voxel size."""
    path = check_output_path(path, SUFFIXES, overwrite)
    labels = np.asarray(labels)
    axes = like.labels_meta().axes if like is not None else "ZYX"[-labels.ndim :]
    if like is not None and labels.shape != like.labels_meta().shape:
        raise InputError(f"{path}: labels of shape {labels.shape} do not fit the image's {like.labels_meta().shape}.")
    labels = labels.astype(label_dtype(int(labels.max()) if labels.size else 0), copy=False)
    spacing = like.spacing if like is not None else {}
    unit = like.unit if like is not None else None
    ome = suffix_of(path).startswith(".ome")
    imagej = not ome and labels.dtype != np.uint32 and set(axes) <= set("TZYX")
    kwargs: dict = {"compression": "zlib", "metadata": {"axes": axes}}
    if ome:
        kwargs["ome"] = True
        for axis, size in spacing.items():
            kwargs["metadata"][f"PhysicalSize{axis}"] = size
            if unit in _OME_UNITS:
                kwargs["metadata"][f"PhysicalSize{axis}Unit"] = _OME_UNITS[unit]
    elif imagej:
        kwargs["imagej"] = True
        if "Z" in spacing:
            kwargs["metadata"]["spacing"] = spacing["Z"]
        if unit in _IMAGEJ_UNITS:
            kwargs["metadata"]["unit"] = _IMAGEJ_UNITS[unit]
    if "X" in spacing and "Y" in spacing and not ome:
        kwargs["resolution"] = (1.0 / spacing["X"], 1.0 / spacing["Y"])
    kwargs["bigtiff"] = labels.nbytes > 2**32 - 2**26 and not imagej
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels, **kwargs)
    return path
