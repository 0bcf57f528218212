"""TIFF through tifffile: plain stacks, ImageJ hyperstacks, OME-TIFF, BigTIFF, any compression.

Axes and voxel size come from the ImageJ or OME metadata where present.
Uncompressed files are memory-mapped; big compressed or tiled files are read
lazily through tifffile's Zarr store (:class:`LazyTiff`), so a large stack
is read slice by slice either way. LZW, Deflate, Zstd, JPEG, PackBits,
LZMA and the rest decode through ``imagecodecs``.

A file that cannot be read gets one of three messages, each with its fix: a
codec this installation lacks (``pip install imagecodecs``), a damaged or
truncated file (copy it again), or a file that is not a TIFF at all (what it
is by its first bytes, and the extension to give it).

Labels are written as ImageJ hyperstacks (``.tif``) or OME-TIFF (``.ome.tif``)
carrying the input's voxel size, so they open aligned in Fiji and napari, with
lossless compression (``COMPRESSIONS``; Deflate unless asked otherwise).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from biosam.errors import InputError
from biosam.io.files import atomic_path, check_output_path, suffix_of
from biosam.io.magic import empty_message, sniff, wrong_type_message
from biosam.io.meta import ImageMeta, unit_factor
from biosam.labels import label_dtype

log = logging.getLogger(__name__)

SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
# The lossless compressions labels are written with (--compression); the first is the default: Deflate
# is what Fiji/ImageJ, napari and every TIFF reader decode. "none" writes uncompressed (memory-mappable) files.
COMPRESSIONS = ("deflate", "lzw", "zstd", "none")
DEFAULT_COMPRESSION = COMPRESSIONS[0]
_CODES = {"deflate": tifffile.COMPRESSION.ADOBE_DEFLATE, "lzw": tifffile.COMPRESSION.LZW, "zstd": tifffile.COMPRESSION.ZSTD}
# Series up to this size are decoded at once (threaded, and every byte checked at open); bigger compressed or
# tiled ones are read lazily, strip by strip or tile by tile (LazyTiff).
EAGER_BYTES = 64 * 2**20
_TIFF_HEADERS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
# What tifffile logs (instead of raising) when a file's chain of pages breaks off: pages would go missing silently.
_BROKEN_CHAIN = ("invalid page offset", "failed to reshape")

# tifffile axis codes -> ours. 'S' (samples) are colour channels; 'I' and 'Q'
# (image sequence, unknown) are how plain multi-page stacks come back.
_AXIS_CODES = {"T": "T", "C": "C", "S": "C", "Z": "Z", "Y": "Y", "X": "X", "I": "Z", "Q": "Z"}
_UNITS = {
    "micron": "micrometer", "um": "micrometer", "µm": "micrometer", "\\u00B5m": "micrometer", "micrometer": "micrometer",
    "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
    "Å": "angstrom", "A": "angstrom", "angstrom": "angstrom",
}
# ImageJ metadata is ASCII: Å spacing is written in nm.
_IMAGEJ_UNITS = {"micrometer": ("micron", "micrometer"), "nanometer": ("nm", "nanometer"),
                 "millimeter": ("mm", "millimeter"), "angstrom": ("nm", "nanometer")}
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


# ----------------------------------------------------------------------------- errors


def _damaged(path: Path, detail: str) -> InputError:
    if sniff(path) is not None:  # e.g. a DICOM file, whose free 128-byte preamble may start like a TIFF
        return InputError(wrong_type_message(path, "TIFF"))
    return InputError(
        f"{path}: the TIFF file is damaged or truncated ({detail}). Copy it again from its source (or export it "
        "again from the software that made it)."
    )


def _compression_name(code: int) -> str:
    try:
        return f"{tifffile.COMPRESSION(code).name} (TIFF compression {code})"
    except ValueError:
        return f"TIFF compression {code}"


def _missing_codec(path: Path, what: str, detail: str) -> InputError:
    try:
        importlib.import_module("imagecodecs")  # whether it is there at all, or there but lacks this codec
    except ImportError:
        fix = "Install the TIFF codecs: pip install imagecodecs"
    else:
        fix = ("The installed imagecodecs lacks it; reinstall the full package: pip install --force-reinstall "
               "imagecodecs")
    return InputError(f"{path}: is compressed with {what}, which this installation cannot decode ({detail}). {fix}")


def _is_codec_missing(exc: BaseException) -> bool:
    return isinstance(exc, ImportError) or type(exc).__name__ == "DelayedImportError" or "imagecodecs" in str(exc)


def _decode_error(path: Path, page: Any, exc: Exception, where: str) -> InputError:
    """A decoding failure as a message: a missing codec, else a damaged file."""
    if _is_codec_missing(exc):
        return _missing_codec(path, _compression_name(page.compression), f"{type(exc).__name__}: {exc}")
    return _damaged(path, f"{where} cannot be decoded: {type(exc).__name__}: {exc}")


def _check_codecs(path: Path, page: Any) -> None:
    """Refuse, before decoding anything, a compression or predictor this installation cannot decode."""
    for table, code, what in ((tifffile.TIFF.DECOMPRESSORS, page.compression, _compression_name(page.compression)),
                              (tifffile.TIFF.UNPREDICTORS, page.predictor, f"predictor {page.predictor}")):
        if code == 1:
            continue
        try:
            table[code]
        except KeyError as exc:
            detail = str(exc).strip("'\"")
            if "imagecodecs" in detail:
                raise _missing_codec(path, what, detail) from exc
            raise InputError(f"{path}: uses {what}, which no TIFF codec biosam knows decodes ({detail}). Convert "
                             "it to an uncompressed or LZW/Deflate TIFF (e.g. in Fiji) and try again.") from exc


class _TifffileLog(logging.Filter):
    """Holds back what tifffile logs in this thread while a file is opened: it logs, rather than raises, some damage
    (read by :func:`_check_complete`); a refused file then gets one message, not a list of tifffile errors."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.records.append(record)
        return False

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def _tifffile_log() -> Iterator[_TifffileLog]:
    """Collect tifffile's log records of this thread; pass them on if the file was read."""
    logger = logging.getLogger("tifffile")
    held = _TifffileLog()
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)
    for record in held.records:  # reached only when reading succeeded
        logger.handle(record)


def _open(path: Path) -> tifffile.TiffFile:
    """Open ``path`` as TIFF, or say what it is instead (empty, another format)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise InputError(f"{path}: cannot be opened ({exc.strerror or exc}). Check its permissions.") from exc
    if not head:
        raise InputError(empty_message(path))
    if head[:4] not in _TIFF_HEADERS:
        raise InputError(wrong_type_message(path, "TIFF", head))
    try:
        return tifffile.TiffFile(path)
    except MemoryError:
        raise
    except Exception as exc:  # a TIFF header followed by garbage or nothing
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from exc


def _check_complete(path: Path, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, logged: list[str]) -> None:
    """Refuse a file whose pages or pixel data end past its last byte (cut off mid-copy)."""
    broken = [m for m in logged if any(sign in m for sign in _BROKEN_CHAIN)]
    if broken:
        raise _damaged(path, f"its list of pages breaks off: {broken[0]}")
    size = tif.filehandle.size
    if series.dataoffset is not None:
        end = series.dataoffset + series.size * series.dtype.itemsize
        if end > size:
            raise _damaged(path, f"the pixels need {end} bytes but the file has {size}")
        return
    for index, page in enumerate(series.pages):
        if page is None:
            continue
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size:
            raise _damaged(path, f"page {index} needs {max(ends)} bytes but the file has {size}")


class LazyTiff:
    """A big compressed or tiled TIFF series, decoded only where it is indexed.

    tifffile's Zarr store (:meth:`tifffile.TiffPageSeries.aszarr`) does the
    work: an index decodes just the strips or tiles it touches, so one plane of
    a stack costs one plane of memory. This wrapper adds what biosam needs on
    top: a decoding failure becomes an :class:`InputError` naming the file, and
    the file is closed when the array is garbage collected (or on :meth:`close`).
    """

    def __init__(self, path: Path, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> None:
        import zarr

        self._path, self._keyframe = path, series.keyframe
        self._array = zarr.open_array(series.aszarr(), mode="r")
        self.shape: tuple[int, ...] = tuple(int(s) for s in self._array.shape)
        self.dtype = np.dtype(self._array.dtype)
        self._close = weakref.finalize(self, tif.close)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<LazyTiff {str(self._path)!r} shape={self.shape} dtype={self.dtype}>"

    def close(self) -> None:
        """Close the file now (indexing afterwards fails); also done when the array is garbage collected."""
        self._close()

    def __enter__(self) -> LazyTiff:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, key: Any) -> np.ndarray:
        if not self._close.alive:
            raise ValueError(f"{self._path}: the TIFF was closed; read it again.")
        try:
            return np.asarray(self._array[key])
        except (IndexError, TypeError, MemoryError):  # a bad index, or out of memory: not the file's fault
            raise
        except Exception as exc:  # codecs raise their own types
            raise _decode_error(self._path, self._keyframe, exc, f"the pixels at {key!r}") from exc

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype, copy=False)


def _pixels(path: Path, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> tuple[Any, bool]:
    """The series' pixels: memory-mapped, decoded at once, or lazily (:class:`LazyTiff`); and whether ``tif`` stays
    open."""
    if series.dataoffset is not None:  # uncompressed and contiguous: map it instead of loading it
        try:
            return tifffile.memmap(path, series=0, mode="r"), False
        except ValueError:
            pass  # not mappable after all (e.g. a byte order numpy cannot map): read it below
    keyframe = series.keyframe
    _check_codecs(path, keyframe)
    if series.size * series.dtype.itemsize > EAGER_BYTES:
        data = LazyTiff(path, tif, series)
        data[(slice(0, 1),) * data.ndim]  # decode one strip or tile: a damaged start shows now, not minutes in
        return data, True
    try:
        return series.asarray(), False
    except MemoryError:
        raise
    except Exception as exc:  # codecs raise their own types
        raise _decode_error(path, keyframe, exc, "the image data") from exc


def _read_picture(path: Path, axes: str | None) -> tuple[np.ndarray, ImageMeta] | None:
    """A PNG or JPEG file named .tif (a renamed or mislabelled export) read by its content, as a user expects;
    None for anything else."""
    from biosam.io import images

    kind = sniff(path)
    if kind is None or kind.suffix not in images.SUFFIXES:
        return None
    log.warning("%s: is %s, not a TIFF (by its first bytes); reading it as such. Rename it to end in %s.",
                path, kind.name, kind.suffix)
    data, meta = images.read(path)
    meta = replace(meta, format="png" if kind.suffix == ".png" else "jpeg")
    if axes is not None:
        if len(axes) != data.ndim:
            raise InputError(f"{path}: --axes '{axes}' has {len(axes)} letters but the image has {data.ndim} "
                             f"dimensions {data.shape}.")
        meta = replace(meta, axes=axes.upper())
    return data, meta


def read(path: str | os.PathLike, axes: str | None = None) -> tuple[Any, ImageMeta]:
    """Read the first image series of a TIFF file.

    Uncompressed files are memory-mapped; compressed or tiled series larger
    than ``EAGER_BYTES`` come back as a lazy :class:`LazyTiff` array that
    decodes only the strips or tiles it is indexed with (its file closes when it is
    garbage collected); smaller ones are decoded at once. Refuses a missing
    codec, a damaged file and a file that is not a TIFF, each with the fix.
    """
    path = Path(path)
    picture = _read_picture(path, axes)
    if picture is not None:
        return picture
    with _tifffile_log() as logged:
        tif = _open(path)
        keep_open = False
        try:
            try:
                series = tif.series[0]
                found = _our_axes(series.axes, path) if axes is None else axes.upper()
                if tif.is_ome:
                    spacing, unit, names = _ome_geometry(tif)
                    kind = "ome-tiff"
                else:
                    (spacing, unit), names = _imagej_geometry(tif, found), None
                    kind = "imagej-tiff" if tif.is_imagej else "tiff"
                _check_complete(path, tif, series, logged.messages)
            except (InputError, MemoryError):
                raise
            except Exception as exc:  # tifffile raises many types for broken files
                raise _damaged(path, f"{type(exc).__name__}: {exc}") from exc
            data, keep_open = _pixels(path, tif, series)
        finally:
            if not keep_open:
                tif.close()
    if len(found) != data.ndim:
        raise InputError(f"{path}: --axes '{found}' has {len(found)} letters but the image has {data.ndim} dimensions {data.shape}.")
    if data.size == 0:
        raise InputError(f"{path}: the image is empty (shape {data.shape}).")
    meta = ImageMeta(str(path), kind, found, tuple(data.shape), data.dtype.str, spacing, unit, channel_names=names)
    return data, meta


def tiff_compression(compression: str | None, path: str | os.PathLike | None = None) -> int | None:
    """tifffile's ``compression`` code for one of :data:`COMPRESSIONS` (``None`` or "none": uncompressed).

    Refuses another value, or one whose encoder is missing, before any work.
    """
    name = "none" if compression is None else str(compression).lower()
    where = f"{path}: " if path is not None else ""
    if name not in COMPRESSIONS:
        raise InputError(f"{where}compression '{compression}' is not one biosam writes labels with; choose one of "
                         f"{', '.join(COMPRESSIONS)} (all lossless; {DEFAULT_COMPRESSION} is the default).")
    if name == "none":
        return None
    try:
        tifffile.TIFF.COMPRESSORS[_CODES[name]]
    except KeyError as exc:
        raise InputError(f"{where}writing {name}-compressed TIFF needs the imagecodecs package: pip install "
                         f"imagecodecs (or choose --compression {DEFAULT_COMPRESSION}).") from exc
    return _CODES[name]


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    like: ImageMeta | None = None,
    overwrite: bool = False,
    compression: str | None = DEFAULT_COMPRESSION,
) -> Path:
    """Write labels as an ImageJ hyperstack (``.tif``) or OME-TIFF (``.ome.tif``) with ``like``'s voxel size.

    ``compression`` is one of :data:`COMPRESSIONS` (lossless; ``None`` or "none" writes uncompressed).
    """
    codec = tiff_compression(compression, path)
    path = check_output_path(path, SUFFIXES, overwrite, source=like.path if like is not None else None)
    labels = np.asarray(labels)
    axes = like.labels_meta().axes if like is not None else "ZYX"[-labels.ndim :]
    if like is not None and labels.shape != like.labels_meta().shape:
        raise InputError(f"{path}: labels of shape {labels.shape} do not fit the image's {like.labels_meta().shape}.")
    labels = labels.astype(label_dtype(int(labels.max()) if labels.size else 0), copy=False)
    spacing = like.spacing if like is not None else {}
    unit = like.unit if like is not None else None
    ome = suffix_of(path).startswith(".ome")
    imagej = not ome and labels.dtype != np.uint32 and set(axes) <= set("TZYX")
    kwargs: dict = {"compression": codec, "metadata": {"axes": axes}}
    if ome:
        kwargs["ome"] = True
        for axis, size in spacing.items():
            kwargs["metadata"][f"PhysicalSize{axis}"] = size
            if unit in _OME_UNITS:
                kwargs["metadata"][f"PhysicalSize{axis}Unit"] = _OME_UNITS[unit]
    elif imagej:
        kwargs["imagej"] = True
        if unit in _IMAGEJ_UNITS:
            kwargs["metadata"]["unit"], written = _IMAGEJ_UNITS[unit]
            spacing = {a: s * unit_factor(unit, written) for a, s in spacing.items()}
        if "Z" in spacing:
            kwargs["metadata"]["spacing"] = spacing["Z"]
    if "X" in spacing and "Y" in spacing and not ome:
        kwargs["resolution"] = (1.0 / spacing["X"], 1.0 / spacing["Y"])
    kwargs["bigtiff"] = labels.nbytes > 2**32 - 2**26 and not imagej
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels, **kwargs)
    return path
