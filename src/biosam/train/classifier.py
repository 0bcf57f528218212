"""Training a mask classifier on frozen SAM features of labelled candidate masks.

Candidates come from the pipeline that will later be filtered (``biosam auto``
on 2D images, the slab candidates of ``biosam tomogram`` on tomograms) and get
their class from ground-truth labels by overlap, or from a user's JSON list.
Every candidate is cropped once and embedded in ``variants`` versions (the
first as is, the others flipped/turned, rescaled in intensity, noised and
blurred); candidates and features are cached on disk, keyed by their content
and settings, so later trainings on the same data skip the encoder.

Training: focal loss with class weights, AdamW, cosine annealing, an
exponential moving average of the weights (optional), mixed precision on GPU,
random flips of the feature maps, early stopping; the epoch with the best
validation macro-F1 over the non-background classes is kept.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from skimage.measure import label as connected_components

from biosam.classify.classifier import BACKGROUND, Classifier, save_classifier
from biosam.classify.features import CropSettings, as_rgb, augment, crops, masked_features
from biosam.classify.head import MaskClassifier
from biosam.errors import InputError
from biosam.models.info import hash_file
from biosam.settings import check, positive, rule, whole, within
from biosam.train.harness import (
    DEFAULT_VAL_FRACTION,
    RunState,
    check_output,
    progress_bar,
    run_epochs,
    save_atomic,
    split,
    val_fraction_rule,
)

logger = logging.getLogger(__name__)

LABEL_TYPES = ("instances", "classes")


@dataclass(frozen=True)
class ClassifierSettings:
    """How the classifier is trained.

    A candidate takes the class of the ground-truth object it overlaps with IoU
    at least ``match_iou``; below ``ignore_iou`` with every object it is
    background; in between it is ambiguous and left out. ``variants``: encoded
    versions of each training candidate (1 = no augmentation). ``val_fraction``:
    share of the sources (or, with a single source, of the candidates) held out.
    """

    epochs: int = 60
    patience: int = 15
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    focal_gamma: float = 2.0
    ema: bool = True
    ema_decay: float = 0.99
    variants: int = 4
    val_fraction: float = DEFAULT_VAL_FRACTION
    dropout: float = 0.2
    match_iou: float = 0.5
    ignore_iou: float = 0.2
    seed: int = 0
    crop: CropSettings = field(default_factory=CropSettings)

    def __post_init__(self) -> None:
        check("classifier settings", [
            whole("epochs", self.epochs, 1),
            whole("patience", self.patience, 1),
            whole("batch_size", self.batch_size, 2),  # BatchNorm needs two samples
            positive("lr", self.lr),
            within("weight_decay", self.weight_decay, 0.0, math.inf),
            within("focal_gamma", self.focal_gamma, 0.0, math.inf),
            rule(0 < self.ema_decay < 1, f"ema_decay must lie in (0, 1), got {self.ema_decay!r}"),
            whole("variants", self.variants, 1),
            val_fraction_rule(self.val_fraction),
            rule(0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout!r}"),
            rule(0 <= self.ignore_iou <= self.match_iou <= 1,
                 f"need 0 <= ignore_iou <= match_iou <= 1, got {self.ignore_iou!r} and {self.match_iou!r}"),
        ])


@dataclass
class LabelledCandidates:
    """Cropped candidates of one source (an image or tomogram) and their class indices (-1: ambiguous)."""

    name: str
    pairs: list[tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray
    key: str = ""  # content hash: the cache key of this source's features

    def usable(self) -> LabelledCandidates:
        keep = np.flatnonzero(self.labels >= 0)
        return LabelledCandidates(self.name, [self.pairs[k] for k in keep], self.labels[keep], self.key)


@dataclass
class ClassifierResult:
    """What :func:`train_classifier` wrote and measured."""

    output: Path
    metrics_path: Path
    curves_path: Path
    classifier: Classifier
    best_epoch: int
    epochs_run: int
    metrics: dict
    history: list[dict]
    seconds: float


# --------------------------------------------------------------------------- labelling candidates


def instance_classes(labels: np.ndarray, label_type: str, n_classes: int, name: str) -> tuple[np.ndarray, dict[int, int]]:
    """Instance ids (2D or 3D) and each one's class index from an instance or class label image.

    ``instances``: every object is class 1 (a binary mask is split into connected
    components); ``classes``: pixel values are class indices, each connected
    region of one value an object.
    """
    labels = np.asarray(labels)
    if label_type not in LABEL_TYPES:
        raise InputError(f"label type must be one of {LABEL_TYPES}, got '{label_type}'.")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        if not np.all(np.mod(labels, 1) == 0):
            raise InputError(f"{name}: labels need integer values, got {labels.dtype} with fractions.")
    labels = labels.astype(np.int64)
    values = np.unique(labels)
    if labels.min(initial=0) < 0:
        raise InputError(f"{name}: labels cannot be negative.")
    if len(values) < 2:
        raise InputError(f"{name}: the label image holds the single value {values[0] if len(values) else 'none'}, "
                         "so it marks no object; label some objects (or leave this image out).")
    if label_type == "instances":
        instances = connected_components(labels > 0) if len(values) == 2 else labels
        return instances, {int(i): 1 for i in np.unique(instances) if i}
    if values.max() >= n_classes:
        raise InputError(f"{name}: holds class value {values.max()}, but only {n_classes} class names were given "
                         "(--classes lists the names of values 0, 1, ...).")
    instances = np.zeros(labels.shape, np.int64)
    classes: dict[int, int] = {}
    for value in values[values > 0]:
        parts, n = connected_components(labels == value, return_num=True)
        instances[parts > 0] = parts[parts > 0] + len(classes)
        classes.update({len(classes) + k: int(value) for k in range(1, n + 1)})
    return instances, classes


def match_classes(masks: Sequence[np.ndarray], truth: np.ndarray, classes: dict[int, int],
                  match_iou: float, ignore_iou: float) -> np.ndarray:
    """Class index of each 2D candidate mask against 2D ground-truth instances (0 background, -1 ambiguous)."""
    out = np.zeros(len(masks), np.int64)
    areas = np.bincount(truth.ravel())
    for k, mask in enumerate(masks):
        ids, overlap = np.unique(truth[mask], return_counts=True)
        best, best_id = 0.0, 0
        for i, n in zip(ids, overlap):
            if i == 0:
                continue
            iou = n / (mask.sum() + areas[i] - n)
            if iou > best:
                best, best_id = iou, int(i)
        if best >= match_iou:
            out[k] = classes[best_id]
        elif best >= ignore_iou:
            out[k] = -1
    return out


def crop_candidates(view: np.ndarray, masks: Sequence[np.ndarray], crop: CropSettings) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(RGB crop, mask crop)`` of each (non-empty) 2D mask on ``view``, in order."""
    rgb = as_rgb(view)
    return [crops(rgb, np.asarray(m, bool), crop) for m in masks]


def image_candidates(predictor, image: np.ndarray, truth: np.ndarray, classes: dict[int, int], name: str,
                     settings: ClassifierSettings, auto=None) -> LabelledCandidates:
    """Candidates of ``biosam auto`` on a 2D image, labelled by overlap with 2D ground-truth instances."""
    from biosam.automatic.run import AutoSettings, segment_automatic, to_uint8

    auto = auto or AutoSettings()
    found = segment_automatic(predictor, image, auto)
    ids = [i for i in np.unique(found) if i]
    masks = [found == i for i in ids]
    labels = match_classes(masks, truth, classes, settings.match_iou, settings.ignore_iou)
    return LabelledCandidates(name, crop_candidates(to_uint8(image, auto.intensity), masks, settings.crop), labels)


def tomogram_candidates(predictor, volume: np.ndarray, voxel_size, truth: np.ndarray,
                        classes: dict[int, int], name: str, settings: ClassifierSettings,
                        vesicles=None) -> LabelledCandidates:
    """Slab candidates of ``biosam tomogram`` (on each of its slabs), labelled by overlap with the truth at the slab centre.

    ``voxel_size`` is anything :meth:`biosam.io.voxel_size.VoxelSize.of` takes (Å).
    """
    from biosam.io.voxel_size import VoxelSize
    from biosam.tomogram.candidates import find_candidates, sam_view
    from biosam.tomogram.slabs import contrast_window, slab_centres, slab_image
    from biosam.tomogram.vesicles import VesicleSettings

    vesicles = vesicles or VesicleSettings()
    voxel = VoxelSize.of(voxel_size)
    window = contrast_window(vesicles.background_nm, voxel)
    pairs, labels = [], []
    for z in slab_centres(volume.shape[0], vesicles):
        slab = slab_image(volume, z, vesicles.slab_thickness, window)
        found = find_candidates(predictor, slab, voxel.pixel_nm, vesicles)
        labels.append(match_classes(list(found.masks), truth[z], classes, settings.match_iou, settings.ignore_iou))
        pairs += crop_candidates(sam_view(slab, vesicles), list(found.masks), settings.crop)
    return LabelledCandidates(name, pairs, np.concatenate(labels) if labels else np.zeros(0, np.int64))


# --------------------------------------------------------------------------- caches


def file_digest(*paths: str | os.PathLike) -> str:
    """xxh128 of the bytes of the given files (a folder: of every file in it)."""
    h = xxhash.xxh3_128()
    for path in paths:
        path = Path(path)
        for item in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if item.is_file():
                h.update(item.name.encode())
                hash_file(h, item)
    return h.hexdigest()


def cached_candidates(make, key_parts: dict, name: str, cache_dir: str | os.PathLike | None) -> LabelledCandidates:
    """``make()`` (which finds and labels candidates), or its result saved earlier under the same ``key_parts``."""
    key = xxhash.xxh3_128(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()
    path = None if cache_dir is None else Path(cache_dir) / f"candidates-{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as data:
            n = len(data["labels"])
            logger.info("%s: %d candidates from the cache %s", name, n, path)
            return LabelledCandidates(name, [(data[f"crop{k}"], data[f"mask{k}"]) for k in range(n)], data["labels"])
    found = make()
    found.name = name
    if path is not None:
        from biosam.io.files import atomic_path

        arrays = {f"crop{k}": c for k, (c, _) in enumerate(found.pairs)}
        arrays.update({f"mask{k}": m for k, (_, m) in enumerate(found.pairs)})
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, labels=found.labels, **arrays)
    return found


# --------------------------------------------------------------------------- features


def _hash_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray]], *extra: object) -> str:
    h = xxhash.xxh3_128()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for crop, mask in pairs:
        h.update(np.ascontiguousarray(crop, np.float32).tobytes())
        h.update(np.packbits(np.asarray(mask) > 0.5).tobytes())
        h.update(str(crop.shape).encode())
    return h.hexdigest()


def source_features(model: torch.nn.Module, source: LabelledCandidates, crop: CropSettings, variants: int,
                    seed: int, cache_dir: Path | None) -> torch.Tensor:
    """``(N, variants, 512, p, p)`` float16 features of a source's candidates (variant 0 unaugmented), cached."""
    key = _hash_pairs(source.pairs, model.info.checkpoint_hash, crop.to_dict(), variants, seed)
    path = None if cache_dir is None else Path(cache_dir) / f"features-{key}.pt"
    if path is not None and path.is_file():
        logger.info("%s: features from the cache %s", source.name, path)
        return torch.load(path, weights_only=True)
    rng = np.random.default_rng([seed, int(key[:8], 16)])
    pairs = []
    for crop_rgb, mask in source.pairs:
        pairs.append((crop_rgb, mask))
        pairs += [augment(crop_rgb, mask, rng) for _ in range(variants - 1)]
    features = []
    for start in progress_bar(range(0, len(pairs), 32), desc=f"features {source.name}", leave=False, unit="batch"):
        features.append(masked_features(model, pairs[start : start + 32], crop).half())
    out = torch.cat(features).reshape(len(source.pairs), variants, *features[0].shape[1:]) if features else \
        torch.zeros(0, variants, 512, crop.pooled, crop.pooled, dtype=torch.float16)
    if path is not None:
        save_atomic(path, out)
    return out


# --------------------------------------------------------------------------- training


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """Class-weighted focal loss (gamma 0: weighted cross-entropy)."""
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target[:, None])[:, 0]
    return (-weight[target] * (1 - logp_t.exp()) ** gamma * logp_t).mean()


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> dict:
    """Per-class precision, recall and F1, the confusion matrix (rows truth, columns predicted) and the
    macro-F1 over the classes other than background."""
    n = len(classes)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_class = {}
    for k, name in enumerate(classes):
        tp, fp, fn = confusion[k, k], confusion[:, k].sum() - confusion[k, k], confusion[k].sum() - confusion[k, k]
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(confusion[k].sum())}
    objects = [c for c in classes if c != BACKGROUND] or list(classes)
    return {"macro_f1": float(np.mean([per_class[c]["f1"] for c in objects])),
            "accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
            "per_class": per_class, "confusion": confusion.tolist(), "classes": list(classes)}


def _split(sources: list[LabelledCandidates], fraction: float, seed: int) -> tuple[list, list]:
    """Held-out sources (whole images/tomograms), or with a single source a stratified share of its candidates."""
    if fraction == 0 or len(sources) != 1:
        return split(sources, fraction, seed)
    rng = np.random.default_rng(seed)
    (only,) = sources
    val_idx = []
    for c in np.unique(only.labels):
        members = rng.permutation(np.flatnonzero(only.labels == c))
        val_idx += list(members[: int(round(fraction * len(members)))])
    val = np.zeros(len(only.labels), bool)
    val[val_idx] = True

    def part(mask: np.ndarray, suffix: str) -> LabelledCandidates:
        idx = np.flatnonzero(mask)
        return LabelledCandidates(only.name + suffix, [only.pairs[i] for i in idx], only.labels[idx])

    return [part(~val, "")], [part(val, " (held out)")]


def _check_labels(sources: list[LabelledCandidates], classes: Sequence[str]) -> np.ndarray:
    counts = np.bincount(np.concatenate([s.labels for s in sources] + [np.zeros(0, np.int64)]),
                         minlength=len(classes))
    if counts.sum() == 0:
        raise InputError("no labelled candidates: the candidate search found nothing in the training data, or "
                         "every candidate was ambiguous; check the images and labels (or label candidates by JSON).")
    missing = [classes[k] for k in range(len(classes)) if counts[k] == 0]
    if missing:
        raise InputError(f"no training candidate of class(es) {missing} among {int(counts.sum())} candidates "
                         f"(counts {dict(zip(classes, counts.tolist()))}); a classifier needs examples of every "
                         "class: add images where they occur, or drop the class.")
    return counts


class WeightAverage:
    """Exponential moving average of a module's weights and buffers.

    The decay starts low and rises to ``decay`` (``(1 + n) / (10 + n)`` after n
    updates), so the average follows the first steps instead of the random start:
    small training sets take only a few steps per epoch.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).eval()
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.module.state_dict().values(), module.state_dict().values()):
            if mine.dtype.is_floating_point:
                mine.mul_(decay).add_(theirs.detach(), alpha=1 - decay)
            else:
                mine.copy_(theirs)


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(8, (1,), generator=generator))
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return x.flip(3) if k >= 4 else x


def _evaluate(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gamma: float,
              device: torch.device) -> tuple[float, np.ndarray]:
    head.eval()
    logits = []
    with torch.inference_mode():
        for start in range(0, len(x), 64):
            logits.append(head(x[start : start + 64].to(device).float()).float())
    logits = torch.cat(logits)
    loss = float(focal_loss(logits, y.to(device), weight, gamma))
    return loss, logits.argmax(1).cpu().numpy()


def train_classifier(
    model: torch.nn.Module,
    sources: list[LabelledCandidates],
    classes: Sequence[str],
    output: str | os.PathLike,
    settings: ClassifierSettings | None = None,
    *,
    source_kind: str = "image",
    val_sources: list[LabelledCandidates] | None = None,
    info: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> ClassifierResult:
    """Train a :class:`MaskClassifier` on labelled candidates and write it with its metrics and learning curves.

    ``classes[0]`` must be ``"background"``. Without ``val_sources`` a share of
    ``sources`` is held out (see :class:`ClassifierSettings`). Writes
    ``output`` (the checkpoint), ``<output stem>.metrics.json`` (per-class
    precision, recall, F1 and confusion matrix of the kept epoch on the
    validation candidates) and ``<output stem>.curves.png``.
    """
    from biosam.io.files import atomic_path

    settings = settings or ClassifierSettings()
    classes = list(classes)
    if len(classes) < 2 or classes[0] != BACKGROUND or len(set(classes)) != len(classes):
        raise InputError(f"classes must be distinct names starting with '{BACKGROUND}', got {classes}.")
    output = Path(output)
    metrics_path, curves_path = check_outputs(output, overwrite)
    start_time = time.perf_counter()
    sources = [s.usable() for s in sources]
    if val_sources is None:
        sources, val_sources = _split(sources, settings.val_fraction, settings.seed)
    else:
        val_sources = [s.usable() for s in val_sources]
    counts = _check_labels(sources, classes)
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    x_train = torch.cat([source_features(model, s, settings.crop, settings.variants, settings.seed, cache)
                         for s in sources if len(s.labels)])
    y_train = torch.from_numpy(np.concatenate([s.labels for s in sources]))
    val_sources = [s for s in val_sources if len(s.labels)]
    if val_sources:
        x_val = torch.cat([source_features(model, s, settings.crop, 1, settings.seed, cache)[:, 0] for s in val_sources])
        y_val = torch.from_numpy(np.concatenate([s.labels for s in val_sources]))
    else:
        x_val, y_val = x_train[:, 0], y_train
        logger.warning("no validation candidates: the best epoch is judged on the training candidates")

    device = model.device
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    head = MaskClassifier(len(classes), in_channels=x_train.shape[2], dropout=settings.dropout)
    head.input_scale.fill_(1.0 / max(float(x_train[:, 0].float().std()), 1e-6))
    head = head.to(device)
    # Rare classes weigh more: inverse square root of their frequency, mean 1.
    weight = torch.tensor(1.0 / np.sqrt(np.maximum(counts, 1)), dtype=torch.float32)
    weight = (weight / weight.mean()).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    averaged = WeightAverage(head, settings.ema_decay) if settings.ema else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    n, variants = x_train.shape[:2]
    latest: dict = {}
    best: dict = {}

    def epoch(number: int) -> tuple[dict, tuple[float, float]]:
        head.train()
        order = torch.randperm(n, generator=generator)
        losses = []
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            pick = torch.randint(variants, (len(idx),), generator=generator)
            x = _flip(x_train[idx, pick].float(), generator).to(device)
            with autocast:
                loss = focal_loss(head(x), y_train[idx].to(device), weight, settings.focal_gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not None:
                averaged.update(head)
            losses.append(float(loss.detach()))
        scheduler.step()
        judged = averaged.module if averaged is not None else head
        val_loss, predicted = _evaluate(judged, x_val, y_val, weight, settings.focal_gamma, device)
        metrics = classification_metrics(y_val.numpy(), predicted, classes)
        latest.update(judged=judged, metrics=metrics)
        row = {"epoch": number, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "val_loss": val_loss, "val_macro_f1": metrics["macro_f1"]}
        # the best macro-F1; of equal ones, the lowest validation loss
        return row, (metrics["macro_f1"], -val_loss)

    def on_best(number: int) -> None:
        best.update(epoch=number, metrics=latest["metrics"],
                    state={k: v.detach().cpu().clone() for k, v in latest["judged"].state_dict().items()})

    run = RunState()
    run_epochs(run, settings.epochs, epoch, patience=settings.patience, on_best=on_best, desc="classifier",
               progress=progress)
    history = run.history

    final = MaskClassifier(len(classes), in_channels=x_train.shape[2], dropout=settings.dropout)
    final.load_state_dict(best["state"])
    record = {"training": {"settings": {**asdict(settings), "crop": settings.crop.to_dict()},
                           "best_epoch": best["epoch"], "epochs_run": len(history),
                           "train_candidates": {c: int(k) for c, k in zip(classes, counts)},
                           "val_candidates": int(len(y_val)), "sources": [s.name for s in sources],
                           "val_sources": [s.name for s in val_sources]},
              "metrics": best["metrics"], **(info or {})}
    from biosam.automatic.ais import encoder_info

    classifier = Classifier(final.eval(), classes, encoder_info(model), settings.crop, source_kind, record)
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps({"best_epoch": best["epoch"], **best["metrics"], "history": history}, indent=2))
    with atomic_path(curves_path) as tmp:
        plot_curves(history, best["epoch"], tmp)
    save_classifier(output, classifier)
    return ClassifierResult(output, metrics_path, curves_path, classifier, best["epoch"], len(history),
                            best["metrics"], history, time.perf_counter() - start_time)


def check_outputs(output: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    """Refuse, before any work, outputs that exist (unless ``overwrite``) or cannot be written: the checkpoint
    ``output`` and the metrics and curves beside it; returns the paths of those two."""
    output = Path(output)
    extras = output.with_suffix(".metrics.json"), output.with_suffix(".curves.png")
    check_output(output, overwrite)
    for extra in extras:
        check_output(extra, overwrite, (extra.suffix,))
    return extras


def plot_curves(history: list[dict], best_epoch: int, path: str | os.PathLike) -> None:
    """PNG of training/validation loss and validation macro-F1 per epoch, the kept epoch marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(8, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    loss_ax, f1_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="training")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="focal loss", title="loss")
    loss_ax.legend()
    f1_ax.plot(epochs, [h["val_macro_f1"] for h in history], color="tab:green")
    f1_ax.set(xlabel="epoch", ylabel="macro-F1", title="validation macro-F1", ylim=(0, 1.02))
    for ax in (loss_ax, f1_ax):
        ax.axvline(best_epoch, color="grey", linestyle=":", label="kept")
    figure.tight_layout()
    figure.savefig(path, format="png")
