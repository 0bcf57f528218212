"""Crop-and-zoom planning for small objects.

A SAM v1 decoder predicts masks at 256x256 for the whole image. A 20 px
nucleus in an 1100 px image covers about 5 px there, so its mask is blocky and
often wrong. Segmenting a crop around the object at the model's resolution
and pasting the mask back restores the detail. Crops are shared: every small
object that fits in an already planned window (with the same amount of
context) is segmented from that window's embedding, so a dense field of nuclei
needs far fewer encoder passes than objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from biosam.errors import InputError
from biosam.settings import check, positive, whole, within
from biosam.prompting.preprocess import LOW_RES

ZOOM_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class ZoomSettings:
    """Tuning of the crop-and-zoom path.

    ``min_size``: under ``auto``, objects whose longest side would span fewer
    pixels than this in the whole image's 256 px decoder output are zoomed.
    ``context``: crop side as a multiple of the object's longest side.
    ``min_crop``: smallest crop side in image pixels (limits upsampling of tiny crops).
    """

    min_size: float = 20.0
    context: float = 5.0
    min_crop: int = 64

    def __post_init__(self) -> None:
        check("zoom settings", [positive("min_size", self.min_size),
                                within("context", self.context, 1.0, float("inf")),
                                whole("min_crop", self.min_crop, 1)])


@dataclass
class Crop:
    """A window ``(x0, y0, x1, y1)`` in image pixels and the objects segmented in it."""

    box: tuple[int, int, int, int]
    objects: list[int] = field(default_factory=list)


def _window(center: np.ndarray, side: float, image_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Square window of ``side`` around ``center``, shifted (and if needed shrunk) to lie inside the image."""
    h, w = image_shape
    sw, sh = min(side, w), min(side, h)
    x0 = float(np.clip(center[0] - sw / 2, 0, w - sw))
    y0 = float(np.clip(center[1] - sh / 2, 0, h - sh))
    return int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x0 + sw)), int(np.ceil(y0 + sh))


def plan_crops(
    extents: np.ndarray,
    image_shape: tuple[int, int],
    zoom: str,
    settings: ZoomSettings | None = None,
) -> tuple[list[Crop], list[int]]:
    """Decide which objects are segmented in a zoomed crop.

    ``extents`` is ``(N, 4)`` boxes ``(x0, y0, x1, y1)`` in image pixels, the
    object's known or estimated extent; rows of NaN mean "size unknown" (point
    prompts only), which ``auto`` never zooms. Returns the crops and the
    indices of the objects to segment on the whole image.
    """
    if zoom not in ZOOM_MODES:
        raise InputError(f"zoom must be one of {ZOOM_MODES}, got '{zoom}'.")
    settings = settings or ZoomSettings()
    extents = np.asarray(extents, dtype=np.float64).reshape(-1, 4)
    n = len(extents)
    if zoom == "off" or n == 0:
        return [], list(range(n))
    h, w = image_shape
    long_image = max(h, w)
    sizes = np.maximum(extents[:, 2] - extents[:, 0], extents[:, 3] - extents[:, 1])
    centers = (extents[:, :2] + extents[:, 2:]) / 2
    sides = np.maximum(sizes * settings.context, settings.min_crop)
    known = np.isfinite(sizes)
    if zoom == "auto":
        wanted = known & (sizes * LOW_RES / long_image < settings.min_size)
    else:
        wanted = known.copy()
    # A crop as large as the image is the whole image: nothing to gain.
    wanted &= sides < long_image

    crops: list[Crop] = []
    whole = [i for i in range(n) if not wanted[i]]
    # The windows planned so far as arrays, so that finding the first one an object fits is one vectorised
    # test per object rather than a Python loop over every window (thousands of boxes, thousands of windows).
    boxes = np.zeros((int(wanted.sum()), 4))
    crop_sides = np.zeros(len(boxes))
    # Largest objects first so each window is sized by the object that needs the most room.
    for i in sorted(np.flatnonzero(wanted), key=lambda k: -sizes[k]):
        m = len(crops)
        margin = (sides[i] - sizes[i]) / 4  # keep at least half the wanted context around the object
        fits = (
            (extents[i, 0] - margin >= boxes[:m, 0])
            & (extents[i, 1] - margin >= boxes[:m, 1])
            & (extents[i, 2] + margin <= boxes[:m, 2])
            & (extents[i, 3] + margin <= boxes[:m, 3])
            & (sides[i] >= crop_sides[:m] / 1.5)
        )
        if fits.any():
            crops[int(np.argmax(fits))].objects.append(int(i))
        else:
            crop = Crop(_window(centers[i], sides[i], image_shape), [int(i)])
            x0, y0, x1, y1 = crop.box
            boxes[m], crop_sides[m] = crop.box, max(x1 - x0, y1 - y0)
            crops.append(crop)
    return crops, whole
