"""Mask classifier: which class a candidate mask belongs to, judged from frozen SAM features."""

from biosam.classify.classifier import (
    BACKGROUND,
    Classifier,
    ClassifierMismatchError,
    classify_labels,
    load_classifier,
    save_classifier,
)
from biosam.classify.features import CropSettings, masked_features
from biosam.classify.head import MaskClassifier

__all__ = [
    "BACKGROUND",
    "Classifier",
    "ClassifierMismatchError",
    "CropSettings",
    "MaskClassifier",
    "classify_labels",
    "load_classifier",
    "masked_features",
    "save_classifier",
]
