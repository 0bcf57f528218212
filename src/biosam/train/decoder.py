"""Training an instance decoder on a frozen image encoder.

The encoder never changes, so every training tile is embedded once and the
embedding cached on disk (keyed by the model's checkpoint hash and the tile's
pixels); augmentation that changes pixels (the 8 rotations/flips, crops at
several scales) therefore means more cached tiles, chosen up front. Each
training step decodes a random window of a cached embedding. Validation runs
the real pipeline on whole validation images (tiles with a halo, maps stitched,
one watershed) and scores F1 at IoU 0.5 and mSA; the best epoch is kept,
training stops early when validation stops improving, and ``resume`` continues
from the state saved after every epoch. The post-processing parameters are
finally tuned on the training tiles.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xxhash

from biosam.automatic.ais import encoder_info, maps_from_embedding, save_decoder
from biosam.automatic.data import dihedral, distance_targets, read_pair
from biosam.automatic.decoder import InstanceDecoder, config_for, count_parameters
from biosam.automatic.instances import PostProcessing, maps_to_instances
from biosam.automatic.labels import object_diameters
from biosam.automatic.resample import resize_image, resize_labels, resize_maps, scaled_shape
from biosam.automatic.tiling import MapStitcher, Tile, tile_grid
from biosam.errors import InputError
from biosam.evaluate import aggregate, instance_counts
from biosam.prompting.intensity import normalize_intensity, resolve_preset
from biosam.prompting.preprocess import Frame, model_input
from biosam.prompting.store import image_hash
from biosam.settings import check, positive, rule, whole, within
from biosam.train.augment import augment_intensity
from biosam.train.harness import (
    RESUME_SUFFIX,
    ResumeFile,
    RunState,
    check_output,
    data_signature,
    optional,
    progress_bar,
    resume_path,
    run_epochs,
)

logger = logging.getLogger(__name__)

# resume_path and RESUME_SUFFIX are the harness's; scripts know them from here
__all__ = ["RESUME_SUFFIX", "EmbeddingCache", "TrainResult", "TrainSettings", "decoder_loss", "evaluate_decoder",
           "resume_path", "size_scale", "train_decoder", "tune_postprocessing", "typical_object_size",
           "validation_images"]

# settings a resumed run may change: more epochs or patience
_FREE_ON_RESUME = ("epochs", "patience")
_TUNING_GRID = {
    "foreground_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "center_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "boundary_threshold": (0.4, 0.5, 0.6, 0.7, 0.8),
    "smoothing": (0.0, 1.0, 2.0),
    "min_size": (0, 25, 50, 100, 200),
    "min_relative_size": (0.0, 0.1, 0.2, 0.3),
    "fill_holes": (True, False),
}


@dataclass(frozen=True)
class TrainSettings:
    """What to train on and for how long.

    ``tile``: side (px) of the training and validation tiles (default: the
    model input size, e.g. 256 for LiteMedSAM), cut at native resolution;
    ``halo``: overlap used when validation images are tiled. Training tiles are
    ``crops_per_image`` random crops at each of ``scales`` (1.0 = native; 0.5
    halves the image first so objects look smaller), each embedded in
    ``variants`` different rotations/flips. A training step decodes a random
    ``window`` x ``window`` part of an embedding (in embedding pixels);
    augmentation that costs no new embeddings: ``feature_flips`` turns and
    flips that window with its targets (teaching the decoder's filters the
    symmetry), ``feature_dropout`` drops whole embedding channels.
    ``steps_per_epoch`` defaults to one pass over the tiles.

    ``object_size`` (pixels) first resizes every image so that its median
    object diameter becomes this size; ``scales`` then vary it (scale
    augmentation), and at inference the image is resized to the same object
    size. ``augment`` is the fraction of crops whose raw pixels are re-exposed
    (gamma, offset, blur, noise, dim 8-bit or 16-bit storage; see
    :func:`biosam.train.augment.augment_intensity`) before normalisation.
    """

    epochs: int = 30
    patience: int = 5
    tile: int | None = None
    halo: int = 32
    scales: tuple[float, ...] = (1.0,)
    crops_per_image: tuple[int, ...] = (8,)
    variants: int = 1
    window: int = 32
    steps_per_epoch: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    intensity: str = "auto"
    features: tuple[int, ...] | None = None
    distance_weight: float = 2.0
    feature_flips: bool = True
    feature_dropout: float = 0.1
    tune: bool = True
    object_size: float | None = None
    augment: float = 0.0

    def __post_init__(self) -> None:
        crops = self.crops_per_image
        crops = (crops,) * len(self.scales) if isinstance(crops, int) else tuple(crops)
        object.__setattr__(self, "crops_per_image", crops)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        check("training settings", [
            whole("epochs", self.epochs, 1),
            whole("patience", self.patience, 1),
            optional(self.tile, whole("tile", self.tile, 32)),
            whole("halo", self.halo, 0),
            rule(len(crops) == len(self.scales), "give one crops_per_image count per scale"),
            rule(all(0 < s <= 4 for s in self.scales), f"scales must lie in (0, 4], got {self.scales}"),
            optional(self.object_size, within("object_size", self.object_size, 4, math.inf)),
            within("augment", self.augment, 0.0, 1.0),
            rule(all(c >= 0 for c in crops) and sum(crops) > 0, "crops_per_image must be >= 0 and not all 0"),
            rule(whole("variants", self.variants, 1)[0] and self.variants <= 8,
                 f"variants must be between 1 and 8 (the rotations and flips of a square), got {self.variants!r}"),
            whole("window", self.window, 4),  # embedding pixels
            whole("batch_size", self.batch_size, 1),
            positive("lr", self.lr),
            rule(0 <= self.feature_dropout < 1, f"feature_dropout must lie in [0, 1), got {self.feature_dropout!r}"),
        ])
        resolve_preset(self.intensity, np.dtype(np.uint16))  # validates the preset name

    def to_dict(self) -> dict:
        """The settings as plain types (tuples as lists), as checkpoints and resume files record them."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass
class TrainResult:
    """Outcome of :func:`train_decoder`; ``validation`` holds the final scores with the tuned post-processing."""

    output: Path
    best_epoch: int
    epochs_run: int
    history: list[dict]
    validation: dict | None
    postprocessing: dict
    parameters: int
    seconds: float
    per_image: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------ caching
class EmbeddingCache:
    """Embeddings of normalised RGB tiles, stored as float16 ``.npy`` files keyed by model and pixels."""

    def __init__(self, model: torch.nn.Module, folder: str | os.PathLike) -> None:
        self.model = model.eval()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        info = model.info
        precision = model.precision
        # fp32 keys stay as they were, so existing caches remain valid
        self._prefix = f"{info.checkpoint_hash}|{info.preprocessing}|{model.image_size}|" + (
            "" if precision == "fp32" else f"{precision}|")
        self.computed = 0

    def __call__(self, rgb: np.ndarray, frame: Frame) -> torch.Tensor:
        h = xxhash.xxh3_128()
        h.update(f"{self._prefix}{frame.image_shape}|{frame.resized}|".encode())
        h.update(image_hash(np.ascontiguousarray(rgb, dtype=np.float32)).encode())
        path = self.folder / f"{h.hexdigest()}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path))
            except (OSError, ValueError):
                logger.warning("%s: unreadable cached embedding, computing it again", path)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            x = model_input(rgb, frame, self.model.info.preprocessing).to(device)
            embedding = self.model.embed(x)[0].to(torch.float16).cpu().numpy()
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
        np.save(tmp, embedding)
        os.replace(tmp, path)
        self.computed += 1
        return torch.from_numpy(embedding)


def _full_frame(frame: Frame, tile: int) -> Frame:
    """The frame of a tile-sized image whose top-left part is ``frame``'s image (maps then cover the padding too)."""
    scale = frame.input_size / tile
    return Frame((tile, tile), frame.input_size, (int(tile * scale + 0.5),) * 2)


def _pad_to(array: np.ndarray, tile: int, value: float, axes: tuple[int, int]) -> np.ndarray:
    pad = [(0, 0)] * array.ndim
    for axis in axes:
        pad[axis] = (0, max(0, tile - array.shape[axis]))
    return np.pad(array, pad, constant_values=value) if any(p[1] for p in pad) else array


@dataclass
class _Sample:
    embedding: torch.Tensor  # (C, h, w) float16
    targets: torch.Tensor  # (3, S, S) float16 at the decoder output resolution
    labels: np.ndarray  # (tile, tile) instance labels, for tuning the post-processing
    frame: Frame


@dataclass
class _ValImage:
    name: str
    labels: np.ndarray
    tiles: list[tuple[Tile, torch.Tensor, Frame]]
    shape: tuple[int, int]  # of the (possibly resized) image the tiles were cut from
    halo: int


def _training_samples(model, pairs, settings: TrainSettings, tile: int, cache: EmbeddingCache, progress: bool):
    size = model.image_size
    samples, diameters = [], []
    bar = progress_bar(pairs, desc="embedding training tiles", enabled=progress, unit="image")
    seen: dict[int, int] = {}
    for image_path, label_path in bar:
        # Random crops depend on the image and how often it was listed before, not on its place in the
        # list, so runs on overlapping image lists, wherever the files lie, share crops (and cached embeddings).
        image, labels = read_pair(image_path, label_path)
        identity = int(image_hash(np.ascontiguousarray(image))[:16], 16)
        repeat = seen[identity] = seen.get(identity, -1) + 1
        base = size_scale(labels, settings.object_size)
        diameters.extend(base * object_diameters(labels))
        rgb = normalize_intensity(image, settings.intensity)
        grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        for level, (scale, count) in enumerate(zip(settings.scales, settings.crops_per_image)):
            # One random stream per image and scale: asking for more crops keeps (and reuses) the earlier ones.
            rng = np.random.default_rng([settings.seed, identity, repeat, level])
            rgb_s = resize_image(rgb, scaled_shape(rgb.shape, base * scale))
            labels_s = resize_labels(labels, rgb_s.shape[:2])
            if min(labels_s.shape) < 16:
                logger.info("%s: skipping scale %.2f (image too small)", image_path, scale)
                continue
            targets = distance_targets(labels_s)
            height, width = labels_s.shape
            for _ in range(count):
                y = int(rng.integers(0, max(height - tile, 0) + 1))
                x = int(rng.integers(0, max(width - tile, 0) + 1))
                window = (slice(y, y + tile), slice(x, x + tile))
                pixels = rgb_s
                if settings.augment and rng.random() < settings.augment:
                    # The whole image is re-exposed and normalised, as inference normalises whole images.
                    raw = augment_intensity(rgb_s[..., 0] if grey else rgb_s, rng)
                    pixels = normalize_intensity(raw, settings.intensity)
                for k in rng.choice(8, size=settings.variants, replace=False):
                    k = int(k)
                    rgb_v = dihedral(pixels[window].transpose(2, 0, 1), k).transpose(1, 2, 0)
                    # A crop smaller than the tile (small image) is padded by the model's own
                    # preprocessing, bottom and right; the targets are padded the same way.
                    frame = Frame.create(rgb_v.shape[:2], size, model.info.preprocessing, extent=tile)
                    embedding = cache(rgb_v, frame)
                    target = _pad_to(dihedral(targets[(slice(None), *window)], k), tile, 1.0, (1, 2))
                    target[0, rgb_v.shape[0] :] = 0.0
                    target[0, :, rgb_v.shape[1] :] = 0.0
                    target = torch.from_numpy(target)
                    if tile != size:
                        fg = F.interpolate(target[None, :1], size=(size, size), mode="nearest")
                        dist = F.interpolate(target[None, 1:], size=(size, size), mode="bilinear", align_corners=False)
                        target = torch.cat([fg, dist], dim=1)[0]
                    labels_v = _pad_to(dihedral(labels_s[window], k), tile, 0, (0, 1))
                    samples.append(_Sample(embedding, target.to(torch.float16), labels_v, _full_frame(frame, tile)))
        bar.set_postfix(tiles=len(samples), embedded=cache.computed)
    if not samples:
        raise InputError("no training tiles: the training images are empty or too small.")
    return samples, typical_object_size(diameters, settings)


def size_scale(labels: np.ndarray, object_size: float | None) -> float:
    """The resize factor that gives the median object of ``labels`` a diameter of ``object_size`` (1 if None)."""
    diameters = object_diameters(labels)
    return 1.0 if object_size is None or diameters.size == 0 else float(object_size / np.median(diameters))


def typical_object_size(diameters, settings: TrainSettings) -> float:
    """The object diameter (pixels) in the middle of what the decoder saw: the median diameter of the
    training objects times the log-midpoint of the training scales, sqrt(smallest x largest)."""
    diameters = np.asarray(diameters, dtype=float)
    diameters = diameters[diameters > 0]
    if diameters.size == 0:
        return 0.0
    middle = math.sqrt(min(settings.scales) * max(settings.scales))
    return round(float(np.median(diameters)) * middle, 1)


def validation_images(
    model: torch.nn.Module,
    pairs: list[tuple[Path, Path]],
    tile: int,
    halo: int,
    intensity: str,
    cache: EmbeddingCache,
    progress: bool = False,
    scale: float = 1.0,
    object_size: float | None = None,
) -> list[_ValImage]:
    """Labelled images cut into tiles with a halo, each tile embedded through ``cache``.

    With ``scale`` the images are resized first (2.0 makes objects twice as
    big), with ``object_size`` so that their median labelled object has that
    diameter; :func:`evaluate_decoder` brings the maps back to the label size.
    """
    out = []
    bar = progress_bar(pairs, desc="embedding validation tiles", enabled=progress, unit="image")
    for image_path, label_path in bar:
        image, labels = read_pair(image_path, label_path)
        rgb = normalize_intensity(image, intensity)
        rgb = resize_image(rgb, scaled_shape(rgb.shape, scale * size_scale(labels, object_size)))
        tiles = []
        for t in tile_grid(rgb.shape[:2], tile, halo):
            part = rgb[t.outer_slice]
            frame = Frame.create(part.shape[:2], model.image_size, model.info.preprocessing, extent=tile)
            tiles.append((t, cache(part, frame), frame))
        out.append(_ValImage(Path(image_path).name, labels, tiles, rgb.shape[:2], halo))
        bar.set_postfix(embedded=cache.computed)
    return out


# ------------------------------------------------------------------ training
def decoder_loss(logits: torch.Tensor, target: torch.Tensor, distance_weight: float = 2.0) -> torch.Tensor:
    """Foreground: BCE + Dice. Distances: Dice + MSE, both only inside the objects."""
    eps = 1e-6
    fg_logit, fg = logits[:, 0], target[:, 0]
    fg_prob = torch.sigmoid(fg_logit)
    loss = F.binary_cross_entropy_with_logits(fg_logit, fg)
    loss = loss + 1 - (2 * (fg_prob * fg).sum() + eps) / (fg_prob.square().sum() + fg.square().sum() + eps)
    mask = fg[:, None]
    inside = mask.sum() * 2
    if inside > 0:
        dist = torch.sigmoid(logits[:, 1:]) * mask
        dist_t = target[:, 1:] * mask
        mse = (dist - dist_t).square().sum() / inside
        dims = (0, 2, 3)
        dice = 1 - (2 * (dist * dist_t).sum(dims) + eps) / (dist.square().sum(dims) + dist_t.square().sum(dims) + eps)
        loss = loss + distance_weight * (mse + dice.mean())
    return loss


def _batch(samples: list[_Sample], indices, settings: TrainSettings, upscale: int, gen: torch.Generator):
    embeddings, targets = [], []
    for i in indices:
        s = samples[i]
        h, w = s.embedding.shape[-2:]
        c = min(settings.window, h, w)
        oy = int(torch.randint(0, h - c + 1, (1,), generator=gen))
        ox = int(torch.randint(0, w - c + 1, (1,), generator=gen))
        embedding = s.embedding[:, oy : oy + c, ox : ox + c]
        target = s.targets[:, oy * upscale : (oy + c) * upscale, ox * upscale : (ox + c) * upscale]
        if settings.feature_flips:
            k = int(torch.randint(0, 8, (1,), generator=gen))
            embedding, target = (torch.rot90(a, k % 4, dims=(-2, -1)) for a in (embedding, target))
            if k >= 4:
                embedding, target = embedding.flip(-1), target.flip(-1)
        embeddings.append(embedding)
        targets.append(target)
    x = torch.stack(embeddings).float()
    if settings.feature_dropout > 0:
        keep = torch.rand(x.shape[:2], generator=gen) >= settings.feature_dropout
        x = x * keep[..., None, None] / (1 - settings.feature_dropout)
    return x, torch.stack(targets).float()


@torch.inference_mode()
def _image_maps(decoder: InstanceDecoder, item: _ValImage) -> np.ndarray:
    stitcher = MapStitcher(3, item.shape, item.halo)
    for t, embedding, frame in item.tiles:
        stitcher.add(t, maps_from_embedding(decoder, embedding[None].float(), frame)[0].cpu().numpy())
    return resize_maps(stitcher.result(), item.labels.shape)


def _scores(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[dict, list[dict]]:
    counts = [instance_counts(p, g) for p, g in zip(preds, gts)]
    pooled = aggregate(counts)
    half = next(r for r in pooled["per_threshold"] if abs(r["threshold"] - 0.5) < 1e-9)
    summary = {"f1": half["f1"], "msa": pooled["msa"], "mean_image_msa": pooled["mean_image_msa"],
               "n_pred": pooled["n_pred"], "n_gt": pooled["n_gt"]}
    per_image = [{"f1": c.at(0.5)["f1"], "msa": c.msa, "n_pred": c.n_pred, "n_gt": c.n_gt} for c in counts]
    return summary, per_image


def evaluate_decoder(
    decoder: InstanceDecoder, items: list[_ValImage], params: PostProcessing
) -> tuple[dict, list[dict]]:
    """Pooled F1 at IoU 0.5 and mSA of the tiled pipeline on validation images, and per-image scores."""
    decoder.eval()
    preds = [maps_to_instances(_image_maps(decoder, item), params) for item in items]
    summary, per_image = _scores(preds, [item.labels for item in items])
    for item, row in zip(items, per_image):
        row["image"] = item.name
    return summary, per_image


def tune_postprocessing(
    maps: list[np.ndarray], labels: list[np.ndarray], start: PostProcessing, progress: bool = False
) -> tuple[PostProcessing, float]:
    """Coordinate search over :data:`_TUNING_GRID` maximising pooled F1@0.5 + mSA on ``(maps, labels)``."""

    def score(p: PostProcessing) -> float:
        s, _ = _scores([maps_to_instances(m, p) for m in maps], labels)
        return s["f1"] + s["msa"]

    best, best_score = start, score(start)
    bar = progress_bar(total=sum(len(v) for v in _TUNING_GRID.values()), desc="tuning post-processing",
                       enabled=progress)
    for name, values in _TUNING_GRID.items():
        for value in values:
            bar.update()
            candidate = best.replace(**{name: value})
            if candidate == best:
                continue
            s = score(candidate)
            if s > best_score + 1e-9:
                best, best_score = candidate, s
    bar.close()
    return best, best_score


def train_decoder(
    model: torch.nn.Module,
    train_pairs: list[tuple[Path, Path]],
    val_pairs: list[tuple[Path, Path]],
    output: str | os.PathLike,
    settings: TrainSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train an instance decoder for ``model`` and write the best checkpoint to ``output``.

    ``train_pairs`` / ``val_pairs`` are ``(image_path, label_path)`` lists (label
    images or binary masks). Embeddings are cached in ``cache_dir`` (default: a
    folder next to ``output``). With ``resume`` the run continues from the state
    left by an earlier call with the same data and settings (and may replace
    ``output``); otherwise an existing ``output`` is refused unless ``overwrite``.
    Without validation pairs the epoch with the lowest training loss is kept.
    """
    started = time.perf_counter()
    settings = settings or TrainSettings()
    output = Path(output)
    check_output(output, overwrite or resume)
    if not train_pairs:
        raise InputError("no training images given.")
    tile = settings.tile or model.image_size
    size = model.image_size
    config = config_for(size, model.config.image_embedding_size, settings.features)
    cache = EmbeddingCache(model, cache_dir or output.with_name(f"{output.stem}_embeddings"))
    saved = ResumeFile(output, data_signature(train_pairs, val_pairs), settings.to_dict(), _FREE_ON_RESUME)
    state = saved.load(resume)

    samples, object_size = _training_samples(model, train_pairs, settings, tile, cache, progress)
    val_items = validation_images(model, val_pairs, tile, settings.halo, settings.intensity, cache, progress,
                                  object_size=settings.object_size)
    logger.info("%d training tiles, %d validation images (%d embeddings computed)", len(samples), len(val_items),
                cache.computed)

    torch.manual_seed(settings.seed)
    device = next(model.parameters()).device
    decoder = InstanceDecoder(config).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs, eta_min=settings.lr / 20)
    run = RunState()
    if state is not None:
        decoder.load_state_dict(state["model"])
        run = saved.restore(state, optimizer, scheduler)

    params = PostProcessing()
    info = {"encoder": encoder_info(model), "intensity": settings.intensity, "normalisation": "whole image",
            "tile": tile, "halo": settings.halo, "object_size": object_size, "postprocessing": params.to_dict()}
    steps = settings.steps_per_epoch or max(1, math.ceil(len(samples) / settings.batch_size))

    def epoch(n: int) -> tuple[dict, float]:
        gen = torch.Generator().manual_seed(settings.seed * 100003 + n)
        decoder.train()
        order = torch.randperm(len(samples), generator=gen).tolist()
        losses = []
        step_bar = progress_bar(range(steps), desc=f"epoch {n}", enabled=progress, leave=False)
        for step in step_bar:
            start = (step * settings.batch_size) % len(samples)
            indices = [order[(start + j) % len(order)] for j in range(settings.batch_size)]
            x, y = _batch(samples, indices, settings, config.upscale, gen)
            loss = decoder_loss(decoder.logits(x.to(device)), y.to(device), settings.distance_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step_bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        scheduler.step()
        row = {"epoch": n, "loss": float(np.mean(losses))}
        if not val_items:
            return row, -row["loss"]
        scores, _ = evaluate_decoder(decoder, val_items, params)
        row |= {"val_f1": scores["f1"], "val_msa": scores["msa"]}
        return row, scores["f1"] + scores["msa"]

    def on_best(n: int) -> None:
        save_decoder(output, decoder, {**info, "training": {"epoch": n, "history": run.history}})

    def after_epoch(n: int) -> None:
        saved.save(run, optimizer, scheduler, decoder.state_dict())

    run_epochs(run, settings.epochs, epoch, patience=settings.patience, on_best=on_best, after_epoch=after_epoch,
               progress=progress)

    from biosam.automatic.ais import load_decoder

    decoder = load_decoder(output, model).to(device)
    if settings.tune:
        with torch.inference_mode():
            maps = [maps_from_embedding(decoder, s.embedding[None].float(), s.frame)[0].cpu().numpy() for s in samples]
        params, _ = tune_postprocessing(maps, [s.labels for s in samples], params, progress)
        logger.info("post-processing tuned on the training tiles: %s", params)
    validation, per_image = (evaluate_decoder(decoder, val_items, params) if val_items else (None, []))
    best_epoch = run.best["epoch"]
    training = {"epoch": best_epoch, "history": run.history, "settings": settings.to_dict(),
                "train_images": [str(p[0]) for p in train_pairs], "val_images": [str(p[0]) for p in val_pairs],
                "training_tiles": len(samples), "validation": validation, "validation_per_image": per_image,
                "parameters": count_parameters(decoder)}
    save_decoder(output, decoder, {**info, "postprocessing": params.to_dict(), "training": training})
    return TrainResult(output, best_epoch, len(run.history), run.history, validation, params.to_dict(),
                       count_parameters(decoder), time.perf_counter() - started, per_image)
