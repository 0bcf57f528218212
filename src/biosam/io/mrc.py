"""MRC / CCP4 maps, tomograms and tilt series through mrcfile.

The data block is memory-mapped (``mrcfile.mmap``), so a multi-GB tomogram is
read slice by slice. Voxel size and origin are reported in Å, as stored.
Labels are written with the input's voxel size, origin and start indices, so
they overlay the map in IMOD, ChimeraX and napari; :func:`open_labels` streams
them section by section into a memory-mapped file.

Label ids and MRC modes: up to 65535 ids are written as mode 6 (uint16), which
every MRC reader takes as integers. MRC has no 32-bit integer mode, so more ids
(or a uint32 label volume streamed by ``biosam auto``, whose final count is not
known until the end) are written as mode 2 (float32), which holds every integer
up to 2**24 = 16,777,216 exactly; read back they are the same ids. Relabelling
to fit 16 bits was not chosen: it cannot be done while streaming, and it would
break the link between ids and the command's report. An id above 2**24 is
refused with a message (write .tif or .zarr for that many objects).
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
from biosam.io.meta import ImageMeta
from biosam.labels import label_dtype

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
MAX_FLOAT_ID = 2**24  # float32 holds every integer up to here exactly


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


class FloatLabels:
    """Label ids in a float32 (mode 2) data block, read and written as uint32; ids above 2**24 are refused."""

    dtype = np.dtype(np.uint32)

    def __init__(self, data: np.memmap, path: Path) -> None:
        self.data, self.path = data, path
        self.shape, self.ndim = data.shape, data.ndim

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.data[key]).astype(np.uint32)

    def __setitem__(self, key: Any, value: Any) -> None:
        value = np.asarray(value)
        if value.size and value.max() > MAX_FLOAT_ID:
            raise InputError(_too_many_ids(self.path, int(value.max())))
        self.data[key] = value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.data).astype(dtype or np.uint32)


def _too_many_ids(path: Path, top: int) -> str:
    return (f"{path}: label id {top} cannot be stored exactly in MRC (its float32 mode holds ids up to {MAX_FLOAT_ID}, "
            "and MRC has no 32-bit integer mode); write the labels as .tif or .zarr.")


def _mode_of(path: Path, dtype: Any) -> int:
    """MRC mode for label ids of ``dtype``: 6 (uint16) when they fit, else 2 (float32, exact up to 2**24)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "bui" and dtype.itemsize <= 2:
        return 6  # also for uint8: mrcfile reads mode 0 back as signed int8
    if dtype.kind in "ui":
        return 2
    raise InputError(f"{path}: MRC labels must be integers, not {dtype}.")


@contextlib.contextmanager
def _new_labels(path: Path, shape: tuple[int, ...], like: ImageMeta | None, dtype: Any) -> Iterator[Any]:
    mode = _mode_of(path, dtype)
    if len(shape) not in _AXES:
        raise InputError(f"{path}: MRC cannot hold labels of shape {shape}.")
    with atomic_path(path) as tmp:
        # no fill: the data block of a new file reads as zeros already; filling it would touch every page
        mrc = mrcfile.new_mmap(tmp, shape, mrc_mode=mode, fill=None, overwrite=True)
        try:
            yield mrc.data if mode == 6 else FloatLabels(mrc.data, path)
            _set_geometry(mrc, like)
            _set_stats(mrc)
            mrc.header.label[0] = b"biosam labels"
            mrc.header.nlabl = 1
        finally:
            mrc.close()


@contextlib.contextmanager
def open_labels(
    path: str | os.PathLike, like: ImageMeta, dtype: Any = np.uint16, overwrite: bool = False
) -> Iterator[Any]:
    """Yield a writable array of ``like.labels_meta().shape`` to fill section by section.

    uint8/uint16 ``dtype`` gives a uint16 memmap (mode 6); a wider integer type a
    uint32 view of a float32 block (mode 2, ids up to 2**24; see the module
    docstring). The file appears at ``path``, with ``like``'s geometry, only when
    the block ends without error.
    """
    path = check_output_path(path, SUFFIXES, overwrite, source=like.path)
    with _new_labels(path, like.labels_meta().shape, like, dtype) as data:
        yield data


def write_labels(
    path: str | os.PathLike, labels: Any, like: ImageMeta | None = None, overwrite: bool = False
) -> Path:
    """Write labels with ``like``'s voxel size, origin and start indices: mode 6 (uint16) for up to 65535 ids,
    mode 2 (float32) for ids up to 2**24; more are refused."""
    path = check_output_path(path, SUFFIXES, overwrite, source=like.path if like is not None else None)
    labels = check_labels(path, labels, like)
    top = int(labels.max()) if labels.size else 0
    if top > MAX_FLOAT_ID:
        raise InputError(_too_many_ids(path, top))
    with _new_labels(path, labels.shape, like, label_dtype(top)) as data:
        data[...] = labels
    return path
