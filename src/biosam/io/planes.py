"""Choosing the 2D plane a model segments out of N-dimensional data."""

from __future__ import annotations

from typing import Any

import numpy as np

from biosam.errors import InputError
from biosam.io.meta import ImageMeta


def plane_index(meta: ImageMeta, z: int | None = None, t: int | None = None, channel: int | None = None) -> tuple:
    """Index into an array described by ``meta`` that leaves ``Y, X`` (and ``C`` unless one channel is chosen).

    Refuses ambiguous requests (a volume without ``z``, a time series without
    ``t``) and out-of-range indices with a message naming the file.
    """
    index: list[Any] = []
    for axis, size in zip(meta.axes, meta.shape):
        chosen = {"Z": z, "T": t, "C": channel}.get(axis)
        option = {"Z": "--z", "T": "--t", "C": "--channel"}.get(axis)
        if axis in "YX" or (axis == "C" and chosen is None):
            index.append(slice(None))
            continue
        if chosen is None:
            if size == 1:
                chosen = 0
            else:
                what = "slices" if axis == "Z" else "time points"
                hint = ' or give "z" for each object in --prompts' if axis == "Z" else ""
                raise InputError(
                    f"{meta.path}: has {size} {what} (axes {meta.axes}, shape {meta.shape}); choose one with {option} "
                    f"(0 to {size - 1}){hint}."
                )
        if not -size <= chosen < size:
            names = f" ({', '.join(meta.channel_names)})" if axis == "C" and meta.channel_names else ""
            raise InputError(f"{meta.path}: {option} {chosen} is out of range; axis {axis} has {size} entries{names}.")
        index.append(int(chosen))
    return tuple(index)


def read_plane(data: Any, meta: ImageMeta, z: int | None = None, t: int | None = None, channel: int | None = None) -> np.ndarray:
    """The 2D image (``YX`` or ``YXC``) at ``z``/``t``, optionally one ``channel``, as a NumPy array."""
    plane = np.asarray(data[plane_index(meta, z, t, channel)])
    kept = [a for a in meta.axes if a in "YX" or (a == "C" and channel is None)]
    if "C" in kept:
        plane = np.moveaxis(plane, kept.index("C"), -1)
    return plane
