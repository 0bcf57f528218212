"""Instance segmentation scores: one-to-one object matching and detection metrics at IoU thresholds.

Edge cases follow one rule: a ratio whose denominator is zero is 1.0 when both
prediction and ground truth are empty (nothing to find, nothing found) and 0.0
otherwise (e.g. precision of an empty prediction against objects).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from biosam.errors import InputError

# The thresholds whose mean segmentation accuracy is reported as mSA (0.5:0.05:0.95).
MSA_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
PAIR_THRESHOLD = 0.5  # matched IoU and panoptic quality use the pairs matched at this IoU


def as_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Check an instance label image (0 = background) and return it as a non-negative integer array.

    Booleans count as one object; floats are accepted when every value is a whole number.
    """
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise InputError(f"{name}: holds non-integer values; an instance label image needs one whole-number id "
                             "per object (0 = background). Round or relabel it first.")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise InputError(f"{name}: dtype {arr.dtype} is not an integer label image; give one integer id per object "
                         "(0 = background).")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise InputError(f"{name}: has negative label {arr.min()}; ids must be >= 0 (0 = background).")
    return arr


def _check_thresholds(thresholds: Iterable[float]) -> tuple[float, ...]:
    thresholds = list(thresholds)
    values = tuple(sorted({round(float(t), 6) for t in thresholds}))
    if not values or values[0] <= 0 or values[-1] > 1:
        raise InputError(f"thresholds {list(thresholds)}: give one or more IoU thresholds in (0, 1].")
    return values


def _dense_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Object ids present (background excluded) and each pixel's index into them, plus one (0 = background)."""
    ids, inverse = np.unique(labels.ravel(), return_inverse=True)
    if ids.size and ids[0] == 0:
        return ids[1:], inverse
    return ids, inverse + 1


@dataclass(frozen=True)
class _Overlaps:
    pred_ids: np.ndarray
    gt_ids: np.ndarray
    iou: sparse.coo_array  # (n_pred, n_gt), entries only where objects overlap
    fg_intersection: int
    fg_sum: int


def _overlaps(pred: np.ndarray, gt: np.ndarray) -> _Overlaps:
    pred, gt = as_labels(pred, "pred"), as_labels(gt, "gt")
    if pred.shape != gt.shape:
        raise InputError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}; "
                         "both label images must cover the same pixels.")
    pred_ids, p = _dense_ids(pred)
    gt_ids, g = _dense_ids(gt)
    fg = (p > 0) | (g > 0)
    p, g = p[fg], g[fg]
    # Pixel counts of every (pred, gt) id pair, row/column 0 = background: object areas are the margins.
    counts = sparse.coo_array((np.ones(p.size, np.int64), (p, g)), shape=(pred_ids.size + 1, gt_ids.size + 1)).tocsr()
    pred_area, gt_area = counts.sum(axis=1), counts.sum(axis=0)
    inter = counts[1:, 1:].tocoo()
    iou = inter.data / (pred_area[inter.row + 1] + gt_area[inter.col + 1] - inter.data)
    return _Overlaps(pred_ids, gt_ids, sparse.coo_array((iou, (inter.row, inter.col)), shape=inter.shape),
                     int(inter.data.sum()), int(pred_area[1:].sum() + gt_area[1:].sum()))


def _assign(iou: sparse.coo_array, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one pairs with IoU >= threshold: as many as possible, then the largest total IoU.

    Returns row and column indices and IoU of the pairs. Solved per connected
    component of the overlap graph, so the cost is set by the largest cluster of
    mutually overlapping objects, not by the object count.
    """
    keep = (iou.data >= threshold) & (iou.data > 0)
    rows, cols, vals = iou.row[keep].astype(np.int64), iou.col[keep].astype(np.int64), iou.data[keep]
    n_pred, nodes = iou.shape[0], iou.shape[0] + iou.shape[1]
    graph = sparse.coo_array((np.ones(rows.size), (rows, cols + n_pred)), shape=(nodes, nodes))
    comp = connected_components(graph, directed=False)[1][rows]
    single = np.bincount(comp, minlength=1)[comp] == 1
    out = [(rows[single], cols[single], vals[single])]  # isolated pairs (all of them when IoU >= 0.5) match directly
    order = np.flatnonzero(~single)
    order = order[np.argsort(comp[order], kind="stable")]
    for edges in np.split(order, np.flatnonzero(np.diff(comp[order])) + 1) if order.size else []:
        r, ri = np.unique(rows[edges], return_inverse=True)
        c, ci = np.unique(cols[edges], return_inverse=True)
        sub = np.zeros((r.size, c.size))
        sub[ri, ci] = vals[edges]
        # Weight 1 per pair plus IoU scaled so that all IoU together never outweigh one more pair.
        weight = np.where(sub > 0, 1 + sub / (min(r.size, c.size) + 1), 0)
        i, j = linear_sum_assignment(weight, maximize=True)
        ok = weight[i, j] > 0
        out.append((r[i[ok]], c[j[ok]], sub[i[ok], j[ok]]))
    return tuple(np.concatenate(parts) for parts in zip(*out))


@dataclass(frozen=True)
class InstanceMatch:
    """Objects of a prediction and a ground truth and their one-to-one matching.

    ``iou`` is a sparse ``(n_pred, n_gt)`` matrix indexed like ``pred_ids`` and
    ``gt_ids`` (entries only where objects overlap). Pair ``k`` matches object
    ``pred_ids[pred_index[k]]`` with ``gt_ids[gt_index[k]]`` at IoU ``pair_iou[k]``.
    """

    pred_ids: np.ndarray
    gt_ids: np.ndarray
    iou: sparse.csr_array
    pred_index: np.ndarray
    gt_index: np.ndarray
    pair_iou: np.ndarray
    threshold: float


def match_instances(pred: np.ndarray, gt: np.ndarray, threshold: float = PAIR_THRESHOLD) -> InstanceMatch:
    """Match predicted to ground-truth objects one-to-one among pairs with IoU >= ``threshold``.

    The matching has the most pairs possible, and among those the largest total
    IoU (``linear_sum_assignment``). For ``threshold >= 0.5`` it is unique: an
    object overlaps at most one other by more than half their union.
    """
    (threshold,) = _check_thresholds([threshold])
    ov = _overlaps(pred, gt)
    return InstanceMatch(ov.pred_ids, ov.gt_ids, ov.iou.tocsr(), *_assign(ov.iou, threshold), threshold)


@dataclass(frozen=True)
class InstanceCounts:
    """What the scores of one image (or several, added with ``+``) are computed from."""

    thresholds: tuple[float, ...]
    tp: np.ndarray  # per threshold
    n_pred: int
    n_gt: int
    matched: int  # pairs at IoU >= 0.5 ...
    matched_iou_sum: float  # ... and their IoU summed
    fg_intersection: int  # pixels that are foreground in both
    fg_sum: int  # foreground pixels of prediction plus those of ground truth
    images: int = 1
    msa_sum: float = 0.0  # per-image mSA summed, for the mean over images

    def __add__(self, other: InstanceCounts) -> InstanceCounts:
        if self.thresholds != other.thresholds:
            raise InputError("cannot pool results computed at different IoU thresholds.")
        summed = (getattr(self, f.name) + getattr(other, f.name) for f in fields(self)[1:])
        return InstanceCounts(self.thresholds, *summed)

    def _ratio(self, num: float, den: float) -> float:
        return float(num / den) if den else float(self.n_pred == 0 and self.n_gt == 0)

    def at(self, threshold: float) -> dict:
        """TP, FP, FN, precision, recall, F1 and segmentation accuracy SA = TP / (TP + FP + FN)."""
        tp = int(self.tp[self.thresholds.index(round(float(threshold), 6))])
        fp, fn = self.n_pred - tp, self.n_gt - tp
        return {"threshold": threshold, "tp": tp, "fp": fp, "fn": fn, "precision": self._ratio(tp, tp + fp),
                "recall": self._ratio(tp, tp + fn), "f1": self._ratio(2 * tp, 2 * tp + fp + fn),
                "sa": self._ratio(tp, tp + fp + fn)}

    @property
    def msa(self) -> float:
        """Mean segmentation accuracy over IoU 0.5:0.05:0.95 (of the pooled counts)."""
        return float(np.mean([self.at(t)["sa"] for t in MSA_THRESHOLDS]))

    def summary(self, thresholds: Sequence[float] = MSA_THRESHOLDS) -> dict:
        """The scores as a JSON-friendly dict, with per-threshold rows for ``thresholds``."""
        at_half = self.at(PAIR_THRESHOLD)
        return {"n_pred": self.n_pred, "n_gt": self.n_gt, "msa": self.msa,
                "mean_matched_iou": self._ratio(self.matched_iou_sum, self.matched),
                "pq": self._ratio(self.matched_iou_sum, at_half["tp"] + (at_half["fp"] + at_half["fn"]) / 2),
                "dice": self._ratio(2 * self.fg_intersection, self.fg_sum),
                "per_threshold": [self.at(t) for t in _check_thresholds(thresholds)]}


def instance_counts(pred: np.ndarray, gt: np.ndarray, thresholds: Iterable[float] = MSA_THRESHOLDS) -> InstanceCounts:
    """Match the objects of ``pred`` and ``gt`` at every threshold (and those of mSA) and count."""
    ts = _check_thresholds([*_check_thresholds(thresholds), *MSA_THRESHOLDS, PAIR_THRESHOLD])
    ov = _overlaps(pred, gt)
    pair_iou = {t: _assign(ov.iou, t)[2] for t in ts}
    counts = InstanceCounts(ts, np.array([pair_iou[t].size for t in ts]), ov.pred_ids.size, ov.gt_ids.size,
                            pair_iou[PAIR_THRESHOLD].size, float(pair_iou[PAIR_THRESHOLD].sum()),
                            ov.fg_intersection, ov.fg_sum)
    return replace(counts, msa_sum=counts.msa)


def evaluate_instances(pred: np.ndarray, gt: np.ndarray, thresholds: Iterable[float] = MSA_THRESHOLDS) -> dict:
    """Score a predicted instance label image against the ground truth (same shape, 0 = background).

    Returns ``n_pred``, ``n_gt``; ``per_threshold``: one row per IoU threshold
    with TP, FP, FN, precision, recall, F1 and SA = TP / (TP + FP + FN);
    ``msa``: mean SA over 0.5:0.05:0.95; ``mean_matched_iou`` of the pairs
    matched at IoU >= 0.5; ``pq``: panoptic quality at 0.5; ``dice`` of the
    foreground (pred > 0 against gt > 0). Ids need not be contiguous. Both
    images empty scores 1.0 everywhere; one of them empty scores 0.0.
    """
    thresholds = list(thresholds)
    return instance_counts(pred, gt, thresholds).summary(thresholds)


def aggregate(counts: Sequence[InstanceCounts], thresholds: Sequence[float] = MSA_THRESHOLDS) -> dict:
    """Scores of several images pooled: TP, FP, FN and pixel counts summed, then the metrics.

    Adds ``images`` and ``mean_image_msa`` (the mean of the per-image mSA).
    """
    if not counts:
        raise InputError("no images to aggregate.")
    total = sum(counts[1:], start=counts[0])
    return total.summary(thresholds) | {"images": total.images, "mean_image_msa": total.msa_sum / total.images}
