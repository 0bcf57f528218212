"""Validation of SAM fine-tuning: every held-back object prompted once with its box and once with its innermost
point, through the normal predictor."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from biosam.evaluate import boxes_from_labels, mask_iou
from biosam.train.finetune_data import read_checked
from biosam.train.finetune_prompts import interior_points
from biosam.train.finetune_settings import FinetuneSettings
from biosam.train.harness import progress_bar

Pair = tuple[Path, Path]


def evaluate_prompts(model: nn.Module, pairs: list[Pair], intensity: str = "auto", min_area: int = 16,
                     chunk: int = 16, progress: bool = False) -> dict:
    """Mean IoU of every labelled object prompted with its box, and with its innermost point.

    Uses the normal :class:`~biosam.prompting.predictor.Predictor` on whole
    images with ``zoom="off"``; a single point gets three masks and the one with
    the highest predicted IoU counts. Objects under ``min_area`` pixels are left
    out. Returns ``box_iou``, ``point_iou``, ``objects`` and ``per_image``.
    """
    from biosam.prompting.predictor import Predictor

    predictor = Predictor(model)
    box_all, point_all, per_image = [], [], []
    for image_path, label_path in progress_bar(pairs, desc="validation", enabled=progress, unit="image", leave=False):
        image, labels = read_checked(image_path, label_path)
        boxes, ids = boxes_from_labels(labels)
        keep = np.bincount(labels.ravel())[ids] >= min_area
        boxes, ids = boxes[keep], ids[keep]
        if not len(ids):
            continue
        points = interior_points(labels, ids)
        predictor.set_image(image, intensity=intensity)
        box_iou, point_iou = [], []
        for s in range(0, len(ids), chunk):
            part = slice(s, s + chunk)
            truth = [labels == i for i in ids[part]]
            result = predictor.predict(box=boxes[part], zoom="off")
            box_iou += [mask_iou(m, t) for m, t in zip(result.masks, truth)]
            pts = points[part][:, None]
            result = predictor.predict(points=pts, point_labels=np.ones(pts.shape[:2]), multimask=True, zoom="off")
            best = result.scores.argmax(axis=1)
            point_iou += [mask_iou(result.masks[k, best[k]], t) for k, t in enumerate(truth)]
        per_image.append({"image": Path(image_path).name, "objects": len(ids),
                          "box_iou": float(np.mean(box_iou)), "point_iou": float(np.mean(point_iou))})
        box_all += box_iou
        point_all += point_iou
    if not box_all:
        return {"box_iou": math.nan, "point_iou": math.nan, "objects": 0, "per_image": per_image}
    return {"box_iou": float(np.mean(box_all)), "point_iou": float(np.mean(point_all)), "objects": len(box_all),
            "per_image": per_image}


def validate(model: nn.Module, val_pairs: list[Pair], settings: FinetuneSettings, progress: bool) -> dict:
    """:func:`evaluate_prompts` with the run's settings, without gradients."""
    with torch.inference_mode():
        return evaluate_prompts(model, val_pairs, settings.intensity, settings.min_area, progress=progress)


def score(metrics: dict, settings: FinetuneSettings) -> float:
    """What picks the best epoch: box IoU for box-only training, else the mean of box and point IoU."""
    if settings.recipe == "medsam":
        return metrics["box_iou"]
    return (metrics["box_iou"] + metrics["point_iou"]) / 2

