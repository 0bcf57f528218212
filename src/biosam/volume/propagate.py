"""Prompted 3D segmentation: objects prompted on some slices are followed through the volume.

SAM v1 models (LiteMedSAM, MedSAM, SAM, micro-sam) see one slice at a time, so
an object is carried from slice to slice by turning its mask on the last slice
into a prompt for the next (its box, an interior point, its logits, or box and
logits, the way micro-sam and MedSAM's 3D inference work; or, where the model
has a propagation adapter, :mod:`biosam.volume.adapter`, its box and mask
decoded by the adapter). Every slice is
embedded once per sweep, for all objects on it together, and small objects get
the predictor's zoomed crops. An object stops where it ends: the predicted IoU
falls below a threshold, its area collapses or explodes, the new mask no longer
overlaps the previous one, or its mean intensity leaves what the object had on
its prompted slice. The thresholds were chosen on labelled volumes
(``benchmarks/volume_quality.py``). An object prompted on several slices (the
same ``Prompt.object``) is segmented on every slice from its nearest prompted
slice, and never ends between two of its prompted slices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from biosam.errors import InputError
from biosam.labels import label_dtype
from biosam.models.sam import Sam
from biosam.models.sam2.model import Sam2
from biosam.prompting.intensity import volume_normalizer
from biosam.prompting.predictor import Predictor
from biosam.prompting.preprocess import Frame, mask_logits
from biosam.prompting.prompts import Prompt, mask_box
from biosam.prompting.zoom import ZOOM_MODES
from biosam.settings import check, choice, positive, rule, whole, within
from biosam.volume.adapter import propagation_decoder
from biosam.volume.ownership import PromptedSlices, claim, write_slice

logger = logging.getLogger(__name__)

__all__ = ["PROJECTIONS", "PropagationSettings", "VolumeSegmentation", "carried_prompt", "group_objects",
           "segment_volume"]

PROJECTIONS = ("auto", "learned", "box", "box+mask", "points", "mask")


@dataclass(frozen=True)
class PropagationSettings:
    """How objects are carried between slices and when they stop.

    ``projection``: the prompt made from an object's mask on the previous slice:
    ``learned`` (its box and the mask itself, decoded by the model's
    propagation adapter, :mod:`biosam.volume.adapter`), ``box`` (its bounding
    box enlarged by ``box_margin`` of its side, at least 2 px; best for
    box-trained models such as MedSAM/LiteMedSAM without an adapter),
    ``box+mask`` (also its logits), ``points`` (one point at its innermost
    pixel) or ``mask`` (its logits alone); ``auto``: ``learned`` where an
    adapter ships for the model, else ``box``. An object stops when its predicted IoU is
    below ``min_score``, its area is below ``min_area`` pixels, below
    ``collapse`` or above ``growth`` times its area on the previous slice, or
    its IoU with the previous slice's mask is below ``min_overlap``, its mean
    intensity differs from its mean on the prompted slice by more than
    ``max_shift`` standard deviations (of its intensities there, plus one grey
    level), or less than ``min_own`` of its mask is left after objects nearer
    their prompted slice took their pixels (objects never share pixels).
    Between two prompted slices of the same object none of these apply.
    Defaults of ``min_score``, ``min_overlap`` and ``max_shift`` were chosen by a
    grid search on the tuning objects of ``benchmarks/volume_quality.py``.
    ``zoom`` is the predictor's small-object zoom (``auto``, ``on``, ``off``).
    """

    projection: str = "auto"
    box_margin: float = 0.05
    min_score: float = 0.5
    min_area: int = 10
    collapse: float = 0.25
    growth: float = 4.0
    min_overlap: float = 0.3
    min_own: float = 0.5
    max_shift: float = 1.5
    zoom: str = "auto"

    def __post_init__(self) -> None:
        check("propagation settings", [
            choice("projection", self.projection, PROJECTIONS),
            within("box_margin", self.box_margin, 0.0, float("inf")),
            rule(0.0 < self.collapse < 1.0 < self.growth,
                 f"need 0 < collapse < 1 < growth, got collapse={self.collapse}, growth={self.growth}"),
            *(within(name, getattr(self, name), 0.0, 1.0) for name in ("min_score", "min_overlap", "min_own")),
            whole("min_area", self.min_area, 0),
            positive("max_shift (standard deviations; inf turns the rule off)", self.max_shift),
            choice("zoom", self.zoom, ZOOM_MODES),
        ])


@dataclass
class VolumeSegmentation:
    """Result of :func:`segment_volume` for ``n`` objects in a ``(Z, Y, X)`` volume.

    ``labels``: object ``k`` (prompt order) has label ``k + 1``; where two
    objects' masks overlap, the one nearer its prompted slice keeps the pixels. ``scores``: ``(n, Z)`` predicted IoU per
    slice, NaN where the object is absent. ``z_range``: ``(n, 2)`` first and
    last slice of each object. ``normalize``: the intensity mapping used for every
    slice (raw slice -> [0, 255] float32), e.g. to draw an overlay of a slice.
    ``projection``: how objects were carried (``auto`` resolved; ``memory`` for SAM 2 models).
    ``ends``: ``(n, 2)`` why each object stopped going down (column 0) and up (column 1), e.g.
    ``"slice 7: predicted IoU 0.41 < 0.5"`` (the first slice it was not drawn on); ``None`` where it
    reached the volume's edge or was never carried that way.
    """

    labels: np.ndarray
    scores: np.ndarray
    z_range: np.ndarray
    normalize: Callable[[np.ndarray], np.ndarray] | None = None
    projection: str | None = None
    ends: np.ndarray | None = None


@dataclass
class _Track:
    mask: np.ndarray
    logits: np.ndarray
    area: int
    # the object's intensity on its prompted slice (mean, standard deviation + 1 grey level)
    intensity: tuple[float, float]


def group_objects(prompts: list[Prompt]) -> list[list[Prompt]]:
    """The prompts of each object, by slice: prompts sharing ``object`` are one object, others one each.

    Objects are ordered by their first prompt in ``prompts`` (object ``k`` gets label ``k + 1``).
    """
    objects: list[list[Prompt]] = []
    named: dict[int, list[Prompt]] = {}
    for p in prompts:
        if p.object is None:
            objects.append([p])
        elif p.object in named:
            named[p.object].append(p)
        else:
            named[p.object] = [p]
            objects.append(named[p.object])
    for obj in objects:
        obj.sort(key=lambda p: -1 if p.z is None else int(p.z))
        taken = [p.z for p in obj]
        if len(set(taken)) < len(taken):
            raise InputError(f"object {obj[0].object} has two prompts on one slice (z = {taken}); give each slice "
                             "of an object at most one prompt (a box and points may share it).")
    return objects


def _check(volume, prompts: list[Prompt]) -> tuple[int, int, int]:
    shape = tuple(volume.shape)
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] > 4):
        raise InputError(
            f"expected a volume (Z, Y, X) or (Z, Y, X, C), got shape {shape}; "
            "for a single 2D image use biosam.Predictor (or `biosam segment`)."
        )
    depth = shape[0]
    if not prompts:
        raise InputError("no objects to segment: give at least one prompt with a slice index \"z\".")
    for i, prompt in enumerate(prompts):
        i = i if prompt.object is None else prompt.object
        if prompt.z is None:
            raise InputError(f"object {i} has no slice index \"z\"; every prompt of a volume must say which slice it is on.")
        if not 0 <= int(prompt.z) < depth:
            raise InputError(f"object {i} is on slice z={prompt.z}, but the volume has {depth} slices (z = 0..{depth - 1}).")
    return depth, shape[1], shape[2]


def carried_prompt(mask: np.ndarray, logits: np.ndarray | None, projection: str, box_margin: float, z: int,
                   frame: Frame) -> Prompt:
    """The prompt for slice ``z`` made from an object's ``mask`` (and decoder ``logits``) on the slice before.

    ``projection`` is one of :data:`PROJECTIONS` but ``auto``; ``frame`` is the
    slices' frame (a ``learned`` mask prompt lies on its decoder grid).
    """
    h, w = mask.shape
    box = mask_box(mask)
    pad = np.maximum(2.0, box_margin * (box[2:] - box[:2]))
    box = np.clip(box + np.concatenate([-pad, pad]), 0, [w, h, w, h])
    if projection == "box":
        return Prompt(box=box, z=z)
    if projection == "learned":
        return Prompt(box=box, mask=mask_logits(mask, frame), z=z)
    if projection == "box+mask":
        return Prompt(box=box, mask=logits, z=z)
    if projection == "mask":
        return Prompt(mask=logits, z=z)
    # the innermost pixel lies well inside even a thin or concave object
    y0, x0, y1, x1 = int(box[1]), int(box[0]), int(box[3]), int(box[2])
    depth = ndi.distance_transform_edt(np.pad(mask[y0:y1, x0:x1], 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return Prompt(points=np.array([[x0 + x + 0.5, y0 + y + 0.5]]), point_labels=np.array([1]), z=z)


def _stops(track: _Track, mask: np.ndarray, score: float, plane: np.ndarray, settings: PropagationSettings) -> str | None:
    area = int(mask.sum())
    if score < settings.min_score:
        return f"predicted IoU {score:.2f} < {settings.min_score}"
    if area < settings.min_area:
        return f"area {area} px < {settings.min_area}"
    if area < settings.collapse * track.area or area > settings.growth * track.area:
        return f"area changed from {track.area} to {area} px"
    inter = np.logical_and(mask, track.mask).sum()
    if inter / (area + track.area - inter) < settings.min_overlap:
        return "no overlap with the previous slice"
    mean, spread = track.intensity
    if area and abs(float(plane[mask].mean()) - mean) > settings.max_shift * spread:
        return "intensity differs from the prompted slice's"
    return None


def _intensity(plane: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    values = plane[mask]
    return float(values.mean()), float(values.std()) + 1.0


def _labels_out(out, shape: tuple[int, int, int], n: int):
    dtype = label_dtype(n)
    if out is None:
        return np.zeros(shape, dtype=dtype)
    if tuple(out.shape) != shape:
        raise InputError(f"out has shape {tuple(out.shape)}, but the labels need {shape}.")
    if np.iinfo(out.dtype).max < n:
        raise InputError(f"out has dtype {out.dtype}, which cannot hold {n} labels; use {np.dtype(dtype).name}.")
    return out


def _z_range(scores: np.ndarray) -> np.ndarray:
    present = ~np.isnan(scores)
    depth = scores.shape[1]
    z_range = np.full((len(scores), 2), -1, dtype=np.int64)
    found = present.any(axis=1)
    z_range[found, 0] = present[found].argmax(axis=1)
    z_range[found, 1] = depth - 1 - present[found, ::-1].argmax(axis=1)
    return z_range


def segment_volume(
    predictor: Predictor,
    volume,
    prompts: list[Prompt],
    settings: PropagationSettings | None = None,
    *,
    intensity: str = "auto",
    progress: bool = True,
    out=None,
    adapter: str | os.PathLike | Sam | None = None,
) -> VolumeSegmentation:
    """Segment objects in 3D from prompts on one or more slices.

    ``volume`` is ``(Z, Y, X)`` (or ``(Z, Y, X, C)``), a NumPy array or any
    lazy array indexed by slice (Zarr, memory-mapped MRC). Each :class:`Prompt`
    needs ``z``, its slice, and is one object, unless prompts share an
    ``object`` id: then they are one object prompted on several slices (e.g. a
    correction where the propagation from the first went wrong), which is
    segmented on every slice from its nearest prompted slice and does not end
    between them. Objects are followed forward and backward from their outermost
    prompted slices until they end (see :class:`PropagationSettings`).
    One intensity window (``intensity`` preset) is used for the whole volume.
    SAM 2 models follow objects with their memory (see
    :mod:`biosam.volume.sam2_tracking`), SAM v1 models by projecting the last mask.
    ``out``: an existing ``(Z, Y, X)`` integer array (e.g. Zarr, a memmap, or
    what :func:`biosam.io.open_labels` yields, indexed by slice) to write the
    labels into slice by slice, so that no volume-sized array is held in memory.
    Object ``k`` (see :func:`group_objects`) gets label ``k + 1``.
    ``adapter``: a propagation adapter for the ``learned`` projection, as a file
    or as loaded by :func:`~biosam.volume.adapter.propagation_decoder` (default:
    the one shipped for the model, if any).
    """
    settings = settings or PropagationSettings()
    depth, height, width = _check(volume, prompts)
    objects = group_objects([p.validate((height, width)) for p in prompts])
    normalize = volume_normalizer(volume, intensity)
    labels = _labels_out(out, (depth, height, width), len(objects))
    scores = np.full((len(objects), depth), np.nan, dtype=np.float32)
    ends = np.full((len(objects), 2), None, dtype=object)
    if isinstance(predictor.model, Sam2):
        from biosam.volume.sam2_tracking import track_objects

        track_objects(predictor, volume, objects, settings, normalize, labels, scores, ends, progress)
        projection = "memory"
    else:
        decoder = None
        if settings.projection in ("auto", "learned"):
            decoder = adapter if isinstance(adapter, Sam) else propagation_decoder(predictor.model, adapter)
            if decoder is not None and decoder.image_encoder is not predictor.model.image_encoder:
                raise InputError("the propagation adapter given was made for another model; load it with "
                                 "propagation_decoder(predictor.model, path).")
            if decoder is None and settings.projection == "learned":
                raise InputError(f"no propagation adapter ships for {predictor.info.name}; train one "
                                 "(biosam.train.propagation) and pass it as adapter=, or use projection='box'.")
            settings = replace(settings, projection="box" if decoder is None else "learned")
        _project_objects(predictor, volume, objects, settings, normalize, labels, scores, ends, progress, decoder)
        projection = settings.projection
    return VolumeSegmentation(labels, scores, _z_range(scores), normalize, projection, ends)


def _project_objects(predictor, volume, objects, settings, normalize, labels, scores, ends, progress,
                     decoder) -> None:
    """SAM v1: carry each object to the next slice as a prompt made from its last mask (decoded by ``decoder``,
    the propagation adapter, where given)."""
    depth = labels.shape[0]
    slices = PromptedSlices(objects)
    asked: dict[int, dict[int, Prompt]] = {}
    for i, obj in enumerate(objects):
        for p in obj:
            asked.setdefault(int(p.z), {})[i] = p
    seeds: dict[tuple[int, int], _Track] = {}  # (object, prompted slice): segmented in the forward sweep

    for step in (1, -1):
        first = min(asked) if step == 1 else max(asked)
        stop = depth if step == 1 else -1
        active: dict[int, _Track] = {}
        bar = tqdm(range(first, stop, step), desc="forward" if step == 1 else "backward", disable=not progress,
                   leave=False)
        for z in bar:
            here = asked.get(z, {})
            # an object passes to the other sweep where one of its prompted slices is nearer that way
            active = {i: t for i, t in active.items() if i not in here and slices.owns(i, z, step)}
            new = list(here) if step == 1 else []
            carried = list(active)
            if new or carried:
                bar.set_postfix(objects=len(new) + len(carried))
                plane = normalize(volume[z])
                predictor.set_image(plane, intensity="none")
                request = [replace(here[i], z=z) for i in new] + [
                    carried_prompt(active[i].mask, active[i].logits, settings.projection, settings.box_margin, z,
                                   predictor.frame) for i in carried]
                # one call, so that a zoomed crop shared by a new and a carried object is embedded once
                result = predictor.predict_prompts(request, zoom=settings.zoom,
                                                   decoder=[None] * len(new) + [decoder] * len(carried))
                grey = plane.mean(axis=-1) if plane.ndim == 3 else plane
                order = new + carried
                near = [slices.distance(i, z) for i in order]
                drawn = {}
                # a carried object that lost most of its mask to an object nearer its own prompt has run into
                # that neighbour: its own end was passed
                for k, own in claim(order, list(result.masks[:, 0]), list(result.scores[:, 0]), near):
                    i, mask, score = order[k], result.masks[k, 0], float(result.scores[k, 0])
                    if i in active:
                        if slices.between(i, z):  # the object is known to go on: keep it, even where it is lost
                            if not own.any():
                                continue
                        else:
                            reason = _stops(active[i], own, score, grey, settings)
                            if reason is None and own.sum() < settings.min_own * mask.sum():
                                reason = "ran into another object"
                            if reason:
                                logger.debug("object %d ends before slice %d: %s", i, z, reason)
                                ends[i, int(step == 1)] = f"slice {z}: {reason}"
                                del active[i]
                                continue
                        intensity = active[i].intensity
                    elif not own.any():
                        logger.warning("object %d: its prompt on slice %d gives an empty mask", i, z)
                        continue
                    else:
                        intensity = _intensity(grey, own)
                    track = _Track(own, result.low_res_logits[k, 0], int(own.sum()), intensity)
                    active[i] = track
                    if i in new:
                        seeds[i, z] = track
                    drawn[i] = own
                    scores[i, z] = score
                write_slice(labels, z, drawn, slices.by_label(z) if step == -1 else None)
            elif (step == 1 and z > max(asked)) or (step == -1 and z < min(asked)):
                break
            if step == -1:  # prompted slices were segmented going forward; carry on from them
                active.update({i: seeds[i, z] for i in here if (i, z) in seeds})
        bar.close()
