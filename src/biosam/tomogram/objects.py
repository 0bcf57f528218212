"""Vesicles as 3D objects: each 2D mask snapped to its membrane, ends trimmed, objects finished and relabelled.

SAM outlines the lumen on some slices and the whole vesicle on others:
:func:`snap_slices` grows every 2D mask to the outer edge of its membrane and
:func:`trim_objects` cuts each object's ends where its predicted IoU falls
off, its membrane fades (the missing wedge hides the poles) or it grows again
into a neighbour. :func:`finish_labels` snaps objects to their membrane in 3D
(:func:`snap_to_membrane`), clips them to the ball of their equatorial radius
(:func:`clip_to_sphere`: the missing wedge stretches them along z), splits
them into connected 3D components, drops fragments and relabels them ``1..N``
(:func:`relabel_volume`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from biosam.labels import label_dtype
from biosam.tomogram.membrane import edge_profile, membrane_fit

__all__ = ["clip_to_sphere", "finish_labels", "relabel_volume", "snap_slices", "snap_to_membrane", "trim_objects"]


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
    :func:`~biosam.tomogram.membrane.membrane_contrast`), NaN where an object is absent. A slice is good
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
    :func:`~biosam.tomogram.membrane.membrane_contrast`, at most two membrane widths, into background
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
            table[k, z], growth = membrane_fit(distances, means, width)
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
    the membrane (see :func:`~biosam.tomogram.membrane.edge_profile`); the object grows by the distance
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
        _, grow = membrane_fit(distances, means, membrane_nm)
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
