"""Prompted 2D segmentation: embed an image once, then decode any number of prompts."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from biosam.errors import EmbeddingMismatchError, InputError
from biosam.labels import label_dtype
from biosam.prompting.intensity import PERCENTILES, normalize_intensity, resolve_preset
from biosam.prompting.preprocess import Frame, crop_to_low_res, logits_to_image, model_input, resample_to_frame
from biosam.prompting.prompts import Prompt
from biosam.prompting.store import EmbeddingStore, embedding_key, image_hash
from biosam.prompting.zoom import ZoomSettings, plan_crops

logger = logging.getLogger(__name__)

EMBEDDING_FORMAT = 1
# Image-size logits of at most this many bytes are made at once: a decoder batch of 64 objects on a large
# image is upsampled a few objects at a time (the same numbers, bounded memory).
UPSAMPLE_BYTES = 1 << 28


@dataclass
class Prediction:
    """Masks at image size, the model's predicted IoU, and 256 px decoder logits.

    For ``N`` objects: ``masks`` ``(N, C, H, W)`` bool, ``scores`` ``(N, C)``,
    ``low_res_logits`` ``(N, C, 256, 256)``, ``zoomed`` ``(N,)`` (whether the
    object was segmented in a zoomed crop); ``C`` is 3 with multimask output,
    else 1. :meth:`Predictor.predict` squeezes these as documented there.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    zoomed: np.ndarray

    def to_labels(self) -> np.ndarray:
        """Label image: object k (0-based) gets label k + 1, later objects drawn over earlier ones.

        With several masks per object the one with the highest predicted IoU is used.
        """
        masks, scores = self.masks, self.scores
        if masks.ndim == 3:
            if len(self.zoomed) == len(masks):  # N objects, one mask each
                masks, scores = masks[:, None], scores[:, None]
            else:  # one object, C candidate masks
                masks, scores = masks[None], scores[None]
        n = len(masks)
        labels = np.zeros(masks.shape[-2:], dtype=label_dtype(n))
        best = np.argmax(scores, axis=1)
        for k in range(n):
            labels[masks[k, best[k]]] = k + 1
        return labels


@dataclass
class LabelResult:
    """Objects segmented straight into a label image by :meth:`Predictor.predict_labels`.

    ``labels`` ``(H, W)``: object k (0-based) gets label k + 1 (or the
    ``ids[k]`` asked for), later objects drawn over earlier ones, as
    :meth:`Prediction.to_labels`. Per object, ``(N,)``:
    ``scores`` (predicted IoU of the mask used), ``areas`` (pixels of its mask),
    ``visible_areas`` (pixels it keeps in ``labels``), ``zoomed``. ``warnings``:
    what the caller should tell the user (also logged).
    """

    labels: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    visible_areas: np.ndarray
    zoomed: np.ndarray
    warnings: list[str]


@dataclass
class _Chunk:
    """Decoded objects ``idx`` (at most a decoder batch): image-pixel logits ``(k, C, y1 - y0, x1 - x0)`` of the
    window ``box`` ``(x0, y0, x1, y1)`` (the whole image, or a zoomed crop), predicted IoU ``(k, C)``, and
    with ``low_res`` asked for, the whole image's ``(k, C, 256, 256)`` decoder logits."""

    idx: np.ndarray
    box: tuple[int, int, int, int]
    logits: torch.Tensor
    scores: np.ndarray
    zoomed: bool
    low_res: np.ndarray | None = None


def _listed(labels: np.ndarray, limit: int = 10) -> str:
    """``labels 3, 8, 12``, shortened after ``limit``."""
    shown = ", ".join(str(int(i)) for i in labels[:limit])
    more = f" and {len(labels) - limit} more" if len(labels) > limit else ""
    return f"label{'s' if len(labels) > 1 else ''} {shown}{more}"


class Predictor:
    """Segment objects in one image from point, box and mask prompts.

    ``model`` comes from :func:`biosam.load_model`. The image embedding is
    computed once by :meth:`set_image` (or restored by :meth:`load_embedding`)
    and reused for every call of :meth:`predict`. With ``store`` (an
    :class:`~biosam.prompting.store.EmbeddingStore` or a path for one), every
    embedding is kept on disk and reused by later runs.
    """

    def __init__(self, model: torch.nn.Module, zoom_settings: ZoomSettings | None = None, batch_size: int = 64,
                 store: EmbeddingStore | str | os.PathLike | None = None):
        if model.info is None:
            raise InputError("this model has no model.info (its name, preprocessing and checkpoint): load it with "
                             "biosam.load_model, or set model.info = biosam.ModelInfo(...) first.")
        self.model = model.eval()
        # every embedding (images, tiles, zoomed crops) is looked up here first and added when new
        self.store = store if store is None or isinstance(store, EmbeddingStore) else EmbeddingStore(store, model)
        self.info = model.info
        self.zoom_settings = zoom_settings or ZoomSettings()
        self.batch_size = batch_size
        self._image: np.ndarray | None = None
        self._rgb: np.ndarray | None = None
        self._frame: Frame | None = None
        self._embedding: torch.Tensor | None = None
        self.intensity: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def input_size(self) -> int:
        return self.model.image_size

    # ---------------------------------------------------------------- image
    def _prepare(self, image: np.ndarray, intensity: str, extent: int | None = None) -> None:
        image = np.asarray(image)
        self._rgb = normalize_intensity(image, intensity)
        self.intensity = resolve_preset(intensity, image.dtype)
        self._image = image
        self._frame = Frame.create(self._rgb.shape[:2], self.input_size, self.info.preprocessing, extent)
        self._embedding = None

    @torch.inference_mode()
    def _embed(self, rgb: np.ndarray, frame: Frame) -> torch.Tensor:
        key = None
        if self.store is not None:
            key = embedding_key(rgb, frame)
            stored = self.store.get(key)
            if stored is not None:
                return stored.to(self.device)
        x = model_input(rgb, frame, self.info.preprocessing).to(self.device)
        embedding = self.model.embed(x)
        if key is not None:
            self.store.put(key, embedding)
        return embedding

    def embed_region(self, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, Frame]:
        """Embedding and frame of the crop ``(x0, y0, x1, y1)`` of the current image, at the model's input size."""
        self._require_image()
        x0, y0, x1, y1 = box
        frame = Frame.create((y1 - y0, x1 - x0), self.input_size, self.info.preprocessing)
        return self._embed(self._rgb[y0:y1, x0:x1], frame), frame

    def set_image(self, image: np.ndarray, intensity: str = "auto", extent: int | None = None) -> None:
        """Normalise and embed a 2D image (grayscale, RGB or multichannel; any dtype).

        ``intensity`` is a preset of :mod:`biosam.prompting.intensity` (``auto``,
        ``percentile``, ``minmax``, ``none``, ``ct-soft-tissue``, ``ct-lung``,
        ``ct-bone``, ``ct-brain``); the one used is kept in :attr:`intensity`.
        ``extent`` (pixels): an image smaller than this is padded as part of an
        ``extent``-pixel square rather than enlarged to the model input (tiles).
        """
        self._prepare(image, intensity, extent)
        self._embedding = self._embed(self._rgb, self._frame)

    @property
    def embedding(self) -> torch.Tensor:
        """The current image embedding ``(1, 256, h, w)`` on the model's device."""
        self._require_image()
        return self._embedding

    @property
    def frame(self) -> Frame:
        """Geometry between the current image's pixels and the model input (see :class:`Frame`)."""
        self._require_image()
        return self._frame

    @property
    def image_rgb(self) -> np.ndarray:
        """The current image after intensity normalisation: ``(H, W, 3)`` float32 in [0, 255]."""
        self._require_image()
        return self._rgb

    @property
    def image_shape(self) -> tuple[int, int]:
        self._require_image()
        return self._frame.image_shape

    def _require_image(self) -> None:
        if self._embedding is None:
            raise RuntimeError("no image set: call set_image() or load_embedding() first.")

    # ----------------------------------------------------- embedding store
    def signature(self) -> dict:
        """What an embedding depends on: model, checkpoint, image and preprocessing."""
        return {
            "format": EMBEDDING_FORMAT,
            "model": self.info.name,
            "checkpoint_hash": self.info.checkpoint_hash,
            "image_hash": image_hash(self._image),
            "image_shape": list(self._image.shape),
            "image_dtype": self._image.dtype.str,
            "preprocessing": self.info.preprocessing,
            "intensity": self.intensity,
            "intensity_percentiles": list(PERCENTILES),
            "input_size": self.input_size,
            "precision": self.model.precision,
        }

    def save_embedding(self, path: str | os.PathLike) -> Path:
        """Save the current image embedding with its signature (``.npz``)."""
        from biosam.io.files import atomic_path

        self._require_image()
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, embedding=self._embedding.float().cpu().numpy(), signature=json.dumps(self.signature()))
        return path

    def load_embedding(self, path: str | os.PathLike, image: np.ndarray, intensity: str = "auto") -> None:
        """Restore an embedding saved by :meth:`save_embedding` for ``image``.

        Raises :class:`EmbeddingMismatchError` naming the first difference if the
        file was made with another model, checkpoint, preprocessing or image.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                saved = json.loads(str(data["signature"]))
                embedding = torch.from_numpy(data["embedding"])
        except FileNotFoundError:
            raise InputError(f"{path}: embedding file not found.") from None
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: not a biosam embedding file ({exc}).") from exc
        self._prepare(image, intensity)
        current = self.signature()
        for key, value in current.items():
            if saved.get(key) != value:
                raise EmbeddingMismatchError(
                    f"{path}: embedding was computed with {key}={saved.get(key)!r}, but now {key}={value!r}; "
                    "it cannot be reused. Call set_image() to compute a new one."
                )
        self._embedding = embedding.to(self.device)

    # ---------------------------------------------------------- decoding
    def predict(
        self,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        multimask: bool = False,
        zoom: str = "auto",
    ) -> Prediction:
        """Segment one object, or ``N`` objects in one batched call.

        Coordinates are original image pixels. ``box`` is ``(4,)`` or ``(N, 4)``;
        ``points`` ``(K, 2)`` or ``(N, K, 2)`` with ``point_labels`` ``(K,)`` or
        ``(N, K)`` (1 object, 0 background; default all 1); ``mask`` is the
        ``low_res_logits`` of a previous prediction, ``(256, 256)``,
        ``(1, 256, 256)`` or ``(N, 1, 256, 256)``.

        Unbatched prompts give ``masks`` ``(C, H, W)`` and ``scores`` ``(C,)``;
        batched prompts give ``(N, H, W)`` and ``(N,)``, or ``(N, 3, H, W)``
        and ``(N, 3)`` with ``multimask``. ``zoom``: ``"auto"`` segments small
        boxed objects in a zoomed crop, ``"on"`` every object with a box (or
        points), ``"off"`` runs on the whole image exactly as the model's
        authors do.
        """
        self._require_image()
        box_a = None if box is None else np.asarray(box, dtype=np.float64)
        pts_a = None if points is None else np.asarray(points, dtype=np.float64)
        lab_a = None if point_labels is None else np.asarray(point_labels)
        mask_a = None if mask is None else np.asarray(mask, dtype=np.float32)
        batch_ndim = {"box": 2, "points": 3, "labels": 2, "mask": 4}
        arrays = {"box": box_a, "points": pts_a, "labels": lab_a, "mask": mask_a}
        counts = {len(a) for k, a in arrays.items() if a is not None and a.ndim == batch_ndim[k] and k != "labels"}
        batched = bool(counts)
        if not batched:
            prompts = [Prompt(box_a, pts_a, lab_a, mask_a)]
        else:
            if len(counts) != 1:
                raise InputError(f"batched prompts must all describe the same number of objects, got {sorted(counts)}.")
            n = counts.pop()

            def pick(a: np.ndarray | None, i: int, batched_ndim: int) -> np.ndarray | None:
                if a is None:
                    return None
                return a[i] if a.ndim == batched_ndim else a

            prompts = [
                Prompt(pick(box_a, i, 2), pick(pts_a, i, 3), pick(lab_a, i, 2), pick(mask_a, i, 4))
                for i in range(n)
            ]
        result = self.predict_prompts(prompts, multimask=multimask, zoom=zoom)
        if not batched:
            return Prediction(result.masks[0], result.scores[0], result.low_res_logits[0], result.zoomed)
        if not multimask:
            return Prediction(result.masks[:, 0], result.scores[:, 0], result.low_res_logits, result.zoomed)
        return result

    def predict_prompts(
        self, prompts: list[Prompt], multimask: bool = False, zoom: str = "auto", progress: bool = False,
        decoder: torch.nn.Module | Sequence[torch.nn.Module | None] | None = None,
    ) -> Prediction:
        """Segment one object per :class:`Prompt`; output arrays are ``(N, C, ...)``.

        Holds every object's image-size masks: for thousands of prompts use
        :meth:`predict_labels`, which gives the same labels in bounded memory.
        ``decoder``: a model sharing this model's image encoder (and so its
        embeddings) that decodes the prompts instead, e.g. a propagation adapter
        (:func:`biosam.volume.adapter.propagation_decoder`); or one per prompt
        (None: this model), so that crops shared by prompts of both are embedded once.
        """
        self._require_image()
        h, w = self._frame.image_shape
        prompts = [p.validate((h, w)) for p in prompts]
        if isinstance(decoder, Sequence) and len(decoder) != len(prompts):
            raise ValueError(f"{len(decoder)} decoders for {len(prompts)} prompts; give one per prompt.")
        n, c = len(prompts), 3 if multimask else 1
        masks = np.zeros((n, c, h, w), dtype=bool)
        scores = np.zeros((n, c), dtype=np.float32)
        low_res = np.zeros((n, c, 256, 256), dtype=np.float32)
        zoomed = np.zeros(n, dtype=bool)
        for chunk in self._chunks(prompts, multimask, zoom, progress, low_res=True, decoder=decoder):
            x0, y0, x1, y1 = chunk.box
            masks[chunk.idx, :, y0:y1, x0:x1] = (chunk.logits > 0).cpu().numpy()
            low_res[chunk.idx] = chunk.low_res
            scores[chunk.idx] = chunk.scores
            zoomed[chunk.idx] = chunk.zoomed
        return Prediction(masks, scores, low_res, zoomed)

    def predict_labels(
        self, prompts: list[Prompt], multimask: bool = False, zoom: str = "auto", progress: bool = False,
        ids: np.ndarray | list[int] | None = None,
    ) -> LabelResult:
        """Segment one object per :class:`Prompt` straight into a label image.

        Object k gets label ``ids[k]`` (increasing; default k + 1, which gives
        ``predict_prompts(...).to_labels()``); where objects overlap the highest
        label wins, as later objects are drawn over earlier ones. Objects are
        decoded :attr:`batch_size` at a time and each mask is drawn into the
        label image as soon as it is decoded, so memory stays bounded for any
        number of prompts (no ``(N, H, W)`` array). ``progress`` shows a bar
        over the objects when there is more than one batch of them. Warns (log
        and :attr:`LabelResult.warnings`) about prompts the model was not
        trained for and about objects that came back empty.
        """
        self._require_image()
        h, w = self._frame.image_shape
        prompts = [p.validate((h, w)) for p in prompts]
        n = len(prompts)
        ids = np.arange(1, n + 1) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != n or (n and ids[0] < 1) or (np.diff(ids) <= 0).any():
            raise InputError(f"ids must be {n} increasing labels >= 1, one per prompt (got {len(ids)}, "
                             f"from {ids[:3].tolist()}...).")
        warnings = self.prompt_warnings(prompts, ids)
        top = int(ids[-1]) if n else 0
        labels = np.zeros((h, w), dtype=label_dtype(top))
        scores = np.zeros(n, dtype=np.float32)
        areas = np.zeros(n, dtype=np.int64)
        zoomed = np.zeros(n, dtype=bool)
        for chunk in self._chunks(prompts, multimask, zoom, progress):
            x0, y0, x1, y1 = chunk.box
            best = chunk.scores.argmax(axis=1)
            masks = (chunk.logits[torch.arange(len(best)), torch.as_tensor(best)] > 0).cpu().numpy()
            window = labels[y0:y1, x0:x1]
            for mask, label in zip(masks, ids[chunk.idx]):
                # Draw only inside the mask's bounding box; the highest label wins, as later objects
                # are drawn over earlier ones whatever order the chunks come in.
                rows = np.flatnonzero(mask.any(axis=1))
                if not len(rows):
                    continue
                cols = np.flatnonzero(mask.any(axis=0))
                r, q = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
                part = window[r, q]
                part[mask[r, q] & (part < label)] = label
            areas[chunk.idx] = masks.sum(axis=(1, 2))
            scores[chunk.idx] = chunk.scores[np.arange(len(best)), best]
            zoomed[chunk.idx] = chunk.zoomed
        visible = np.bincount(labels.ravel(), minlength=top + 1)[ids]
        empty = np.flatnonzero(areas == 0)
        if len(empty):
            message = (f"{len(empty)} of {n} object(s) came back empty ({_listed(ids[empty])}): the model found "
                       "nothing at their prompts; check that each box frames its object.")
            logger.warning(message)
            warnings.append(message)
        return LabelResult(labels, scores, areas, visible, zoomed, warnings)

    def prompt_warnings(self, prompts: list[Prompt], ids: np.ndarray | None = None) -> list[str]:
        """Warnings (logged, and returned) about prompts the model was not trained for; ``ids``: the objects'
        labels, named in the message (default 1 to N).

        A model trained with box prompts only (LiteMedSAM, MedSAM; see
        :attr:`biosam.ModelInfo.box_only`) usually gives an empty or wrong
        mask for an object prompted by points alone.
        """
        if not (self.info is not None and self.info.box_only):
            return []
        boxless = [i for i, p in enumerate(prompts) if p.box is None]
        if not boxless:
            return []
        ids = np.arange(1, len(prompts) + 1) if ids is None else np.asarray(ids)
        message = (f"objects without a box ({_listed(ids[boxless])}): {self.info.name} was trained with box prompts "
                   "only, so points alone usually give an empty or wrong mask. Give each object a box, or use a "
                   "model trained with points (e.g. vit_b_lm).")
        logger.warning(message)
        return [message]

    def views(self, prompts: list[Prompt], zoom: str) -> Iterator[tuple[list[int], torch.Tensor, Frame, tuple[int, int]]]:
        """Where validated ``prompts`` are decoded: ``(objects, embedding, frame, offset)`` for the whole image
        first, then for each zoomed crop (``offset``: the crop's top-left corner in image pixels).

        Crops are planned by :func:`~biosam.prompting.zoom.plan_crops` from each
        prompt's extent and embedded one at a time, as they are reached.
        """
        frame = self._frame
        extents = np.stack([p.extent() for p in prompts]) if prompts else np.zeros((0, 4))
        if zoom == "on" and prompts:
            extents = np.stack([_points_extent(p, frame.image_shape) if p.box is None and p.points is not None
                                else p.extent() for p in prompts])
        crops, whole = plan_crops(extents, frame.image_shape, zoom, self.zoom_settings)
        if crops:
            logger.info("segmenting %d object(s) in %d zoomed crop(s)", sum(len(cr.objects) for cr in crops), len(crops))
        yield whole, self._embedding, frame, (0, 0)
        for crop in crops:
            embedding, crop_frame = self.embed_region(crop.box)
            yield crop.objects, embedding, crop_frame, crop.box[:2]

    def _chunks(
        self, prompts: list[Prompt], multimask: bool, zoom: str, progress: bool, low_res: bool = False,
        decoder: torch.nn.Module | Sequence[torch.nn.Module | None] | None = None,
    ) -> Iterator[_Chunk]:
        """Decode validated ``prompts`` a batch at a time: whole-image objects first, then each zoomed crop.

        Every chunk holds at most :attr:`batch_size` objects, and image-size
        logits of at most :data:`UPSAMPLE_BYTES`, so that the caller's memory
        does not grow with the number of prompts.
        """
        frame = self._frame
        c = 3 if multimask else 1
        bar = tqdm(total=len(prompts), desc="objects", unit="obj", leave=False,
                   disable=not progress or len(prompts) <= self.batch_size)
        with bar:
            for objects, embedding, view, (x0, y0) in self.views(prompts, zoom):
                zoomed = view is not frame
                h, w = view.image_shape
                box = (x0, y0, x0 + w, y0 + h)
                step = max(1, UPSAMPLE_BYTES // (4 * c * h * w))
                for idx, lr, iou in self._decode(objects, prompts, embedding, view, (x0, y0), multimask, decoder):
                    for s in range(0, len(idx), step):
                        part = slice(s, s + step)
                        logits = logits_to_image(lr[part], view, self.info.preprocessing)
                        small = None
                        if low_res:
                            small = (crop_to_low_res(logits, box, frame) if zoomed else lr[part]).cpu().numpy()
                        yield _Chunk(idx[part], box, logits, iou[part].cpu().numpy(), zoomed, small)
                    bar.update(len(idx))

    @torch.inference_mode()
    def _decode(self, indices, prompts, embedding, frame, offset, multimask, decoder=None):
        """Yield ``(indices, low_res_logits, iou)`` for batches of same-structure prompts with the same decoder."""
        decoders = decoder if isinstance(decoder, Sequence) else [decoder] * len(prompts)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in indices:
            groups[prompts[i].structure, id(decoders[i])].append(i)
        for members in groups.values():
            model = decoders[members[0]] or self.model
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                inputs = decoder_inputs([prompts[i] for i in idx], frame, self._frame, offset, self.device)
                lr, iou = model.decode(embedding, multimask=multimask, **inputs)
                yield np.array(idx), lr.float(), iou.float()


def decoder_inputs(prompts: list[Prompt], frame: Frame, whole: Frame, offset: tuple[int, int] = (0, 0),
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A model's ``decode`` arguments for same-structure validated ``prompts`` (image pixels) in ``frame``.

    ``frame`` is the whole image's frame ``whole`` or a crop's, whose top-left
    corner lies at ``offset``; coordinates become model-input pixels, and mask
    prompts (logits on ``whole``'s grid) are resampled onto a crop's grid.
    """
    shift = np.array(offset, dtype=np.float64)
    inputs = {}
    if prompts[0].points is not None:
        pts = np.stack([frame.to_model(p.points - shift) for p in prompts])
        inputs["point_coords"] = torch.as_tensor(pts, dtype=torch.float32, device=device)
        inputs["point_labels"] = torch.as_tensor(np.stack([p.point_labels for p in prompts]), dtype=torch.int64,
                                                 device=device)
    if prompts[0].box is not None:
        bx = np.stack([frame.to_model(p.box - np.tile(shift, 2)) for p in prompts])
        inputs["boxes"] = torch.as_tensor(bx, dtype=torch.float32, device=device)
    if prompts[0].mask is not None:
        masks = torch.as_tensor(np.stack([p.mask for p in prompts])[:, None], device=device)
        if frame != whole:
            masks = resample_to_frame(masks, whole.low_res_per_px, frame, offset)
        inputs["mask_inputs"] = masks
    return inputs


def _points_extent(prompt: Prompt, image_shape: tuple[int, int]) -> np.ndarray:
    """A square around a point-only object's foreground points, for ``zoom='on'``."""
    pts = prompt.points[prompt.point_labels == 1] if (prompt.point_labels == 1).any() else prompt.points
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    side = max(float((hi - lo).max()), max(image_shape) / 8)
    center = (lo + hi) / 2
    return np.concatenate([center - side / 2, center + side / 2])
