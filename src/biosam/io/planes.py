"""Choosing the 2D plane a model segments out of N-dimensional data."""

from __future__ import annotations

from typing import Any

import numpy as np

from biosam.errors import InputError
from biosam.io.meta import ImageMeta

# The option that picks an entry of each axis, and what its entries are called.
_AXIS_WORDS = {"Z": ("--z", "slices"), "T": ("--t", "time points"), "C": ("--channel", "channels")}


def plane_index(meta: ImageMeta, z: int | None = None, t: int | None = None, channel: int | None = None) -> tuple:
    """Index into an array described by ``meta`` that leaves ``Y, X`` (and ``C`` unless one channel is chosen).

    Refuses ambiguous requests (a volume without ``z``, a time series without
    ``t``), negative and out-of-range indices, and an index for an axis the
    data do not have (other than 0, its only entry), with a message naming the file.
    """
    _check_requested(meta, z, t, channel)
    index: list[Any] = []
    for axis, size in zip(meta.axes, meta.shape):
        chosen = {"Z": z, "T": t, "C": channel}.get(axis)
        option, what = _AXIS_WORDS.get(axis, (None, None))
        if axis in "YX" or (axis == "C" and chosen is None):
            index.append(slice(None))
            continue
        if chosen is None:
            if size == 1:
                chosen = 0
            else:
                hint = ' or give "z" for each object in --prompts' if axis == "Z" else ""
                raise InputError(
                    f"{meta.path}: has {size} {what} (axes {meta.axes}, shape {meta.shape}); choose one with {option} "
                    f"(0 to {size - 1}){hint}."
                )
        if not 0 <= chosen < size:
            names = f" ({', '.join(meta.channel_names)})" if axis == "C" and meta.channel_names else ""
            raise InputError(f"{meta.path}: {option} {chosen} is out of range; axis {axis} has {size} entries{names}, "
                             f"numbered 0 to {size - 1}.")
        index.append(int(chosen))
    return tuple(index)


def _check_requested(meta: ImageMeta, z: int | None, t: int | None, channel: int | None) -> None:
    """Refuse a negative index, and one for an axis ``meta`` does not have (0, its one entry, is accepted)."""
    for axis, chosen in (("Z", z), ("T", t), ("C", channel)):
        option, words = _AXIS_WORDS[axis]
        if chosen is not None and chosen < 0:
            raise InputError(f"{meta.path}: {option} {chosen}: {words} are numbered from 0; give a number >= 0.")
        if chosen is None or chosen == 0 or axis in meta.axes:
            continue
        hint = ", or set --axes if they were read wrongly" if "tif" in meta.format or "zarr" in meta.format else ""
        raise InputError(
            f"{meta.path}: {option} {chosen} asks for one of several {words}, but the data have no {axis} axis "
            f"(axes {meta.axes}, shape {tuple(meta.shape)}): leave {option} out{hint}."
        )


def plane_shape(meta: ImageMeta) -> tuple[int, int]:
    """``(height, width)`` of the 2D planes of the data ``meta`` describes (what prompts are checked against)."""
    return meta.shape[meta.axes.index("Y")], meta.shape[meta.axes.index("X")]


def read_plane(data: Any, meta: ImageMeta, z: int | None = None, t: int | None = None, channel: int | None = None,
               box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The 2D image (``YX`` or ``YXC``) at ``z``/``t``, optionally one ``channel``, as a NumPy array.

    ``box`` ``(y0, y1, x0, x1)`` reads only that window (of a lazy array: only the chunks it touches).
    """
    index = plane_index(meta, z, t, channel)
    if box is not None:
        window = {"Y": slice(box[0], box[1]), "X": slice(box[2], box[3])}
        index = tuple(window.get(a, i) for a, i in zip(meta.axes, index))
    plane = np.asarray(data[index])
    kept = [a for a in meta.axes if a in "YX" or (a == "C" and channel is None)]
    if "C" in kept:
        plane = np.moveaxis(plane, kept.index("C"), -1)
    return plane
