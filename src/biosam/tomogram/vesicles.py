"""What vesicle finding takes and gives: :class:`VesicleSettings` and :class:`VesicleSegmentation`.

Lengths are in nm, images ``(Z, Y, X)`` with dense material dark, as tomograms are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from biosam.settings import check, choice, positive, rule, whole, within
from biosam.tomogram.grid import POLARITY_CHOICES
from biosam.volume import PropagationSettings

__all__ = ["CANDIDATE_METHODS", "VesicleSegmentation", "VesicleSettings"]

CANDIDATE_METHODS = ("decoder", "lumen", "hough", "amg")


@dataclass(frozen=True)
class VesicleSettings:
    """Parameters of :func:`~biosam.tomogram.pipeline.segment_vesicles`.

    Lengths are in nm unless the name says slices or pixels.

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
    ``contrast_drop``: see :func:`~biosam.tomogram.objects.trim_objects`.

    Finish: ``membrane_nm`` is the bilayer's thickness (objects are grown to
    its outer edge); ``sphere``: clip objects to the ball of their equatorial
    radius (see :func:`~biosam.tomogram.objects.clip_to_sphere`); ``background_nm``: the window of
    the local contrast normalisation.
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
        default_factory=lambda: PropagationSettings(projection="box", box_margin=0.15, min_overlap=0.5,
                                                    max_shift=float("inf")))

    def __post_init__(self) -> None:
        several, _ = whole("n_slabs", self.n_slabs, 2)
        check("vesicle settings", [
            choice("method", self.method, CANDIDATE_METHODS),
            choice("polarity", self.polarity, POLARITY_CHOICES),
            whole("slab_thickness", self.slab_thickness, 1),
            whole("n_slabs", self.n_slabs, 1),
            rule(self.z is None or not several, "give either a depth z or several slabs (n_slabs > 1), not both"),
            rule(self.method != "decoder" or (self.z is None and not several),
                 "the decoder method reads slabs through the whole tomogram; a depth z or several slabs "
                 "(n_slabs > 1) apply to the lumen, hough and amg methods"),
            positive("min_diameter_nm", self.min_diameter_nm),
            rule(self.min_diameter_nm < self.max_diameter_nm,
                 f"need min_diameter_nm < max_diameter_nm, got {self.min_diameter_nm} and {self.max_diameter_nm}"),
            *(within(name, getattr(self, name), 0.0, 1.0)
              for name in ("min_score", "min_solidity", "min_roundness", "score_drop", "contrast_drop")),
            *(within(name, getattr(self, name), 0.0, math.inf) for name in ("z_smoothing", "membrane_nm")),
            whole("z_step", self.z_step, 1),
            whole("slab_step", self.slab_step, 1),
            positive("background_nm", self.background_nm),
            whole("max_candidates", self.max_candidates, 1),
        ])


@dataclass
class VesicleSegmentation:
    """Result of :func:`~biosam.tomogram.pipeline.segment_vesicles` for a ``(Z, Y, X)`` tomogram.

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
