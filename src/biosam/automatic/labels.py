"""The form every automatic method returns its label image in."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import relabel_sequential
from biosam.labels import label_dtype


def relabel(labels: np.ndarray) -> np.ndarray:
    """Contiguous ids 1..N in :func:`biosam.labels.label_dtype`'s type."""
    out = relabel_sequential(labels)[0]
    return out.astype(label_dtype(out.max(initial=0)), copy=False)


def object_diameters(labels: np.ndarray, skip_border: bool = False) -> np.ndarray:
    """Equivalent diameters (pixels: the diameter of a disc of the same area) of the objects in ``labels``.

    With ``skip_border``, objects touching the image border (whose size is cut off) are left out.
    """
    labels = np.asarray(labels)
    sizes = np.bincount(labels.ravel())
    keep = sizes > 0
    keep[0] = False
    if skip_border:
        keep[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    return 2.0 * np.sqrt(sizes[keep] / np.pi)
