"""2D image files: TIFF through tifffile, PNG and JPEG through imageio.

Writes are atomic: data goes to a temporary file beside the target and is renamed
into place only once complete, so an interrupted or failed run never leaves a
truncated result, and an existing file is only replaced when asked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

from biosam.errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = TIFF_SUFFIXES + (".png",)


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF, PNG or JPEG file into a NumPy array (pixel values unchanged)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found. Check the path and spelling.")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an image file ({', '.join(IMAGE_SUFFIXES)}).")
    suffix = _suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(
            f"{path}: unsupported file type '{suffix or '(none)'}'. "
            f"biosam reads {', '.join(IMAGE_SUFFIXES)}; convert the image to one of these."
        )
    try:
        if suffix in TIFF_SUFFIXES:
            image = tifffile.imread(path)
        else:
            image = iio.imread(path)
    except Exception as exc:  # the libraries raise many types for broken files
        raise InputError(
            f"{path}: cannot be read as {suffix[1:].upper()} ({type(exc).__name__}: {exc}). "
            "The file may be truncated or not really of that type; re-export it."
        ) from exc
    image = np.asarray(image)
    if image.size == 0:
        raise InputError(f"{path}: the image is empty (shape {image.shape}).")
    return image


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...], overwrite: bool) -> Path:
    """Validate an output path before any work is done.

    Raises :class:`InputError` for an unsupported extension or an existing file
    (unless ``overwrite``).
    """
    path = Path(path)
    if _suffix(path) not in suffixes:
        raise InputError(
            f"{path}: unsupported output type '{path.suffix or '(none)'}'; use one of {', '.join(suffixes)}."
        )
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists. Choose another name or pass --overwrite to replace it.")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file name.")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _label_dtype(labels: np.ndarray) -> np.dtype:
    top = int(labels.max()) if labels.size else 0
    if top <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if top <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def write_labels(path: str | os.PathLike, labels: np.ndarray, overwrite: bool = False) -> Path:
    """Write an integer label image as TIFF or PNG (the smallest unsigned type that fits).

    PNG holds at most 16 bits; a label image with more than 65535 objects needs TIFF.
    """
    path = check_output_path(path, LABEL_SUFFIXES, overwrite)
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise InputError(f"{path}: labels must be a 2D array of non-negative integers, got {labels.dtype} {labels.shape}.")
    labels = labels.astype(_label_dtype(labels), copy=False)
    if _suffix(path) == ".png" and labels.dtype == np.uint32:
        raise InputError(f"{path}: {int(labels.max())} labels do not fit in a PNG; write a .tif instead.")
    write_image(path, labels, overwrite=overwrite)
    return path


def write_image(path: str | os.PathLike, image: np.ndarray, overwrite: bool = False) -> Path:
    """Write an image atomically; the format follows the extension."""
    path = check_output_path(path, IMAGE_SUFFIXES, overwrite)
    with atomic_path(path) as tmp:
        if _suffix(path) in TIFF_SUFFIXES:
            tifffile.imwrite(tmp, image, compression="zlib")
        else:
            iio.imwrite(tmp, image, extension=_suffix(path))
    return path
