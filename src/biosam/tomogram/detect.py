"""Vesicles found by a trained instance decoder on slabs through the whole tomogram, linked in 3D.

On the working grid (:mod:`biosam.tomogram.grid`: 10 Å voxels, dense dark),
a slice every ``slab_step`` nm is the centre of a slab (:func:`decoder_slab`); the
decoder trained on slabs of realistic synthetic tomograms
(``scripts/train_vesicle_decoder.py``) finds the vesicle cross-sections on it,
touching ones apart (:func:`slab_instances`). Cross-sections on neighbouring
slabs that overlap are one object (:func:`link_sections`). The missing wedge
hides a vesicle's poles, so each object is completed from its widest sections
as an ellipsoid of revolution about z whose half-height is its equatorial
radius (:func:`complete_objects`): its cross-sections shrink as
``sqrt(1 - (dz / R)^2)``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from biosam.io.voxel_size import VoxelSize
from biosam.tomogram.grid import WORKING_VOXEL, to_input_grid, working_volume
from biosam.tomogram.objects import relabel_volume
from biosam.tomogram.slabs import contrast_window, slab_image
from biosam.tomogram.vesicles import VesicleSegmentation, VesicleSettings
from biosam.volume.link import overlap_iou

logger = logging.getLogger(__name__)

#: Training truth keeps a cross-section only where it is at least this fraction of the object's widest one
#: (by radius): near the poles the missing wedge leaves nothing to see.
SECTION_FRACTION = 0.6
#: Two cross-sections on neighbouring slabs are one object from this IoU on.
LINK_IOU = 0.3


def decoder_slab(volume: np.ndarray, z: int, thickness: int, background_nm: float) -> np.ndarray:
    """The uint8 slab the vesicle decoder reads: ``thickness`` working-grid slices around ``z``, locally normalised."""
    window = contrast_window(background_nm, WORKING_VOXEL)
    return np.rint(slab_image(volume, z, thickness, window)).astype(np.uint8)


def widest_sections(labels: np.ndarray) -> np.ndarray:
    """Area (voxels) of each object's widest z-section; index ``i`` for label ``i``."""
    out = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is not None:
            out[index + 1] = int((labels[box] == index + 1).sum(axis=(1, 2)).max())
    return out


def cross_section_labels(labels: np.ndarray, z: int, widest: np.ndarray | None = None,
                         fraction: float = SECTION_FRACTION) -> np.ndarray:
    """The 2D truth at slice ``z`` of 3D ``labels``: the cross-sections whose radius is at least ``fraction``
    of their object's widest (``widest``: from :func:`widest_sections`)."""
    widest = widest_sections(labels) if widest is None else widest
    section = np.array(labels[z])
    areas = np.bincount(section.ravel(), minlength=len(widest))
    small = np.flatnonzero(areas < fraction**2 * widest)
    section[np.isin(section, small[small > 0])] = 0
    return section


def slab_instances(predictor, decoder, volume: np.ndarray, zs: np.ndarray, thickness: int, background_nm: float,
                   progress: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
    """Vesicle cross-sections ``(len(zs), Y, X)`` (ids per slab) on the slabs centred at ``zs`` of a working
    volume, and for each slab the decoder's mean foreground probability of each of its sections (index id - 1)."""
    from biosam.automatic.ais import decoder_postprocessing
    from biosam.automatic.instances import maps_to_instances
    from biosam.automatic.run import decoder_maps

    params = decoder_postprocessing(decoder)
    out = np.zeros((len(zs), *volume.shape[1:]), np.int32)
    confidence = []
    for k, z in enumerate(tqdm(zs, desc="slabs", unit="slab", disable=not progress, leave=False)):
        maps = decoder_maps(predictor, decoder, decoder_slab(volume, int(z), thickness, background_nm))
        out[k] = maps_to_instances(maps, params)
        n = int(out[k].max(initial=0))
        confidence.append(np.asarray(ndi.mean(maps[0], out[k], np.arange(1, n + 1)), np.float32).reshape(n))
    return out, confidence


def link_sections(sections: np.ndarray, min_iou: float = LINK_IOU, reach: int = 2) -> np.ndarray:
    """Give the cross-sections of one object on successive slabs one id: ``(n_slabs, Y, X)`` object ids.

    Sections are matched one to one between slabs ``k`` and ``k + d`` (``d``
    up to ``reach``: an object may be missed on a slab), best IoU first, from
    ``min_iou``; matched sections share an id.
    """
    n = len(sections)
    offsets = np.concatenate([[0], np.cumsum([int(s.max(initial=0)) for s in sections])])
    parent = np.arange(offsets[-1] + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    linked_up = set()  # sections that already have a partner on a later slab
    linked_down = set()
    for d in range(1, reach + 1):
        for k in range(n - d):
            la, lb, iou = overlap_iou(sections[k], sections[k + d])
            for iou, i, j in sorted(zip(iou.tolist(), la.tolist(), lb.tolist()), reverse=True):
                a, b = offsets[k] + i, offsets[k + d] + j
                if iou < min_iou or a in linked_up or b in linked_down:
                    continue
                linked_up.add(a)
                linked_down.add(b)
                parent[root(b)] = root(a)
    roots = np.array([root(i) for i in range(len(parent))])
    _, ids = np.unique(roots, return_inverse=True)
    out = np.zeros_like(sections)
    for k in range(n):
        present = sections[k] > 0
        out[k][present] = ids[sections[k][present] + offsets[k]]
    return out


def _scaled_mask(mask: np.ndarray, factor: float) -> np.ndarray:
    """``mask`` shrunk about its centroid by ``factor`` (nearest-neighbour sampling)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    yy, xx = np.indices(mask.shape, dtype=np.float64)
    sy = np.rint(cy + (yy - cy) / factor).astype(np.int64)
    sx = np.rint(cx + (xx - cx) / factor).astype(np.int64)
    inside = (sy >= 0) & (sy < mask.shape[0]) & (sx >= 0) & (sx < mask.shape[1])
    out = np.zeros_like(mask)
    out[inside] = mask[sy[inside], sx[inside]]
    return out


def round_enough(mask: np.ndarray, min_solidity: float, min_roundness: float) -> bool:
    """Whether a 2D section is vesicle-like: its solidity and minor/major axis ratio reach the minimums."""
    from skimage.measure import regionprops

    props = regionprops(mask.astype(np.uint8))[0]
    roundness = props.axis_minor_length / props.axis_major_length if props.axis_major_length else 0.0
    return props.solidity >= min_solidity and roundness >= min_roundness


def complete_objects(objects: np.ndarray, zs: np.ndarray, depth: int, min_sections: int = 2,
                     diameter_px: tuple[float, float] = (0.0, math.inf), min_solidity: float = 0.0,
                     min_roundness: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """3D labels ``(depth, Y, X)`` from linked sections ``objects`` on slices ``zs``: each object completed as a
    body of revolution about z through its widest section (see the module docstring).

    Objects seen on fewer than ``min_sections`` slabs, whose equatorial
    diameter (px) lies outside ``diameter_px`` or whose equatorial section is
    not round (:func:`round_enough`) are dropped. Larger objects are drawn
    first; a voxel already taken stays with its first object. Returns the
    labels ``1..N`` and the id in ``objects`` of each.
    """
    zs = np.asarray(zs, np.float64)
    found = []
    for index, box in enumerate(ndi.find_objects(objects)):
        if box is None:
            continue
        mask = objects[box] == index + 1
        areas = mask.sum(axis=(1, 2)).astype(np.float64)
        seen = np.flatnonzero(areas)
        if len(seen) < min_sections:
            continue
        widest = float(areas.max())
        radius = math.sqrt(widest / math.pi)
        if not diameter_px[0] <= 2 * radius <= diameter_px[1]:
            continue
        wide = seen[areas[seen] >= 0.5 * widest]
        slab_z = zs[box[0]]
        centre = float(np.average(slab_z[wide], weights=areas[wide]))
        equator = mask[int(wide[np.argmin(np.abs(slab_z[wide] - centre))])]
        if not round_enough(equator, min_solidity, min_roundness):
            continue
        found.append((radius, centre, box[1:], equator, index + 1))
    found.sort(key=lambda f: -f[0])
    out = np.zeros((depth, *objects.shape[1:]), np.int32)
    for label, (radius, centre, plane_box, equator, _) in enumerate(found, start=1):
        pad = 1
        padded = np.pad(equator, pad)
        y0, x0 = plane_box[0].start - pad, plane_box[1].start - pad
        for z in range(max(0, math.ceil(centre - radius)), min(depth, math.floor(centre + radius) + 1)):
            factor = math.sqrt(max(0.0, 1 - ((z - centre) / radius) ** 2))
            if factor <= 0:
                continue
            section = _scaled_mask(padded, factor)
            ys, xs = np.nonzero(section)
            ys, xs = ys + y0, xs + x0
            keep = (ys >= 0) & (ys < out.shape[1]) & (xs >= 0) & (xs < out.shape[2])
            ys, xs = ys[keep], xs[keep]
            free = out[z, ys, xs] == 0
            out[z, ys[free], xs[free]] = label
    return out, np.array([f[4] for f in found], np.int64)


def find_vesicles(predictor, volume: np.ndarray, voxel: VoxelSize, settings: VesicleSettings,
                  progress: bool = True) -> VesicleSegmentation:
    """The ``decoder`` method of :func:`biosam.tomogram.pipeline.segment_vesicles` (see the module docstring).

    ``volume`` ``(Z, Y, X)`` in its own geometry and polarity (``settings.polarity``);
    returns a :class:`~biosam.tomogram.vesicles.VesicleSegmentation` on the input's voxels whose scores are
    the decoder's mean foreground probability of each object's section on each slab (NaN between slabs).
    """
    from biosam.automatic.ais import load_decoder

    decoder = load_decoder(settings.decoder, model=predictor.model, kind="vesicles")
    work, grid = working_volume(volume, voxel, settings.polarity)
    depth = work.shape[0]
    nm = WORKING_VOXEL.nm[0]  # the working grid's voxels are cubic
    step = max(1, round(settings.slab_step / nm))
    zs = np.arange((depth // 2) % step, depth, step)
    sections, confidence = slab_instances(predictor, decoder, work, zs, round(settings.slab_thickness / nm),
                                          settings.background_nm, progress)
    objects = link_sections(sections)
    labels, object_ids = complete_objects(
        objects, zs, depth, diameter_px=(settings.min_diameter_nm / nm, settings.max_diameter_nm / nm),
        min_solidity=settings.min_solidity, min_roundness=settings.min_roundness)
    labels, kept = relabel_volume(to_input_grid(labels, grid))
    logger.info("%d slabs, %d sections, %d linked objects, %d vesicles", len(zs), sum(int(s.max(initial=0))
                for s in sections), int(objects.max(initial=0)), len(kept))
    # Scores on the input's slices: each slab's confidence at the input slice nearest its centre.
    z_input = np.clip(np.rint((zs + 0.5) / grid.zoom[0] - 0.5).astype(int), 0, volume.shape[0] - 1)
    row_of = {int(o): r for r, o in enumerate(object_ids[kept - 1])}
    scores = np.full((len(kept), volume.shape[0]), np.nan, np.float32)
    for k in range(len(zs)):
        present = (sections[k] > 0) & (objects[k] > 0)
        for section, obj in set(zip(sections[k][present].tolist(), objects[k][present].tolist())):
            if obj in row_of:
                scores[row_of[obj], z_input[k]] = confidence[k][section - 1]
    # The picture users check: the input's middle slab, dense dark.
    middle = volume.shape[0] // 2
    dark = np.negative(volume, dtype=np.float32) if grid.polarity == "bright" else volume
    slab = slab_image(dark, middle, max(1, round(settings.slab_thickness / voxel.nm[0])),
                      contrast_window(settings.background_nm, voxel))
    return VesicleSegmentation(labels, scores, [middle], np.rint(slab).astype(np.uint8),
                               [int(s.max(initial=0)) for s in sections], grid.polarity)
