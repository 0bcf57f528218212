"""Measuring segmentations against ground truth: single masks and whole instance label images."""

from biosam.evaluate.folders import evaluate_folders, pair_files, read_labels
from biosam.evaluate.instances import (
    MSA_THRESHOLDS,
    InstanceCounts,
    InstanceMatch,
    aggregate,
    evaluate_instances,
    instance_counts,
    match_instances,
)
from biosam.evaluate.masks import boxes_from_labels, mask_iou

__all__ = [
    "MSA_THRESHOLDS",
    "InstanceCounts",
    "InstanceMatch",
    "aggregate",
    "boxes_from_labels",
    "evaluate_folders",
    "evaluate_instances",
    "instance_counts",
    "mask_iou",
    "match_instances",
    "pair_files",
    "read_labels",
]
