"""copick cryo-ET projects: read a run's tomogram, write segmentations and picks back.

A project is addressed by a URI naming its config file and what to open::

    copick:///data/project/config.json?run=TS_001&voxel_spacing=10&tomo_type=wbp
    copick:///data/project/config.json?run=TS_001&voxel_spacing=10&name=membrane&user_id=biosam&session_id=1

``run``, ``voxel_spacing`` and ``tomo_type`` may be left out where the project
has exactly one. Outputs go to the project's overlay through copick's API, in
copick's own layout (OME-Zarr NGFF 0.4 segmentations, JSON picks in angstrom).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, unquote

import numpy as np
import zarr

from biosam.errors import InputError
from biosam.io import zarr_store
from biosam.io.formats import COPICK_PREFIX
from biosam.io.meta import ImageMeta

SUFFIXES: tuple[str, ...] = ()  # addressed by copick:// URIs, not by file extension
_KEYS = ("run", "voxel_spacing", "tomo_type", "name", "user_id", "session_id", "multilabel")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def is_copick_uri(text: Any) -> bool:
    """Whether ``text`` is a ``copick://`` address."""
    return str(text).startswith(COPICK_PREFIX)


def parse_uri(text: str) -> dict[str, Any]:
    """Split ``copick://<config.json>?key=value&...`` into ``config`` and the query keys.

    ``voxel_spacing`` becomes a float and ``multilabel`` a bool; unknown or repeated
    keys are refused.
    """
    text = str(text)
    if not is_copick_uri(text):
        raise InputError(f"{text}: not a copick address; write copick://<path to config.json>?run=<run>&...")
    location, _, query = text[len(COPICK_PREFIX) :].partition("?")
    if not location:
        raise InputError(f"{text}: names no config file; write copick://<path to config.json>?run=<run>&...")
    params: dict[str, Any] = {"config": unquote(location)}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _KEYS:
            raise InputError(f"{text}: unknown key '{key}'; copick addresses take {', '.join(_KEYS)}.")
        if key in params:
            raise InputError(f"{text}: '{key}' is given twice.")
        if not value:
            raise InputError(f"{text}: '{key}' has no value.")
        params[key] = value
    if "voxel_spacing" in params:
        try:
            params["voxel_spacing"] = float(params["voxel_spacing"])
        except ValueError:
            raise InputError(f"{text}: voxel_spacing '{params['voxel_spacing']}' is not a number (angstrom).") from None
    if "multilabel" in params:
        flag = params["multilabel"].lower()
        if flag not in _TRUE + _FALSE:
            raise InputError(f"{text}: multilabel must be true or false, not '{params['multilabel']}'.")
        params["multilabel"] = flag in _TRUE
    return params


def _is_local(fs: Any) -> bool:
    """Whether an fsspec filesystem is the local disk."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"file", "local"} & set(protocols))


def _zarr_store(path: str, fs: Any = None, mode: str = "r", create: bool = False, **_: Any) -> Any:
    """Stand-in for zarr 2's ``FSStore``: a zarr 3 store for ``path`` on the fsspec filesystem ``fs``."""
    if _is_local(fs):
        return zarr.storage.LocalStore(path, read_only=mode == "r")
    return fs.get_mapper(path, create=create)  # zarr 3 wraps fsspec mappers itself


def import_copick() -> ModuleType:
    """Import copick (slow, so only when a copick address is used).

    copick 0.8 names ``zarr.storage.FSStore`` when its classes are defined and
    when it opens a store; zarr 3 removed that class, so copick would not even
    import. We supply a stand-in that returns the equivalent zarr 3 store.
    """
    import zarr.storage

    if not hasattr(zarr.storage, "FSStore"):
        zarr.storage.FSStore = _zarr_store
    try:
        import copick
    except ImportError as exc:
        raise InputError(
            "copick projects need the optional package copick, which is not installed here "
            f"({exc}); install biosam's cryo-ET extra: pip install 'biosam[cryoet]'."
        ) from exc
    return copick


def _open_project(params: dict[str, Any], uri: str) -> Any:
    config = Path(params["config"])
    if not config.is_file():
        raise InputError(f"{uri}: copick config file {config} not found. Give the project's config.json path.")
    try:
        return import_copick().from_file(str(config))
    except Exception as exc:  # JSON and pydantic validation errors
        raise InputError(f"{uri}: {config} is not a valid copick config ({type(exc).__name__}: {exc}).") from exc


def _choose(kind: str, key: str, wanted: Any, available: list[Any], uri: str) -> Any:
    """The item of ``available`` matching ``wanted``, or the only one when ``wanted`` is None."""
    listing = ", ".join(str(a) for a in available) or "(none)"
    if wanted is None:
        if len(available) == 1:
            return available[0]
        raise InputError(f"{uri}: the project has {len(available)} {kind}s ({listing}); choose one with {key}=... .")
    for item in available:
        if item == wanted or (isinstance(wanted, float) and abs(item - wanted) < 1e-3):
            return item
    raise InputError(f"{uri}: no {kind} '{wanted}'; available: {listing}.")


def _run(root: Any, name: str | None, uri: str) -> Any:
    return root.get_run(_choose("run", "run", name, [r.name for r in root.runs], uri))


def _voxel_size(run: Any, wanted: float | None, uri: str) -> float:
    return _choose("voxel spacing", "voxel_spacing", wanted, sorted(v.voxel_size for v in run.voxel_spacings), uri)


def read(
    path: str, run: str | None = None, voxel_spacing: float | None = None, tomo_type: str | None = None
) -> tuple[zarr.Array, ImageMeta]:
    """Read a run's tomogram (full resolution, lazily) as ZYX with the voxel spacing in angstrom."""
    uri = str(path)
    options = {"run": run, "voxel_spacing": voxel_spacing, "tomo_type": tomo_type}
    params = {**parse_uri(uri), **{k: v for k, v in options.items() if v is not None}}
    copick_run = _run(_open_project(params, uri), params.get("run"), uri)
    wanted = params.get("voxel_spacing")
    size = _voxel_size(copick_run, None if wanted is None else float(wanted), uri)
    spacing = copick_run.get_voxel_spacing(size)
    types = sorted(t.tomo_type for t in spacing.tomograms)
    kind = _choose("tomogram type", "tomo_type", params.get("tomo_type"), types, uri)
    tomogram = spacing.get_tomograms(kind)[0]
    try:
        group = zarr.open_group(tomogram.zarr(), mode="r")
    except Exception as exc:
        raise InputError(f"{uri}: the tomogram '{kind}' of run {copick_run.name} cannot be opened ({exc}).") from exc
    data, meta = zarr_store.read_group(group, uri)
    if meta.axes != "ZYX":
        raise InputError(f"{uri}: expected a ZYX tomogram, found axes {meta.axes} {meta.shape}.")
    extra = {**meta.extra, "config": params["config"], "run": copick_run.name, "voxel_spacing": size, "tomo_type": kind}
    return data, dataclasses.replace(
        meta, format="copick", spacing=dict.fromkeys("ZYX", size), unit="angstrom", origin={}, extra=extra
    )


def _output_target(uri: str, like: ImageMeta | None) -> tuple[dict[str, Any], Any]:
    """Parsed output address (with defaults from ``like`` and for user/session) and the copick run."""
    params = parse_uri(uri)
    known = like.extra if like is not None and like.format == "copick" else {}
    for key in ("run", "voxel_spacing"):
        params.setdefault(key, known.get(key))
        if params[key] is None:
            raise InputError(f"{uri}: give {key}=... (the labels do not come from a copick tomogram).")
    params.setdefault("user_id", "biosam")
    params.setdefault("session_id", "0")
    for key in ("name", "user_id", "session_id"):
        # copick finds outputs by splitting their file names on '_'.
        if "_" in str(params.get(key, "")):
            raise InputError(f"{uri}: {key} '{params[key]}' must not contain '_' (copick separates names with it).")
    return params, _run(_open_project(params, uri), params["run"], uri)


def _object_names(run: Any) -> str:
    return ", ".join(o.name for o in run.root.config.pickable_objects) or "(none)"


def write_labels(uri: str, labels: Any, like: ImageMeta | None = None, overwrite: bool = False) -> str:
    """Write a copick segmentation named ``name=`` into the run's overlay; returns its folder."""
    uri = str(uri)
    params, run = _output_target(uri, like)
    name, multilabel = params.get("name"), params.get("multilabel", False)
    if not name:
        raise InputError(f"{uri}: give the segmentation a name with name=... (a pickable object, or any name with "
                         "multilabel=true).")
    labels = np.asarray(labels)
    if like is not None and labels.shape != like.labels_meta().shape:
        raise InputError(f"{uri}: labels of shape {labels.shape} do not fit the tomogram's {like.labels_meta().shape}.")
    if labels.ndim != 3:
        raise InputError(f"{uri}: copick segmentations are 3D (ZYX); got shape {labels.shape}.")
    size, user, session = float(params["voxel_spacing"]), params["user_id"], params["session_id"]
    found = run.get_segmentations(user_id=user, session_id=session, name=name, is_multilabel=multilabel, voxel_size=size)
    if found and (not overwrite or found[0].read_only):
        raise InputError(f"{uri}: segmentation '{name}' by {user}, session {session} at {size} A already exists"
                         + (" in the read-only static data; use another name or session." if found[0].read_only
                            else "; pass --overwrite to replace it or choose another session_id."))
    try:
        seg = found[0] if found else run.new_segmentation(size, name, session, multilabel, user_id=user)
    except ValueError as exc:  # copick: a single-label segmentation must be named after a pickable object
        raise InputError(f"{uri}: {exc} Objects: {_object_names(run)}; or add multilabel=true.") from exc
    if not _is_local(seg.fs):
        raise InputError(f"{uri}: biosam writes segmentations to a local overlay_root only, not {seg.fs.protocol}.")
    folder = Path(seg.path)
    made_dir = not folder.parent.exists()
    geometry = ImageMeta(
        seg.path, "copick", "ZYX", labels.shape, labels.dtype.str, dict.fromkeys("ZYX", size), "angstrom"
    )
    try:  # NGFF 0.4 / Zarr v2 array "0": the layout every copick version reads
        zarr_store.write_labels(folder, labels, like=geometry, overwrite=overwrite)
    except BaseException:
        if made_dir:  # remove the Segmentations folder this call created
            with contextlib.suppress(OSError):
                folder.parent.rmdir()
        raise
    return str(folder)


def write_picks(
    uri: str, centers_zyx_voxels: Any, like: ImageMeta | None = None, object_name: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write object centres (voxel indices, ZYX) as copick picks of ``object_name`` (or ``name=``); returns the file."""
    uri = str(uri)
    params, run = _output_target(uri, like)
    object_name = object_name or params.get("name")
    if not object_name:
        raise InputError(f"{uri}: give the picked object's name (name=...); objects: {_object_names(run)}.")
    centers = np.asarray(centers_zyx_voxels, dtype=float).reshape(-1, 3)
    size, user, session = float(params["voxel_spacing"]), params["user_id"], params["session_id"]
    found = run.get_picks(object_name=object_name, user_id=user, session_id=session)
    if found and (not overwrite or found[0].read_only):
        raise InputError(f"{uri}: picks of '{object_name}' by {user}, session {session} already exist; pass "
                         "--overwrite to replace them or choose another session_id.")
    try:
        picks = found[0] if found else run.new_picks(object_name, session, user_id=user)
    except ValueError as exc:
        raise InputError(f"{uri}: {exc} Objects: {_object_names(run)}.") from exc
    try:
        picks.meta.voxel_spacing = size
        # copick locations are x, y, z in angstrom: voxel index times voxel size.
        picks.from_numpy(centers[:, ::-1] * size, np.tile(np.eye(4), (len(centers), 1, 1)))
    except BaseException:
        if not found:  # new_picks already stored an empty file
            with contextlib.suppress(OSError):
                picks.fs.rm(picks.path)
        raise
    return str(picks.path)

