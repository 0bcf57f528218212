"""3D objects from per-slice 2D instance labels, linked by overlap between neighbouring slices."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from biosam.errors import InputError
from biosam.labels import label_dtype

__all__ = ["SliceLinker", "link_slices", "overlap_iou"]


def overlap_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label pairs ``(la, lb)`` that overlap between two label slices and their IoU."""
    both = (a > 0) & (b > 0)
    pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
    if not inter.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    la, lb = pairs.astype(np.int64)
    area_a = np.bincount(a.ravel(), minlength=int(la.max()) + 1)
    area_b = np.bincount(b.ravel(), minlength=int(lb.max()) + 1)
    return la, lb, inter / (area_a[la] + area_b[lb] - inter)


class SliceLinker:
    """Links 2D instance labels slice by slice into 3D objects (see :func:`link_slices`).

    Feed the slices in order to :meth:`add`; each call returns that slice with
    3D ids, so a volume can be written as it is segmented.
    """

    def __init__(self, min_iou: float = 0.3) -> None:
        if not 0.0 < min_iou <= 1.0:
            raise InputError(f"min_iou must lie in (0, 1], got {min_iou}.")
        self.min_iou = min_iou
        self.count = 0
        self._previous: np.ndarray | None = None
        self._ids: dict[int, int] = {}

    def add(self, labels: np.ndarray) -> np.ndarray:
        """The next slice's 2D instance labels -> the same slice with 3D object ids (int64)."""
        labels = np.asarray(labels).astype(np.int64, copy=False)
        return self.link(labels)[labels]

    def link(self, labels: np.ndarray) -> np.ndarray:
        """The next slice's 2D instance labels -> a table of their 3D object ids (int64; ``table[labels]`` is
        :meth:`add`'s result), for callers that write the slice piece by piece.

        Holds this slice until the next call: two slices of labels at a time.
        """
        labels = np.asarray(labels).astype(np.int64, copy=False)
        current = np.unique(labels)
        current = current[current > 0]
        ids: dict[int, int] = {}
        if self._previous is not None and self._ids and current.size:
            la, lb, iou = overlap_iou(self._previous, labels)
            keep = iou >= self.min_iou
            la, lb, iou = la[keep], lb[keep], iou[keep]
            if iou.size:
                rows, row_of = np.unique(la, return_inverse=True)
                cols, col_of = np.unique(lb, return_inverse=True)
                score = np.zeros((rows.size, cols.size))
                score[row_of, col_of] = iou
                for r, c in zip(*linear_sum_assignment(score, maximize=True)):
                    if score[r, c] > 0:
                        ids[int(cols[c])] = self._ids[int(rows[r])]
        lut = np.zeros(int(current.max()) + 1 if current.size else 1, dtype=np.int64)
        for label in current:
            if int(label) not in ids:
                self.count += 1
                ids[int(label)] = self.count
            lut[label] = ids[int(label)]
        self._previous, self._ids = labels, ids
        return lut


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
    linker = SliceLinker(min_iou)
    out = np.stack([linker.add(plane) for plane in labels]) if len(labels) else labels.astype(np.int64)
    return out.astype(label_dtype(linker.count))
