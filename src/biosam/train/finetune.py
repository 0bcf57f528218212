"""Fine-tuning a SAM v1 model on labelled images: in full, or with LoRA adapters on the image encoder.

Every training step takes one view of one training image (the whole image in the
model's input frame, or with ``max_zoom`` a random enlarged part of it, turned or
flipped), embeds it once and decodes up to ``batch_size`` of its objects with
iterative prompting, as SAM was trained: the first prompt is the object's box or
one random point inside it, then each further round adds a corrective point in
the middle of the largest error (object missed: positive point; background
taken: negative point) and the previous mask's logits as a mask prompt. Each
round's masks are scored with Dice plus focal (or BCE) loss on the decoder's
256 px grid, and the IoU head learns the true IoU of its masks by MSE. A single
point is ambiguous, so it gets SAM's three masks and only the best one is
trained. The MedSAM recipe uses jittered boxes only, Dice + BCE, and a frozen
prompt encoder.

Validation prompts every ground-truth object of the held-back images once with
its tight box and once with the interior point furthest from its boundary,
through the normal :class:`~biosam.prompting.predictor.Predictor` (whole image,
zoom off), and reports the mean IoU of each. The best epoch is written to the
output; the state after every epoch goes to ``OUTPUT.resume`` so an interrupted
run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from scipy import ndimage
from torch import Tensor, nn
from tqdm.auto import tqdm

from biosam.automatic.data import as_instances, dihedral
from biosam.automatic.resample import resize_image, resize_labels, scaled_shape
from biosam.errors import BiosamError, InputError
from biosam.evaluate import boxes_from_labels, mask_iou
from biosam.models.config import config_dict, config_name
from biosam.models.sam import Sam
from biosam.prompting.intensity import normalize_intensity, resolve_preset
from biosam.prompting.preprocess import Frame, model_input
from biosam.train.lora import DEFAULT_TARGETS, add_lora, lora_state_dict, merge_lora, merged_state_dict

logger = logging.getLogger(__name__)

RESUME_SUFFIX = ".resume"
CHECKPOINT_FORMAT = 1
MODULES = ("image_encoder", "prompt_encoder", "mask_decoder")
RECIPES = ("sam", "medsam")
_OUTPUT_SUFFIXES = (".pt", ".pth")
_FOCAL_ALPHA, _FOCAL_GAMMA = 0.25, 2.0
_VIEW_TRIES = 10
Pair = tuple[Path, Path]


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune.

    ``recipe``: ``"sam"`` (boxes or points first, then ``prompt_iterations`` - 1
    corrective rounds; focal + Dice) or ``"medsam"`` (jittered boxes only, one
    round, BCE + Dice, prompt encoder frozen). ``lora_rank`` 0 trains the image
    encoder in full; above 0 its attention projections (``lora_targets``) get
    adapters of that rank (scale ``lora_alpha / lora_rank``) and only those train
    there. ``freeze`` names modules kept fixed (default: none for ``sam``, the
    prompt encoder for ``medsam``). ``minutes``: time budget; training stops
    after the epoch that reaches it. ``steps_per_epoch`` defaults to one view of
    every training image. ``batch_size``: objects decoded per step (one image).
    ``max_zoom`` above 1 also trains on random parts of the images enlarged up to
    that factor (for objects that ``zoom="auto"`` segments in crops).
    ``lora_separate`` writes only the adapters (and fully trained modules) with
    the base model's name instead of the merged model.
    """

    recipe: str = "sam"
    epochs: int = 10
    minutes: float | None = None
    steps_per_epoch: int | None = None
    batch_size: int = 8
    prompt_iterations: int = 3
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    clip_grad: float = 1.0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_separate: bool = False
    freeze: tuple[str, ...] | None = None
    mask_loss: str | None = None
    focal_weight: float = 1.0
    box_probability: float = 0.5
    box_jitter: float = 0.1
    max_zoom: float = 1.0
    flips: bool = True
    min_area: int = 16
    intensity: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        freeze = self.freeze
        if isinstance(freeze, str):
            freeze = tuple(f.strip() for f in freeze.split(",") if f.strip())
        if freeze is not None:
            object.__setattr__(self, "freeze", tuple(dict.fromkeys(freeze)))  # in order, without repeats
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        frozen = self.frozen_modules
        checks = [
            (self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}, got '{self.recipe}'"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.minutes is None or self.minutes > 0, "minutes must be positive"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch must be at least 1"),
            (self.batch_size >= 1, "batch_size (objects per step) must be at least 1"),
            (1 <= self.prompt_iterations <= 32, "prompt_iterations must lie between 1 and 32"),
            (self.lr > 0, "lr must be positive"),
            (self.weight_decay >= 0, "weight_decay cannot be negative"),
            (self.warmup_steps >= 0, "warmup_steps cannot be negative"),
            (self.clip_grad >= 0, "clip_grad cannot be negative (0 turns clipping off)"),
            (self.lora_rank >= 0, "lora_rank cannot be negative (0 = full fine-tuning)"),
            (self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha must be positive"),
            (len(self.lora_targets) > 0, "lora_targets needs at least one layer name (e.g. qkv)"),
            (not self.lora_separate or self.lora_rank > 0, "lora_separate needs LoRA: give a lora_rank above 0"),
            (set(frozen) <= set(MODULES), f"freeze takes {', '.join(MODULES)}; got {', '.join(frozen)}"),
            (len(set(frozen)) < len(MODULES), "every module is frozen: nothing would be trained"),
            (not (self.lora_rank and "image_encoder" in frozen),
             "LoRA adapts the image encoder: do not freeze image_encoder together with lora_rank > 0"),
            (self.mask_loss in (None, "focal", "bce"), f"mask_loss must be focal or bce, got '{self.mask_loss}'"),
            (self.focal_weight >= 0, "focal_weight cannot be negative"),
            (0 <= self.box_probability <= 1, "box_probability must lie in [0, 1]"),
            (0 <= self.box_jitter < 1, "box_jitter must lie in [0, 1) (a fraction of the box side)"),
            (self.max_zoom >= 1, "max_zoom must be at least 1"),
            (self.min_area >= 1, "min_area must be at least 1 pixel"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"fine-tuning settings: {message}.")
        resolve_preset(self.intensity, np.dtype(np.uint16))  # validates the preset name

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        """Modules kept fixed: ``freeze``, or the recipe's default."""
        if self.freeze is not None:
            return self.freeze
        return ("prompt_encoder",) if self.recipe == "medsam" else ()

    @property
    def loss_kind(self) -> str:
        return self.mask_loss or ("bce" if self.recipe == "medsam" else "focal")

    @property
    def rounds(self) -> int:
        """Decoder rounds per step (MedSAM: one box prompt)."""
        return 1 if self.recipe == "medsam" else self.prompt_iterations

    @property
    def box_share(self) -> float:
        return 1.0 if self.recipe == "medsam" else self.box_probability

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune_sam`: ``validation`` is the kept epoch's, ``baseline`` the model's before training."""

    output: Path
    best_epoch: int
    epochs_run: int
    history: list[dict]
    validation: dict | None
    baseline: dict | None
    trainable_parameters: int
    seconds: float
    stopped_by_time: bool = False
    metadata: dict = field(default_factory=dict)


# ------------------------------------------------------------------ data
@dataclass
class TrainImage:
    """A training image kept small: normalised RGB and instance labels at most ``max_zoom`` x the model input."""

    name: str
    rgb: np.ndarray  # (h, w, 3) float32 in [0, 255]
    labels: np.ndarray  # (h, w) int32 instance labels
    scale: float  # stored size / original size


def read_checked(image_path: str | os.PathLike, label_path: str | os.PathLike,
                 min_area: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An image and its instance labels, refused with an :class:`InputError` naming the file when unusable.

    Problems caught: unreadable files, empty arrays, a label image of another
    size than its image, a label image holding a single value (nothing to prompt),
    and labels without an object of ``min_area`` pixels.
    """
    from biosam.io import read_image

    arrays = []
    for path, what in ((image_path, "image"), (label_path, "label image")):
        try:
            array = np.asarray(read_image(path)[0])
        except (BiosamError, OSError, ValueError) as exc:
            raise InputError(f"{path}: the {what} cannot be read ({exc}). Replace the file or remove the pair.") from exc
        if array.size == 0:
            raise InputError(f"{path}: the {what} is empty (shape {array.shape}). Replace the file or remove the pair.")
        arrays.append(array)
    image, raw = arrays
    values = np.unique(raw)
    if values.size == 1:
        raise InputError(
            f"{label_path}: the label image holds only the value {values[0].item()}, so it has no object to prompt "
            "(all background or all foreground). Label the objects in it (0 = background) or remove the pair."
        )
    labels = as_instances(raw, str(label_path))
    size = image.shape[:2] if image.ndim == 2 or image.shape[-1] <= 4 else image.shape[1:]
    if tuple(size) != labels.shape:
        raise InputError(
            f"{label_path}: the label image is {labels.shape[1]} x {labels.shape[0]} px but its image {image_path} is "
            f"{size[1]} x {size[0]} px. Give every image a label image of the same size."
        )
    if min_area > 1 and not (np.bincount(labels.ravel())[1:] >= min_area).any():
        raise InputError(f"{label_path}: no labelled object has {min_area} pixels or more; nothing to train on. "
                         "Remove the pair or lower min_area.")
    return image, labels


def prepare_image(image: np.ndarray, labels: np.ndarray, name: str, model: Sam,
                  settings: FinetuneSettings) -> TrainImage:
    """Normalise and shrink a training image to at most ``max_zoom`` times the model input (long side)."""
    rgb = normalize_intensity(image, settings.intensity)
    limit = model.image_size * settings.max_zoom
    scale = min(1.0, limit / max(rgb.shape[:2]))
    shape = scaled_shape(rgb.shape, scale)
    # same antialiased bilinear resampling as the model input, so a whole-image view is what inference sees
    small = resize_image(rgb, shape).astype(np.float32, copy=False)
    return TrainImage(name, small, resize_labels(labels, shape).astype(np.int32), shape[0] / rgb.shape[0])


def training_view(item: TrainImage, settings: FinetuneSettings, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A random view (part at a random zoom, rotated/flipped) of a training image: ``(rgb, labels)``."""
    rgb, labels = item.rgb, item.labels
    if settings.max_zoom > 1:
        zoom = math.exp(rng.uniform(0.0, math.log(settings.max_zoom)))
        h, w = labels.shape
        ch, cw = max(8, round(h / zoom)), max(8, round(w / zoom))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        rgb, labels = rgb[y : y + ch, x : x + cw], labels[y : y + ch, x : x + cw]
    if settings.flips:
        k = int(rng.integers(0, 8))
        rgb = dihedral(rgb.transpose(2, 0, 1), k).transpose(1, 2, 0)
        labels = dihedral(labels, k)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(labels)


# ------------------------------------------------------------------ prompts and targets
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
    size, low = model.image_size, 4 * model.config.image_embedding_size
    lh, lw = (max(1, round(r * low / size)) for r in frame.resized)
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


def _jitter(boxes: Tensor, sides: Tensor, amount: float, size: int, rng: np.random.Generator) -> Tensor:
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


# ------------------------------------------------------------------ losses
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
    boxes = _jitter(batch.boxes, batch.box_sides, settings.box_jitter, size, rng) if use_box else None
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


# ------------------------------------------------------------------ model setup
def prepare_for_training(model: Sam, settings: FinetuneSettings) -> list[nn.Parameter]:
    """Add LoRA adapters if asked, choose what trains, and return the trainable parameters.

    With LoRA the image encoder's own weights stay fixed and only its adapters
    train; modules in ``settings.frozen_modules`` stay fixed entirely.
    """
    frozen = settings.frozen_modules
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.lora_rank:
        add_lora(model, settings.lora_rank, settings.lora_alpha, settings.lora_targets)
    for name in MODULES:
        if name in frozen or (name == "image_encoder" and settings.lora_rank):
            continue
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    if settings.lora_rank:
        for key, p in model.image_encoder.named_parameters():
            p.requires_grad_(key.endswith((".lora_a", ".lora_b")))
    return [p for p in model.parameters() if p.requires_grad]


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    if set(state) != names:
        raise InputError(f"--resume: {source} holds other trainable tensors than this run has; "
                         "use the same --model, --lora and --freeze, or start anew.")
    model.load_state_dict(state, strict=False)


# ------------------------------------------------------------------ validation
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
    for image_path, label_path in tqdm(pairs, desc="validation", unit="image", leave=False, disable=not progress):
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


def _score(metrics: dict, settings: FinetuneSettings) -> float:
    """What picks the best epoch: box IoU for box-only training, else the mean of box and point IoU."""
    if settings.recipe == "medsam":
        return metrics["box_iou"]
    return (metrics["box_iou"] + metrics["point_iou"]) / 2


# ------------------------------------------------------------------ checkpoints
def resume_path(output: str | os.PathLike) -> Path:
    """Where :func:`finetune_sam` keeps the state it resumes from."""
    output = Path(output)
    return output.with_name(output.name + RESUME_SUFFIX)


def _base_identity(model: Sam) -> dict:
    info = model.info
    # a file is named by its absolute path, so an adapter file finds its base from anywhere
    name = info.spec.name if info.spec is not None else str(Path(info.checkpoint).resolve())
    return {"name": name, "checkpoint_hash": info.checkpoint_hash,
            "architecture": config_name(model.config), "preprocessing": info.preprocessing}


def _save(path: Path, payload: dict) -> None:
    """``torch.save`` through a temporary file in the same folder, so a failed write leaves nothing behind."""
    from biosam.io.files import atomic_path

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_finetuned(path: str | os.PathLike, model: Sam, metadata: dict, separate: bool = False) -> Path:
    """Write a fine-tuned model readable by :func:`biosam.load_model`.

    Merged (default): ``{"model": state dict with the base model's key names,
    adapters folded in, "biosam": metadata}``. ``separate``: ``{"adapters": the
    LoRA tensors plus every tensor of the modules trained in full, "biosam":
    metadata with kind "lora_adapters"}``; loading it loads the base model named
    in the metadata and applies them.
    """
    path = Path(path)
    if separate:
        trained = {name for name in MODULES[1:]
                   if any(p.requires_grad for p in getattr(model, name).parameters())}
        tensors = lora_state_dict(model)
        tensors |= {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    if k.split(".", 1)[0] in trained}
        payload = {"adapters": tensors, "biosam": {**metadata, "kind": "lora_adapters"}}
    else:
        payload = {"model": merged_state_dict(model), "biosam": {**metadata, "kind": "model"}}
    _save(path, payload)
    return path


def _data_signature(train_pairs: list[Pair], val_pairs: list[Pair]) -> str:
    h = xxhash.xxh3_64()
    for p in [*train_pairs, None, *val_pairs]:
        h.update(repr(p and (str(p[0]), str(p[1]))).encode())
    return h.hexdigest()


def _resumable(settings: dict) -> dict:
    """Settings that must match to resume (a longer run or another output format may be asked for)."""
    return {k: v for k, v in settings.items() if k not in ("epochs", "minutes", "lora_separate")}


def _check_resume(state: dict, path: Path, base: dict, signature: str, settings: FinetuneSettings) -> None:
    saved = state["base"]
    if saved["architecture"] != base["architecture"] or saved["checkpoint_hash"] != base["checkpoint_hash"]:
        raise InputError(
            f"--resume: {path} was saved while fine-tuning {saved['name']} (architecture "
            f"{saved['architecture'] or 'custom'}), but the model given now is {base['name']} (architecture "
            f"{base['architecture'] or 'custom'}{'' if saved['architecture'] != base['architecture'] else ', other weights'}). "
            "Resume with the same --model, or start anew without --resume."
        )
    if state["data"] != signature or _resumable(state["settings"]) != _resumable(settings.to_dict()):
        raise InputError(f"--resume: {path} was saved for other images or settings; use the same options or start anew.")


# ------------------------------------------------------------------ training
def finetune_sam(
    model: Sam,
    train_pairs: list[Pair],
    val_pairs: list[Pair],
    output: str | os.PathLike,
    settings: FinetuneSettings | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``(image_path, label_path)`` pairs and write the best epoch to ``output``.

    ``model`` is a SAM v1 model from :func:`biosam.load_model`; it is trained in
    place and at the end holds the kept epoch's weights (adapters merged).
    Every pair is checked before training starts (see :func:`read_checked`). An
    existing ``output`` is refused unless ``overwrite`` (or ``resume``, which
    continues from ``OUTPUT.resume`` with the same data and settings; more
    epochs may be asked for). Without validation pairs the epoch with the lowest
    training loss is kept.
    """
    started = time.perf_counter()
    settings = settings or FinetuneSettings()
    output = Path(output)
    _check_start(model, output, train_pairs, overwrite or resume)
    base = _base_identity(model)
    signature = _data_signature(train_pairs, val_pairs)
    state_path = resume_path(output)
    state = None
    if resume:
        if not state_path.is_file():
            raise InputError(f"--resume: no saved training state at {state_path}; start without --resume.")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resume(state, state_path, base, signature, settings)
    items = _read_data(model, train_pairs, val_pairs, settings, progress)

    precision = getattr(model, "precision", "fp32")
    model.precision = "fp32"  # trained in full precision whatever the model runs inference in
    model.eval()  # BatchNorm keeps its statistics: one image per step is too few to estimate new ones
    torch.manual_seed(settings.seed)
    params = prepare_for_training(model, settings)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = settings.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    history: list[dict] = []
    best = {"epoch": 0, "score": -math.inf}
    baseline, first_epoch = None, 1
    if state is not None:
        _load_trainable(model, state["trainable"], state_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, baseline, best_state = state["history"], state["best"], state["baseline"], state["best_state"]
        first_epoch = state["epoch"] + 1
        logger.info("resuming after epoch %d (best so far: epoch %d)", state["epoch"], best["epoch"])
    else:
        best_state = _trainable_state(model)
        if val_pairs:
            baseline = _validate(model, val_pairs, settings, progress)
            logger.info("before fine-tuning: box IoU %.4f, point IoU %.4f", baseline["box_iou"], baseline["point_iou"])
    n_trainable = sum(p.numel() for p in params)
    logger.info("%d trainable parameters (%s)", n_trainable,
                f"LoRA rank {settings.lora_rank}" if settings.lora_rank else "full fine-tuning")

    metadata = _metadata(base, model, settings, train_pairs, val_pairs)
    steps = settings.steps_per_epoch or len(items)
    loop_started = time.perf_counter()
    stopped_by_time = False
    bar = tqdm(range(first_epoch, settings.epochs + 1), desc="epochs", unit="epoch", disable=not progress,
               initial=first_epoch - 1, total=settings.epochs)
    for epoch in bar:
        row = _train_epoch(model, items, optimizer, scheduler, params, settings, epoch, steps, progress)
        if val_pairs:
            scores = _validate(model, val_pairs, settings, progress)
            row |= {"val_box_iou": scores["box_iou"], "val_point_iou": scores["point_iou"]}
            score = _score(scores, settings)
        else:
            score = -row["loss"]
        history.append(row)
        if score > best["score"]:
            best = {"epoch": epoch, "score": score}
            best_state = _trainable_state(model)
            save_finetuned(output, model, metadata | {"metrics": _metrics(history, best, baseline)},
                           settings.lora_separate)
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k not in ("epoch", "seconds")} | {"best": best["epoch"]})
        _save(state_path, {"epoch": epoch, "trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "history": history, "best": best,
                           "best_state": best_state, "baseline": baseline, "data": signature,
                           "settings": settings.to_dict(), "base": base})
        if settings.minutes is not None and time.perf_counter() - loop_started >= settings.minutes * 60:
            logger.info("time budget of %g minutes reached after epoch %d", settings.minutes, epoch)
            stopped_by_time = True
            break
    bar.close()

    # the model leaves with the kept epoch's weights, adapters merged, as written to OUTPUT
    model.load_state_dict(best_state, strict=False)
    if not output.exists():  # resumed after the last epoch, with OUTPUT deleted since: write it again
        save_finetuned(output, model, metadata | {"metrics": _metrics(history, best, baseline)}, settings.lora_separate)
    merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.precision = precision
    kept = next((r for r in history if r["epoch"] == best["epoch"]), {})
    validation = {"box_iou": kept["val_box_iou"], "point_iou": kept["val_point_iou"]} if "val_box_iou" in kept else None
    return FinetuneResult(output, best["epoch"], len(history), history, validation, baseline, n_trainable,
                          time.perf_counter() - started, stopped_by_time,
                          torch.load(output, map_location="cpu", weights_only=True)["biosam"])


def _check_start(model: Sam, output: Path, train_pairs: list[Pair], replace: bool) -> None:
    """Refuse what cannot work before anything is read or trained."""
    if not isinstance(model, Sam) or not hasattr(model, "info"):
        kind = "a SAM 2 model" if type(model).__name__.lower().startswith("sam2") else type(model).__name__
        raise InputError(f"fine-tuning needs a SAM v1 model loaded with biosam.load_model (SAM, MedSAM, LiteMedSAM, "
                         f"MobileSAM, micro-sam); got {kind}.")
    if output.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise InputError(f"{output}: a fine-tuned model is written as a PyTorch file; give it the extension .pt.")
    if output.exists() and not replace:
        raise InputError(f"{output}: already exists. Choose another name or pass --overwrite to replace it.")
    if not train_pairs:
        raise InputError("no training images given.")


def _read_data(model: Sam, train_pairs: list[Pair], val_pairs: list[Pair], settings: FinetuneSettings,
               progress: bool) -> list[TrainImage]:
    """Check every pair (training and validation) and keep the training images small in memory."""
    items = []
    for image_path, label_path in tqdm(train_pairs, desc="reading training images", unit="image",
                                       disable=not progress, leave=False):
        image, labels = read_checked(image_path, label_path, settings.min_area)
        items.append(prepare_image(image, labels, Path(image_path).name, model, settings))
    for image_path, label_path in val_pairs:
        read_checked(image_path, label_path, settings.min_area)
    logger.info("%d training and %d validation images checked", len(items), len(val_pairs))
    return items


def _metadata(base: dict, model: Sam, settings: FinetuneSettings, train_pairs: list[Pair],
              val_pairs: list[Pair]) -> dict:
    """What a fine-tuned checkpoint records besides its metrics (plain types only: it is read with weights_only)."""
    lora = None
    if settings.lora_rank:
        lora = {"rank": settings.lora_rank, "alpha": float(settings.lora_alpha or settings.lora_rank),
                "targets": list(settings.lora_targets), "merged": not settings.lora_separate}
    return {
        "format": CHECKPOINT_FORMAT, "base_model": base["name"], "base_checkpoint_hash": base["checkpoint_hash"],
        "architecture": base["architecture"], "config": config_dict(model.config), "preprocessing": base["preprocessing"],
        "intensity": settings.intensity, "lora": lora,
        "trained": [m for m in MODULES if m not in settings.frozen_modules],
        "settings": settings.to_dict(),
        "train_images": [str(p[0]) for p in train_pairs], "val_images": [str(p[0]) for p in val_pairs],
    }


def _metrics(history: list[dict], best: dict, baseline: dict | None) -> dict:
    kept = next(r for r in history if r["epoch"] == best["epoch"])
    return {"best_epoch": best["epoch"], "kept": copy.deepcopy(kept), "history": copy.deepcopy(history),
            "baseline": None if baseline is None else {k: baseline[k] for k in ("box_iou", "point_iou", "objects")}}


def _validate(model: Sam, val_pairs: list[Pair], settings: FinetuneSettings, progress: bool) -> dict:
    with torch.inference_mode():
        return evaluate_prompts(model, val_pairs, settings.intensity, settings.min_area, progress=progress)


def _train_epoch(model: Sam, items: list[TrainImage], optimizer, scheduler, params, settings: FinetuneSettings,
                 epoch: int, steps: int, progress: bool) -> dict:
    """One epoch of steps; the random stream depends only on (seed, epoch), so a resumed run repeats it exactly."""
    rng = np.random.default_rng([settings.seed, epoch])
    started = time.perf_counter()
    order = np.concatenate([rng.permutation(len(items)) for _ in range(math.ceil(steps / len(items)))])[:steps]
    losses, first, last = [], [], []
    step_bar = tqdm(order, desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress)
    for index in step_bar:
        item = items[index]
        batch = None
        for _ in range(_VIEW_TRIES):  # an enlarged part may hold no object: look elsewhere
            rgb, labels = training_view(item, settings, rng)
            batch = make_batch(model, rgb, labels, settings, rng, settings.min_area * item.scale ** 2)
            if batch is not None:
                break
        if batch is None:
            logger.debug("%s: no object in %d random views; step skipped", item.name, _VIEW_TRIES)
            continue
        use_box = bool(rng.random() < settings.box_share)
        loss, stats = batch_loss(model, batch, settings, rng, use_box)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, settings.clip_grad)
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach().item())
        first.append(stats["iou_first"])
        last.append(stats["iou_last"])
        step_bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", iou=f"{np.mean(last[-10:]):.3f}")
    return {"epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan,
            "train_iou_first": float(np.mean(first)) if first else math.nan,
            "train_iou_last": float(np.mean(last)) if last else math.nan,
            "seconds": round(time.perf_counter() - started, 1)}
