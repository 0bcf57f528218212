"""Training the propagation adapter (:mod:`biosam.volume.adapter`) on labelled volumes.

Every pair of neighbouring slices of a training object is one example: the
object's true mask on one slice, disturbed the way a propagated mask goes wrong
(grown, shrunk, shifted), becomes the ``learned`` prompt for the next slice
exactly as :func:`biosam.volume.segment_volume` makes it (same box margin, same
zoomed crop), and the true mask there is the target: empty one slice past the
object's end, where the predicted IoU must fall. Slice and crop embeddings are
computed once; only the decoder copy trains.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from biosam.prompting.predictor import Predictor, decoder_inputs
from biosam.prompting.preprocess import Frame, LOW_RES, resample_to_frame
from biosam.prompting.intensity import volume_normalizer
from biosam.settings import check, positive, whole, within
from biosam.train.harness import save_atomic
from biosam.volume.adapter import ADAPTER_FORMAT, adapter_model, adapter_state
from biosam.volume.propagate import PropagationSettings, carried_prompt

logger = logging.getLogger(__name__)

__all__ = ["AdapterSettings", "LabelledVolume", "train_propagation_adapter"]


@dataclass
class LabelledVolume:
    """A ``(Z, Y, X)`` volume, its instance labels, and the label ids to train on (all when None)."""

    volume: np.ndarray
    labels: np.ndarray
    ids: list[int] | None = None
    name: str = "volume"


@dataclass(frozen=True)
class AdapterSettings:
    """Training of a propagation adapter: LoRA ``rank``, ``epochs``, ``batch_size``, ``lr``; ``val_fraction`` of
    the objects (whole objects) chooses the kept epoch; ``min_area`` (px) for a slice to be carried from."""

    rank: int = 8
    epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    val_fraction: float = 0.2
    min_area: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check("adapter settings", [whole("rank", self.rank, 1), whole("epochs", self.epochs, 1),
                                   whole("batch_size", self.batch_size, 1), positive("lr", self.lr),
                                   within("val_fraction", self.val_fraction, 0.0, 0.9),
                                   whole("min_area", self.min_area, 0)])


@dataclass
class _Example:
    data: int  # index of the LabelledVolume
    label: int
    z_from: int
    z_to: int
    embedding: int  # index into the embedding list
    view: Frame
    offset: tuple[int, int]
    whole: Frame


@dataclass
class _Examples:
    items: list[_Example] = field(default_factory=list)
    embeddings: list[torch.Tensor] = field(default_factory=list)


def slice_pairs(labels: np.ndarray, ids: list[int], min_area: int) -> list[tuple[int, int, int]]:
    """``(label, z_from, z_to)`` for every slice of each object with at least ``min_area`` px and each neighbour
    (the neighbour past an object's end included: there it must stop)."""
    pairs = []
    areas = {i: np.zeros(labels.shape[0], np.int64) for i in ids}
    for z in range(labels.shape[0]):
        counts = np.bincount(labels[z].ravel())
        for i in ids:
            areas[i][z] = counts[i] if i < len(counts) else 0
    for i in ids:
        for z in np.flatnonzero(areas[i] >= max(min_area, 1)):
            pairs += [(i, int(z), int(z) + step) for step in (-1, 1) if 0 <= z + step < labels.shape[0]]
    return pairs


def disturb(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``mask`` as a propagated mask may come out: unchanged, grown, shrunk or shifted by a few pixels
    (up to a tenth of the object's size); never empty."""
    radius = 1 + int(rng.integers(0, max(1, round(0.1 * np.sqrt(mask.sum())))))
    kind = rng.integers(0, 4)
    if kind == 1:
        return ndi.binary_dilation(mask, iterations=radius)
    if kind == 2:
        shrunk = ndi.binary_erosion(mask, iterations=radius)
        return shrunk if shrunk.any() else mask
    if kind == 3:
        dy, dx = rng.integers(-radius, radius + 1, size=2)
        moved = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
        return moved if moved.any() else mask
    return mask


def _embed_examples(predictor: Predictor, data: list[LabelledVolume], pairs: list[list[tuple[int, int, int]]],
                    settings: PropagationSettings) -> _Examples:
    """Embed every slice and zoomed crop the examples are decoded on, as propagation would."""
    out = _Examples()
    total = sum(len({p[2] for p in pp}) for pp in pairs)
    with tqdm(total=total, desc="embedding slices", leave=False) as bar:
        for d, (item, pp) in enumerate(zip(data, pairs)):
            normalize = volume_normalizer(item.volume, "auto")
            for z in sorted({p[2] for p in pp}):
                here = [p for p in pp if p[2] == z]
                predictor.set_image(normalize(np.asarray(item.volume[z])), intensity="none")
                whole_frame = predictor.frame
                prompts = [carried_prompt(item.labels[z_from] == i, None, "learned", settings.box_margin, z,
                                          whole_frame).validate(whole_frame.image_shape) for i, z_from, _ in here]
                for objects, embedding, view, offset in predictor.views(prompts, settings.zoom):
                    if not objects:
                        continue
                    out.embeddings.append(embedding.detach().to(torch.float16).cpu())
                    for k in objects:
                        i, z_from, _ = here[k]
                        out.items.append(_Example(d, i, z_from, z, len(out.embeddings) - 1, view, tuple(offset),
                                                  whole_frame))
                bar.update(1)
    return out


def _batch(examples: list[_Example], store: _Examples, data: list[LabelledVolume], settings: PropagationSettings,
           rng: np.random.Generator | None) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder inputs, embeddings, low-res targets and their valid grid for ``examples`` (disturbed when ``rng``)."""
    inputs, targets, valid = [], [], []
    for ex in examples:
        labels = data[ex.data].labels
        prev = labels[ex.z_from] == ex.label
        if rng is not None:
            prev = disturb(prev, rng)
        prompt = carried_prompt(prev, None, "learned", settings.box_margin, ex.z_to, ex.whole)
        inputs.append(decoder_inputs([prompt.validate(ex.whole.image_shape)], ex.view, ex.whole, ex.offset))
        truth = torch.from_numpy((labels[ex.z_to] == ex.label).astype(np.float32))[None, None]
        targets.append(resample_to_frame(truth, (1.0, 1.0), ex.view, ex.offset, fill=0.0))
        inside = torch.zeros(LOW_RES, LOW_RES, dtype=torch.bool)
        h, w = ex.view.low_res_extent
        inside[:h, :w] = True
        valid.append(inside)
    joined = {k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}
    embeddings = torch.cat([store.embeddings[ex.embedding] for ex in examples]).float()
    return joined, embeddings, torch.cat(targets)[:, 0], torch.stack(valid)


def _losses(logits: torch.Tensor, iou: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask loss (BCE + Dice inside the image) plus the IoU head's squared error; and each example's true IoU."""
    logits = logits[:, 0]
    v = valid.float()
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * v).sum((1, 2)) / v.sum((1, 2))
    prob = torch.sigmoid(logits) * v
    dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
    with torch.no_grad():
        pred, truth = (logits > 0) & valid, (target > 0.5) & valid
        union = (pred | truth).sum((1, 2)).float()
        true_iou = torch.where(union > 0, (pred & truth).sum((1, 2)).float() / union.clamp(min=1), torch.ones_like(union))
    loss = (bce + dice).mean() + F.mse_loss(iou[:, 0], true_iou)
    return loss, true_iou


def train_propagation_adapter(model, data: list[LabelledVolume], output: str | os.PathLike,
                              settings: AdapterSettings | None = None,
                              propagation: PropagationSettings | None = None, progress: bool = True) -> dict:
    """Train a propagation adapter for the SAM v1 ``model`` on ``data`` and write it to ``output``.

    The objects are split (whole objects) into training and validation; the
    epoch with the best validation mean IoU (low-resolution masks) is kept.
    Returns the metrics written into the file: each epoch's training loss and
    validation IoU.
    """
    settings = settings or AdapterSettings()
    propagation = propagation or PropagationSettings()
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    predictor = Predictor(model)
    pairs, val_keys = [], set()
    for d, item in enumerate(data):
        ids = item.ids if item.ids is not None else [int(i) for i in np.unique(item.labels) if i]
        held = rng.random(len(ids)) < settings.val_fraction
        val_keys |= {(d, i) for i, h in zip(ids, held) if h}
        pairs.append(slice_pairs(item.labels, ids, settings.min_area))
    store = _embed_examples(predictor, data, pairs, propagation)
    train = [ex for ex in store.items if (ex.data, ex.label) not in val_keys]
    val = [ex for ex in store.items if (ex.data, ex.label) in val_keys]
    logger.info("%d training and %d validation slice pairs", len(train), len(val))
    adapter = adapter_model(model, settings.rank)
    params = [p for n, p in adapter.named_parameters() if p.requires_grad and not n.startswith("image_encoder.")]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)

    def validate(decoder) -> float:
        fixed = np.random.default_rng(settings.seed + 1)  # the same disturbances every epoch
        ious = []
        with torch.no_grad():
            for s in range(0, len(val), 32):
                inputs, emb, target, valid = _batch(val[s:s + 32], store, data, propagation, fixed)
                lr, iou = decoder.decode(emb, **inputs)
                ious.append(_losses(lr, iou, target, valid)[1])
        return float(torch.cat(ious).mean()) if ious else float("nan")

    history = [{"epoch": 0, "train_loss": float("nan"), "val_iou": validate(adapter)}]  # before training
    best, best_state = -1.0, adapter_state(adapter)
    epochs = tqdm(range(settings.epochs), desc="epochs", disable=not progress)
    for epoch in epochs:
        adapter.train()
        order = rng.permutation(len(train))
        total = 0.0
        for s in range(0, len(order), settings.batch_size):
            inputs, emb, target, valid = _batch([train[k] for k in order[s:s + settings.batch_size]], store, data,
                                                propagation, rng)
            lr, iou = adapter.decode(emb, **inputs)
            loss, _ = _losses(lr, iou, target, valid)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(target)
        adapter.eval()
        score = validate(adapter)
        history.append({"epoch": epoch + 1, "train_loss": total / max(1, len(train)), "val_iou": score})
        epochs.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_iou=f"{score:.3f}")
        logger.info("epoch %d: loss %.4f, validation IoU %.4f", epoch + 1, history[-1]["train_loss"], score)
        if score > best or not val:
            best, best_state = score, adapter_state(adapter)
    info = model.info
    metrics = {"history": history, "best_val_iou": best, "train_pairs": len(train), "val_pairs": len(val)}
    payload = {"adapters": best_state, "biosam": {
        "format": ADAPTER_FORMAT, "base_model": info.name, "base_checkpoint_hash": info.checkpoint_hash,
        "rank": settings.rank, "alpha": float(settings.rank), "settings": asdict(settings),
        "box_margin": propagation.box_margin, "zoom": propagation.zoom,
        "trained_on": [item.name for item in data], "metrics": metrics}}
    save_atomic(output, payload)
    return metrics
