"""Automatic segmentation of a 2D image or of a volume's slices one after another, with ids unique across slices.

What ``biosam auto``, the napari widget and batch runs share: the object size
is estimated on the first slice and used for every later one, a mask
classifier (optional) removes unwanted objects, and objects of neighbouring
slices that overlap become one 3D object (:class:`~biosam.volume.SliceLinker`)
or keep separate ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from biosam.automatic.run import AutoSettings, amg_settings_for, resolve_decoder, segment_automatic, to_uint8
from biosam.prompting.intensity import check_contrast


@dataclass
class PlaneResult:
    """One slice's outcome: ``labels`` (int64, ids unique across slices), the ``objects`` that start on it,
    the ``scale`` and estimated ``object_size`` used, objects ``rejected`` by the classifier, a contrast
    ``warning`` (or None)."""

    z: int | None
    labels: np.ndarray
    objects: int
    scale: float | None
    object_size: float | None
    rejected: int = 0
    warning: str | None = None


class PlaneSegmenter:
    """Segments planes of one image in order (call :meth:`add` per slice).

    ``settings`` is copied: the scale estimated on the first slice is kept for
    the others without changing the caller's. ``amg_overrides`` change the
    model's automatic-mask-generation defaults; a decoder path (ais) is loaded
    once here, not once per slice. ``link_iou`` > 0 links the slices of a
    volume into 3D objects. ``judge`` is a loaded mask classifier that keeps
    only the classes ``keep`` (None: all but background).
    """

    def __init__(self, predictor, settings: AutoSettings, *, volume: bool, amg_overrides: dict | None = None,
                 link_iou: float = 0.3, judge=None, keep: list[str] | None = None) -> None:
        from biosam.volume import SliceLinker

        self.predictor = predictor
        self.settings = dataclasses.replace(settings)
        self.settings.amg = amg_settings_for(predictor.model, **(amg_overrides or {}))
        if self.settings.mode == "ais":  # a decoder that does not fit the model is refused before any work
            self.settings.decoder = resolve_decoder(predictor, self.settings.decoder)
        self.judge, self.keep = judge, keep
        self.linker = SliceLinker(link_iou) if volume and link_iou > 0 else None
        self.offset = 0
        self.estimated: float | None = None

    def add(self, plane: np.ndarray, z: int | None = None, name: str = "image") -> PlaneResult:
        """Segment one plane (2D, gray or RGB) and give it ids that continue the earlier planes'."""
        settings = self.settings
        warning = check_contrast(plane, name if z is None else f"{name} (slice z={z})")
        sizing: dict = {}
        labels = segment_automatic(self.predictor, plane, settings, progress=True, info=sizing)
        if sizing.get("object_size") and settings.scale is None and settings.object_size is None:
            settings.scale, self.estimated = sizing["scale"], sizing["object_size"]  # one scale for every slice
        rejected = 0
        if self.judge is not None:
            from skimage.segmentation import relabel_sequential

            from biosam.classify import classify_labels

            found = int(labels.max())
            labels, kept = classify_labels(self.judge, self.predictor.model, to_uint8(plane, settings.intensity),
                                           labels, self.keep)
            labels = relabel_sequential(labels)[0]
            rejected = found - len(kept)
        if self.linker is not None:
            before = self.linker.count
            labels = self.linker.add(labels)
            count = self.linker.count - before  # objects that start on this slice
        else:
            count = int(labels.max())
            labels = np.where(labels > 0, labels.astype(np.int64) + self.offset, 0)
            self.offset += count
        return PlaneResult(z, labels, count, sizing.get("scale"), sizing.get("object_size", self.estimated),
                           rejected, warning)
