"""Zarr arrays and OME-Zarr images (NGFF 0.4 on Zarr v2, NGFF 0.5 on Zarr v3).

Reading returns the ``zarr.Array`` itself, so a big volume is read slice by
slice. Axes, voxel size, origin and channel names come from the NGFF
``multiscales`` / ``omero`` metadata. Labels are written either into the
image's own ``labels`` group (``<image>.zarr/labels/<name>``, the layout napari
and other NGFF viewers show as a label layer) or as a standalone OME-Zarr.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from biosam.errors import InputError
from biosam.io.files import STORE_MARK, atomic_dir, check_output_path
from biosam.io.meta import AXIS_LETTERS, SPATIAL_AXES, ImageMeta
from biosam.labels import label_dtype

SUFFIXES = (".zarr", ".ome.zarr")

_UNITS = {
    "micrometer": "micrometer", "micron": "micrometer", "um": "micrometer",
    "nanometer": "nanometer", "nm": "nanometer",
    "angstrom": "angstrom", "millimeter": "millimeter", "mm": "millimeter",
}
_AXIS_TYPES = {"T": "time", "C": "channel"}
_GUESSED_AXES = {2: "YX", 3: "ZYX", 4: "CZYX"}
# One plane per chunk: slice-wise writes and plane reads touch one chunk row each.
_PLANE_CHUNK = 512


def _ome_attrs(group: zarr.Group) -> tuple[dict[str, Any], str | None]:
    """The NGFF metadata dict of a group and its version (0.5 nests it under "ome")."""
    attrs = group.attrs.asdict()
    if isinstance(attrs.get("ome"), dict):
        return attrs["ome"], str(attrs["ome"].get("version", "0.5"))
    multiscales = attrs.get("multiscales")
    version = multiscales[0].get("version", "0.4") if multiscales else None
    return attrs, version


def _transforms(items: list[dict[str, Any]], ndim: int) -> tuple[list[float], list[float]]:
    """Compose NGFF scale/translation transforms into one index -> world scale and offset."""
    scale, shift = np.ones(ndim), np.zeros(ndim)
    for item in items:
        if item.get("type") == "scale" and "scale" in item:
            factor = np.asarray(item["scale"], dtype=float)
            scale, shift = scale * factor, shift * factor
        elif item.get("type") == "translation" and "translation" in item:
            shift = shift + np.asarray(item["translation"], dtype=float)
    return scale.tolist(), shift.tolist()


def _check_axes(axes: str, shape: tuple[int, ...], source: str) -> str:
    axes = axes.upper()
    if len(axes) != len(shape) or set(axes) - set(AXIS_LETTERS) or len(set(axes)) != len(axes):
        raise InputError(
            f"{source}: axes '{axes}' do not fit an array of shape {shape}; give one letter from TCZYX per "
            "dimension with --axes (e.g. --axes ZYX)."
        )
    return axes


def _level_error(source: str, level: int, shapes: list[tuple[int, ...]]) -> InputError:
    listing = ", ".join(f"{i}: {shape}" for i, shape in enumerate(shapes))
    return InputError(f"{source}: resolution level {level} does not exist; available levels (shape): {listing}.")


def read_group(
    group: zarr.Group, source: str, level: int = 0, array: str | None = None, axes: str | None = None
) -> tuple[zarr.Array, ImageMeta]:
    """Read an opened Zarr group: an OME-Zarr multiscale image, or a group holding plain arrays."""
    ome, version = _ome_attrs(group)
    extra: dict[str, Any] = {"root": source, "zarr_format": group.metadata.zarr_format}
    origin: dict[str, float] = {}
    channel_names = None
    multiscales = ome.get("multiscales")
    if multiscales:
        if array is not None:
            raise InputError(f"{source}: is an OME-Zarr image; choose a resolution with --level, not an array name.")
        ms = multiscales[0]
        datasets = ms.get("datasets", [])
        if not 0 <= level < len(datasets):
            raise _level_error(source, level, [group[d["path"]].shape for d in datasets])
        data = group[datasets[level]["path"]]
        axis_meta = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
        if axes is None:
            if not axis_meta:  # NGFF < 0.3 had no axes: always TCZYX
                axis_meta = [{"name": n} for n in "tczyx"[-data.ndim :]]
            names = [str(a.get("name", "")) for a in axis_meta]
            axes = "".join(n if len(n) == 1 else "?" for n in names)
        axes = _check_axes(axes, data.shape, source)
        scale, translation = _transforms(
            datasets[level].get("coordinateTransformations", []) + ms.get("coordinateTransformations", []), data.ndim
        )
        spacing = {a: scale[i] for i, a in enumerate(axes) if a in SPATIAL_AXES}
        if any(translation[i] for i, a in enumerate(axes) if a in SPATIAL_AXES):
            origin = {a: translation[i] for i, a in enumerate(axes) if a in SPATIAL_AXES}
        units = [a.get("unit") for a in axis_meta if a.get("type") == "space" and a.get("unit")]
        unit = _UNITS.get(str(units[0]).lower()) if units else None
        channels = (ome.get("omero") or {}).get("channels") or []
        labels = [c.get("label") for c in channels if isinstance(c, dict)]
        if labels and all(labels) and "C" in axes and len(labels) == data.shape[axes.index("C")]:
            channel_names = [str(label) for label in labels]
        extra.update(ngff_version=version, multiscales=ms, level=level, scale=scale, translation=translation)
    else:
        names = sorted(group.array_keys())
        if array is None and len(names) != 1:
            raise InputError(
                f"{source}: " + (f"holds several arrays ({', '.join(names)}); choose one with --array NAME." if names
                                 else "holds no array and no OME-Zarr 'multiscales' metadata; point to an image.")
            )
        name = names[0] if array is None else array
        if name not in names:
            raise InputError(f"{source}: has no array '{name}'; available: {', '.join(names) or '(none)'}.")
        return _plain_array(group[name], source, level, axes, {**extra, "array": name})
    _check_not_empty(data, source)
    meta = ImageMeta(source, "ome-zarr", axes, tuple(data.shape), data.dtype.str, spacing, unit, origin,
                     channel_names=channel_names, extra=extra)
    return data, meta


def _check_not_empty(data: zarr.Array, source: str) -> None:
    if data.size == 0:
        raise InputError(f"{source}: the image is empty (shape {data.shape}).")


def _plain_array(
    data: zarr.Array, source: str, level: int, axes: str | None, extra: dict[str, Any]
) -> tuple[zarr.Array, ImageMeta]:
    """A Zarr array without NGFF metadata: one resolution, axes given or guessed from the dimensions."""
    if level != 0:
        raise _level_error(source, level, [data.shape])
    if axes is None:
        if data.ndim not in _GUESSED_AXES:
            raise InputError(f"{source}: cannot guess the axes of a {data.ndim}D array {data.shape}; name them with --axes.")
        axes = _GUESSED_AXES[data.ndim]
    axes = _check_axes(axes, data.shape, source)
    _check_not_empty(data, source)
    return data, ImageMeta(source, "zarr", axes, tuple(data.shape), data.dtype.str, extra=extra)


def read(
    path: str | os.PathLike, level: int = 0, array: str | None = None, axes: str | None = None
) -> tuple[zarr.Array, ImageMeta]:
    """Read a Zarr array, a group of arrays (``array=``) or an OME-Zarr image (``level=``), lazily."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found. Check the path and spelling.")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for folders that are not stores
        raise InputError(
            f"{path}: is not a Zarr store ({type(exc).__name__}); expected a folder with zarr.json (Zarr v3) or "
            ".zgroup/.zarray (Zarr v2)."
        ) from exc
    if isinstance(node, zarr.Group):
        return read_group(node, str(path), level=level, array=array, axes=axes)
    if array is not None:
        raise InputError(f"{path}: is a single array; --array applies to a group of arrays.")
    return _plain_array(node, str(path), level, axes, {"root": str(path), "zarr_format": node.metadata.zarr_format})


def _image_of_label_path(path: Path) -> tuple[Path, str] | None:
    """(image root, NGFF version) when ``path`` is ``<OME-Zarr image>/labels/<name>``."""
    if path.parent.name != "labels" or not path.parent.parent.is_dir():
        return None
    with contextlib.suppress(Exception):
        ome, version = _ome_attrs(zarr.open_group(str(path.parent.parent), mode="r"))
        if ome.get("multiscales"):
            return path.parent.parent, version or "0.4"
    return None


def _label_geometry(like: ImageMeta) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    """NGFF axes, scale and translation of a label image for ``like`` (its axes without C)."""
    n = len(like.axes)
    keep = [i for i, a in enumerate(like.axes) if a != "C"]
    scale = like.extra.get("scale") if len(like.extra.get("scale") or []) == n else [1.0] * n
    shift = like.extra.get("translation") if len(like.extra.get("translation") or []) == n else [0.0] * n
    known = [a for a in (like.extra.get("multiscales") or {}).get("axes", []) if isinstance(a, dict)]
    axes = []
    for i in keep:
        letter = like.axes[i]
        axis = dict(known[i]) if len(known) == n else {"name": letter.lower(), "type": _AXIS_TYPES.get(letter, "space")}
        if letter in SPATIAL_AXES and like.unit:
            axis["unit"] = like.unit
        axes.append(axis)
    return (
        axes,
        [float(like.spacing.get(like.axes[i], scale[i])) for i in keep],
        [float(like.origin.get(like.axes[i], shift[i])) for i in keep],
    )


@contextlib.contextmanager
def _ngff_labels(
    folder: Path, like: ImageMeta, dtype: np.dtype, version: str, name: str, image_label: bool
) -> Iterator[zarr.Array]:
    """Create a one-level NGFF image in ``folder``; its metadata is written once the data is complete."""
    axes, scale, translation = _label_geometry(like)
    shape = like.labels_meta().shape
    zarr_format = 3 if version == "0.5" else 2
    group = zarr.open_group(str(folder), mode="w", zarr_format=zarr_format)
    layout: dict[str, Any] = (
        {"dimension_names": [a["name"] for a in axes]} if zarr_format == 3
        else {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    )
    chunks = tuple(1 for _ in shape[:-2]) + tuple(min(_PLANE_CHUNK, s) for s in shape[-2:])
    yield group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0, **layout)
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if any(translation):
        transforms.append({"type": "translation", "translation": translation})
    multiscale: dict[str, Any] = {
        "name": name, "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transforms}]
    }
    ome: dict[str, Any] = {"multiscales": [multiscale]}
    if image_label:
        ome["image-label"] = {"source": {"image": "../../"}}
    mark = {STORE_MARK: {"kind": "labels"}}  # lets a later --overwrite replace this folder (biosam.io.files)
    if zarr_format == 3:
        group.attrs.update({"ome": {"version": "0.5", **ome}, **mark})
    else:
        multiscale["version"] = "0.4"
        if image_label:
            ome["image-label"]["version"] = "0.4"
        group.attrs.update({**ome, **mark})


def _register_label(image_root: Path, name: str, version: str) -> None:
    """Add ``name`` to the image's ``labels`` group list, keeping the entries already there."""
    group = zarr.open_group(str(image_root / "labels"), mode="a", zarr_format=3 if version == "0.5" else 2)
    attrs = group.attrs.asdict()
    if version == "0.5":
        ome = dict(attrs.get("ome") or {})
        ome.update(version="0.5", labels=list(dict.fromkeys([*ome.get("labels", []), name])))
        group.attrs["ome"] = ome
    else:
        group.attrs["labels"] = list(dict.fromkeys([*attrs.get("labels", []), name]))
    # Consolidated metadata (v2 .zmetadata, v3 inside zarr.json) would hide the new label from readers that use it.
    root_json = image_root / "zarr.json"
    if (image_root / ".zmetadata").exists() or (
        root_json.exists() and json.loads(root_json.read_text()).get("consolidated_metadata")
    ):
        zarr.consolidate_metadata(str(image_root))


@contextlib.contextmanager
def open_labels(
    path: str | os.PathLike, like: ImageMeta, dtype: Any, overwrite: bool = False
) -> Iterator[zarr.Array]:
    """A writable Zarr array of ``like.labels_meta().shape``, committed as OME-Zarr on success.

    ``<image>.zarr/labels/<name>`` writes an NGFF label image inside that image
    (same NGFF version); any other ``.zarr`` path a standalone OME-Zarr (NGFF
    0.4, or 0.5 when ``like`` came from an NGFF 0.5 image). On an error nothing
    is left behind.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui":
        raise InputError(f"{path}: labels must be stored as unsigned or signed integers, not {dtype}.")
    target = _image_of_label_path(path)
    if target is not None and path.exists() and not overwrite:
        raise InputError(f"{path}: label image '{path.name}' already exists in {target[0]}. Choose another name "
                         "or pass --overwrite to replace it.")
    # Not checked against like.path here: a copick segmentation's geometry names the store itself.
    check_output_path(path, SUFFIXES if target is None else None, overwrite, folder=True)
    version = target[1] if target is not None else "0.5" if like.extra.get("ngff_version") == "0.5" else "0.4"
    made_labels_group = target is not None and not path.parent.exists()
    try:
        with atomic_dir(path) as tmp, _ngff_labels(tmp, like, dtype, version, path.name, target is not None) as array:
            yield array
    except BaseException:
        if made_labels_group:  # atomic_dir created the empty 'labels' folder: take it away again
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        raise
    if target is not None:
        _register_label(target[0], path.name, version)


def write_labels(
    path: str | os.PathLike, labels: Any, like: ImageMeta | None = None, overwrite: bool = False
) -> Path:
    """Write labels as OME-Zarr with ``like``'s axes, scale and translation (see :func:`open_labels`)."""
    path = Path(path)
    labels = np.asarray(labels)
    if like is None:
        target = _image_of_label_path(path)
        if target is not None:
            like = read(target[0])[1]
        else:
            like = ImageMeta(str(path), "zarr", "TZYX"[-labels.ndim :], labels.shape, labels.dtype.str)
    if labels.shape != like.labels_meta().shape:
        raise InputError(f"{path}: labels of shape {labels.shape} do not fit the image's {like.labels_meta().shape}.")
    if labels.dtype.kind not in "uib" or (labels.size and labels.min() < 0):
        raise InputError(f"{path}: labels must be integers >= 0 (got {labels.dtype}).")
    with open_labels(path, like, label_dtype(int(labels.max()) if labels.size else 0), overwrite) as out:
        out[...] = labels
    return path
