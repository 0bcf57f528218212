"""napari reader for the formats napari opens without their geometry: MRC, NIfTI, DICOM, OME-Zarr, copick.

Everything is read through :func:`biosam.io.read_image`, so napari shows exactly what the ``biosam`` command
segments: the same axes, intensities (DICOM rescaled to HU) and geometry. Each layer gets the voxel size as
``scale`` and the origin as ``translate``, in the unit biosam.io reports (Å for MRC and copick, mm for NIfTI
and DICOM, the NGFF unit for OME-Zarr). Data stay on disk where biosam.io reads lazily (memory-mapped MRC and
NIfTI, Zarr arrays); an OME-Zarr image or copick tomogram opens with all its resolution levels (napari's
multiscale), so a big volume is browsed without loading it.

Layer ``metadata["biosam"]`` (:data:`METADATA_KEY`) records where the layer came from, for the writer and the
widgets: ``source`` (path or copick address), ``format``, ``axes`` (one letter per layer dimension), ``unit``
(of ``scale`` and ``translate``; None: pixels), ``level`` (the resolution level ``scale`` refers to),
``levels`` (how many the layer holds) and ``image_meta`` (the :class:`biosam.io.ImageMeta` of that level,
whose geometry :mod:`biosam.napari.writer` gives the labels).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from biosam.errors import InputError
from biosam.io import ImageMeta, format_of, read_image
from biosam.io.files import suffix_of
from biosam.io.formats import COPICK_PREFIX

log = logging.getLogger(__name__)

METADATA_KEY = "biosam"
# The formats this reader claims in napari: those napari's own reader opens without voxel size and origin.
FORMATS = ("mrc", "nifti", "dicom", "zarr", "copick")
LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | Sequence[str]) -> Callable[[str | Sequence[str]], list[LayerData]] | None:
    """napari's reader hook: :func:`read_layers` for a path biosam reads with geometry, else None."""
    single = _single_path(path)
    if single is None or not _claims(single):
        return None
    return read_layers


def read_layers(
    path: str | os.PathLike | Sequence[str], level: int | None = None, multiscale: bool = True, **options: Any
) -> list[LayerData]:
    """Read any image biosam reads as one napari layer data tuple ``(data, kwargs, layer_type)``.

    An OME-Zarr image or copick tomogram comes with all its resolution levels (a multiscale layer), or with
    ``multiscale=False`` at full resolution only; ``level=N`` gives that level alone. ``options`` go to
    :func:`biosam.io.read_image` (``axes=``, ``series_uid=``). Label images biosam wrote (an NGFF label
    image, NIfTI with the label intent, MRC labelled ``biosam labels``) come back as a labels layer. Raises
    :class:`~biosam.errors.InputError` for what biosam cannot read, with the file and the fix.
    """
    single = _single_path(path)
    if single is None:
        raise InputError(f"{path}: biosam opens one image at a time, not a stack of files; open them one by "
                         "one.")
    data, meta = read_image(single, level=level, **options)
    levels = _levels(single, data, meta, options) if multiscale and level is None else [data]
    return [_layer(single, levels, meta, level or 0)]


def _single_path(path: Any) -> str | None:
    if isinstance(path, (list, tuple)):
        return str(path[0]) if len(path) == 1 else None
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else None


def _claims(path: str) -> bool:
    """Whether ``path`` is one of :data:`FORMATS` (a DICOM folder only when it holds DICOM files)."""
    if path.startswith(COPICK_PREFIX):
        return True
    try:
        key = format_of(path)
    except (InputError, OSError):
        return False
    if key == "dicom" and Path(path).is_dir():
        return _holds_dicom(Path(path))
    return key in FORMATS


def _holds_dicom(folder: Path, look_at: int = 20) -> bool:
    # format_of calls any folder that is not Zarr a DICOM series; napari offers us every folder, so look inside.
    from pydicom.misc import is_dicom

    try:
        with os.scandir(folder) as entries:
            files = [Path(e.path) for e in entries if e.is_file() and not e.name.startswith(".")]
        return any(is_dicom(file) for file in sorted(files)[:look_at])
    except OSError:  # a folder or file we may not read: not ours to claim (napari's own reader may try)
        return False


def _levels(path: str, data: Any, meta: ImageMeta, options: dict[str, Any]) -> list[Any]:
    """All resolution levels of an OME-Zarr image or copick tomogram, full resolution first."""
    datasets = (meta.extra.get("multiscales") or {}).get("datasets") or []
    if len(datasets) < 2:
        return [data]
    if meta.format == "copick":  # its reader takes no level: open the others from the same tomogram group
        import zarr

        from biosam.io.zarr_store import read_group

        group = zarr.open_group(store=data.store, path=data.path.rpartition("/")[0], mode="r")
        return [data] + [read_group(group, path, level=i)[0] for i in range(1, len(datasets))]
    return [data] + [read_image(path, level=i, **options)[0] for i in range(1, len(datasets))]


def _is_labels(path: str, meta: ImageMeta) -> bool:
    """Whether the image is a label image biosam (or another NGFF writer) wrote, so it opens as labels."""
    if np.dtype(meta.dtype).kind not in "ui":
        return False
    if meta.format == "ome-zarr":
        return Path(path).parent.name == "labels"  # <image>.zarr/labels/<name>, as biosam.io.format_of reads it
    if meta.format == "nifti":
        return meta.extra["header"].get_intent()[0] == "label"
    if meta.format == "mrc":
        handle = meta.extra.get("_handle")
        return handle is not None and bytes(handle.header.label[0]).startswith(b"biosam labels")
    return False


def _layer(path: str, levels: list[Any], meta: ImageMeta, level: int) -> LayerData:
    layer_type = "labels" if _is_labels(path, meta) else "image"
    kwargs: dict[str, Any] = {}
    axes = meta.axes
    if "C" in axes and layer_type == "image":
        channel = axes.index("C")
        if channel == len(axes) - 1 and meta.shape[channel] in (3, 4):
            kwargs["rgb"] = True
        else:
            kwargs["channel_axis"] = channel
        axes = axes.replace("C", "")
    kwargs["scale"] = tuple(float(meta.spacing.get(a, 1.0)) for a in axes)
    kwargs["translate"] = tuple(float(meta.origin.get(a, 0.0)) for a in axes)
    if len(levels) > 1:
        kwargs["multiscale"] = True
    accepted = layer_parameters()
    if "axis_labels" in accepted:
        kwargs["axis_labels"] = tuple(a.lower() for a in axes)
    if meta.unit and meta.spacing and "units" in accepted:  # newer napari: the scale bar shows real lengths
        kwargs["units"] = tuple(meta.unit if a in "ZYX" else "pixel" for a in axes)
    kwargs["name"] = _name(path, meta)
    if "channel_axis" in kwargs and meta.channel_names:  # one layer per channel, named after it
        kwargs["name"] = [f"{kwargs['name']} {channel}" for channel in meta.channel_names]
    kwargs["metadata"] = {METADATA_KEY: {
        "source": path, "format": meta.format, "axes": axes, "unit": meta.unit if meta.spacing else None,
        "level": level, "levels": len(levels), "image_meta": meta,
    }}
    log.info("%s: %s layer, axes %s, scale %s %s", path, layer_type, axes, kwargs["scale"], meta.unit or "pixel")
    return (levels if len(levels) > 1 else levels[0]), kwargs, layer_type


def _name(path: str, meta: ImageMeta) -> str:
    if meta.format == "copick":
        return f"{meta.extra.get('run')} {meta.extra.get('tomo_type')}"
    name = Path(path.rstrip("/")).name
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix and len(suffix) < len(name) else name


@functools.cache
def layer_parameters() -> frozenset[str]:
    """Keyword arguments napari's layers take here (``units`` and ``axis_labels`` only in newer versions)."""
    try:
        from napari.layers import Image
    except ImportError:  # read_layers used without napari: plain tuples
        return frozenset()
    return frozenset(inspect.signature(Image.__init__).parameters)
