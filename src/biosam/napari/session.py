"""The annotation core behind the napari annotator, free of Qt: image, prompts, current and committed objects.

One object is annotated at a time: its prompts (one box and any number of
positive/negative points) are segmented on the current slice, or followed
through all slices of a volume, and committed into the label image with the
next free id. Prompts followed through a volume are remembered per slice until
the object is committed or cleared, so a second prompt on another slice corrects
the propagation (one object prompted on several slices, see
:func:`biosam.volume.segment_volume`). Coordinates are biosam's: pixel ``i`` spans ``[i, i + 1)``, boxes
``(x0, y0, x1, y1)``, points ``(x, y)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from biosam.errors import InputError
from biosam.prompting import Predictor, Prompt
from biosam.prompting.intensity import volume_normalizer
from biosam.volume import PropagationSettings, segment_volume

logger = logging.getLogger(__name__)


@dataclass
class _Commit:
    """What :meth:`AnnotationSession.undo` needs to take a commit back: its id and the flat pixels it wrote."""

    label: int
    pixels: np.ndarray


class AnnotationSession:
    """Interactive segmentation of one image (2D, ``(Z, Y, X)`` volume, either with ``rgb`` channels last).

    ``predictor`` holds the model (and its embedding store); ``zoom`` is its small-object
    zoom (``auto``, ``on``, ``off``); ``propagation`` tunes :meth:`segment_volume`. ``labels``:
    an existing (contiguous NumPy) label array to commit into, e.g. earlier work; default empty.
    """

    def __init__(self, predictor: Predictor, image, *, rgb: bool = False, intensity: str = "auto",
                 zoom: str = "auto", propagation: PropagationSettings | None = None,
                 labels: np.ndarray | None = None) -> None:
        shape = tuple(image.shape)
        spatial = shape[:-1] if rgb else shape
        if rgb and shape[-1] not in (3, 4):
            raise InputError(f"an RGB image needs 3 or 4 channels last, this one has shape {shape}.")
        if len(spatial) not in (2, 3):
            raise InputError(f"the annotator works on 2D images and (Z, Y, X) volumes; this image has shape {shape}. "
                             "Split time series or extra channels into separate layers first.")
        self.predictor = predictor
        self.image = image
        self.is_volume = len(spatial) == 3
        self.shape: tuple[int, ...] = spatial
        self.zoom = zoom
        self.intensity = intensity
        self.propagation = replace(propagation or PropagationSettings(), zoom=zoom)
        # a volume is normalised with one window for all slices, exactly as segment_volume does, so that a
        # slice segmented here and the same slice in a propagation see the same pixels
        self._normalize = volume_normalizer(image, intensity) if self.is_volume else None
        if labels is not None and tuple(labels.shape) != spatial:
            raise InputError(f"labels of shape {tuple(labels.shape)} do not fit an image of shape {spatial}.")
        # committed objects go straight into the caller's array (the napari layer's data), kept contiguous
        self.labels = np.zeros(spatial, dtype=np.uint32) if labels is None else labels
        self.current = np.zeros(spatial, dtype=np.uint8)
        self.z = spatial[0] // 2 if self.is_volume else 0
        self.box: np.ndarray | None = None
        self.points = np.zeros((0, 2))
        self.point_labels = np.zeros(0, dtype=np.int64)
        self.warnings: list[str] = []
        # after a propagation: the slices the object spans and why it stopped where it did
        self.reach = ""
        self._embedded_z: int | None = None
        self._history: list[_Commit] = []
        # the current object's prompts followed through the volume, by slice
        self.volume_prompts: dict[int, Prompt] = {}

    # -- image and embedding -------------------------------------------------------------------

    def set_slice(self, z: int | None) -> None:
        """Make slice ``z`` of a volume the current one (its embedding is computed on demand); 2D images
        have one plane, and ignore it."""
        if not self.is_volume or z is None:
            return
        if not 0 <= z < self.shape[0]:
            raise InputError(f"slice {z} is outside the volume (z = 0..{self.shape[0] - 1}).")
        self.z = int(z)

    @property
    def embedded(self) -> bool:
        """Whether the predictor holds the current slice's (or image's) embedding."""
        return self._embedded_z == self.z

    def plane(self, z: int) -> np.ndarray:
        """Slice ``z`` of a volume as the model sees it: the volume's intensity window, [0, 255] float32."""
        if not self.is_volume:
            raise InputError("plane() is for volumes; a 2D image has no slices.")
        return self._normalize(np.asarray(self.image[z]))

    def embed(self) -> None:
        """Compute (or fetch from the store) the current slice's embedding: the slow step, fit for a worker."""
        if self.embedded:
            return
        if self.is_volume:
            self.predictor.set_image(self.plane(self.z), intensity="none")
        else:
            self.predictor.set_image(np.asarray(self.image), intensity=self.intensity)
        self._embedded_z = self.z

    # -- prompts and segmentation -----------------------------------------------------------------

    def set_prompts(self, box=None, points=None, point_labels=None) -> None:
        """The current object's prompts: a box ``(x0, y0, x1, y1)``, points ``(K, 2)`` with labels 1/0."""
        self.box = None if box is None else np.asarray(box, dtype=np.float64).reshape(4)
        self.points = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = np.ones(len(self.points)) if point_labels is None else point_labels
        self.point_labels = np.asarray(labels, dtype=np.int64).reshape(-1)

    def _prompt(self) -> Prompt:
        if self.box is None and not len(self.points):
            raise InputError("no prompt for the object: draw a box in the 'prompts' layer or add points to "
                             "'point_prompts', then segment.")
        points = self.points if len(self.points) else None
        labels = self.point_labels if len(self.points) else None
        return Prompt(box=self.box, points=points, point_labels=labels, z=self.z if self.is_volume else None)

    def segment(self) -> np.ndarray:
        """Segment the current object on the current slice; returns (and keeps in :attr:`current`) its mask."""
        prompt = self._prompt()
        self.embed()
        self.warnings = self.predictor.prompt_warnings([prompt])
        result = self.predictor.predict(box=prompt.box, points=prompt.points, point_labels=prompt.point_labels,
                                        zoom=self.zoom)
        mask = result.masks[0]
        self.reach = ""
        if not mask.any():
            self.warnings.append("the object came back empty: check that the box frames it.")
        plane = self.current[self.z] if self.is_volume else self.current
        self.current[...] = 0  # one object at a time: a new segmentation replaces the whole previous one
        plane[...] = mask
        return mask

    def segment_volume(self) -> np.ndarray:
        """Follow the current object through the volume from its prompt on this slice and from the prompts it
        was followed from on other slices (:attr:`volume_prompts`); returns :attr:`current`."""
        if not self.is_volume:
            raise InputError("segmenting through all slices needs a volume (Z, Y, X); this image is 2D.")
        self.volume_prompts[self.z] = self._prompt()
        prompts = [replace(p, object=0) for _, p in sorted(self.volume_prompts.items())]
        self.warnings = self.predictor.prompt_warnings(prompts)
        result = segment_volume(self.predictor, self.image, prompts, self.propagation, intensity=self.intensity,
                                progress=False)
        self._embedded_z = None  # the predictor now holds some other slice
        self.current[...] = result.labels > 0
        first, last = (int(z) for z in result.z_range[0])
        stops = " and ".join(why for why in result.ends[0] if why)
        self.reach = f"slices {first}-{last}" + (f", stopped at {stops}" if stops else "") if first >= 0 else ""
        if not self.current.any():
            self.warnings.append("the object came back empty on its prompted slice: check that the box frames it.")
        return self.current

    # -- committing ---------------------------------------------------------------------------------

    def next_id(self) -> int:
        """The next free label: one above the largest in :attr:`labels` (which the user may have painted)."""
        return int(self.labels.max()) + 1 if self.labels.size else 1

    def commit(self) -> int:
        """Write the current object into :attr:`labels` with the next free id; returns the id (0 if empty).

        Committed objects keep their pixels: the new one fills only unlabelled pixels.
        """
        free = (self.current > 0) & (self.labels == 0)
        if not free.any():
            return 0
        label = self.next_id()
        pixels = np.flatnonzero(free)
        self.labels.reshape(-1)[pixels] = label
        self._history.append(_Commit(label, pixels))
        self.clear()
        return label

    def clear(self) -> None:
        """Forget the current object's prompts (on every slice) and mask."""
        self.set_prompts()
        self.volume_prompts = {}
        self.current[...] = 0
        self.warnings = []
        self.reach = ""

    def undo(self) -> int | None:
        """Take the last commit back; returns its id, or None when nothing is left to undo."""
        if not self._history:
            return None
        last = self._history.pop()
        flat = self.labels.reshape(-1)
        still = last.pixels[flat[last.pixels] == last.label]  # pixels painted over since are the user's
        flat[still] = 0
        return last.label
