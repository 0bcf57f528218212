"""Intensity normalisation: any 2D image to RGB float32 in [0, 255].

Presets (``intensity=``):

- ``auto``: ``percentile`` for every pixel type, 8-bit included: a dim 8-bit
  image (values 0-40 of 255) and its 16-bit twin reach the model alike.
- ``percentile``: clip to the 1st and 99.8th percentile of the image, scale to
  0-255. Each channel of a multichannel (fluorescence) image gets its own pair;
  RGB keeps one pair for its three channels, so colours keep their balance.
- ``minmax``: the image's minimum to 0, maximum to 255.
- ``none``: values used as they are (clipped to 0-255): for data already on that scale.
- CT windows on Hounsfield units (level / width): ``ct-soft-tissue`` 40/400,
  ``ct-lung`` -600/1500, ``ct-bone`` 400/1800, ``ct-brain`` 40/80.

Channel layout: grayscale is repeated to RGB; RGB is kept; RGBA drops alpha;
an image with 2 or more than 4 channels (or 4 non-``uint8`` channels) becomes
a grayscale composite, the mean of its channels each normalised on its own.
Choose a single channel before calling to segment that channel alone.
"""

from __future__ import annotations

import logging

import numpy as np

from biosam.errors import InputError

PERCENTILES = (1.0, 99.8)
CT_WINDOWS = {"ct-soft-tissue": (40.0, 400.0), "ct-lung": (-600.0, 1500.0), "ct-bone": (400.0, 1800.0), "ct-brain": (40.0, 80.0)}
INTENSITY_PRESETS = ("auto", "percentile", "minmax", "none", *CT_WINDOWS)
_MAX_PERCENTILE_SAMPLES = 4_000_000
# An image plane whose values span no more than this many grey levels (integer pixels), or this fraction of
# their magnitude (any pixels), has no contrast to segment: normalisation would only stretch noise.
BLANK_LEVELS = 2
BLANK_RELATIVE = 1e-3

logger = logging.getLogger(__name__)


def resolve_preset(intensity: str, dtype: np.dtype) -> str:
    """The preset ``auto`` stands for with this pixel type; validates the name."""
    if intensity not in INTENSITY_PRESETS:
        raise InputError(f"unknown intensity preset '{intensity}'; choose one of {', '.join(INTENSITY_PRESETS)}.")
    if intensity == "auto":
        return "none" if np.dtype(dtype) == np.bool_ else "percentile"
    return intensity


def _channels_last(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image[..., None]
    if image.ndim == 3:
        if image.shape[-1] <= 4:
            return image
        if image.shape[0] <= 4:
            return np.moveaxis(image, 0, -1)
        raise InputError(
            f"image of shape {image.shape} looks like a stack of {image.shape[0]} slices, not a 2D image; "
            "select one slice (or channel) first."
        )
    raise InputError(f"expected a 2D image (H, W) or (H, W, C), got an array of shape {image.shape}.")


def _scale(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.float32)
    out = (data.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0, out=out)


def _apply(data: np.ndarray, preset: str) -> np.ndarray:
    if preset == "none":
        return np.clip(data.astype(np.float32), 0.0, 255.0)
    if preset in CT_WINDOWS:
        level, width = CT_WINDOWS[preset]
        return _scale(data, level - width / 2, level + width / 2)
    flat = data.reshape(-1)
    if preset == "percentile":
        step = max(1, flat.size // _MAX_PERCENTILE_SAMPLES)  # percentiles of a sample are plenty
        lo, hi = np.percentile(flat[::step], PERCENTILES)
        if hi > lo:
            return _scale(data, lo, hi)
    return _scale(data, float(flat.min()), float(flat.max()))


def normalize_intensity(image: np.ndarray, intensity: str = "auto") -> np.ndarray:
    """Map a 2D image of any dtype and channel layout to RGB float32 in [0, 255].

    See the module docstring for the presets and channel rules. Raises
    :class:`InputError` for NaN/inf values, unsupported dtypes or shapes.
    """
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InputError(f"unsupported pixel type {image.dtype}; expected integer or floating-point pixels.")
    preset = resolve_preset(intensity, image.dtype)
    image = _channels_last(image)
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InputError(f"image of shape {image.shape[:2]} is too small to segment.")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise InputError("image contains NaN or infinite values; replace them (e.g. with 0) before segmenting.")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(_apply(image, preset), 3, axis=-1)
    if channels == 3 or (channels == 4 and image.dtype == np.uint8):
        return _apply(image[..., :3], preset)
    composite = np.mean([_apply(image[..., c], preset) for c in range(channels)], axis=0)
    return np.repeat(composite[..., None], 3, axis=-1).astype(np.float32)


def volume_normalizer(volume, intensity: str = "auto", samples: int = 16):
    """A function mapping each grayscale slice of ``volume`` to [0, 255] float32 with one window for all slices.

    Per-slice percentiles would make the same structure brighter or darker from
    slice to slice, which confuses propagation; the window is computed once from
    up to ``samples`` evenly spaced slices (``volume`` may be a lazy array
    indexed by its first axis). Multichannel slices fall back to per-slice
    :func:`normalize_intensity`.
    """
    preset = resolve_preset(intensity, np.dtype(volume.dtype))
    if len(volume.shape) != 3 or preset not in ("percentile", "minmax"):
        return lambda plane: normalize_intensity(plane, preset)
    picks = np.unique(np.linspace(0, volume.shape[0] - 1, min(samples, volume.shape[0])).round().astype(int))
    sample = np.concatenate([np.asarray(volume[int(z)], dtype=np.float32).reshape(-1) for z in picks])
    if not np.isfinite(sample).all():
        raise InputError("volume contains NaN or infinite values; replace them (e.g. with 0) before segmenting.")
    step = max(1, sample.size // _MAX_PERCENTILE_SAMPLES)
    lo, hi = np.percentile(sample[::step], PERCENTILES) if preset == "percentile" else (sample.min(), sample.max())
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    return lambda plane: _scale(np.asarray(plane), float(lo), float(hi))


def check_contrast(image: np.ndarray, what: str) -> str | None:
    """Warn (log, and return the message) when the image plane ``what`` is blank: constant or nearly so.

    The model still returns confident objects on such a plane (the input is
    stretched to full range before the encoder), so they must not be trusted.
    Nearly constant: all values within :data:`BLANK_LEVELS` grey levels for
    integer pixels, or within :data:`BLANK_RELATIVE` of their magnitude. The
    whole range is used, not percentiles: a few small objects on an empty
    background are real content. Used by ``biosam segment``, ``auto`` and
    ``volume`` on every plane they segment (whole planes, never tiles).
    """
    data = np.asarray(image)
    if data.size == 0 or data.dtype == bool:
        return None
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        return None  # refused with its own message by normalize_intensity
    lo, hi = float(data.min()), float(data.max())
    tolerance = max(BLANK_LEVELS if np.issubdtype(data.dtype, np.integer) else 0.0,
                    BLANK_RELATIVE * max(abs(lo), abs(hi)))
    if hi - lo > tolerance:
        return None
    values = f"every pixel is {lo:g}" if hi == lo else f"all pixels lie in {lo:g}-{hi:g}"
    message = (f"{what}: the image has no contrast ({values}), so any object found in it is unreliable; "
               "check the file, --channel, --t or --z.")
    logger.warning(message)
    return message
