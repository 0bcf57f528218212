"""MRC / CCP4 maps, tomograms and tilt series through mrcfile.

The data block is memory-mapped (``mrcfile.mmap``), so a multi-GB tomogram is
read slice by slice. Voxel size and origin are reported in Å, as stored.
Labels are written as MRC mode 6 (uint16) with the input's voxel size, origin
and start indices, so they overlay the map in IMOD, ChimeraX and napari;
:func:`open_labels` streams them section by section into a memory-mapped file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
from mrcfile.mrcmemmap import MrcMemmap

from biosam.errors import InputError
from biosam.io.files import atomic_path, check_output_path
from biosam.io.meta import ImageMeta, label_dtype

log = logging.getLogger(__name__)

SUFFIXES = (".mrc", ".rec", ".map", ".st", ".ali")

_AXES = {2: "YX", 3: "ZYX", 4: "TZYX"}  # 4D = a volume stack (space group 401)
# Another reader's spacing/origin -> Å, the unit of the MRC header.
_TO_ANGSTROM = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4, "millimeter": 1e7}
# Header fields that place the data in space; copied verbatim from an MRC input so the
# labels' voxel size (cella / mx...), origin and start indices are bit-identical to it.
_GEOMETRY_FIELDS = (
    "mx", "my", "mz", "cella", "origin", "nxstart", "nystart", "nzstart", "mapc", "mapr", "maps", "ispg",
)


def check_labels(path: Path, labels: Any, like: ImageMeta | None) -> np.ndarray:
    """Return ``labels`` as an array of non-negative integers shaped like ``like``'s label image.

    Shared by the label writers of the volume formats; raises :class:`InputError` naming ``path``.
    """
    labels = np.asarray(labels)
    if like is not None and labels.shape != like.labels_meta().shape:
        raise InputError(f"{path}: labels of shape {labels.shape} do not fit the image's {like.labels_meta().shape}.")
    if labels.dtype.kind not in "biu":
        raise InputError(f"{path}: labels must be integers, got {labels.dtype}; convert them with labels.astype(int).")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise InputError(f"{path}: labels must be >= 0, got {labels.min()}.")
    return labels


def _decimal(value: Any) -> float:
    # The header holds float32: report 11.4, not 11.399999618530273 (it converts back to the same float32).
    return float(str(np.float32(value)))


def read(path: str | os.PathLike) -> tuple[np.memmap, ImageMeta]:
    """Memory-map an MRC file; a single section (nz = 1) comes back as ``YX``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found. Check the path and spelling.")
    try:
        mrc = mrcfile.mmap(path, mode="r", permissive=False)
    except Exception as exc:  # mrcfile reports bad headers and short files as ValueError, OSError for others
        raise InputError(
            f"{path}: not a valid MRC file: {exc}. The file may be truncated or not MRC; check it with "
            f"mrcfile.validate('{path}') and re-export it."
        ) from exc
    data = mrc.data
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim not in _AXES or data.size == 0:
        mrc.close()
        raise InputError(f"{path}: cannot use an MRC data block of shape {data.shape}.")
    header = mrc.header
    axes = _AXES[data.ndim]
    spatial = [a for a in axes if a != "T"]
    spacing = {a: _decimal(mrc.voxel_size[a.lower()]) for a in spatial}
    spacing = spacing if min(spacing.values()) > 0 else {}  # cella 0 = voxel size not recorded
    origin = {a: _decimal(header.origin[a.lower()]) for a in spatial}
    geometry = {name: header[name].tolist() for name in _GEOMETRY_FIELDS}
    if (geometry["mapc"], geometry["mapr"], geometry["maps"]) != (1, 2, 3):
        log.warning("%s: axis order mapc/mapr/maps = %s/%s/%s, not X/Y/Z; axes are reported as stored.",
                    path, geometry["mapc"], geometry["mapr"], geometry["maps"])
    meta = ImageMeta(
        str(path), "mrc", axes, tuple(data.shape), data.dtype.str, spacing, "angstrom" if spacing else None, origin,
        # The memmap stays valid on its own, but keeping the MrcMemmap open ties the file's
        # lifetime to the metadata and lets a caller close it explicitly.
        extra={"nstart": {"X": geometry["nxstart"], "Y": geometry["nystart"], "Z": geometry["nzstart"]},
               "mrc_geometry": geometry, "_handle": mrc},
    )
    return data, meta


def _set_geometry(mrc: MrcMemmap, like: ImageMeta | None) -> None:
    header = mrc.header
    if like is not None and "mrc_geometry" in like.extra:
        for name, value in like.extra["mrc_geometry"].items():
            header[name] = value
        return
    scale = _TO_ANGSTROM.get(like.unit, 1.0) if like is not None and like.unit else 1.0
    spacing = like.spacing if like is not None else {}
    origin = like.origin if like is not None else {}
    mrc.voxel_size = tuple(spacing.get(a, 1.0) * scale for a in "XYZ")
    header.origin = tuple(origin.get(a, 0.0) * scale for a in "XYZ")


def _set_stats(mrc: MrcMemmap) -> None:
    # Slab by slab: mrcfile's update_header_stats() makes full-size float temporaries.
    data = mrc.data
    sections = data.reshape(-1, *data.shape[-2:])
    step = max(1, 2**24 // max(1, sections[0].size))
    lo, hi, total, squares = np.inf, -np.inf, 0.0, 0.0
    for start in range(0, len(sections), step):
        slab = np.asarray(sections[start : start + step], dtype=np.float64)
        lo, hi = min(lo, slab.min()), max(hi, slab.max())
        total, squares = total + slab.sum(), squares + np.square(slab).sum()
    mean = total / data.size
    header = mrc.header
    header.dmin, header.dmax, header.dmean = lo, hi, mean
    header.rms = np.sqrt(max(squares / data.size - mean**2, 0.0))


@contextlib.contextmanager
def _new_labels(path: Path, shape: tuple[int, ...], like: ImageMeta | None, dtype: Any) -> Iterator[np.memmap]:
    dtype = np.dtype(dtype)
    if dtype.kind not in "bu" or dtype.itemsize > 2:
        raise InputError(
            f"{path}: MRC stores labels as 16-bit unsigned integers (at most 65535 labels), not {dtype}; "
            "write a .tif or .zarr for more labels."
        )
    if len(shape) not in _AXES:
        raise InputError(f"{path}: MRC cannot hold labels of shape {shape}.")
    with atomic_path(path) as tmp:
        # Mode 6 (uint16) even for uint8: mrcfile reads mode 0 back as signed int8.
        mrc = mrcfile.new_mmap(tmp, shape, mrc_mode=6, fill=0, overwrite=True)
        try:
            yield mrc.data
            _set_geometry(mrc, like)
            _set_stats(mrc)
            mrc.header.label[0] = b"biosam labels"
            mrc.header.nlabl = 1
        finally:
            mrc.close()


@contextlib.contextmanager
def open_labels(
    path: str | os.PathLike, like: ImageMeta, dtype: Any = np.uint16, overwrite: bool = False
) -> Iterator[np.memmap]:
    """Yield a writable uint16 memmap of ``like.labels_meta().shape`` to fill section by section.

    The file appears at ``path``, with ``like``'s geometry, only when the block ends without error.
    """
    path = check_output_path(path, SUFFIXES, overwrite)
    with _new_labels(path, like.labels_meta().shape, like, dtype) as data:
        yield data


def write_labels(
    path: str | os.PathLike, labels: Any, like: ImageMeta | None = None, overwrite: bool = False
) -> Path:
    """Write labels (at most 65535) as MRC mode 6 with ``like``'s voxel size, origin and start indices."""
    path = check_output_path(path, SUFFIXES, overwrite)
    labels = check_labels(path, labels, like)
    with _new_labels(path, labels.shape, like, label_dtype(int(labels.max()) if labels.size else 0)) as data:
        data[...] = labels
    return path
