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

This module is the training run; its parts live beside it (settings, data,
prompt sampling, losses, the model side, validation) and their public names are
importable from here too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from biosam.errors import InputError
from biosam.models.lora import merge_lora
from biosam.models.sam import Sam
from biosam.train.finetune_data import TrainImage, prepare_image, read_checked, training_view
from biosam.train.finetune_losses import bce_loss, batch_loss, dice_loss, focal_loss, mask_ious, mask_losses
from biosam.train.finetune_model import (
    CHECKPOINT_FORMAT,
    base_identity,
    check_same_base,
    checkpoint_metadata,
    checkpoint_metrics,
    full_precision,
    load_trainable,
    prepare_for_training,
    save_finetuned,
    trainable_state,
)
from biosam.train.finetune_prompts import PromptBatch, corrective_points, interior_points, make_batch
from biosam.train.finetune_settings import MODULES, RECIPES, FinetuneSettings
from biosam.train.finetune_validation import evaluate_prompts, score, validate
from biosam.train.harness import (
    RESUME_SUFFIX,
    ResumeFile,
    RunState,
    check_output,
    data_signature,
    progress_bar,
    resume_path,
    run_epochs,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT", "MODULES", "RECIPES", "RESUME_SUFFIX", "FinetuneResult", "FinetuneSettings", "PromptBatch",
    "TrainImage", "batch_loss", "bce_loss", "corrective_points", "dice_loss", "evaluate_prompts", "finetune_sam",
    "focal_loss", "interior_points", "make_batch", "mask_ious", "mask_losses", "prepare_for_training",
    "prepare_image", "read_checked", "resume_path", "save_finetuned", "training_view",
]

_VIEW_TRIES = 10
# settings a resumed run may change: a longer run, another time budget or output format
_FREE_ON_RESUME = ("epochs", "minutes", "lora_separate")
Pair = tuple[Path, Path]


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
    base = base_identity(model)
    saved = ResumeFile(output, data_signature(train_pairs, val_pairs), settings.to_dict(), _FREE_ON_RESUME)
    state = saved.load(resume, check=lambda s: check_same_base(s["base"], base, saved.path))
    items = _read_data(model, train_pairs, val_pairs, settings, progress)

    with full_precision(model):
        model.eval()  # BatchNorm keeps its statistics: one image per step is too few to estimate new ones
        torch.manual_seed(settings.seed)
        params = prepare_for_training(model, settings)
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        warmup = settings.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        if state is not None:
            load_trainable(model, state["model"], saved.path)
            run = saved.restore(state, optimizer, scheduler)
            baseline, best_state = state["baseline"], state["best_state"]
        else:
            run, baseline, best_state = RunState(), None, trainable_state(model)
            if val_pairs:
                baseline = validate(model, val_pairs, settings, progress)
                logger.info("before fine-tuning: box IoU %.4f, point IoU %.4f", baseline["box_iou"],
                            baseline["point_iou"])
        n_trainable = sum(p.numel() for p in params)
        logger.info("%d trainable parameters (%s)", n_trainable,
                    f"LoRA rank {settings.lora_rank}" if settings.lora_rank else "full fine-tuning")

        metadata = checkpoint_metadata(base, model, settings, train_pairs, val_pairs)
        steps = settings.steps_per_epoch or len(items)

        def write_output() -> None:
            metrics = checkpoint_metrics(run.history, run.best, baseline)
            save_finetuned(output, model, metadata | {"metrics": metrics}, settings.lora_separate)

        def epoch(n: int) -> tuple[dict, float]:
            row = _train_epoch(model, items, optimizer, scheduler, params, settings, n, steps, progress)
            if not val_pairs:
                return row, -row["loss"]
            scores = validate(model, val_pairs, settings, progress)
            row |= {"val_box_iou": scores["box_iou"], "val_point_iou": scores["point_iou"]}
            return row, score(scores, settings)

        def on_best(n: int) -> None:
            nonlocal best_state
            best_state = trainable_state(model)
            write_output()

        def after_epoch(n: int) -> None:
            saved.save(run, optimizer, scheduler, trainable_state(model), best_state=best_state, baseline=baseline,
                       base=base)

        stopped = run_epochs(run, settings.epochs, epoch, minutes=settings.minutes, on_best=on_best,
                             after_epoch=after_epoch, progress=progress)

        # the model leaves with the kept epoch's weights, adapters merged, as written to OUTPUT
        model.load_state_dict(best_state, strict=False)
        if not output.exists():  # resumed after the last epoch, with OUTPUT deleted since: write it again
            write_output()
        merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(False)
    kept = next((r for r in run.history if r["epoch"] == run.best["epoch"]), {})
    validation = {"box_iou": kept["val_box_iou"], "point_iou": kept["val_point_iou"]} if "val_box_iou" in kept else None
    return FinetuneResult(output, run.best["epoch"], len(run.history), run.history, validation, baseline, n_trainable,
                          time.perf_counter() - started, stopped == "time",
                          torch.load(output, map_location="cpu", weights_only=True)["biosam"])


def _check_start(model: Sam, output: Path, train_pairs: list[Pair], replace: bool) -> None:
    """Refuse what cannot work before anything is read or trained."""
    if not isinstance(model, Sam) or model.info is None:
        from biosam.models.sam2.model import Sam2

        kind = "a SAM 2 model" if isinstance(model, Sam2) else type(model).__name__
        raise InputError(f"fine-tuning needs a SAM v1 model loaded with biosam.load_model (SAM, MedSAM, LiteMedSAM, "
                         f"MobileSAM, micro-sam); got {kind}.")
    check_output(output, replace)
    if not train_pairs:
        raise InputError("no training images given.")


def _read_data(model: Sam, train_pairs: list[Pair], val_pairs: list[Pair], settings: FinetuneSettings,
               progress: bool) -> list[TrainImage]:
    """Check every pair (training and validation) and keep the training images small in memory."""
    items = []
    for image_path, label_path in progress_bar(train_pairs, desc="reading training images", enabled=progress,
                                               unit="image", leave=False):
        image, labels = read_checked(image_path, label_path, settings.min_area)
        items.append(prepare_image(image, labels, Path(image_path).name, model, settings))
    for image_path, label_path in val_pairs:
        read_checked(image_path, label_path, settings.min_area)
    logger.info("%d training and %d validation images checked", len(items), len(val_pairs))
    return items


def _train_epoch(model: Sam, items: list[TrainImage], optimizer, scheduler, params, settings: FinetuneSettings,
                 epoch: int, steps: int, progress: bool) -> dict:
    """One epoch of steps; the random stream depends only on (seed, epoch), so a resumed run repeats it exactly."""
    rng = np.random.default_rng([settings.seed, epoch])
    started = time.perf_counter()
    order = np.concatenate([rng.permutation(len(items)) for _ in range(math.ceil(steps / len(items)))])[:steps]
    losses, first, last = [], [], []
    step_bar = progress_bar(order, desc=f"epoch {epoch}", enabled=progress, unit="step", leave=False)
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
