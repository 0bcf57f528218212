"""Membrane-bound vesicles in a cryo-electron tomogram, found automatically and followed in 3D.

The steps of :func:`segment_vesicles`, each a public function here:

1. :func:`prepare_volume`: a copy of the tomogram smoothed along z (single
   slices are very noisy) and normalised slice by slice for local contrast.
   SAM sees this volume during propagation.
2. :func:`slab_image`: the mean of ``slab_thickness`` slices around a depth,
   with the same local normalisation; vesicles crossing that depth appear as
   dark rings (the bilayer) around a lumen.
3. :func:`find_candidates`: 2D vesicle cross-sections on the slab: circles from
   a ring detector (``hough``: Hough transform of the membrane ridges;
   ``log``: Laplacian-of-Gaussian blobs), each verified by a SAM box prompt, or
   SAM's automatic mask generation with a grid of boxes (``amg``). Candidates
   are filtered by predicted IoU, diameter (nm) and shape (solidity, axis ratio).
4. :func:`biosam.volume.segment_volume` carries each candidate from the slab's
   centre slice through z; :func:`trim_by_score` cuts each object's ends where
   its predicted IoU falls off.
5. :func:`finish_labels`: SAM outlines the lumen inside the dark bilayer, so
   every object is grown by the membrane thickness (without overlapping its
   neighbours), split into connected 3D components, fragments are dropped and
   the objects relabelled ``1..N`` in a dtype that holds them all.

With several slabs (``n_slabs``), slabs are processed from the middle outwards
and a candidate is dropped when an object found from an earlier slab already
covers it, so each vesicle is propagated once. Slice embeddings are cached
between slabs, so extra slabs cost mostly mask decoding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, transform
from tqdm.auto import tqdm

from biosam.errors import InputError
from biosam.prompting.predictor import Predictor
from biosam.prompting.prompts import Prompt
from biosam.volume import PropagationSettings, segment_volume

logger = logging.getLogger(__name__)

__all__ = [
    "CANDIDATE_METHODS",
    "Candidates",
    "VesicleSegmentation",
    "VesicleSettings",
    "finish_labels",
    "find_candidates",
    "label_dtype_for",
    "local_contrast",
    "prepare_volume",
    "relabel_volume",
    "segment_vesicles",
    "slab_centres",
    "slab_image",
    "trim_by_score",
]

CANDIDATE_METHODS = ("lumen", "hough", "amg")
# Percentiles the locally normalised images are clipped to before scaling to 0-255.
_CLIP_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class VesicleSettings:
    """Parameters of :func:`segment_vesicles` (lengths in nm unless the name says slices or pixels).

    Slabs: ``slab_thickness`` slices are averaged around depth ``z`` (default:
    the middle slice), or around ``n_slabs`` evenly spaced depths.
    Candidates: ``method`` (see :data:`CANDIDATE_METHODS`); cross-sections
    whose diameter (membrane included) lies outside ``min_diameter_nm`` to
    ``max_diameter_nm``, whose SAM predicted IoU is below ``min_score``, or
    whose solidity or minor/major axis ratio is below ``min_solidity`` /
    ``min_roundness`` are dropped. ``max_candidates`` caps the circles a ring
    detector hands to SAM. Propagation: ``z_smoothing`` (Gaussian sigma in
    slices) of the volume SAM sees, which visits every ``z_step``-th slice
    (other slices take the nearest visited one's masks); ``propagation`` settings of
    :func:`~biosam.volume.segment_volume`; ``score_drop``: an object's end
    slices are cut while their predicted IoU is below this fraction of its
    median. Finish: ``membrane_nm`` grown around SAM's lumen mask;
    ``background_nm``: window of the local contrast normalisation.
    """

    slab_thickness: int = 11
    z: int | None = None
    n_slabs: int = 1
    method: str = "hough"
    min_diameter_nm: float = 20.0
    max_diameter_nm: float = 150.0
    min_score: float = 0.8
    min_solidity: float = 0.9
    min_roundness: float = 0.7
    max_candidates: int = 200
    z_smoothing: float = 2.0
    z_step: int = 1
    score_drop: float = 0.85
    membrane_nm: float = 6.0
    background_nm: float = 150.0
    propagation: PropagationSettings = field(default_factory=PropagationSettings)

    def __post_init__(self) -> None:
        if self.method not in CANDIDATE_METHODS:
            raise InputError(f"method must be one of {', '.join(CANDIDATE_METHODS)}, got {self.method!r}.")
        if int(self.slab_thickness) != self.slab_thickness or self.slab_thickness < 1:
            raise InputError(f"slab_thickness must be a whole number of slices >= 1, got {self.slab_thickness!r}.")
        if int(self.n_slabs) != self.n_slabs or self.n_slabs < 1:
            raise InputError(f"n_slabs must be a whole number >= 1, got {self.n_slabs!r}.")
        if self.z is not None and self.n_slabs > 1:
            raise InputError("give either a depth z or several slabs (n_slabs > 1), not both.")
        if not 0 < self.min_diameter_nm < self.max_diameter_nm:
            raise InputError(
                f"need 0 < min_diameter_nm < max_diameter_nm, got {self.min_diameter_nm} and {self.max_diameter_nm}."
            )
        for name in ("min_score", "min_solidity", "min_roundness", "score_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}.")
        for name in ("z_smoothing", "membrane_nm"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if int(self.z_step) != self.z_step or self.z_step < 1:
            raise InputError(f"z_step must be a whole number of slices >= 1, got {self.z_step!r}.")
        if not self.background_nm > 0 or self.max_candidates < 1:
            raise InputError("background_nm must be > 0 and max_candidates >= 1.")


@dataclass
class Candidates:
    """2D vesicle candidates on one slab: SAM masks of the lumen, their scores and boxes ``(x0, y0, x1, y1)``."""

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
    ``(N, Z)`` SAM predicted IoU of each vesicle per slice (NaN where it is
    absent; after splitting, pieces keep the scores of the object they came
    from). ``slabs``: the slab centre slices, ``slab``: the first (normalised,
    uint8) slab image, ``candidates``: 2D candidates found on each slab.
    """

    labels: np.ndarray
    scores: np.ndarray
    slabs: list[int]
    slab: np.ndarray
    candidates: list[int]


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
    boxes = boxes[(boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)]
    result = predictor.predict_prompts([Prompt(box=b) for b in boxes])
    return Candidates(result.masks[:, 0], result.scores[:, 0].astype(np.float32), boxes)


def _amg_candidates(predictor: Predictor, slab: np.ndarray, pixel_nm: float, settings: VesicleSettings) -> Candidates:
    from biosam.automatic.amg import generate_masks
    from biosam.automatic.run import amg_settings_for

    # A grid of boxes about the size of a typical vesicle; the filters below judge the masks.
    r_min, r_max = _radius_range(settings, pixel_nm)
    side = max(slab.shape)
    per_side = int(np.clip(round(side / (2 * r_min)), 8, 32))
    amg = amg_settings_for(predictor.model, points_per_side=per_side, pred_iou_thresh=settings.min_score,
                           stability_score_thresh=0.8)
    records = generate_masks(predictor, None, amg)
    masks = np.array([r.mask for r in records], bool).reshape(-1, *slab.shape)
    boxes = np.array([r.bbox for r in records], np.float64).reshape(-1, 4)
    return Candidates(masks, np.array([r.predicted_iou for r in records], np.float32), boxes)


def find_candidates(
    predictor: Predictor, slab: np.ndarray, pixel_nm: float, settings: VesicleSettings | None = None
) -> Candidates:
    """2D vesicle cross-sections (SAM lumen masks) on a normalised slab image (float 0-255).

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
    predictor.set_image(slab, intensity="none")
    if settings.method == "amg":
        found = _amg_candidates(predictor, slab, pixel_nm, settings)
        expected = None
    else:
        circles = (_circles_hough if settings.method == "hough" else _circles_lumen)(slab, pixel_nm, settings)
        found = _sam_candidates(predictor, slab, _boxes_from_circles(circles, slab.shape))
        expected = circles[: len(found), 2]
    logger.info("slab: %d raw candidates (%s)", len(found), settings.method)
    keep = _filter(found, pixel_nm, settings, expected)
    return _suppress(found.select(keep))


def _filter(found: Candidates, pixel_nm: float, settings: VesicleSettings, expected: np.ndarray | None) -> np.ndarray:
    """Indices of candidates that look like a vesicle's lumen of an allowed size."""
    keep = []
    for k in range(len(found)):
        if found.scores[k] < settings.min_score:
            continue
        props = measure.regionprops(found.masks[k].astype(np.uint8))
        if not props:
            continue
        p = props[0]
        lumen_d = p.equivalent_diameter_area * pixel_nm
        diameter = lumen_d + 2 * settings.membrane_nm
        if not settings.min_diameter_nm <= diameter <= settings.max_diameter_nm:
            continue
        if p.solidity < settings.min_solidity:
            continue
        if p.axis_major_length > 0 and p.axis_minor_length / p.axis_major_length < settings.min_roundness:
            continue
        # A ring detector's circle passes through the membrane: SAM's lumen must lie just inside it.
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


def trim_by_score(labels: np.ndarray, scores: np.ndarray, drop: float) -> np.ndarray:
    """Cut each object's end slices while its predicted IoU is below ``drop`` times its median; in place.

    ``labels`` ``(Z, Y, X)`` holds object ``k`` as ``k + 1``; ``scores`` is
    ``(n, Z)`` with NaN where an object is absent. Returns ``scores`` with the
    cut slices set to NaN.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    for k in range(scores.shape[0]):
        present = np.flatnonzero(~np.isnan(scores[k]))
        if not present.size:
            continue
        limit = drop * float(np.median(scores[k, present]))
        good = present[scores[k, present] >= limit]
        if not good.size:
            continue
        for z in present[(present < good[0]) | (present > good[-1])]:
            plane = labels[z]
            plane[plane == k + 1] = 0
            scores[k, z] = np.nan
    return scores


def label_dtype_for(count: int) -> np.dtype:
    """Label dtype that holds ``count`` objects: uint16, or uint32 past 65535 (never 8-bit, which wraps at 255)."""
    if count < 0:
        raise InputError(f"object count must be >= 0, got {count}.")
    return np.dtype(np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32)


def relabel_volume(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive ids ``1..N`` in a dtype that holds them all, and the old id of each new one (``(N,)``)."""
    labels = np.asarray(labels)
    old = np.unique(labels)
    old = old[old > 0]
    lut = np.zeros(int(old[-1]) + 1 if old.size else 1, dtype=label_dtype_for(old.size))
    lut[old] = np.arange(1, old.size + 1)
    return lut[labels], old


def _grow(labels: np.ndarray, distance_nm: float, spacing_nm: tuple[float, float, float]) -> np.ndarray:
    """Grow every object by ``distance_nm`` into the background; neighbours split the space between them."""
    if distance_nm <= 0 or not labels.any():
        return labels
    distance, index = ndi.distance_transform_edt(labels == 0, sampling=spacing_nm, return_indices=True)
    grown = labels[tuple(index)]
    grown[distance > distance_nm] = 0
    return grown


def finish_labels(
    labels: np.ndarray, spacing_nm: tuple[float, float, float], membrane_nm: float, min_diameter_nm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Grow lumens by the membrane, split objects into connected 3D pieces, drop fragments, relabel.

    Pieces whose volume-equivalent diameter is below half of
    ``min_diameter_nm`` are fragments. Returns the labels ``1..N`` and, for
    each, the id it had in ``labels``.
    """
    grown = _grow(np.asarray(labels), membrane_nm, spacing_nm)
    out = np.zeros(grown.shape, dtype=np.int64)
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
    progress: bool = True,
) -> VesicleSegmentation:
    """Find membrane-bound vesicles in a tomogram and segment each in 3D.

    ``volume`` is ``(Z, Y, X)`` with dense material dark (cryo-ET contrast);
    ``voxel_size`` in Å, one number or ``(z, y, x)``. See the module docstring
    for the steps and :class:`VesicleSettings` for the parameters.
    """
    settings = settings or VesicleSettings()
    volume = _check_volume(volume)
    spacing_a = _spacing(voxel_size)
    spacing_nm = tuple(s / 10.0 for s in spacing_a)
    pixel_nm = math.sqrt(spacing_nm[1] * spacing_nm[2])
    window = settings.background_nm / pixel_nm
    depth = volume.shape[0]
    step = settings.z_step
    centres = slab_centres(depth, settings)
    # Propagation visits every step-th slice, starting so that it meets the first slab's centre.
    offset = centres[0] % step
    sampled = np.arange(offset, depth, step)

    prepared = prepare_volume(volume, settings.z_smoothing, window)[offset::step]
    found = np.zeros((len(sampled), *volume.shape[1:]), dtype=np.int64)
    all_scores: list[np.ndarray] = []
    counts: list[int] = []
    first_slab = None
    with _cached_embeddings(predictor, len(centres) > 1):
        for zc in tqdm(centres, desc="slabs", disable=not progress or len(centres) < 2, leave=False):
            slab = slab_image(volume, zc, settings.slab_thickness, window)
            if first_slab is None:
                first_slab = slab
            candidates = find_candidates(predictor, slab, pixel_nm, settings)
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
            result = segment_volume(predictor, prepared, prompts, settings.propagation, intensity="none",
                                    progress=progress)
            labels = result.labels.astype(np.int64)
            scores = trim_by_score(labels, result.scores, settings.score_drop)
            # Objects of this slab fill only background: earlier objects keep their voxels.
            free = (found == 0) & (labels > 0)
            found[free] = labels[free] + len(all_scores)
            all_scores.extend(scores)
    # Back to every slice: each one takes the nearest propagated slice.
    nearest = np.clip(np.rint((np.arange(depth) - offset) / step).astype(int), 0, len(sampled) - 1)
    found = found[nearest]
    labels, origin = finish_labels(found, spacing_nm, settings.membrane_nm, settings.min_diameter_nm)
    scores = np.full((len(origin), depth), np.nan, np.float32)
    for k, box in enumerate(ndi.find_objects(labels)):
        if box is not None:
            # A piece keeps its parent's scores on the slices it occupies.
            z = np.arange(box[0].start, box[0].stop)
            scores[k, z] = all_scores[origin[k] - 1][nearest[z]]
    return VesicleSegmentation(labels, scores, centres, first_slab.astype(np.uint8), counts)


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
