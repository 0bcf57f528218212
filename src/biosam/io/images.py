"""PNG and JPEG through imageio (2D only; no geometry)."""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from biosam.errors import InputError
from biosam.io.files import atomic_path, check_output_path, suffix_of
from biosam.io.meta import ImageMeta, label_dtype

SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".png",)


def read(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read a PNG or JPEG file (pixel values unchanged)."""
    path = Path(path)
    try:
        image = np.asarray(iio.imread(path))
    except Exception as exc:  # imageio raises many types for broken files
        raise InputError(
            f"{path}: cannot be read as {suffix_of(path)[1:].upper()} ({type(exc).__name__}: {exc}). "
            "The file may be truncated or not really of that type; re-export it."
        ) from exc
    if image.size == 0 or image.ndim not in (2, 3):
        raise InputError(f"{path}: not a 2D image (shape {image.shape}).")
    kind = "png" if suffix_of(path) == ".png" else "jpeg"
    return image, ImageMeta(str(path), kind, "YX" if image.ndim == 2 else "YXC", image.shape, image.dtype.str)


def write_labels(
    path: str | os.PathLike, labels: np.ndarray, like: ImageMeta | None = None, overwrite: bool = False
) -> Path:
    """Write a 2D label image as PNG (8 or 16 bit)."""
    path = check_output_path(path, LABEL_SUFFIXES, overwrite)
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
