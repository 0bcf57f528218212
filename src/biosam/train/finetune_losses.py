"""The losses of SAM fine-tuning: Dice with focal or BCE loss per mask, the IoU head's target, and the loss of
one step of iterative prompting (:func:`batch_loss`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from biosam.models.sam import Sam
from biosam.train.finetune_prompts import PromptBatch, corrective_points, jitter
from biosam.train.finetune_settings import FinetuneSettings

_FOCAL_ALPHA, _FOCAL_GAMMA = 0.25, 2.0


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    return (x * valid).sum((-2, -1)) / valid.sum().clamp(min=1)


def dice_loss(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """1 - soft Dice per mask over the valid pixels: logits ``(N, C, L, L)``, targets ``(N, L, L)`` -> ``(N, C)``."""
    p = torch.sigmoid(logits) * valid
    t = (targets * valid)[:, None]
    return 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)


def focal_loss(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Sigmoid focal loss (alpha 0.25, gamma 2) per mask, mean over the valid pixels -> ``(N, C)``."""
    t = targets[:, None].expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * t + (1 - p) * (1 - t)
    weight = _FOCAL_ALPHA * t + (1 - _FOCAL_ALPHA) * (1 - t)
    return _masked_mean(weight * ce * (1 - p_t) ** _FOCAL_GAMMA, valid)


def bce_loss(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Binary cross-entropy per mask, mean over the valid pixels -> ``(N, C)``."""
    t = targets[:, None].expand_as(logits)
    return _masked_mean(F.binary_cross_entropy_with_logits(logits, t, reduction="none"), valid)


def mask_losses(logits: Tensor, targets: Tensor, valid: Tensor, kind: str = "focal",
                focal_weight: float = 1.0) -> Tensor:
    """Dice + ``focal_weight`` x focal (SAM recipe) or Dice + BCE (MedSAM) per mask -> ``(N, C)``."""
    if kind == "focal":
        return dice_loss(logits, targets, valid) + focal_weight * focal_loss(logits, targets, valid)
    return dice_loss(logits, targets, valid) + bce_loss(logits, targets, valid)


def mask_ious(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """IoU of each thresholded mask with its target -> ``(N, C)`` (1 when both are empty)."""
    pred = (logits > 0) & valid
    truth = ((targets > 0.5) & valid)[:, None]
    inter = (pred & truth).sum((-2, -1)).float()
    union = (pred | truth).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def batch_loss(model: Sam, batch: PromptBatch, settings: FinetuneSettings, rng: np.random.Generator,
               use_box: bool) -> tuple[Tensor, dict]:
    """Loss of one step of iterative prompting on ``batch`` (differentiable) and a few numbers about it.

    Round 1 prompts with the (jittered) boxes when ``use_box``, else one point per
    object with three candidate masks; every later round adds a corrective point
    and the previous mask. The loss is the mean over rounds of the mask loss plus
    the IoU head's squared error.
    """
    train_encoder = any(p.requires_grad for p in model.image_encoder.parameters())
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        embedding = model.embed(batch.image)
    size = model.image_size
    boxes = jitter(batch.boxes, batch.box_sides, settings.box_jitter, size, rng) if use_box else None
    coords = labels = mask_in = None
    if not use_box:
        coords = batch.points
        labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=coords.device)
    n = len(batch.targets)
    total = torch.zeros((), device=embedding.device)
    ious = []
    for round_ in range(settings.rounds):
        multimask = coords is not None and boxes is None and coords.shape[1] == 1
        logits, iou_pred = model.decode(embedding, point_coords=coords, point_labels=labels, boxes=boxes,
                                        mask_inputs=mask_in, multimask=multimask)
        losses = mask_losses(logits, batch.targets, batch.valid, settings.loss_kind, settings.focal_weight)
        true_iou = mask_ious(logits.detach(), batch.targets, batch.valid)
        best = losses.detach().argmin(dim=1)  # the best of several candidates is the one trained
        picked = losses[torch.arange(n), best]
        total = total + picked.mean() + F.mse_loss(iou_pred, true_iou)
        chosen = logits[torch.arange(n), best].detach()
        ious.append(float(true_iou[torch.arange(n), best].mean()))
        if round_ + 1 < settings.rounds:
            new_coords, new_labels = corrective_points(chosen, batch.targets, batch.valid, size)
            coords = new_coords if coords is None else torch.cat([coords, new_coords], dim=1)
            labels = new_labels if labels is None else torch.cat([labels, new_labels], dim=1)
            mask_in = chosen[:, None]
    return total / settings.rounds, {"iou_first": ious[0], "iou_last": ious[-1]}

