"""The ``(Z, Y, X)`` volume in an image read by :func:`biosam.io.read_image`, for commands that need one."""

from __future__ import annotations

from typing import Any

import numpy as np

from biosam.errors import InputError
from biosam.io.meta import ImageMeta

__all__ = ["zyx_volume"]


def zyx_volume(data: Any, meta: ImageMeta, path: str) -> np.ndarray:
    """The ``(Z, Y, X)`` voxels of an image read by :func:`biosam.io.read_image`, as float32 in memory.

    Axes of size 1 other than Z, Y, X are dropped; a 2D image, a time series
    or several channels are refused with a message naming ``path``.
    """
    axes, shape = meta.axes, tuple(meta.shape)
    if not set("ZYX") <= set(axes) or shape[axes.index("Z")] < 2:
        raise InputError(
            f"{path}: is a 2D image (axes {axes}, shape {shape}), but `biosam tomogram` needs a 3D tomogram (Z, Y, X). "
            "Give a volume (MRC, TIFF stack, Zarr, copick run); for single images use `biosam auto`."
        )
    extra = [a for a in axes if a not in "ZYX" and shape[axes.index(a)] > 1]
    if extra:
        raise InputError(
            f"{path}: has axes {axes} (shape {shape}); `biosam tomogram` reads one 3D volume (Z, Y, X) without "
            "channels or time points. Save the tomogram you want as its own file."
        )
    index = tuple(slice(None) if a in "ZYX" else 0 for a in axes)
    kept = [a for a in axes if a in "ZYX"]
    volume = np.asarray(data[index], dtype=np.float32)
    return np.transpose(volume, [kept.index(a) for a in "ZYX"])
