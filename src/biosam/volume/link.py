"""3D objects from per-slice 2D instance labels, linked by overlap between neighbouring slices."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from biosam.errors import InputError

__all__ = ["link_slices"]


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label pairs ``(la, lb)`` that overlap between two label slices and their IoU."""
    both = (a > 0) & (b > 0)
    pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
    if not inter.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    la, lb = pairs.astype(np.int64)
    area_a = np.bincount(a.ravel(), minlength=int(la.max()) + 1)
    area_b = np.bincount(b.ravel(), minlength=int(lb.max()) + 1)
    return la, lb, inter / (area_a[la] + area_b[lb] - inter)


def link_slices(labels: np.ndarray, min_iou: float = 0.3) -> np.ndarray:
    """Merge 2D instances of consecutive slices into 3D objects.

    ``labels`` is ``(Z, Y, X)`` with independent instance ids per slice (0 is
    background). An object continues into the next slice through the instance
    it overlaps best, by a one-to-one assignment that maximises total IoU among
    pairs with IoU >= ``min_iou`` (so two touching cells are not fused, and a
    cell that splits continues into one branch only). Returns consecutive 3D ids
    from 1 in a dtype that holds them all.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"link_slices needs a (Z, Y, X) stack of 2D label images, got shape {labels.shape}.")
    if not 0.0 < min_iou <= 1.0:
        raise InputError(f"min_iou must lie in (0, 1], got {min_iou}.")
    labels = labels.astype(np.int64, copy=False)
    out = np.zeros(labels.shape, dtype=np.int64)
    next_id = 1
    ids_prev: dict[int, int] = {}
    for z in range(labels.shape[0]):
        current = np.unique(labels[z])
        current = current[current > 0]
        ids: dict[int, int] = {}
        if z > 0 and ids_prev and current.size:
            la, lb, iou = _overlaps(labels[z - 1], labels[z])
            keep = iou >= min_iou
            la, lb, iou = la[keep], lb[keep], iou[keep]
            if iou.size:
                rows, row_of = np.unique(la, return_inverse=True)
                cols, col_of = np.unique(lb, return_inverse=True)
                score = np.zeros((rows.size, cols.size))
                score[row_of, col_of] = iou
                r, c = linear_sum_assignment(score, maximize=True)
                for i, j in zip(r, c):
                    if score[i, j] > 0:
                        ids[int(cols[j])] = ids_prev[int(rows[i])]
        for label in current:
            if int(label) not in ids:
                ids[int(label)] = next_id
                next_id += 1
        if current.size:
            lut = np.zeros(int(current.max()) + 1, dtype=np.int64)
            for label, obj in ids.items():
                lut[label] = obj
            out[z] = lut[labels[z]]
        ids_prev = ids
    dtype = np.uint16 if next_id <= np.iinfo(np.uint16).max else np.uint32
    return out.astype(dtype)
