"""SAM 2 volumes: objects followed through slices with the model's memory of earlier slices.

The slices play the role of video frames. Each prompted slice conditions the
object (an object may be prompted on several slices), propagation runs forward
from the first prompted slice and backward from the last, and the tracker keeps only the memories SAM 2 can still attend
to, so memory stays flat however many slices there are. An object ends where
the model's object score says it is gone (probability below ``min_score``) or
where it runs into an object nearer its own prompted slice; never between two
prompted slices of the same object.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from biosam.models.sam2.tracker import Sam2Tracker
from biosam.prompting.predictor import Predictor
from biosam.prompting.preprocess import Frame
from biosam.prompting.prompts import Prompt
from biosam.volume.ownership import PromptedSlices, claim, write_slice

logger = logging.getLogger(__name__)

__all__ = ["track_objects"]


def track_objects(predictor: Predictor, volume, objects: list[list[Prompt]], settings, normalize, labels, scores,
                  ends, progress: bool) -> None:
    """Fill ``labels`` (Z, Y, X), ``scores`` (n, Z; object probability) and ``ends`` (n, 2; why each object
    stopped down and up) for SAM 2 objects, each a list of prompts on its slices (see segment_volume)."""
    model = predictor.model
    depth, height, width = labels.shape
    frame = Frame.create((height, width), model.image_size, "sam2")

    def features(z: int) -> torch.Tensor:
        # through the predictor, so an embedding store is used and filled
        predictor.set_image(normalize(volume[z]), intensity="none")
        return predictor.embedding

    tracker = Sam2Tracker(model)
    state = tracker.init_state(features, num_frames=depth)
    for i, obj in enumerate(objects):
        for p in obj:
            box = None if p.box is None else frame.to_model(p.box)
            points = None if p.points is None else frame.to_model(p.points)
            if p.mask is not None:
                logger.warning("object %d: mask prompts are not used for volumes; its box/points are", i)
            tracker.add_prompt(state, int(p.z), i, points=points, labels=p.point_labels, box=box)
    slices = PromptedSlices(objects)
    first, last = min(int(zs.min()) for zs in slices.z), max(int(zs.max()) for zs in slices.z)
    for reverse in (False, True):
        # the forward pass owns each object's first prompted slice and what follows it, the backward pass what precedes
        owns = (lambda i, z: z >= slices.z[i][0]) if not reverse else (lambda i, z: z < slices.z[i][0])
        passes = tracker.propagate(state, start_frame=last if reverse else first, reverse=reverse)
        for step in tqdm(passes, total=(last + 1) if reverse else depth - first, desc="backward" if reverse else "forward",
                         disable=not progress, leave=False):
            z = step.frame_index
            logits = F.interpolate(step.low_res_logits.float(), size=(height, width), mode="bilinear",
                                   align_corners=False)
            masks = (logits[:, 0] > 0).cpu().numpy()
            probability = torch.sigmoid(step.object_score_logits[:, 0].float()).cpu().numpy()
            mine = [k for k, i in enumerate(step.object_ids) if owns(i, z)]
            drawn = {}
            present = [step.object_ids[k] for k in mine]
            near = [slices.distance(i, z) for i in present]
            for j, own in claim(present, [masks[k] for k in mine], [probability[k] for k in mine], near):
                i, k = present[j], mine[j]
                # never ends on or between its prompted slices
                kept = z in slices.z[i] or slices.between(i, z)
                ended = None
                if probability[k] < settings.min_score:
                    ended = f"object score {probability[k]:.2f} < {settings.min_score}"
                elif own.sum() < settings.min_area:
                    ended = f"area {int(own.sum())} px < {settings.min_area}"
                elif own.sum() < settings.min_own * masks[k].sum():
                    ended = "ran into another object"  # an object nearer its own prompted slice
                if ended and not kept:
                    logger.debug("object %d ends before slice %d: %s", i, z, ended)
                    ends[i, int(not reverse)] = f"slice {z}: {ended}"
                    state.stop_object(i)
                    continue
                if own.any():
                    drawn[i] = own
                    scores[i, z] = probability[k]
            write_slice(labels, z, drawn)
