"""The one rule for the integer type of label images, used by every module that makes or writes them."""

from __future__ import annotations

import numpy as np

from biosam.errors import InputError


def label_dtype(count: int) -> np.dtype:
    """Type that holds labels ``0..count``: uint16, uint32 past 65535, uint64 past 2**32 - 1.

    Never 8-bit: label images of 8-bit wrap at 255 objects and tools would read a
    grown image as a different type.
    """
    count = int(count)
    if count < 0:
        raise InputError(f"object count must be >= 0, got {count}.")
    for dtype in (np.uint16, np.uint32):
        if count <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


# Automatic segmentation keeps no object smaller than this (its minimum object size), so a plane of
# ``n`` pixels holds at most ``n // 64`` objects.
_SMALLEST_OBJECT = 64


def streamed_label_dtype(shape: tuple[int, ...], volume: bool) -> np.dtype:
    """Type of a label image opened before its objects are counted (written plane by plane).

    A plane gets room for one object per 64 pixels; a volume, whose 3D objects are counted over all
    its slices, gets uint32.
    """
    if volume:
        return np.dtype(np.uint32)
    return label_dtype(int(np.prod(shape[-2:])) // _SMALLEST_OBJECT)
