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
from biosam.io.files import check_output_path, suffix_of
from biosam.io.meta import ImageMeta
from biosam.io.tiff import DEFAULT_COMPRESSION, tiff_compression

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

    Returns the pixel array (NumPy, or for big data a lazy memory-mapped, Zarr or
    page-by-page TIFF array that supports NumPy slicing) and its :class:`ImageMeta`. ``options``
    are format-specific (``axes=`` for TIFF and Zarr, ``level=`` for OME-Zarr,
    ``series_uid=`` for DICOM folders, ``run=`` ... for copick); ``None`` values
    are ignored.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if not str(path).startswith(COPICK_PREFIX) and not Path(path).exists():
        raise InputError(f"{path}: file not found. Check the path and spelling.")
    if Path(path).is_file() and Path(path).stat().st_size == 0:  # one message for every format
        from biosam.io.magic import empty_message

        raise InputError(empty_message(path))
    key = format_of(path)
    reader = _module(key).read
    accepted = inspect.signature(reader).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise InputError(f"{path}: option(s) {', '.join(unknown)} do not apply to {key.upper()} data.")
    return reader(path, **options)


def check_labels_output(
    path: str | os.PathLike, like: ImageMeta | None, overwrite: bool, compression: str | None = DEFAULT_COMPRESSION
) -> None:
    """Refuse an output before any work: unknown type, wrong dimensionality, an existing file, the input itself,
    a place that cannot be written (see :func:`biosam.io.files.check_output_path`), or a ``compression`` that
    does not apply (see :func:`write_labels`)."""
    key = format_of(path, for_writing=True)
    _check_compression(path, key, compression)
    if key == "dicom":
        raise InputError(f"{path}: biosam does not write DICOM; write the labels as .nii.gz (same geometry).")
    ndim = len(like.labels_meta().axes) if like is not None else 2
    if key == "image" and suffix_of(path) != ".png":
        raise InputError(f"{path}: JPEG is lossy, so it cannot hold labels (it would change their values); write "
                         "the labels as .png or .tif.")
    if key == "image" and ndim != 2:
        raise InputError(f"{path}: PNG holds 2D labels only, and these have axes {like.labels_meta().axes}; write "
                         ".tif, .nii.gz, .mrc or .zarr.")
    if key != "copick":  # the type was checked above; a Zarr store is a folder
        check_output_path(path, None, overwrite, source=like.path if like is not None else None, folder=key == "zarr")


def _check_compression(path: str | os.PathLike, key: str, compression: str | None) -> None:
    if key == "tiff":
        tiff_compression(compression, path)
    elif (compression or "none").lower() != DEFAULT_COMPRESSION:
        raise InputError(f"{path}: --compression {compression or 'none'} applies to TIFF labels only; {key.upper()} "
                         "outputs are stored the way that format defines. Leave --compression out or write a .tif.")


def _writer_options(path: str | os.PathLike, compression: str | None) -> dict[str, Any]:
    return {"compression": compression} if format_of(path, for_writing=True) == "tiff" else {}


def write_labels(
    path: str | os.PathLike,
    labels: Any,
    like: ImageMeta | None = None,
    overwrite: bool = False,
    compression: str | None = DEFAULT_COMPRESSION,
) -> Path | str:
    """Write a label image in the format of ``path``'s extension with ``like``'s geometry.

    ``compression`` applies to TIFF (one of :data:`biosam.io.tiff.COMPRESSIONS`, all lossless; ``None`` or
    "none" writes uncompressed). Other formats keep their own storage and refuse any value but the default.
    """
    check_labels_output(path, like, overwrite, compression)
    return _module(format_of(path, for_writing=True)).write_labels(path, labels, like=like, overwrite=overwrite,
                                                                   **_writer_options(path, compression))


@contextlib.contextmanager
def open_labels(
    path: str | os.PathLike,
    like: ImageMeta,
    dtype: Any,
    overwrite: bool = False,
    compression: str | None = DEFAULT_COMPRESSION,
) -> Iterator[Any]:
    """A writable label array of ``like``'s shape (minus channels), saved to ``path`` on success.

    MRC and Zarr outputs are written to disk as they fill (memory stays flat for
    big volumes); other formats are kept in memory and written at the end. On an
    error nothing is left behind. ``compression`` is as in :func:`write_labels`.
    """
    check_labels_output(path, like, overwrite, compression)
    module = _module(format_of(path, for_writing=True))
    if hasattr(module, "open_labels"):
        with module.open_labels(path, like, dtype, overwrite=overwrite, **_writer_options(path, compression)) as array:
            yield array
        return
    array = np.zeros(like.labels_meta().shape, dtype=dtype)
    yield array
    module.write_labels(path, array, like=like, overwrite=overwrite, **_writer_options(path, compression))
