"""napari writer for labels layers: :func:`biosam.io.write_labels` in the geometry of the image they belong to.

The geometry comes from the layer's ``metadata["biosam"]["image_meta"]`` (the image biosam's reader opened,
see :mod:`biosam.napari.reader`): an MRC keeps its header's voxel size, origin and start indices, NIfTI its
header and affine, OME-Zarr its axes and transforms. A labels layer without it (drawn on an image napari
opened itself) is written with the layer's ``scale`` and ``translate``, in the unit the metadata or the
layer's ``units`` name. An existing file is never replaced: napari's save dialog asks about overwriting, but
labels are often saved next to the image and hours of annotation must not replace a file by one click.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from biosam.errors import InputError
from biosam.io import ImageMeta, write_labels as write_label_image
from biosam.io.formats import WRITE_SUFFIXES
from biosam.io.meta import UNIT_ANGSTROM
from biosam.napari.reader import METADATA_KEY

log = logging.getLogger(__name__)

# The suffixes napari offers for this writer (the manifest lists the same; a test keeps them equal).
LABEL_SUFFIXES = WRITE_SUFFIXES
_AXES = {2: "YX", 3: "ZYX", 4: "TZYX"}


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """napari's single-layer writer hook: write a labels layer to ``path``; returns the path written.

    Raises :class:`~biosam.errors.InputError` (shown by napari) when ``path`` exists, or when biosam cannot
    write these labels there (type, dimensionality, folder), naming the file and the fix.
    """
    if Path(path).exists() or Path(path).is_symlink():
        raise InputError(f"{path}: already exists; biosam's napari writer never replaces a file, even after "
                         "napari's overwrite question. Save the labels under another name, or delete the old file "
                         "first.")
    labels = np.asarray(data[0] if attributes.get("multiscale") else data)  # a multiscale layer: full resolution
    like = geometry_of(labels.shape, attributes)
    written = write_label_image(path, labels, like=like)
    log.info("%s: labels %s written with the geometry of %s", written, labels.shape, like.path or "the layer")
    return [str(written)]


def geometry_of(shape: tuple[int, ...], attributes: dict[str, Any]) -> ImageMeta:
    """The :class:`ImageMeta` labels of ``shape`` are written with: their image's, else the layer's scale."""
    info = (attributes.get("metadata") or {}).get(METADATA_KEY) or {}
    image = info.get("image_meta")
    if isinstance(image, ImageMeta) and image.labels_meta().shape == tuple(shape):
        return image
    ndim = len(shape)
    axes = info.get("axes") if len(info.get("axes") or "") == ndim else _AXES.get(ndim)
    if axes is None:
        raise InputError(f"labels of {ndim} dimensions {tuple(shape)}: biosam writes 2D to 4D (TZYX) labels.")
    scale = _per_axis(attributes.get("scale"), ndim, 1.0)
    translate = _per_axis(attributes.get("translate"), ndim, 0.0)
    unit = info.get("unit") or _layer_unit(attributes.get("units"))
    spatial = [i for i, a in enumerate(axes) if a in "ZYX"]
    known = unit is not None or any(scale[i] != 1.0 for i in spatial)
    return ImageMeta(
        str(info.get("source") or ""), "napari", axes, tuple(shape), "<u4",
        spacing={axes[i]: scale[i] for i in spatial} if known else {}, unit=unit if known else None,
        origin={axes[i]: translate[i] for i in spatial if any(translate[j] for j in spatial)},
    )


def _per_axis(values: Any, ndim: int, default: float) -> list[float]:
    values = [float(v) for v in values] if values is not None else []
    return values if len(values) == ndim else [default] * ndim


def _layer_unit(units: Any) -> str | None:
    """The spatial unit of napari's ``units`` (pint units, newer napari) if biosam knows it, else None (pixels)."""
    names = {str(u) for u in units or ()} & set(UNIT_ANGSTROM)
    return names.pop() if len(names) == 1 else None
