"""Membrane-bound vesicles in a cryo-electron tomogram, found automatically and followed in 3D.

:func:`segment_vesicles` runs the steps, each in its own module:

1. :mod:`~biosam.tomogram.slabs`: a copy of the tomogram smoothed along z
   (single slices are very noisy) and normalised slice by slice for local
   contrast (:func:`~biosam.tomogram.slabs.prepare_volume`); SAM sees this
   volume, membranes made bright, during propagation. A slab image
   (:func:`~biosam.tomogram.slabs.slab_image`) is the mean of
   ``slab_thickness`` slices around a depth, normalised the same way;
   vesicles crossing that depth appear as dark rings (the bilayer) around a
   lumen.
2. :mod:`~biosam.tomogram.candidates`: vesicle cross-sections on the slab
   (:func:`~biosam.tomogram.candidates.find_candidates`), SAM masks that pass
   the score, membrane (:mod:`~biosam.tomogram.membrane`), diameter and shape
   filters.
3. :func:`biosam.volume.segment_volume` carries each candidate from the slab's
   centre slice through z; :mod:`~biosam.tomogram.objects` snaps every 2D mask
   to its membrane and trims each object's ends
   (:func:`~biosam.tomogram.objects.snap_slices`,
   :func:`~biosam.tomogram.objects.trim_objects`).
4. :func:`~biosam.tomogram.objects.finish_labels`: objects snapped to their
   membrane in 3D, clipped to the ball of their equatorial radius, split into
   connected 3D components, fragments dropped, relabelled ``1..N``.

With several slabs (``n_slabs``), slabs are processed from the middle outwards
and a candidate is dropped when an object found from an earlier slab already
covers it, so each vesicle is propagated once. Slice embeddings are cached
between slabs, so extra slabs cost mostly mask decoding. The ``decoder``
method (the default) is :func:`biosam.tomogram.detect.find_vesicles` instead.

Lengths are in nm, voxel sizes in Å (as in MRC headers, see
:class:`~biosam.io.voxel_size.VoxelSize`), images ``(Z, Y, X)`` with dense
material dark, as tomograms are.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from biosam.errors import InputError
from biosam.io.voxel_size import VoxelSize
from biosam.prompting.predictor import Predictor
from biosam.prompting.prompts import Prompt, mask_box
from biosam.tomogram.candidates import find_candidates, sam_view
from biosam.tomogram.detect import find_vesicles
from biosam.tomogram.grid import resolve_polarity
from biosam.tomogram.objects import finish_labels, snap_slices, trim_objects
from biosam.tomogram.slabs import check_volume, contrast_window, prepare_volume, slab_centres, slab_image
from biosam.tomogram.vesicles import CANDIDATE_METHODS, VesicleSegmentation, VesicleSettings
from biosam.volume import segment_volume

logger = logging.getLogger(__name__)

# CANDIDATE_METHODS and the settings and result types are re-exported: callers know them from here.
__all__ = ["CANDIDATE_METHODS", "VesicleSegmentation", "VesicleSettings", "segment_vesicles"]


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
    voxel_size: VoxelSize | float | tuple[float, float, float],
    settings: VesicleSettings | None = None,
    *,
    classifier=None,
    keep: Sequence[str] | None = None,
    progress: bool = True,
) -> VesicleSegmentation:
    """Find membrane-bound vesicles in a tomogram and segment each in 3D.

    ``volume`` is ``(Z, Y, X)`` with dense material dark (cryo-ET contrast);
    ``voxel_size`` a :class:`~biosam.io.voxel_size.VoxelSize`, or one number
    or ``(z, y, x)`` in Å. See the module docstring for the steps and
    :class:`~biosam.tomogram.vesicles.VesicleSettings` for the parameters. With a
    :class:`~biosam.classify.Classifier` trained on tomogram candidates, only
    the slab candidates it puts in a class of ``keep`` (default: any but
    background) are followed through z.
    """
    settings = settings or VesicleSettings()
    volume = check_volume(volume)
    voxel = VoxelSize.of(voxel_size)
    if settings.method == "decoder":
        if classifier is not None:
            raise InputError("the mask classifier sorts lumen, hough or amg candidates; choose one of those methods "
                             "with a classifier.")
        return find_vesicles(predictor, volume, voxel, settings, progress=progress)
    polarity, _ = resolve_polarity(volume, settings.polarity)
    if polarity == "bright":
        volume = np.negative(volume, dtype=np.float32)
    if classifier is not None:
        classifier.check(predictor.model, "tomogram")
        classifier.keep_ids(keep)
    spacing_nm, pixel_nm = voxel.nm, voxel.pixel_nm
    window = contrast_window(settings.background_nm, voxel)
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
            prompts = [Prompt(box=mask_box(m), z=zs) for m in candidates.masks]
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
