"""Automatic mask generation (AMG): segment everything in a 2D image from a grid of prompts.

The algorithm is the one of Meta's ``SamAutomaticMaskGenerator`` (Kirillov et
al. 2023), re-implemented for every biosam SAM v1 model:

1. The image is embedded once (optionally also overlapping crops of it, in
   layers of 2x2, 4x4, ... crops).
2. A regular grid of single foreground points is decoded in batches against
   that one embedding, three candidate masks per point. (biosam also offers a
   grid of boxes, for models trained on box prompts only, see
   :class:`AmgSettings`.)
3. Candidates are kept when the model's predicted IoU exceeds
   ``pred_iou_thresh`` and their stability score (IoU of the masks obtained by
   thresholding the logits at +offset and -offset) reaches
   ``stability_score_thresh``. Masks touching a crop border that is not an
   image border are dropped, since the crop cut them.
4. Duplicates are removed by box non-maximum suppression, first inside each
   crop (best predicted IoU wins), then across crops (the smaller crop wins).
5. Optionally, small islands and holes are removed and suppression is rerun.

Masks are resampled to image resolution only after the cheap IoU filter, a few
at a time, and are kept run-length encoded afterwards, so a 32x32 grid on a
megapixel image needs little memory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from itertools import product

import numpy as np
import torch
from skimage.measure import label as label_components
from tqdm.auto import tqdm

from biosam.automatic.labels import relabel
from biosam.automatic.rle import Rle, encode_masks
from biosam.errors import InputError
from biosam.labels import label_dtype
from biosam.prompting.intensity import _channels_last
from biosam.prompting.predictor import Predictor
from biosam.prompting.preprocess import Frame, logits_to_image
from biosam.settings import check, choice, positive, rule, whole, within

logger = logging.getLogger(__name__)

PROMPT_KINDS = ("points", "boxes")
# Upsampled logits held at once while filtering (float32 elements): 64 MiB.
_UPSAMPLE_ELEMENTS = 16 * 1024 * 1024
# Masks whose box lies within this many pixels of a crop edge (that is not an image edge) are cut by the crop.
_CROP_EDGE_TOLERANCE = 20.0


@dataclass
class AmgSettings:
    """Parameters of :func:`generate_masks` (defaults are those of Meta's generator unless noted).

    ``points_per_side``: grid of ``points_per_side**2`` point prompts over the
    image (and over each crop). ``points_per_batch``: points decoded together.
    ``pred_iou_thresh``: keep masks whose predicted IoU is above this.
    ``stability_score_thresh`` / ``stability_score_offset``: keep masks whose
    IoU between the logit > +offset and logit > -offset masks is at least this.
    ``box_nms_thresh``: box IoU above which the weaker of two masks in a crop is
    dropped; ``crop_nms_thresh`` the same between crops. ``crop_n_layers``:
    layers of crops (layer i has ``2**i x 2**i`` crops) segmented in addition to
    the whole image; ``crop_overlap_ratio``: overlap of first-layer crops as a
    fraction of the short image side; ``crop_n_points_downscale_factor``: layer
    i uses ``points_per_side / factor**i`` points per side.
    ``min_mask_region_area``: if > 0, islands and holes smaller than this many
    pixels are removed from every mask. ``max_mask_area_fraction`` (biosam):
    masks covering more than this fraction of their crop (background) are
    dropped; 1.0 keeps all. ``multimask`` (biosam): three candidate masks per
    prompt as in Meta's generator, or the single-mask output.
    ``prompt`` (biosam): ``"points"`` (Meta's algorithm) or ``"boxes"``: a
    square box of ``box_size`` grid cells per side centred on every grid point,
    for models trained on box prompts only (MedSAM, LiteMedSAM), whose point
    prompts give unusable masks.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    max_mask_area_fraction: float = 0.95
    multimask: bool = True
    prompt: str = "points"
    box_size: float = 2.0

    def __post_init__(self) -> None:
        ints = {"points_per_side": 1, "points_per_batch": 1, "crop_n_points_downscale_factor": 1,
                "crop_n_layers": 0, "min_mask_region_area": 0}
        unit = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
                "crop_overlap_ratio", "max_mask_area_fraction")
        rules = [whole(name, getattr(self, name), low) for name, low in ints.items()]
        rules += [within(name, getattr(self, name), 0.0, 1.0) for name in unit]
        rules += [
            rule(isinstance(self.multimask, bool), f"multimask must be True or False, got {self.multimask!r}"),
            choice("prompt", self.prompt, PROMPT_KINDS),
            positive("box_size (grid cells per box side)", self.box_size),
            within("stability_score_offset", self.stability_score_offset, 0.0, float("inf")),
        ]
        check("AMG settings", rules)
        check("AMG settings", [rule(
            int(self.points_per_side / self.crop_n_points_downscale_factor**self.crop_n_layers) >= 1,
            f"points_per_side={self.points_per_side} leaves no points in crop layer {self.crop_n_layers} "
            f"with crop_n_points_downscale_factor={self.crop_n_points_downscale_factor}; use more points "
            "or fewer crop layers")])


@dataclass
class MaskRecord:
    """One generated mask, in pixels of the whole image.

    ``bbox`` and ``crop_box`` are ``(x0, y0, x1, y1)`` with exclusive ends
    (``image[y0:y1, x0:x1]``); ``point`` is the ``(x, y)`` grid point that
    produced the mask (the centre of its box with box prompts); ``crop_box``
    the image region whose embedding it was decoded from.
    """

    rle: Rle
    bbox: tuple[int, int, int, int]
    area: int
    predicted_iou: float
    stability_score: float
    point: tuple[float, float]
    crop_box: tuple[int, int, int, int]

    @property
    def mask(self) -> np.ndarray:
        """The mask as a boolean image."""
        return self.rle.to_mask()


# ------------------------------------------------------------------ geometry
def point_grid(n_per_side: int) -> np.ndarray:
    """``(n*n, 2)`` (x, y) points at the centres of an n x n grid of cells over the unit square."""
    ticks = (np.arange(n_per_side) + 0.5) / n_per_side
    xs, ys = np.meshgrid(ticks, ticks)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def crop_layers(
    image_shape: tuple[int, int], n_layers: int, overlap_ratio: float
) -> list[tuple[tuple[int, int, int, int], int]]:
    """The whole image (layer 0) and, for layer i >= 1, ``2**i x 2**i`` overlapping crops: ``[(box, layer)]``."""
    h, w = image_shape
    out = [((0, 0, w, h), 0)]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * min(h, w) * 2 / n)  # later layers overlap proportionally less
        side_w = math.ceil((overlap * (n - 1) + w) / n)
        side_h = math.ceil((overlap * (n - 1) + h) / n)
        xs = [int((side_w - overlap) * i) for i in range(n)]
        ys = [int((side_h - overlap) * i) for i in range(n)]
        out += [((x, y, min(x + side_w, w), min(y + side_h, h)), layer) for x, y in product(xs, ys)]
    return out


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    ``boxes`` ``(N, 4)`` ``(x0, y0, x1, y1)`` with area ``(x1 - x0) * (y1 - y0)``;
    a box is dropped when its IoU with a better kept box exceeds ``iou_thresh``.
    Equal scores keep their input order.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    alive = np.ones(len(boxes), dtype=bool)
    keep = []
    for rank, i in enumerate(order):
        if not alive[i]:
            continue
        keep.append(i)
        rest = order[rank + 1 :]
        rest = rest[alive[rest]]
        if len(rest) == 0:
            continue
        iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        alive[rest[iou > iou_thresh]] = False
    return np.array(keep, dtype=np.int64)


def _nms_boxes(bboxes: np.ndarray) -> np.ndarray:
    """Boxes measured from first to last pixel index, as Meta's generator measures them for suppression."""
    return np.asarray(bboxes, dtype=np.float64).reshape(-1, 4) - np.array([0.0, 0.0, 1.0, 1.0])


# ------------------------------------------------------------ mask scoring
def stability_score(logits: torch.Tensor, offset: float, threshold: float = 0.0) -> torch.Tensor:
    """IoU of ``logits > threshold + offset`` and ``logits > threshold - offset`` per mask (0 when both are empty).

    The first mask lies inside the second, so the IoU is a ratio of pixel counts.
    """
    inner = (logits > threshold + offset).flatten(1).sum(1)
    outer = (logits > threshold - offset).flatten(1).sum(1)
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros((), device=logits.device))


def _masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` bool -> ``(N, 4)`` exclusive-end boxes (zeros for empty masks)."""
    h, w = masks.shape[1:]
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    return torch.where(rows.any(1)[:, None], boxes, 0)


def remove_small_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """Fill holes, then drop islands, smaller than ``min_area`` pixels (8-connected).

    When every island is small the largest one is kept. Returns the cleaned
    mask and whether anything changed.
    """
    mask = np.asarray(mask, dtype=bool)
    out, changed_holes = _fill_small_holes(mask, min_area, np.zeros(4, dtype=bool))
    out, changed_islands = _drop_small_islands(out, min_area)
    return out, changed_holes or changed_islands


def _fill_small_holes(mask: np.ndarray, min_area: int, open_sides: np.ndarray) -> tuple[np.ndarray, bool]:
    """Fill background components smaller than ``min_area``.

    Components touching an open side (left, top, right, bottom) continue outside
    the array, so they are never filled.
    """
    holes = label_components(~mask, connectivity=2)
    if holes.max() == 0:
        return mask, False
    sizes = np.bincount(holes.ravel())
    small = sizes < min_area
    small[0] = False
    for side, edge in zip(open_sides, (holes[:, 0], holes[0], holes[:, -1], holes[-1])):
        if side:
            small[edge] = False
    if not small.any():
        return mask, False
    return mask | small[holes], True


def _drop_small_islands(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    islands = label_components(mask, connectivity=2)
    if islands.max() == 0:
        return mask, False
    sizes = np.bincount(islands.ravel())
    sizes[0] = 0
    keep = sizes >= min_area
    keep[0] = False
    if not keep.any():
        keep[np.argmax(sizes)] = True
    if keep[1:].sum() == islands.max():
        return mask, False
    return keep[islands], True


def _clean_record(rle: Rle, min_area: int) -> Rle | None:
    """:func:`remove_small_regions` on the mask's box (plus a 1 px margin inside the image); None if unchanged."""
    h, w = rle.shape
    x0, y0, x1, y1 = rle.bbox
    window = (max(x0 - 1, 0), max(y0 - 1, 0), min(x1 + 1, w), min(y1 + 1, h))
    # Sides where the window stops inside the image lead to the background around the object.
    open_sides = np.array([window[0] > 0, window[1] > 0, window[2] < w, window[3] < h])
    mask = rle.to_mask(window)
    mask, changed_holes = _fill_small_holes(mask, min_area, open_sides)
    mask, changed_islands = _drop_small_islands(mask, min_area)
    if not (changed_holes or changed_islands):
        return None
    return encode_masks(torch.from_numpy(mask)[None], rle.shape, window[:2])[0]


# ---------------------------------------------------------------- generator
@dataclass
class _Candidates:
    """Masks that passed the filters, as parallel lists."""

    rles: list[Rle]
    bboxes: list[np.ndarray]
    ious: list[float]
    stabilities: list[float]
    points: list[np.ndarray]
    crops: list[tuple[int, int, int, int]]

    @classmethod
    def empty(cls) -> _Candidates:
        return cls([], [], [], [], [], [])

    def __len__(self) -> int:
        return len(self.rles)

    def extend(self, other: _Candidates) -> None:
        for f in fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))

    def select(self, keep: np.ndarray) -> _Candidates:
        return _Candidates(*([getattr(self, f.name)[i] for i in keep] for f in fields(self)))

    def box_array(self) -> np.ndarray:
        return np.array(self.bboxes, dtype=np.float64).reshape(-1, 4)


def _filter_batch(
    low_res: torch.Tensor,
    iou: torch.Tensor,
    points: np.ndarray,
    frame: Frame,
    preprocessing: str,
    crop_box: tuple[int, int, int, int],
    image_shape: tuple[int, int],
    settings: AmgSettings,
) -> _Candidates:
    """Filter one batch of decoder outputs ``(M, 256, 256)``/``(M,)`` of a crop and encode the survivors."""
    out = _Candidates.empty()
    iou = iou.cpu()
    keep = torch.ones_like(iou, dtype=torch.bool) if settings.pred_iou_thresh <= 0 else iou > settings.pred_iou_thresh
    idx = torch.nonzero(keep).flatten()
    if len(idx) == 0:
        return out
    x0, y0, x1, y1 = crop_box
    height, width = image_shape
    crop_h, crop_w = frame.image_shape
    max_area = settings.max_mask_area_fraction * crop_h * crop_w
    crop_edges = torch.tensor([x0, y0, x1, y1], dtype=torch.float64)
    image_edges = torch.tensor([0, 0, width, height], dtype=torch.float64)
    # Resampling passes through the model's input size before the image size.
    chunk = max(1, _UPSAMPLE_ELEMENTS // (frame.input_size**2 + crop_h * crop_w))
    for start in range(0, len(idx), chunk):
        sel = idx[start : start + chunk]
        logits = logits_to_image(low_res[sel.to(low_res.device)][:, None], frame, preprocessing)[:, 0]
        stability = stability_score(logits, settings.stability_score_offset)
        passed = stability >= settings.stability_score_thresh if settings.stability_score_thresh > 0 else stability >= 0
        masks = logits > 0
        del logits
        boxes = _masks_to_boxes(masks).cpu().to(torch.float64)
        areas = masks.flatten(1).sum(1).cpu()
        passed = passed.cpu() & (areas > 0) & (areas <= max_area)
        # As in Meta's generator: box from first to last pixel, compared to crop and image edges.
        near = boxes - torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64) + torch.tensor([x0, y0, x0, y0])
        cut = torch.isclose(near, crop_edges, rtol=0, atol=_CROP_EDGE_TOLERANCE)
        cut &= ~torch.isclose(near, image_edges, rtol=0, atol=_CROP_EDGE_TOLERANCE)
        passed &= ~cut.any(1)
        chosen = torch.nonzero(passed).flatten()
        if len(chosen) == 0:
            continue
        rles = encode_masks(masks[chosen.to(masks.device)], image_shape, (x0, y0))
        bboxes = boxes[chosen].numpy().astype(np.int64) + np.array([x0, y0, x0, y0])
        picked = sel[chosen]
        out.extend(
            _Candidates(
                rles,
                list(bboxes),
                iou[picked].tolist(),
                stability.cpu()[chosen].tolist(),
                list(points[picked.numpy()] + np.array([x0, y0])),
                [crop_box] * len(rles),
            )
        )
    return out


def _embed_crop(predictor: Predictor, crop_box: tuple[int, int, int, int]) -> tuple[torch.Tensor, Frame]:
    """Embedding and frame of one crop of the predictor's current image (the whole image is already embedded)."""
    if crop_box == (0, 0, predictor.frame.image_shape[1], predictor.frame.image_shape[0]):
        return predictor.embedding, predictor.frame
    return predictor.embed_region(crop_box)


def generate_masks(
    predictor: Predictor,
    image: np.ndarray | None,
    settings: AmgSettings | None = None,
    intensity: str = "auto",
    progress: bool = False,
) -> list[MaskRecord]:
    """Segment everything in a 2D image with a grid of prompts.

    ``predictor`` is a :class:`biosam.Predictor`; ``image`` any 2D image it
    accepts (normalised with the ``intensity`` preset and embedded here), or
    ``None`` to use the image the predictor already holds. Returns one
    :class:`MaskRecord` per mask; masks may overlap (see :func:`masks_to_labels`).
    A constant image gives an empty list.
    """
    settings = settings or AmgSettings()
    if image is not None:
        image = np.asarray(image)
        if image.size == 0 or image.min() == image.max():
            logger.info("empty or constant image: no masks")
            return []
        predictor.set_image(image, intensity=intensity)
    rgb = predictor.image_rgb
    if rgb.min() == rgb.max():  # e.g. constant after clipping to an intensity window
        logger.info("constant image after intensity normalisation: no masks")
        return []
    with torch.inference_mode():
        candidates = _generate(predictor, settings, progress)
    if settings.min_mask_region_area > 0 and len(candidates):
        candidates = _postprocess_small_regions(
            candidates, settings.min_mask_region_area, max(settings.box_nms_thresh, settings.crop_nms_thresh)
        )
    return [
        MaskRecord(
            rle=rle,
            bbox=tuple(int(v) for v in bbox),
            area=rle.area,
            predicted_iou=float(iou),
            stability_score=float(stab),
            point=(float(pt[0]), float(pt[1])),
            crop_box=tuple(int(v) for v in crop),
        )
        for rle, bbox, iou, stab, pt, crop in zip(
            candidates.rles, candidates.bboxes, candidates.ious, candidates.stabilities, candidates.points,
            candidates.crops,
        )
    ]


def _generate(predictor: Predictor, settings: AmgSettings, progress: bool) -> _Candidates:
    image_shape = predictor.frame.image_shape
    preprocessing = predictor.info.preprocessing
    device = predictor.device
    crops = crop_layers(image_shape, settings.crop_n_layers, settings.crop_overlap_ratio)
    per_side = [
        int(settings.points_per_side / settings.crop_n_points_downscale_factor**layer)
        for layer in range(settings.crop_n_layers + 1)
    ]
    n_batches = sum(math.ceil(per_side[layer] ** 2 / settings.points_per_batch) for _, layer in crops)
    bar = tqdm(total=n_batches, desc="automatic masks", disable=not progress, leave=False)
    result = _Candidates.empty()
    for crop_box, layer in crops:
        embedding, frame = _embed_crop(predictor, crop_box)
        crop_h, crop_w = frame.image_shape
        points = point_grid(per_side[layer]) * np.array([crop_w, crop_h])
        # Box prompts are squares measured in grid spacings (geometric mean of the x and y spacing).
        half_box = settings.box_size * math.sqrt(crop_w * crop_h) / per_side[layer] / 2
        found = _Candidates.empty()
        for start in range(0, len(points), settings.points_per_batch):
            batch = points[start : start + settings.points_per_batch]
            if settings.prompt == "points":
                coords = torch.as_tensor(frame.to_model(batch)[:, None], dtype=torch.float32, device=device)
                labels = torch.ones((len(batch), 1), dtype=torch.int64, device=device)
                low_res, iou = predictor.model.decode(embedding, coords, labels, multimask=settings.multimask)
            else:
                lo = np.clip(batch - half_box, 0, None)
                hi = np.minimum(batch + half_box, [crop_w, crop_h])
                boxes = torch.as_tensor(frame.to_model(np.concatenate([lo, hi], 1)), dtype=torch.float32, device=device)
                low_res, iou = predictor.model.decode(embedding, boxes=boxes, multimask=settings.multimask)
            n_masks = low_res.shape[1]
            found.extend(
                _filter_batch(
                    low_res.float().flatten(0, 1),
                    iou.float().flatten(),
                    np.repeat(batch, n_masks, axis=0),
                    frame,
                    preprocessing,
                    crop_box,
                    image_shape,
                    settings,
                )
            )
            bar.update()
        keep = box_nms(_nms_boxes(found.box_array()), np.array(found.ious), settings.box_nms_thresh)
        result.extend(found.select(keep))
        logger.debug("crop %s: %d masks after suppression", crop_box, len(keep))
    bar.close()
    if len(crops) > 1 and len(result):
        crop_area = np.array([(c[2] - c[0]) * (c[3] - c[1]) for c in result.crops], dtype=np.float64)
        keep = box_nms(_nms_boxes(result.box_array()), 1.0 / crop_area, settings.crop_nms_thresh)
        result = result.select(keep)
    return result


def _postprocess_small_regions(candidates: _Candidates, min_area: int, nms_thresh: float) -> _Candidates:
    """Clean every mask, then suppress duplicates again, preferring masks that needed no cleaning."""
    cleaned = [_clean_record(rle, min_area) for rle in candidates.rles]
    bboxes = np.array(
        [rle.bbox if new is None else new.bbox for rle, new in zip(candidates.rles, cleaned)], dtype=np.float64
    ).reshape(-1, 4)
    unchanged = np.array([new is None for new in cleaned], dtype=np.float64)
    keep = box_nms(_nms_boxes(bboxes), unchanged, nms_thresh)
    out = candidates.select(keep)
    for k, i in enumerate(keep):
        if cleaned[i] is not None:
            out.rles[k] = cleaned[i]
            out.bboxes[k] = bboxes[i].astype(np.int64)
    return out


# ------------------------------------------------------------------ labels
def masks_to_labels(records: list[MaskRecord], shape: tuple[int, int]) -> np.ndarray:
    """Instance label image from possibly overlapping masks.

    Masks are drawn from the largest to the smallest, so where masks overlap
    the smaller one wins (an object inside a larger one stays visible). Labels
    are contiguous ``1..N`` in drawing order; a partly covered mask keeps its
    visible pixels, one hidden entirely gets no label. ``uint16`` when
    ``N < 65536``, else ``uint32``.
    """
    shape = tuple(int(s) for s in shape)
    for r in records:
        if tuple(r.rle.shape) != shape:
            raise InputError(f"a mask of shape {tuple(r.rle.shape)} cannot be drawn in a label image of shape {shape}.")
    order = sorted(range(len(records)), key=lambda i: -records[i].area)
    labels = np.zeros(shape, dtype=label_dtype(len(records)))
    if not records or labels.size == 0:
        return labels
    for value, i in enumerate(order, start=1):
        x0, y0, x1, y1 = records[i].rle.bbox
        labels[y0:y1, x0:x1][records[i].rle.to_mask((x0, y0, x1, y1))] = value
    return relabel(labels)


def automatic_mask_generation(
    predictor: Predictor,
    image: np.ndarray | None,
    settings: AmgSettings | None = None,
    intensity: str = "auto",
    progress: bool = False,
) -> np.ndarray:
    """:func:`generate_masks` followed by :func:`masks_to_labels`: an instance label image of ``image``."""
    records = generate_masks(predictor, image, settings, intensity=intensity, progress=progress)
    shape = predictor.frame.image_shape if image is None else _channels_last(np.asarray(image)).shape[:2]
    return masks_to_labels(records, shape)
