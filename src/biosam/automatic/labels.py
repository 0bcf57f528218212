"""The form every automatic method returns its label image in."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import relabel_sequential


def relabel(labels: np.ndarray) -> np.ndarray:
    """Contiguous ids 1..N in the smallest unsigned type (uint16 below 65536 objects, else uint32)."""
    out = relabel_sequential(labels)[0]
    return out.astype(np.uint16 if out.max(initial=0) < 65536 else np.uint32, copy=False)
