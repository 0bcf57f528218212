"""Measuring segmentations against ground truth."""

from __future__ import annotations

import numpy as np
from skimage.measure import regionprops


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def boxes_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight boxes of every object in an instance label image.

    Returns ``(boxes, ids)``: ``boxes`` is ``(N, 4)`` ``(x_min, y_min, x_max, y_max)``
    with inclusive maxima (the convention MedSAM's authors use for box prompts),
    ``ids`` the label of each box.
    """
    props = regionprops(np.asarray(labels))
    boxes = np.array([[p.bbox[1], p.bbox[0], p.bbox[3] - 1, p.bbox[2] - 1] for p in props], dtype=float).reshape(-1, 4)
    return boxes, np.array([p.label for p in props], dtype=np.int64)
