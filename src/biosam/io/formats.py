"""One entry point for every format: pick the module by path, read, write labels.

Format modules are imported only when used, so reading a PNG never imports
copick or ome-zarr.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from biosam.errors import InputError
from biosam.io.files import suffix_of
from biosam.io.meta import ImageMeta

COPICK_PREFIX = "copick://"
_MODULES = {
    "tiff": "biosam.io.tiff",
    "image": "biosam.io.images",
    "mrc": "biosam.io.mrc",
    "nifti": "biosam.io.nifti",
    "dicom": "biosam.io.dicom",
    "zarr": "biosam.io.zarr_store",
    "copick": "biosam.io.copick_project",
}
_SUFFIXES = {
    "tiff": (".tif", ".tiff", ".ome.tif", ".ome.tiff"),
    "image": (".png", ".jpg", ".jpeg"),
    "mrc": (".mrc", ".rec", ".map", ".st", ".ali"),
    "nifti": (".nii", ".nii.gz"),
    "dicom": (".dcm", ".dicom"),
    "zarr": (".zarr", ".ome.zarr"),
}
READ_SUFFIXES = tuple(s for group in _SUFFIXES.values() for s in group)
WRITE_SUFFIXES = tuple(s for k, group in _SUFFIXES.items() if k != "dicom" for s in group if s not in (".jpg", ".jpeg"))


def _is_zarr_folder(path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zattrs", ".zgroup", ".zarray"))


def _is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def format_of(path: str | os.PathLike, for_writing: bool = False) -> str:
    """The format key of ``path`` (a file, a folder, or a ``copick://`` address)."""
    text = str(path)
    if text.startswith(COPICK_PREFIX):
        return "copick"
    path = Path(path)
    if path.parent.name == "labels" and suffix_of(path.parent.parent) in _SUFFIXES["zarr"]:
        return "zarr"  # <image>.zarr/labels/<name>: an NGFF label image inside the image
    suffix = suffix_of(path)
    for key, suffixes in _SUFFIXES.items():
        if suffix in suffixes:
            return key
    if not for_writing and path.is_dir():
        return "zarr" if _is_zarr_folder(path) else "dicom"
    if not for_writing and path.is_file() and _is_dicom_file(path):
        return "dicom"
    known = WRITE_SUFFIXES if for_writing else READ_SUFFIXES + (" a DICOM folder", " copick://config.json?run=...")
    raise InputError(
        f"{path}: unsupported file type '{suffix or '(none)'}'. biosam "
        f"{'writes' if for_writing else 'reads'} {', '.join(known)}; convert the data to one of these."
    )


def _module(key: str) -> ModuleType:
    return importlib.import_module(_MODULES[key])


def read_image(path: str | os.PathLike, **options: Any) -> tuple[Any, ImageMeta]:
    """Read any supported image, volume, series or copick tomogram.

    Returns the pixel array (NumPy, or a lazy memory-mapped / Zarr array for big
    data that supports NumPy slicing) and its :class:`ImageMeta`. ``options``
    are format-specific (``axes=`` for TIFF and Zarr, ``level=`` for OME-Zarr,
    ``series_uid=`` for DICOM folders, ``run=`` ... for copick); ``None`` values
    are ignored.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if not str(path).startswith(COPICK_PREFIX) and not Path(path).exists():
        raise InputError(f"{path}: file not found. Check the path and spelling.")
    key = format_of(path)
    reader = _module(key).read
    accepted = inspect.signature(reader).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise InputError(f"{path}: option(s) {', '.join(unknown)} do not apply to {key.upper()} data.")
    return reader(path, **options)


def check_labels_output(path: str | os.PathLike, like: ImageMeta | None, overwrite: bool) -> None:
    """Refuse an output before any work: unknown type, wrong dimensionality, or an existing file."""
    key = format_of(path, for_writing=True)
    if key == "dicom":
        raise InputError(f"{path}: biosam does not write DICOM; write the labels as .nii.gz (same geometry).")
    ndim = len(like.labels_meta().axes) if like is not None else 2
    if key == "image" and (ndim != 2 or suffix_of(path) != ".png"):
        raise InputError(f"{path}: PNG holds 2D labels only (JPEG none); write .tif, .nii.gz, .mrc or .zarr.")
    if key != "copick" and Path(path).exists() and not overwrite:
        raise InputError(f"{path}: already exists. Choose another name or pass --overwrite to replace it.")


def write_labels(
    path: str | os.PathLike, labels: Any, like: ImageMeta | None = None, overwrite: bool = False
) -> Path | str:
    """Write a label image in the format of ``path``'s extension with ``like``'s geometry."""
    check_labels_output(path, like, overwrite)
    return _module(format_of(path, for_writing=True)).write_labels(path, labels, like=like, overwrite=overwrite)


@contextlib.contextmanager
def open_labels(path: str | os.PathLike, like: ImageMeta, dtype: Any, overwrite: bool = False) -> Iterator[Any]:
    """A writable label array of ``like``'s shape (minus channels), saved to ``path`` on success.

    MRC and Zarr outputs are written to disk as they fill (memory stays flat for
    big volumes); other formats are kept in memory and written at the end. On an
    error nothing is left behind.
    """
    check_labels_output(path, like, overwrite)
    module = _module(format_of(path, for_writing=True))
    if hasattr(module, "open_labels"):
        with module.open_labels(path, like, dtype, overwrite=overwrite) as array:
            yield array
        return
    array = np.zeros(like.labels_meta().shape, dtype=dtype)
    yield array
    module.write_labels(path, array, like=like, overwrite=overwrite)
