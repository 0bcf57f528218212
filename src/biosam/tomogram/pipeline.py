"""Membrane-bound vesicles in a cryo-electron tomogram, found automatically and followed in 3D.

The steps of :func:`segment_vesicles`, each a public function here:

1. :func:`prepare_volume`: a copy of the tomogram smoothed along z (single
   slices are very noisy) and normalised slice by slice for local contrast
   (minus the local mean, over the local standard deviation, then clipped to
   percentiles). SAM sees this volume, membranes made bright, during
   propagation.
2. :func:`slab_image`: the mean of ``slab_thickness`` slices around a depth,
   normalised the same way; vesicles crossing that depth appear as dark rings
   (the bilayer) around a lumen.
3. :func:`find_candidates`: vesicle cross-sections on the slab. A ring
   detector proposes circles (``lumen``: regions fully enclosed by membrane
   ridges; ``hough``: Hough transform of the ridges) that SAM outlines from a
   box prompt each, or SAM's automatic mask generation with a grid of boxes
   proposes masks (``amg``). Masks must have a high predicted IoU, a dark
   membrane around them, an allowed diameter (nm) and a round, convex shape.
4. :func:`biosam.volume.segment_volume` carries each candidate from the slab's
   centre slice through z. :func:`snap_slices` grows every 2D mask to the
   outer edge of its membrane (SAM outlines the lumen on some slices, the
   whole vesicle on others) and :func:`trim_objects` cuts each object's ends
   where its predicted IoU falls off, its membrane fades (the missing wedge
   hides the poles) or it grows again into a neighbour.
5. :func:`finish_labels`: objects are snapped to their membrane in 3D
   (:func:`snap_to_membrane`), clipped to the ball of their equatorial radius
   (:func:`clip_to_sphere`: the missing wedge stretches them along z), split
   into connected 3D components, fragments dropped, and relabelled ``1..N`` in
   a dtype that holds them all (:func:`relabel_volume`).

With several slabs (``n_slabs``), slabs are processed from the middle outwards
and a candidate is dropped when an object found from an earlier slab already
covers it, so each vesicle is propagated once. Slice embeddings are cached
between slabs, so extra slabs cost mostly mask decoding.

Lengths are in nm, voxel sizes in Å (as in MRC headers), images ``(Z, Y, X)``
with dense material dark, as tomograms are.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, transform
from tqdm.auto import tqdm

from biosam.errors import InputError
from biosam.labels import label_dtype
from biosam.prompting.predictor import Predictor
from biosam.prompting.prompts import Prompt
from biosam.volume import PropagationSettings, segment_volume

logger = logging.getLogger(__name__)

__all__ = [
    "CANDIDATE_METHODS",
    "Candidates",
    "VesicleSegmentation",
    "VesicleSettings",
    "clip_to_sphere",
    "finish_labels",
    "snap_to_membrane",
    "find_candidates",
    "local_contrast",
    "prepare_volume",
    "relabel_volume",
    "sam_view",
    "segment_vesicles",
    "slab_centres",
    "snap_slices",
    "slab_image",
    "edge_profile",
    "membrane_contrast",
    "trim_objects",
]

CANDIDATE_METHODS = ("decoder", "lumen", "hough", "amg")
# Percentiles the locally normalised images are clipped to before scaling to 0-255.
_CLIP_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class VesicleSettings:
    """Parameters of :func:`segment_vesicles` (lengths in nm unless the name says slices or pixels).

    Slabs: ``slab_thickness`` slices are averaged around slice ``z`` (default:
    the middle one), or around ``n_slabs`` evenly spaced depths.

    Contrast: ``polarity`` ``"dark"`` (dense material dark, as reconstructed),
    ``"bright"``, or ``"auto"`` (detected: :func:`biosam.tomogram.grid.detect_polarity`).

    Candidates: ``method`` is one of :data:`CANDIDATE_METHODS`. ``decoder``
    (the default) finds vesicle cross-sections on slabs through the whole
    tomogram, one every ``slab_step`` nm, with a trained instance decoder
    (``decoder``: a checkpoint, None for the shipped one) and links them in 3D
    (:mod:`biosam.tomogram.detect`); ``z``, ``n_slabs``, the score and
    contrast thresholds, propagation and the classifier do not apply to it.
    For the other methods, a ring
    detector hands at most ``max_candidates`` circles to SAM. A cross-section
    is kept when its SAM predicted IoU is at least ``min_score``, the
    membrane around it is at least ``min_contrast`` darker than what lies
    beyond (0-255 units of the normalised slab), its diameter (membrane
    included) lies in ``min_diameter_nm`` .. ``max_diameter_nm``, and its
    solidity and minor/major axis ratio reach ``min_solidity`` and
    ``min_roundness``. ``invert``: SAM sees membranes bright (it outlines
    vesicles more consistently than on dark rings).

    Propagation: the volume SAM sees is smoothed along z with a Gaussian of
    ``z_smoothing`` slices and visited every ``z_step``-th slice (the others
    take the nearest visited slice's masks); ``propagation`` holds the
    settings of :func:`~biosam.volume.segment_volume`. ``score_drop`` and
    ``contrast_drop``: see :func:`trim_objects`.

    Finish: ``membrane_nm`` is the bilayer's thickness (objects are grown to
    its outer edge); ``sphere``: clip objects to the ball of their equatorial
    radius (see :func:`clip_to_sphere`); ``background_nm``: the window of the
    local contrast normalisation.
    """

    slab_thickness: int = 11
    z: int | None = None
    n_slabs: int = 1
    method: str = "decoder"
    polarity: str = "auto"
    decoder: str | None = None
    slab_step: int = 4
    min_diameter_nm: float = 20.0
    max_diameter_nm: float = 150.0
    min_score: float = 0.8
    min_solidity: float = 0.9
    min_roundness: float = 0.7
    max_candidates: int = 100
    invert: bool = True
    z_smoothing: float = 2.0
    z_step: int = 2
    score_drop: float = 0.85
    contrast_drop: float = 0.3
    min_contrast: float = 10.0
    membrane_nm: float = 6.0
    sphere: bool = True
    background_nm: float = 150.0
    # The box for the next slice: the mask's box grown by 15% of its side, so that it takes in the membrane;
    # the stop rules chosen for vesicles before the intensity rule existed.
    propagation: PropagationSettings = field(
        default_factory=lambda: PropagationSettings(box_margin=0.15, min_overlap=0.5, max_shift=float("inf")))

    def __post_init__(self) -> None:
        if self.method not in CANDIDATE_METHODS:
            raise InputError(f"method must be one of {', '.join(CANDIDATE_METHODS)}, got {self.method!r}.")
        from biosam.tomogram.grid import POLARITY_CHOICES

        if self.polarity not in POLARITY_CHOICES:
            raise InputError(f"polarity must be one of {', '.join(POLARITY_CHOICES)}, got {self.polarity!r}.")
        if int(self.slab_thickness) != self.slab_thickness or self.slab_thickness < 1:
            raise InputError(f"slab_thickness must be a whole number of slices >= 1, got {self.slab_thickness!r}.")
        if int(self.n_slabs) != self.n_slabs or self.n_slabs < 1:
            raise InputError(f"n_slabs must be a whole number >= 1, got {self.n_slabs!r}.")
        if self.z is not None and self.n_slabs > 1:
            raise InputError("give either a depth z or several slabs (n_slabs > 1), not both.")
        if self.method == "decoder" and (self.z is not None or self.n_slabs > 1):
            raise InputError("the decoder method reads slabs through the whole tomogram; a depth z or several slabs "
                             "(n_slabs > 1) apply to the lumen, hough and amg methods.")
        if not 0 < self.min_diameter_nm < self.max_diameter_nm:
            raise InputError(
                f"need 0 < min_diameter_nm < max_diameter_nm, got {self.min_diameter_nm} and {self.max_diameter_nm}."
            )
        for name in ("min_score", "min_solidity", "min_roundness", "score_drop", "contrast_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}.")
        for name in ("z_smoothing", "membrane_nm"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        for name in ("z_step", "slab_step"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}.")
        if not self.background_nm > 0 or self.max_candidates < 1:
            raise InputError("background_nm must be > 0 and max_candidates >= 1.")


@dataclass
class Candidates:
    """2D vesicle candidates on one slab: SAM masks (lumen or whole vesicle), scores and boxes ``(x0, y0, x1, y1)``."""

    masks: np.ndarray  # (n, H, W) bool
    scores: np.ndarray  # (n,) predicted IoU
    boxes: np.ndarray  # (n, 4) float, exclusive ends

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> Candidates:
        return Candidates(self.masks[keep], self.scores[keep], self.boxes[keep])


@dataclass
class VesicleSegmentation:
    """Result of :func:`segment_vesicles` for a ``(Z, Y, X)`` tomogram.

    ``labels``: vesicles ``1..N`` (uint16, uint32 past 65535). ``scores``:
    ``(N, Z)`` SAM predicted IoU of each vesicle per slice, NaN where it is
    absent or was not scored (slices between propagated ones take the
    nearest one's score; pieces of a split object keep its scores). ``slabs``: the slab centre slices, ``slab``: the first (normalised,
    uint8) slab image, ``candidates``: 2D candidates found on each slab, ``polarity``: the contrast the
    tomogram had (given or detected).
    """

    labels: np.ndarray
    scores: np.ndarray
    slabs: list[int]
    slab: np.ndarray
    candidates: list[int]
    polarity: str = "dark"


# --------------------------------------------------------------------------- images


def _check_volume(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(
            f"expected a tomogram (Z, Y, X), got an array of shape {volume.shape}; "
            "vesicle finding needs a 3D volume, not a single image."
        )
    if min(volume.shape) < 2:
        raise InputError(f"tomogram of shape {volume.shape} is too small; it needs at least 2 voxels along each axis.")
    if volume.dtype.kind not in "iuf":
        raise InputError(f"unsupported voxel type {volume.dtype}; expected integer or floating-point voxels.")
    return volume


def local_contrast(image: np.ndarray, window: float) -> np.ndarray:
    """Local contrast normalisation of 2D images (or each slice of a stack): ``(x - mean) / std``.

    Mean and standard deviation are taken over a square of ``window`` pixels
    (box filters, so the cost does not grow with the window); a stack
    ``(Z, Y, X)`` is normalised slice by slice. Returns float32.
    """
    image = np.asarray(image, dtype=np.float32)
    size = max(3, int(round(window)) | 1)
    sizes = (size,) * 2 if image.ndim == 2 else (1, size, size)
    mean = ndi.uniform_filter(image, sizes, mode="reflect")
    out = image - mean
    var = ndi.uniform_filter(out * out, sizes, mode="reflect")
    # Flat regions (padding, constant borders) have no contrast to normalise; keep them at 0.
    std = np.sqrt(np.maximum(var, 0.0, out=var), out=var)
    floor = np.float32(1e-3) * float(std.max(initial=0.0)) + np.float32(1e-12)
    out /= np.maximum(std, floor)
    return out


def _to_byte_range(image: np.ndarray, percentiles: tuple[float, float] = _CLIP_PERCENTILES) -> np.ndarray:
    """Clip to percentiles (one pair for the whole array) and scale to float32 0-255."""
    flat = image.reshape(-1)
    step = max(1, flat.size // 4_000_000)  # percentiles of a sample are plenty
    lo, hi = np.percentile(flat[::step], percentiles)
    if hi <= lo:
        return np.zeros(image.shape, np.float32)
    out = (image - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0, out=out).astype(np.float32, copy=False)


def prepare_volume(volume: np.ndarray, z_smoothing: float, window: float) -> np.ndarray:
    """The volume SAM propagates through: smoothed along z, locally normalised per slice, float32 0-255.

    ``z_smoothing`` is a Gaussian sigma in slices (0: none); ``window`` the
    local-contrast window in pixels (see :func:`local_contrast`). One intensity
    window (percentiles of the whole volume) maps all slices to 0-255.
    """
    volume = _check_volume(volume).astype(np.float32)
    if z_smoothing > 0:
        volume = ndi.gaussian_filter1d(volume, z_smoothing, axis=0, mode="nearest")
    return _to_byte_range(local_contrast(volume, window))


def slab_image(volume: np.ndarray, z: int, thickness: int, window: float) -> np.ndarray:
    """Mean of ``thickness`` slices centred on slice ``z`` (cut at the volume's faces), normalised to 0-255."""
    volume = _check_volume(volume)
    depth = volume.shape[0]
    if not 0 <= z < depth:
        raise InputError(f"slab depth z={z} is outside the volume (z = 0..{depth - 1}).")
    start = max(0, z - thickness // 2)
    stop = min(depth, start + thickness)
    slab = np.asarray(volume[start:stop], dtype=np.float32).mean(axis=0)
    return _to_byte_range(local_contrast(slab, window))


def slab_centres(depth: int, settings: VesicleSettings) -> list[int]:
    """Slab centre slices: ``settings.z``, the middle slice, or ``n_slabs`` evenly spaced depths (middle first)."""
    if settings.z is not None:
        if not 0 <= settings.z < depth:
            raise InputError(f"z={settings.z} is outside the volume: it has {depth} slices (z = 0..{depth - 1}).")
        return [int(settings.z)]
    if settings.n_slabs == 1:
        return [depth // 2]
    # Evenly spaced, each slab at the centre of its share of the depth.
    centres = [int((k + 0.5) * depth / settings.n_slabs) for k in range(settings.n_slabs)]
    centres = sorted(set(centres), key=lambda c: (abs(c - depth // 2), c))
    return centres


# --------------------------------------------------------------------------- candidates


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
        contrast, growth = _membrane_fit(distances, means, membrane_px)
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


# --------------------------------------------------------------------------- 3D objects


def edge_profile(
    image: np.ndarray, mask: np.ndarray, reach: float, spacing: float | tuple[float, ...] = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``image`` in shells at signed distance from the edge of ``mask`` (2D or 3D).

    Distances are in the units of ``spacing`` (negative inside the mask),
    binned one smallest-spacing wide, out to ``reach`` on both sides. Returns
    the bin centres and the mean in each bin (NaN where a bin is empty).
    """
    step = float(np.min(spacing))
    n = int(math.ceil(reach / step))
    if not mask.any():
        return (np.arange(2 * n + 1) - n) * step, np.full(2 * n + 1, np.nan)
    # Only voxels within reach of the mask matter: work in its box, widened by the reach.
    margin = np.ceil(reach / np.broadcast_to(np.asarray(spacing, np.float64), (mask.ndim,))).astype(int) + 1
    box = tuple(slice(max(0, b.start - m), b.stop + m) for b, m in zip(ndi.find_objects(mask.astype(np.uint8))[0], margin))
    image, mask = image[box], mask[box]
    inside = ndi.distance_transform_edt(mask, sampling=spacing)
    outside = ndi.distance_transform_edt(~mask, sampling=spacing)
    # Pixel centres next to the edge are half a pixel from it.
    signed = np.where(mask, 0.5 * step - inside, outside - 0.5 * step)
    bins = np.rint(signed / step).astype(np.int64) + n
    near = (bins >= 0) & (bins <= 2 * n)
    sums = np.bincount(bins[near], weights=image[near].astype(np.float64), minlength=2 * n + 1)
    counts = np.bincount(bins[near], minlength=2 * n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return (np.arange(2 * n + 1) - n) * step, np.where(counts > 0, means, np.nan)


def _membrane_fit(distances: np.ndarray, means: np.ndarray, membrane: float) -> tuple[float, float]:
    """Where a dark membrane lies in an edge profile: ``(contrast, growth)``.

    The darkest band (the profile smoothed over most of a membrane's width)
    within a membrane's width of the edge is the membrane's middle;
    ``contrast`` is how much brighter the band one to two membrane widths
    beyond it is (NaN if unknown), ``growth`` how far the mask must grow to
    take in the membrane's outer half (>= 0).
    """
    valid = np.isfinite(means)
    if valid.sum() < 3:
        return float("nan"), 0.0
    # Smoothed over most of a membrane's width, the two leaflets of a bilayer merge into one band
    # whose darkest point is the bilayer's middle.
    step = float(distances[1] - distances[0])
    window = np.ones(max(3, int(round(0.7 * membrane / step)) | 1))
    smooth = np.convolve(np.where(valid, means, 0.0), window, "same")
    weight = np.convolve(valid.astype(np.float64), window, "same")
    smooth = np.where(weight > 0, smooth / np.maximum(weight, 1), np.nan)
    search = (distances >= -membrane) & (distances <= membrane + 2 * step) & valid
    if not search.any():
        return float("nan"), 0.0
    centre = distances[search][np.nanargmin(smooth[search])]
    beyond = (distances >= centre + membrane) & (distances <= centre + 2 * membrane) & valid
    contrast = float(np.mean(means[beyond]) - smooth[distances == centre][0]) if beyond.any() else float("nan")
    return contrast, max(0.0, float(centre + membrane / 2))


def membrane_contrast(image: np.ndarray, mask: np.ndarray, membrane_px: float) -> float:
    """How much darker than its surroundings the membrane at the edge of a 2D mask is (units of ``image``).

    The membrane is the darkest band within ``membrane_px`` of the mask's edge
    (inside or out, so a mask of the lumen and one of the whole vesicle both
    work); the contrast is the mean of the band one to two membrane widths
    further out minus the band's. NaN for an empty mask.
    """
    if not mask.any():
        return float("nan")
    width = max(1.0, float(membrane_px))
    distances, means = edge_profile(image, mask, 3 * width + 2)
    return _membrane_fit(distances, means, width)[0]


def trim_objects(
    labels: np.ndarray,
    scores: np.ndarray,
    contrast: np.ndarray,
    score_drop: float,
    contrast_drop: float,
    max_regrowth: float = 0.15,
) -> np.ndarray:
    """Cut each object's ends where it stops looking like one vesicle; ``labels`` is changed in place.

    ``labels`` ``(Z, Y, X)`` holds object ``k`` as ``k + 1``; ``scores`` and
    ``contrast`` are ``(n, Z)`` (SAM predicted IoU and membrane contrast, see
    :func:`membrane_contrast`), NaN where an object is absent. A slice is good
    when its predicted IoU is at least ``score_drop`` times the object's
    median and its membrane contrast is positive and at least
    ``contrast_drop`` times the object's highest. The object keeps the
    unbroken run of good slices around its good slice of highest contrast, and within it
    stops where its area, once shrinking away from that slice, grows again by
    more than ``max_regrowth`` over its smallest (a vesicle only shrinks
    towards its poles; regrowth is a neighbour or a missing-wedge halo). Returns ``scores`` with erased slices set to NaN.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    boxes = ndi.find_objects(labels, max_label=scores.shape[0])
    for k in range(scores.shape[0]):
        present = ~np.isnan(scores[k])
        if not present.any() or boxes[k] is None:
            continue
        rows, cols = boxes[k][1:]
        area = np.array([np.count_nonzero(labels[z, rows, cols] == k + 1) for z in range(labels.shape[0])])
        c = np.where(present, contrast[k], np.nan)
        best = np.nanmax(c) if np.isfinite(c).any() else np.nan
        good = present & (scores[k] >= score_drop * float(np.median(scores[k, present])))
        keep = np.zeros_like(good)
        if np.isfinite(best) and best > 0:
            good &= np.nan_to_num(c, nan=-np.inf) >= max(contrast_drop * best, 0.0)
        else:
            good[:] = False  # no slice shows a membrane: not a vesicle, erase it all
        if good.any():
            centre = int(np.argmax(np.where(good, np.nan_to_num(c, nan=-np.inf), -np.inf)))
            lo = hi = centre
            while lo > 0 and good[lo - 1]:
                lo -= 1
            while hi < len(good) - 1 and good[hi + 1]:
                hi += 1
            lo, hi = _shrinking(area, centre, lo, -1, max_regrowth), _shrinking(area, centre, hi, 1, max_regrowth)
            keep[lo : hi + 1] = True
        for z in np.flatnonzero(present & ~keep):
            plane = labels[z, rows, cols]
            plane[plane == k + 1] = 0
            scores[k, z] = np.nan
    return scores


def _shrinking(area: np.ndarray, start: int, end: int, step: int, max_regrowth: float) -> int:
    """Last slice from ``start`` towards ``end`` before the area, once shrinking, grows again past its minimum.

    The area may grow at first (``start`` need not be the largest
    cross-section); it is shrinking once it is 10% below its largest so far.
    """
    largest = smallest = float(area[start])
    shrinking = False
    z = start
    while z != end:
        nxt = z + step
        value = float(area[nxt])
        if shrinking and value > (1 + max_regrowth) * smallest:
            break
        largest = max(largest, value)
        if not shrinking and value < 0.9 * largest:
            shrinking, smallest = True, value
        smallest = min(smallest, value)
        z = nxt
    return z


def snap_slices(labels: np.ndarray, volume: np.ndarray, n: int, membrane_px: float) -> np.ndarray:
    """Grow each object on each slice out to its membrane's outer edge; return the membrane contrast ``(n, Z)``.

    SAM outlines the lumen on some slices and the whole vesicle on others;
    growing every 2D mask to the outer edge of the dark band around it (see
    :func:`membrane_contrast`, at most two membrane widths, into background
    only) makes an object's cross-sections comparable from slice to slice.
    ``labels`` ``(Z, Y, X)`` (object ``k`` is ``k + 1``) is changed in place;
    ``volume`` has membranes dark. Contrast is NaN where an object is absent.
    """
    table = np.full((n, labels.shape[0]), np.nan, np.float32)
    width = max(1.0, float(membrane_px))
    reach = int(math.ceil(3 * width + 4))
    for z in range(labels.shape[0]):
        plane = labels[z]
        grown = plane.copy()
        for k, box in enumerate(ndi.find_objects(plane)):
            if box is None or k >= n:
                continue
            # Only the object's box and the bands around it matter.
            crop = tuple(slice(max(0, b.start - reach), b.stop + reach) for b in box)
            mask = plane[crop] == k + 1
            distances, means = edge_profile(volume[z][crop], mask, 3 * width + 2)
            table[k, z], growth = _membrane_fit(distances, means, width)
            growth = min(growth, 2 * width)
            if growth > 0:
                reach_out = ndi.distance_transform_edt(~mask) <= growth
                grown[crop][reach_out & (plane[crop] == 0)] = k + 1
        labels[z] = grown
    return table


def relabel_volume(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive ids ``1..N`` in a dtype that holds them all, and the old id of each new one (``(N,)``)."""
    labels = np.asarray(labels)
    old = np.unique(labels)
    old = old[old > 0]
    lut = np.zeros(int(old[-1]) + 1 if old.size else 1, dtype=label_dtype(old.size))
    lut[old] = np.arange(1, old.size + 1)
    return lut[labels], old


def snap_to_membrane(
    labels: np.ndarray, image: np.ndarray, spacing_nm: tuple[float, float, float], membrane_nm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Grow each object out to the outer edge of the dark membrane around it.

    SAM outlines either the lumen or the whole vesicle. For every object the
    mean of ``image`` (membranes dark) in shells around its surface locates
    the membrane (see :func:`edge_profile`); the object grows by the distance
    to the membrane's outer half, at most two membrane widths, into
    background only (a voxel claimed by several objects goes to the nearest).
    Returns the grown labels and each object's growth in nm (index ``id - 1``).
    """
    labels = np.asarray(labels)
    out = labels.copy()
    n = int(labels.max(initial=0))
    growth = np.zeros(n, np.float64)
    if membrane_nm <= 0 or not n:
        return out, growth
    spacing = np.asarray(spacing_nm, np.float64)
    reach_nm = 3 * membrane_nm + 2 * float(spacing.min())
    margin = np.ceil(reach_nm / spacing).astype(int)
    nearest = np.full(labels.shape, np.inf, np.float32)
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is None:
            continue
        label = index + 1
        crop = tuple(slice(max(0, b.start - m), b.stop + m) for b, m in zip(box, margin))
        local = labels[crop]
        mask = local == label
        distances, means = edge_profile(image[crop], mask, reach_nm, tuple(spacing))
        _, grow = _membrane_fit(distances, means, membrane_nm)
        growth[index] = grow = min(grow, 2 * membrane_nm)
        if grow <= 0:
            continue
        distance = ndi.distance_transform_edt(~mask, sampling=spacing).astype(np.float32)
        claim = (local == 0) & (distance <= grow) & (distance < nearest[crop])
        out[crop][claim] = label
        nearest[crop][claim] = distance[claim]
    return out, growth


def clip_to_sphere(labels: np.ndarray, spacing_nm: tuple[float, float, float]) -> np.ndarray:
    """Clip every object to the ball of its equatorial radius around its centroid (in place; returned).

    The missing wedge blurs a vesicle's poles away along z: near them a slice
    still shows a ring of about the equatorial radius, so the 2D masks stack
    up into a cylinder. The equatorial radius (median radius of the slices in
    the middle half of the object's z-extent) is reliable, so each object is
    cut to the ball of that radius (plus half a voxel).
    """
    spacing = np.asarray(spacing_nm, np.float64)
    pixel_nm2 = spacing[1] * spacing[2]
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is None:
            continue
        label = index + 1
        mask = labels[box] == label
        areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
        present = np.flatnonzero(areas)
        first, last = present[0], present[-1]
        quarter = (last - first) / 4
        middle = present[(present >= first + quarter) & (present <= last - quarter)]
        radius = float(np.median(np.sqrt(areas[middle] * pixel_nm2 / np.pi))) + 0.5 * float(spacing.max())
        coords = np.nonzero(mask)
        centre = [c.mean() for c in coords]
        offsets = [(c - m) * s for c, m, s in zip(coords, centre, spacing)]
        outside = offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2 > radius**2
        if outside.any():
            region = labels[box]
            region[tuple(c[outside] for c in coords)] = 0
    return labels


def finish_labels(
    labels: np.ndarray, image: np.ndarray, spacing_nm: tuple[float, float, float], membrane_nm: float,
    min_diameter_nm: float, sphere: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Snap objects to their membranes, clip them to spheres, split them into connected 3D pieces, relabel.

    ``image`` is the volume with membranes dark (see :func:`snap_to_membrane`);
    ``sphere``: clip with :func:`clip_to_sphere`.
    Pieces whose volume-equivalent diameter is below half of
    ``min_diameter_nm`` are fragments. Returns the labels ``1..N`` and, for
    each, the id it had in ``labels``.
    """
    grown, _ = snap_to_membrane(np.asarray(labels), image, spacing_nm, membrane_nm)
    if sphere:
        clip_to_sphere(grown, spacing_nm)
    out = np.zeros(grown.shape, dtype=np.int32)
    origin: list[int] = []
    voxel_nm3 = float(np.prod(spacing_nm))
    min_voxels = (math.pi / 6) * (min_diameter_nm / 2) ** 3 / voxel_nm3
    for old, box in enumerate(ndi.find_objects(grown), start=1):
        if box is None:
            continue
        pieces, n = ndi.label(grown[box] == old)
        if not n:
            continue
        sizes = np.bincount(pieces.ravel())
        for piece in range(1, n + 1):
            if sizes[piece] < min_voxels:
                continue
            origin.append(old)
            out[box][pieces == piece] = len(origin)
    labels_out, _ = relabel_volume(out)
    return labels_out, np.asarray(origin, dtype=np.int64)


# --------------------------------------------------------------------------- the pipeline


@contextlib.contextmanager
def _cached_embeddings(predictor: Predictor, wanted: bool) -> Iterator[None]:
    """Give the predictor a temporary embedding store (slices embedded once for every slab) if it has none."""
    if not wanted or predictor.store is not None:
        yield
        return
    from biosam.prompting.store import EmbeddingStore

    with tempfile.TemporaryDirectory(prefix="biosam-embeddings-") as folder:
        predictor.store = EmbeddingStore(f"{folder}/store.zarr", predictor.model)
        try:
            yield
        finally:
            predictor.store = None


def segment_vesicles(
    predictor: Predictor,
    volume: np.ndarray,
    voxel_size: float | tuple[float, float, float],
    settings: VesicleSettings | None = None,
    *,
    classifier=None,
    keep: Sequence[str] | None = None,
    progress: bool = True,
) -> VesicleSegmentation:
    """Find membrane-bound vesicles in a tomogram and segment each in 3D.

    ``volume`` is ``(Z, Y, X)`` with dense material dark (cryo-ET contrast);
    ``voxel_size`` in Å, one number or ``(z, y, x)``. See the module docstring
    for the steps and :class:`VesicleSettings` for the parameters. With a
    :class:`~biosam.classify.Classifier` trained on tomogram candidates, only
    the slab candidates it puts in a class of ``keep`` (default: any but
    background) are followed through z.
    """
    settings = settings or VesicleSettings()
    volume = _check_volume(volume)
    spacing_a = _spacing(voxel_size)
    if settings.method == "decoder":
        if classifier is not None:
            raise InputError("the mask classifier sorts lumen, hough or amg candidates; choose one of those methods "
                             "with a classifier.")
        from biosam.tomogram.detect import find_vesicles

        return find_vesicles(predictor, volume, spacing_a, settings, progress=progress)
    from biosam.tomogram.grid import resolve_polarity

    polarity, _ = resolve_polarity(volume, settings.polarity)
    if polarity == "bright":
        volume = np.negative(volume, dtype=np.float32)
    if classifier is not None:
        classifier.check(predictor.model, "tomogram")
        classifier.keep_ids(keep)
    spacing_nm = tuple(s / 10.0 for s in spacing_a)
    pixel_nm = math.sqrt(spacing_nm[1] * spacing_nm[2])
    window = settings.background_nm / pixel_nm
    membrane_px = settings.membrane_nm / pixel_nm
    depth = volume.shape[0]
    step = settings.z_step
    centres = slab_centres(depth, settings)
    # Propagation visits every step-th slice, starting so that it meets the first slab's centre.
    offset = centres[0] % step
    sampled = np.arange(offset, depth, step)

    prepared = prepare_volume(volume, settings.z_smoothing, window)
    sampled_view = prepared[offset::step]
    # SAM's copy: 8 bits are plenty for an image it sees as 8-bit RGB anyway.
    sam_volume = np.rint(255.0 - sampled_view if settings.invert else sampled_view).astype(np.uint8)
    found = np.zeros((len(sampled), *volume.shape[1:]), dtype=np.int32)
    all_scores: list[np.ndarray] = []
    counts: list[int] = []
    first_slab = None
    with _cached_embeddings(predictor, len(centres) > 1):
        for zc in tqdm(centres, desc="slabs", disable=not progress or len(centres) < 2, leave=False):
            slab = slab_image(volume, zc, settings.slab_thickness, window)
            if first_slab is None:
                first_slab = slab
            candidates = find_candidates(predictor, slab, pixel_nm, settings)
            if classifier is not None and len(candidates):
                probs = classifier.predict(predictor.model, sam_view(slab, settings), candidates.masks)
                accepted = np.isin(probs.argmax(axis=1), classifier.keep_ids(keep))
                logger.info("slab at z=%d: classifier accepts %d of %d candidates", zc, accepted.sum(), len(accepted))
                candidates = candidates.select(np.flatnonzero(accepted))
            zs = int(np.argmin(np.abs(sampled - zc)))  # the propagated slice nearest the slab centre
            # Drop what an earlier slab's objects already cover, so each vesicle is propagated once.
            covered = found[zs] > 0
            new = [k for k, m in enumerate(candidates.masks) if (m & covered).sum() < 0.3 * m.sum()]
            candidates = candidates.select(np.array(new, dtype=np.int64))
            counts.append(len(candidates))
            logger.info("slab at z=%d: %d new candidates", zc, len(candidates))
            if not len(candidates):
                continue
            prompts = [Prompt(box=_mask_box(m), z=zs) for m in candidates.masks]
            result = segment_volume(predictor, sam_volume, prompts, settings.propagation, intensity="none",
                                    progress=progress)
            labels = np.asarray(result.labels, dtype=np.int32)
            contrast = snap_slices(labels, sampled_view, len(prompts), membrane_px)
            scores = trim_objects(labels, result.scores, contrast, settings.score_drop, settings.contrast_drop)
            # Objects of this slab fill only background: earlier objects keep their voxels.
            free = (found == 0) & (labels > 0)
            found[free] = labels[free] + len(all_scores)
            all_scores.extend(scores)
    # Back to every slice: each one takes the nearest propagated slice.
    nearest = np.clip(np.rint((np.arange(depth) - offset) / step).astype(int), 0, len(sampled) - 1)
    found = found[nearest]
    labels, origin = finish_labels(found, prepared, spacing_nm, settings.membrane_nm, settings.min_diameter_nm,
                                   settings.sphere)
    scores = np.full((len(origin), depth), np.nan, np.float32)
    for k, box in enumerate(ndi.find_objects(labels)):
        if box is not None:
            # A piece keeps its parent's scores on the slices it occupies.
            z = np.arange(box[0].start, box[0].stop)
            scores[k, z] = all_scores[origin[k] - 1][nearest[z]]
    return VesicleSegmentation(labels, scores, centres, np.rint(first_slab).astype(np.uint8), counts, polarity)


def _mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def _spacing(voxel_size: float | tuple[float, float, float]) -> tuple[float, float, float]:
    values = np.atleast_1d(np.asarray(voxel_size, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(f"voxel size must be one positive number or (z, y, x) in Å, got {voxel_size!r}.")
    return tuple(float(v) for v in values)
