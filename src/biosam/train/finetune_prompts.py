"""Prompt sampling for SAM fine-tuning: the objects of a view as prompts and targets, box jitter, corrective
points in the middle of a mask's largest error, and the innermost point of an object (validation)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from biosam.evaluate import boxes_from_labels
from biosam.models.sam import Sam
from biosam.prompting.preprocess import LOW_RES, Frame, model_input
from biosam.train.finetune_settings import FinetuneSettings


@dataclass
class PromptBatch:
    """The objects of one view, ready for the model: all coordinates are model-input pixels."""

    image: Tensor  # (1, 3, S, S) model input
    targets: Tensor  # (N, L, L) soft object masks on the decoder's low-resolution grid
    valid: Tensor  # (L, L) bool: the part of the grid covered by the image (not padding)
    boxes: Tensor  # (N, 4) tight boxes x0, y0, x1, y1 (inclusive maxima, as at inference)
    points: Tensor  # (N, 1, 2) one random pixel inside each object (x, y)
    box_sides: Tensor  # (N, 2) box width and height, for jitter


def make_batch(model: Sam, rgb: np.ndarray, labels: np.ndarray, settings: FinetuneSettings,
               rng: np.random.Generator, min_area: float | None = None) -> PromptBatch | None:
    """Prompts and targets for up to ``batch_size`` random objects of a view; None when it has no object.

    ``min_area`` is in view pixels (default ``settings.min_area``).
    """
    preprocessing = model.info.preprocessing
    min_area = settings.min_area if min_area is None else min_area
    areas = np.bincount(labels.ravel())
    ids = np.nonzero(areas >= max(min_area, 1))[0]
    ids = ids[ids > 0]
    if ids.size == 0:
        return None
    ids = np.sort(rng.choice(ids, size=min(settings.batch_size, ids.size), replace=False))
    frame = Frame.create(labels.shape, model.image_size, preprocessing)
    low = LOW_RES
    lh, lw = frame.low_res_extent
    device = model.device

    boxes_all, box_ids = boxes_from_labels(labels)
    boxes = boxes_all[np.searchsorted(box_ids, ids)]
    points = []
    slices = ndimage.find_objects(labels)
    for i in ids:
        sl = slices[i - 1]
        ys, xs = np.nonzero(labels[sl] == i)
        j = int(rng.integers(0, ys.size))
        points.append((xs[j] + sl[1].start, ys[j] + sl[0].start))
    masks = torch.from_numpy(np.stack([labels == i for i in ids]).astype(np.float32))[:, None]
    shrink = lh < labels.shape[0] or lw < labels.shape[1]
    small = F.interpolate(masks, size=(lh, lw), mode="bilinear", align_corners=False, antialias=shrink)[:, 0]
    targets = torch.zeros(len(ids), low, low)
    targets[:, :lh, :lw] = small.clamp(0, 1)
    valid = torch.zeros(low, low, dtype=torch.bool)
    valid[:lh, :lw] = True
    sx, sy = frame.scale_xy
    return PromptBatch(
        image=model_input(rgb, frame, preprocessing).to(device),
        targets=targets.to(device),
        valid=valid.to(device),
        boxes=torch.as_tensor(frame.to_model(boxes), dtype=torch.float32, device=device),
        points=torch.as_tensor(frame.to_model(np.array(points, dtype=np.float64)), dtype=torch.float32,
                               device=device)[:, None],
        box_sides=torch.as_tensor((boxes[:, 2:] - boxes[:, :2] + 1) * [sx, sy], dtype=torch.float32, device=device),
    )


def jitter(boxes: Tensor, sides: Tensor, amount: float, size: int, rng: np.random.Generator) -> Tensor:
    """Move each box side by up to ``amount`` x the box's width/height (SAM and MedSAM train with noisy boxes)."""
    if amount <= 0:
        return boxes
    noise = torch.as_tensor(rng.uniform(-amount, amount, size=tuple(boxes.shape)), dtype=boxes.dtype,
                            device=boxes.device)
    moved = (boxes + noise * sides.repeat(1, 2)).clamp(0, size - 1)
    lo = torch.minimum(moved[:, :2], moved[:, 2:])
    hi = torch.maximum(moved[:, :2], moved[:, 2:])
    return torch.cat([lo, torch.maximum(hi, lo + 1)], dim=1)


def corrective_points(logits: Tensor, targets: Tensor, valid: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """One new point per object in the middle of its largest error, with its label.

    The error is the missed part of the object (label 1) or the wrongly taken
    background (label 0), whichever is larger; the point is the pixel furthest
    from the error's edge. A perfect mask gets a padding point (label -1).
    Returns ``(N, 1, 2)`` model-input coordinates and ``(N, 1)`` labels.
    """
    pred = ((logits > 0) & valid).cpu().numpy()
    truth = ((targets > 0.5) & valid).cpu().numpy()
    low = logits.shape[-1]
    coords = np.zeros((len(pred), 1, 2), dtype=np.float32)
    labels = np.full((len(pred), 1), -1, dtype=np.int64)
    for k, (p, t) in enumerate(zip(pred, truth)):
        missed, extra = t & ~p, p & ~t
        error, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
        if not error.any():
            continue
        depth = ndimage.distance_transform_edt(np.pad(error, 1))[1:-1, 1:-1]
        row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
        # the centre of low-res pixel (row, col) in model-input pixels (the prompt encoder adds 0.5 itself)
        coords[k, 0] = ((col + 0.5) * size / low - 0.5, (row + 0.5) * size / low - 0.5)
        labels[k, 0] = label
    return torch.from_numpy(coords).to(logits.device), torch.from_numpy(labels).to(logits.device)



def interior_points(labels: np.ndarray, ids: Iterable[int]) -> np.ndarray:
    """For each object id, its pixel furthest from the object's boundary, as ``(N, 2)`` (x, y).

    Of several equally deep pixels (a ridge), the one nearest their centre is taken.
    """
    slices = ndimage.find_objects(labels)
    out = []
    for i in ids:
        sl = slices[i - 1]
        depth = ndimage.distance_transform_edt(np.pad(labels[sl] == i, 1))
        rows, cols = np.nonzero(depth == depth.max())
        k = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
        out.append((sl[1].start + cols[k] - 1, sl[0].start + rows[k] - 1))
    return np.array(out, dtype=np.float64).reshape(-1, 2)

