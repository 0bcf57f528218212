"""PNG and JPEG through imageio (2D only; no geometry)."""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from biosam.errors import InputError
from biosam.io.files import atomic_path, check_output_path, suffix_of
from biosam.io.magic import empty_message, sniff, wrong_type_message
from biosam.io.meta import ImageMeta
from biosam.labels import label_dtype

SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".png",)


def read(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read a PNG or JPEG file (pixel values unchanged)."""
    path = Path(path)
    try:
        image = np.asarray(iio.imread(path))
    except Exception as exc:  # imageio raises many types for broken files
        raise InputError(_unreadable(path, exc)) from exc
    if image.size == 0 or image.ndim not in (2, 3):
        raise InputError(f"{path}: not a 2D image (shape {image.shape}).")
    kind = "png" if suffix_of(path) == ".png" else "jpeg"
    return image, ImageMeta(str(path), kind, "YX" if image.ndim == 2 else "YXC", image.shape, image.dtype.str)


def _unreadable(path: Path, exc: Exception) -> str:
    """Why imageio could not read ``path``: empty, another type of file, or a damaged PNG/JPEG.

    imageio's own advice (plugins to install, e.g. pyav) is left out: it is about
    codecs for video files, never what a broken PNG or JPEG needs.
    """
    expected = suffix_of(path)[1:].upper()
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"{path}: cannot be opened ({err.strerror or err}). Check its permissions."
    if size == 0:
        return empty_message(path)
    kind = sniff(path)
    if kind is None or kind.suffix not in SUFFIXES:
        return wrong_type_message(path, expected)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    reason = lines[0].strip() if lines else ""
    if "backend" in reason or "plugin" in reason:  # imageio found no reader: not a valid file of this type
        reason = "no reader recognises its content"
    return (f"{path}: cannot be read as {expected} ({type(exc).__name__}: {reason}). The file may be truncated or "
            "damaged; re-export it.")


def write_labels(
    path: str | os.PathLike, labels: np.ndarray, like: ImageMeta | None = None, overwrite: bool = False
) -> Path:
    """Write a 2D label image as PNG (8 or 16 bit)."""
    path = check_output_path(path, LABEL_SUFFIXES, overwrite, source=like.path if like is not None else None)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputError(f"{path}: PNG holds a 2D label image, these labels are {labels.shape}; write .tif, .nii.gz, .mrc or .zarr.")
    top = int(labels.max()) if labels.size else 0
    if top > np.iinfo(np.uint16).max:
        raise InputError(f"{path}: {top} labels do not fit in a PNG; write a .tif instead.")
    write_image(path, labels.astype(label_dtype(top), copy=False), overwrite=overwrite)
    return path


def write_image(path: str | os.PathLike, image: np.ndarray, overwrite: bool = False) -> Path:
    """Write a picture (overlay, plot) atomically as PNG or JPEG."""
    path = check_output_path(path, SUFFIXES, overwrite)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image, extension=suffix_of(path))
    return path
