"""Safe output files: validated before work starts, replaced only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from biosam.errors import InputError


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case extension, with the double extensions biosam knows (``.nii.gz``, ``.ome.tif``, ``.ome.zarr``)."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...], overwrite: bool) -> Path:
    """Validate an output path before any work is done.

    Raises :class:`InputError` for an unsupported extension or an existing file
    or folder (unless ``overwrite``).
    """
    path = Path(path)
    if suffix_of(path) not in suffixes:
        raise InputError(f"{path}: unsupported output type '{suffix_of(path) or '(none)'}'; use one of {', '.join(suffixes)}.")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists. Choose another name or pass --overwrite to replace it.")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` that replaces it only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix_of(path), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that replaces it only on success (Zarr stores)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp_path
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
