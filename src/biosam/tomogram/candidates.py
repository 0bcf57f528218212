"""Vesicle cross-sections on a slab: SAM masks of the circles a ring detector proposes, or of SAM's own grid.

A ring detector proposes circles (``lumen``: regions fully enclosed by
membrane ridges; ``hough``: Hough transform of the ridges) that SAM outlines
from a box prompt each, or SAM's automatic mask generation with a grid of
boxes proposes masks (``amg``). Masks must have a high predicted IoU, a dark
membrane around them (:mod:`biosam.tomogram.membrane`), an allowed diameter
(nm) and a round, convex shape; overlapping ones are reduced to the best
scored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, transform

from biosam.errors import InputError
from biosam.prompting.predictor import Predictor
from biosam.prompting.prompts import Prompt
from biosam.tomogram.membrane import edge_profile, membrane_fit
from biosam.tomogram.vesicles import VesicleSettings

logger = logging.getLogger(__name__)

__all__ = ["Candidates", "find_candidates", "sam_view"]


@dataclass
class Candidates:
    """2D vesicle candidates on one slab: SAM masks (lumen or whole vesicle), scores and boxes ``(x0, y0, x1, y1)``."""

    masks: np.ndarray  # (n, H, W) bool
    scores: np.ndarray  # (n,) predicted IoU
    boxes: np.ndarray  # (n, 4) float, exclusive ends

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> Candidates:
        """The candidates at indices ``keep``, in that order."""
        return Candidates(self.masks[keep], self.scores[keep], self.boxes[keep])


def _radius_range(settings: VesicleSettings, pixel_nm: float) -> tuple[float, float]:
    """Lumen-to-membrane-centre radii in pixels that the diameter limits allow on a slab."""
    r_min = max(2.0, (settings.min_diameter_nm / 2 - settings.membrane_nm / 2) / pixel_nm)
    r_max = max(r_min + 1, (settings.max_diameter_nm / 2 - settings.membrane_nm / 2) / pixel_nm)
    return r_min, r_max


def _membrane_map(slab: np.ndarray, pixel_nm: float, membrane_nm: float) -> np.ndarray:
    """Pixels on dark ridges as wide as a bilayer: a ridge filter, thresholded in units of its own noise."""
    width = max(1.0, membrane_nm / pixel_nm)
    ridge = filters.sato(slab, sigmas=[width / 4, width / 2.5], black_ridges=True, mode="reflect")
    median = float(np.median(ridge))
    spread = float(np.median(np.abs(ridge - median))) * 1.4826 + 1e-12
    return ridge > median + 2.0 * spread


def _circles_hough(slab: np.ndarray, pixel_nm: float, settings: VesicleSettings) -> np.ndarray:
    """Circles ``(y, x, r)`` on membrane ridges: Hough transform, strongest first."""
    r_min, r_max = _radius_range(settings, pixel_nm)
    membrane = _membrane_map(slab, pixel_nm, settings.membrane_nm)
    # Radii 5% apart: finer steps add cost, not circles (SAM refines the outline).
    radii = np.unique(np.round(np.geomspace(r_min, r_max, max(2, int(np.log(r_max / r_min) / 0.05) + 1))).astype(int))
    accumulator = transform.hough_circle(membrane, radii)
    gap = max(1, int(r_min))
    _, xs, ys, rs = transform.hough_circle_peaks(
        accumulator, radii, min_xdistance=gap, min_ydistance=gap, total_num_peaks=4 * settings.max_candidates,
        threshold=0.3,
    )
    circles = np.stack([ys, xs, rs], axis=1).astype(np.float64).reshape(-1, 3)
    # Both edges of a bilayer and off-centre arcs vote too: keep a circle only when its centre is not
    # near the centre of a stronger one.
    kept: list[np.ndarray] = []
    for c in circles:
        if all(np.hypot(*(c[:2] - k[:2])) > 0.5 * min(c[2], k[2]) for k in kept):
            kept.append(c)
        if len(kept) == settings.max_candidates:
            break
    return np.array(kept, np.float64).reshape(-1, 3)


def _circles_lumen(slab: np.ndarray, pixel_nm: float, settings: VesicleSettings) -> np.ndarray:
    """Circles ``(y, x, r)`` around lumens: regions of the slab fully enclosed by membrane ridges."""
    r_min, r_max = _radius_range(settings, pixel_nm)
    membrane = _membrane_map(slab, pixel_nm, settings.membrane_nm)
    lumens, _ = ndi.label(ndi.binary_fill_holes(membrane) & ~membrane)
    half_membrane = settings.membrane_nm / 2 / pixel_nm
    circles = []
    for p in measure.regionprops(lumens):
        # The circle passes through the membrane's middle, as a Hough circle does.
        r = p.equivalent_diameter_area / 2 + half_membrane
        if r_min <= r <= r_max:
            circles.append((*p.centroid, r, p.area))
    circles.sort(key=lambda c: -c[3])
    return np.array([c[:3] for c in circles[: settings.max_candidates]], np.float64).reshape(-1, 3)


def _boxes_from_circles(circles: np.ndarray, shape: tuple[int, int], margin: float = 1.15) -> np.ndarray:
    h, w = shape
    y, x, r = circles.T
    half = np.maximum(r * margin, 2.0)
    boxes = np.stack([x - half, y - half, x + half + 1, y + half + 1], axis=1)
    return np.clip(boxes, 0, [w, h, w, h])


def _sam_candidates(predictor: Predictor, slab: np.ndarray, boxes: np.ndarray) -> Candidates:
    """SAM masks of box prompts on the slab (already embedded by the caller)."""
    if not len(boxes):
        return Candidates(np.zeros((0, *slab.shape), bool), np.zeros(0, np.float32), np.zeros((0, 4)))
    # A slab no bigger than the model's input keeps every vesicle at full detail: zoomed crops (one
    # embedding each) would only cost time, mostly for the false circles.
    zoom = "off" if max(slab.shape) <= 1.5 * predictor.input_size else "auto"
    result = predictor.predict_prompts([Prompt(box=b) for b in boxes], zoom=zoom)
    return Candidates(result.masks[:, 0], result.scores[:, 0].astype(np.float32), boxes)


def _amg_candidates(predictor: Predictor, slab: np.ndarray, pixel_nm: float, settings: VesicleSettings) -> Candidates:
    from biosam.automatic.amg import generate_masks
    from biosam.automatic.run import amg_settings_for

    # A grid of boxes about the size of a typical vesicle; the filters below judge the masks.
    r_min, _ = _radius_range(settings, pixel_nm)
    side = max(slab.shape)
    per_side = int(np.clip(round(side / (2 * r_min)), 8, 32))
    # LiteMedSAM's own stability threshold; the membrane and shape filters do the rest.
    amg = amg_settings_for(predictor.model, points_per_side=per_side, pred_iou_thresh=settings.min_score,
                           stability_score_thresh=0.8)
    records = generate_masks(predictor, None, amg)
    masks = np.array([r.mask for r in records], bool).reshape(-1, *slab.shape)
    boxes = np.array([r.bbox for r in records], np.float64).reshape(-1, 4)
    return Candidates(masks, np.array([r.predicted_iou for r in records], np.float32), boxes)


def sam_view(slab: np.ndarray, settings: VesicleSettings) -> np.ndarray:
    """The slab as SAM (and a mask classifier) sees it: membranes bright with ``settings.invert``."""
    # SAM outlines whole vesicles or lumens more consistently on bright membranes than on dark rings.
    return 255.0 - slab if settings.invert else slab


def find_candidates(
    predictor: Predictor, slab: np.ndarray, pixel_nm: float, settings: VesicleSettings | None = None
) -> Candidates:
    """2D vesicle cross-sections (SAM masks) on a normalised slab image (float 0-255, membranes dark).

    ``pixel_nm`` is the slab's pixel size in nm. Candidates come from
    ``settings.method`` and pass the score, diameter and shape filters of
    :class:`VesicleSettings`; overlapping ones are reduced to the best scored.
    The predictor's image is replaced by the slab.
    """
    settings = settings or VesicleSettings()
    slab = np.asarray(slab, dtype=np.float32)
    if slab.ndim != 2:
        raise InputError(f"a slab image is 2D, got shape {slab.shape}.")
    if not pixel_nm > 0:
        raise InputError(f"pixel size must be positive, got {pixel_nm} nm.")
    predictor.set_image(sam_view(slab, settings), intensity="none")
    if settings.method == "amg":
        found = _amg_candidates(predictor, slab, pixel_nm, settings)
        expected = None
    else:
        circles = (_circles_hough if settings.method == "hough" else _circles_lumen)(slab, pixel_nm, settings)
        boxes = _boxes_from_circles(circles, slab.shape)
        usable = (boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)
        found = _sam_candidates(predictor, slab, boxes[usable])
        expected = circles[usable, 2]
    logger.info("slab: %d raw candidates (%s)", len(found), settings.method)
    keep = _filter(found, slab, pixel_nm, settings, expected)
    return _suppress(found.select(keep))


def _filter(
    found: Candidates, slab: np.ndarray, pixel_nm: float, settings: VesicleSettings, expected: np.ndarray | None
) -> np.ndarray:
    """Indices of candidates that look like a vesicle's lumen of an allowed size, ringed by a membrane."""
    keep = []
    membrane_px = max(1.0, settings.membrane_nm / pixel_nm)
    for k in range(len(found)):
        if found.scores[k] < settings.min_score or not found.masks[k].any():
            continue
        # Missing-wedge halos above and below dense objects are bright blobs with no dark rim.
        distances, means = edge_profile(slab, found.masks[k], 3 * membrane_px + 2)
        contrast, growth = membrane_fit(distances, means, membrane_px)
        if not contrast >= settings.min_contrast:
            continue
        props = measure.regionprops(found.masks[k].astype(np.uint8))
        p = props[0]
        # SAM outlines the lumen or the whole vesicle; the membrane found around it settles which.
        diameter = (p.equivalent_diameter_area + 2 * growth) * pixel_nm
        if not settings.min_diameter_nm <= diameter <= settings.max_diameter_nm:
            continue
        if p.solidity < settings.min_solidity:
            continue
        if p.axis_major_length > 0 and p.axis_minor_length / p.axis_major_length < settings.min_roundness:
            continue
        # A ring detector's circle passes through the membrane: SAM's mask must end near it.
        if expected is not None and not 0.4 <= (p.equivalent_diameter_area / 2) / max(expected[k], 1.0) <= 1.3:
            continue
        keep.append(k)
    return np.array(keep, dtype=np.int64)


def _suppress(found: Candidates, max_overlap: float = 0.3) -> Candidates:
    """Greedy non-maximum suppression of overlapping masks, best predicted IoU first."""
    order = np.argsort(-found.scores, kind="stable")
    kept: list[int] = []
    taken = np.zeros(found.masks.shape[1:], bool)
    for k in order:
        mask = found.masks[k]
        area = mask.sum()
        if area == 0 or (mask & taken).sum() > max_overlap * area:
            continue
        kept.append(int(k))
        taken |= mask
    return found.select(np.array(sorted(kept), dtype=np.int64))
