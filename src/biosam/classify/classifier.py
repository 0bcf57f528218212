"""A trained mask classifier with its record: load, check against the model, classify candidate masks."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from biosam.classify.features import CropSettings, as_rgb, crops, masked_features
from biosam.classify.head import MaskClassifier
from biosam.errors import InputError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "biosam-mask-classifier"
CHECKPOINT_VERSION = 1
BACKGROUND = "background"
# What the candidates were cut from: a 2D image (``biosam auto``) or a tomogram's slabs (``biosam tomogram``).
SOURCES = ("image", "tomogram")


class ClassifierMismatchError(InputError):
    """A mask classifier used with another image encoder or on another kind of input than it was trained for."""


@dataclass
class Classifier:
    """A :class:`MaskClassifier` with what it needs to be used: class names (0 is background),
    the encoder whose features it reads, crop settings, and where its candidates came from."""

    head: MaskClassifier
    classes: list[str]
    encoder: dict
    crop: CropSettings = field(default_factory=CropSettings)
    source: str = "image"
    info: dict = field(default_factory=dict)  # candidate settings, intensity, training record

    def check(self, model: torch.nn.Module, source: str | None = None, name: str = "classifier") -> None:
        """Refuse a model with another image encoder, or candidates of another kind than trained on."""
        mine = self.encoder.get("checkpoint_hash")
        if mine is not None and mine != model.info.checkpoint_hash:
            raise ClassifierMismatchError(
                f"{name} was trained on features of '{self.encoder.get('name')}', not of '{model.info.name}' "
                f"(checkpoint hashes differ): use --model {self.encoder.get('name')} or train a classifier for this model."
            )
        if source is not None and source != self.source:
            raise ClassifierMismatchError(
                f"{name} was trained on {self.source} candidates; it cannot judge {source} candidates. "
                f"Train one with `biosam train classifier` on {source} data."
            )

    def keep_ids(self, keep: Sequence[str] | None) -> list[int]:
        """Class indices for class names (default: every class but background); unknown names are refused."""
        if not keep:
            return [k for k, c in enumerate(self.classes) if c != BACKGROUND]
        unknown = [c for c in keep if c not in self.classes]
        if unknown:
            raise InputError(f"unknown class(es) {unknown}: this classifier knows {self.classes}.")
        return [self.classes.index(c) for c in keep]

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, view: np.ndarray, masks: Sequence[np.ndarray] | np.ndarray,
                batch_size: int = 8) -> np.ndarray:
        """Class probabilities ``(N, C)`` of 2D candidate masks on ``view`` (gray or RGB, 0-255)."""
        view = as_rgb(view)
        pairs = [crops(view, np.asarray(m, bool), self.crop) for m in masks]
        features = masked_features(model, pairs, self.crop, batch_size)
        self.head.eval()
        probs = [torch.softmax(self.head(features[i : i + 64].to(self.device)).float(), dim=1).cpu()
                 for i in range(0, len(features), 64)]
        return torch.cat(probs).numpy() if probs else np.zeros((0, len(self.classes)), np.float32)

    def record(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "classes": list(self.classes),
                "encoder": dict(self.encoder), "crop": self.crop.to_dict(), "source": self.source,
                "dropout": float(self.head.features[-1].p), **self.info}


def save_classifier(path: str | os.PathLike, classifier: Classifier) -> Path:
    """Write ``classifier`` (weights and record) to ``path`` atomically."""
    from biosam.io.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({**classifier.record(), "state_dict": classifier.head.state_dict()}, tmp)
    return path


def load_classifier(path: str | os.PathLike, model: torch.nn.Module | None = None, source: str | None = None,
                    device: str | torch.device | None = None) -> Classifier:
    """Load a classifier checkpoint; with ``model`` (and ``source``), refuse a mismatch before any work."""
    from biosam.models.checkpoint import read_plain_checkpoint

    path = Path(path)
    data = read_plain_checkpoint(path, "classifier")
    if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a biosam mask classifier (train one with `biosam train classifier`).")
    if data.get("version", 0) > CHECKPOINT_VERSION:
        raise InputError(f"{path}: classifier version {data['version']} is newer than this biosam reads; upgrade biosam.")
    classes = list(data["classes"])
    head = MaskClassifier(len(classes), dropout=float(data.get("dropout", 0.2)))
    try:
        head.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path}: classifier weights do not fit its network ({str(exc).splitlines()[0]}).") from exc
    known = {"format", "version", "classes", "encoder", "crop", "source", "dropout", "state_dict"}
    classifier = Classifier(head.eval(), classes, dict(data["encoder"]), CropSettings(**data["crop"]),
                            data.get("source", "image"), {k: v for k, v in data.items() if k not in known})
    if device is None and model is not None:
        device = model.device
    if device is not None:
        classifier.head.to(device)
    if model is not None:
        classifier.check(model, source, name=str(path))
    return classifier


def classify_labels(classifier: Classifier, model: torch.nn.Module, view: np.ndarray, labels: np.ndarray,
                    keep: Sequence[str] | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Keep the objects of a 2D label image that the classifier puts in ``keep`` (default: not background).

    Returns the labels with the other objects removed (ids unchanged) and each kept id's class.
    """
    ids = [int(i) for i in np.unique(labels) if i != 0]
    if not ids:
        return labels, {}
    probs = classifier.predict(model, view, [labels == i for i in ids])
    wanted = set(classifier.keep_ids(keep))
    chosen = probs.argmax(axis=1)
    kept = {i: classifier.classes[c] for i, c in zip(ids, chosen) if c in wanted}
    logger.info("classifier kept %d of %d objects", len(kept), len(ids))
    out = np.where(np.isin(labels, list(kept)), labels, 0).astype(labels.dtype)
    return out, kept
