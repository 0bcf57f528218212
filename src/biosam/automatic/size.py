"""The typical object diameter of an image, estimated with the instance decoder itself.

A decoder segments best at the object size it was trained at (``object_size``
in its record). The image's own size is found by looking at it coarse to fine:
one window of the image, where its contrast is highest, is segmented at each of
:data:`PROBE_SCALES`, smallest first; at every scale the foreground's distance
transform gives the objects' width (its peaks are the objects' radii). The first
scale at which objects are resolved (at least half the decoder's size across)
is used, and the median diameter of the objects found there, in original
pixels, is the estimate. Coarse first, because at larger scales a decoder that
has not seen such objects segments their texture into pieces of its own size,
which a "closest to the decoder's size" rule would take for the objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max

from biosam.automatic.instances import PostProcessing, maps_to_instances
from biosam.automatic.labels import object_diameters
from biosam.automatic.resample import resize_image, scaled_shape

logger = logging.getLogger(__name__)

#: Resize factors tried, from objects 4x too big for the decoder to 4x too small.
PROBE_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
MIN_OBJECTS = 3
#: Objects count as resolved at a scale once they are this fraction of the decoder's size across.
RESOLVED = 0.5


@dataclass(frozen=True)
class SizeEstimate:
    """``diameter``: typical object diameter in image pixels (None when no objects were seen); ``scale``:
    the probe scale it was measured at; ``objects``: how many objects it rests on."""

    diameter: float | None
    scale: float | None
    objects: int


def probe_window(pixels: np.ndarray, side: int) -> tuple[slice, slice]:
    """A ``side`` x ``side`` window (clipped to the image) centred where the local contrast is highest."""
    step = max(1, min(pixels.shape[:2]) // 256)  # a coarse look is enough to place a window
    small = pixels[::step, ::step].astype(np.float32)
    if small.ndim == 3:
        small = small.mean(axis=-1)
    width = max(3, side // (2 * step))
    mean = ndimage.uniform_filter(small, width)
    variance = ndimage.uniform_filter(small * small, width) - mean * mean
    cy, cx = np.unravel_index(np.argmax(variance), variance.shape)
    out = []
    for centre, length in zip((cy * step, cx * step), pixels.shape[:2]):
        start = int(np.clip(centre - side // 2, 0, max(0, length - side)))
        out.append(slice(start, min(length, start + side)))
    return tuple(out)


def _width(foreground: np.ndarray) -> float | None:
    """Twice the median radius of the foreground's objects (peaks of its distance transform)."""
    distance = ndimage.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=2, threshold_abs=1.0, exclude_border=False)
    return 2.0 * float(np.median(distance[tuple(peaks.T)])) if len(peaks) >= MIN_OBJECTS else None


def estimate_object_size(predict, pixels: np.ndarray, tile: int, preferred: float,
                         params: PostProcessing | None = None, scales=PROBE_SCALES) -> SizeEstimate:
    """Estimate the typical object diameter (pixels) of ``pixels`` (a normalised 8-bit image).

    ``predict`` maps an image of at most ``tile`` x ``tile`` pixels to decoder
    maps ``(3, h, w)``; ``preferred`` is the diameter the decoder segments best.
    """
    params = params or PostProcessing()
    for scale in sorted(scales):
        window = probe_window(pixels, int(np.ceil(tile / scale)))
        crop = pixels[window]
        crop = resize_image(crop, scaled_shape(crop.shape, scale))
        if min(crop.shape[:2]) < 8:
            continue
        maps = predict(crop)
        width = _width(ndimage.gaussian_filter(maps[0], params.smoothing) > params.foreground_threshold)
        logger.debug("size probe at scale %g: width %s px", scale, width)
        if width is None or width < RESOLVED * preferred:
            continue
        diameters = object_diameters(maps_to_instances(maps, params), skip_border=True)
        if len(diameters) >= MIN_OBJECTS:
            return SizeEstimate(round(float(np.median(diameters)) / scale, 1), scale, len(diameters))
        return SizeEstimate(round(width / scale, 1), scale, len(diameters))
    return SizeEstimate(None, None, 0)
