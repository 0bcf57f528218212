"""Turning user images into model inputs, and model outputs back into image pixels.

Two steps, kept apart so that a crop of an image is preprocessed exactly like
the whole image:

1. :func:`normalize_intensity` maps any 2D image (grayscale, RGB, multichannel;
   any dtype) to an RGB float array in [0, 255]. ``uint8`` data is used as is.
   Other dtypes are clipped to their 1st and 99.8th percentile and scaled to
   [0, 255] (one pair of percentiles for all channels, so colours keep their
   balance). An image with 2 or more than 4 channels (or 4 non-uint8 channels)
   becomes a grayscale composite: the mean of its channels, each scaled by its
   own percentiles. ``bool`` images map to 0 and 255.
2. :func:`model_input` applies the preprocessing each model family was trained
   with (see ``MODEL_ZOO.md``):

   - ``sam`` (Meta SAM, micro-sam, MobileSAM): resize the longest side to the
     model size, subtract the ImageNet pixel mean and divide by the std (0-255
     scale), pad bottom/right with zeros.
   - ``medsam``: square resize to the model size (aspect ratio not kept),
     min-max to [0, 1].
   - ``lite_medsam``: resize the longest side to the model size, min-max to
     [0, 1], pad bottom/right with zeros.

Resampling uses torch's antialiased bilinear (bicubic for MedSAM) interpolation
in place of the authors' PIL/OpenCV/scikit-image calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from biosam.errors import InputError

PREPROCESSINGS = ("sam", "medsam", "lite_medsam")
_SAM_MEAN = (123.675, 116.28, 103.53)
_SAM_STD = (58.395, 57.12, 57.375)
PERCENTILES = (1.0, 99.8)
LOW_RES = 256  # side of the mask decoder's logits for every SAM v1 model
_MAX_PERCENTILE_SAMPLES = 4_000_000


@dataclass(frozen=True)
class Frame:
    """Geometry linking original image pixels to a model's square input.

    ``resized`` is the (height, width) the image occupies inside the
    ``input_size`` square before padding.
    """

    image_shape: tuple[int, int]
    input_size: int
    resized: tuple[int, int]

    @classmethod
    def create(cls, image_shape: tuple[int, int], input_size: int, preprocessing: str) -> Frame:
        h, w = image_shape
        if preprocessing == "medsam":
            return cls((h, w), input_size, (input_size, input_size))
        scale = input_size / max(h, w)
        # Same rounding as the reference ResizeLongestSide transform.
        return cls((h, w), input_size, (int(h * scale + 0.5), int(w * scale + 0.5)))

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Factors from original (x, y) pixels to model-input pixels."""
        return self.resized[1] / self.image_shape[1], self.resized[0] / self.image_shape[0]

    def to_model(self, coords: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` (x, y) points, or ``(..., 4)`` boxes, into the model frame."""
        coords = np.asarray(coords, dtype=np.float64)
        sx, sy = self.scale_xy
        factors = np.array([sx, sy] * (coords.shape[-1] // 2))
        return coords * factors


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


def _percentile_scale(data: np.ndarray) -> np.ndarray:
    flat = data.reshape(-1)
    step = max(1, flat.size // _MAX_PERCENTILE_SAMPLES)  # percentiles of a sample are plenty
    lo, hi = np.percentile(flat[::step], PERCENTILES)
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.float32)
    out = (data.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0, out=out)


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Map a 2D image of any dtype and channel layout to RGB float32 in [0, 255].

    See the module docstring for the rules. Raises :class:`InputError` for
    NaN/inf values, unsupported dtypes or shapes.
    """
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InputError(f"unsupported pixel type {image.dtype}; expected integer or floating-point pixels.")
    image = _channels_last(image)
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InputError(f"image of shape {image.shape[:2]} is too small to segment.")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise InputError("image contains NaN or infinite values; replace them (e.g. with 0) before segmenting.")
    channels = image.shape[-1]
    is_uint8 = image.dtype == np.uint8
    if channels == 1:
        rgb = image.astype(np.float32) if is_uint8 else _percentile_scale(image)
        return np.repeat(rgb, 3, axis=-1)
    if channels == 3 or (channels == 4 and is_uint8):
        rgb = image[..., :3]
        return rgb.astype(np.float32) if is_uint8 else _percentile_scale(rgb)
    composite = np.mean([_percentile_scale(image[..., c]) for c in range(channels)], axis=0)
    return np.repeat(composite[..., None], 3, axis=-1).astype(np.float32)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(), x.amax()
    return (x - lo) / torch.clamp(hi - lo, min=1e-8)


def model_input(rgb: np.ndarray, frame: Frame, preprocessing: str) -> torch.Tensor:
    """Build the ``(1, 3, S, S)`` float32 model input from a normalised RGB image."""
    if preprocessing not in PREPROCESSINGS:
        raise InputError(f"unknown preprocessing '{preprocessing}'; expected one of {PREPROCESSINGS}.")
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    mode = "bicubic" if preprocessing == "medsam" else "bilinear"
    if tuple(x.shape[-2:]) != frame.resized:
        x = F.interpolate(x, size=frame.resized, mode=mode, align_corners=False, antialias=True)
        x = x.clamp(0.0, 255.0)
    if preprocessing == "sam":
        mean = torch.tensor(_SAM_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_SAM_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    else:
        x = _minmax(x)
    s = frame.input_size
    return F.pad(x, (0, s - x.shape[-1], 0, s - x.shape[-2]))


def logits_to_image(low_res: torch.Tensor, frame: Frame, preprocessing: str) -> torch.Tensor:
    """Resample ``(N, C, 256, 256)`` decoder logits to ``(N, C, H, W)`` image logits."""
    if preprocessing == "medsam":
        # MedSAM's authors resize the low-resolution logits straight to the image size.
        return F.interpolate(low_res, size=frame.image_shape, mode="bilinear", align_corners=False)
    s = frame.input_size
    x = F.interpolate(low_res, size=(s, s), mode="bilinear", align_corners=False)
    x = x[..., : frame.resized[0], : frame.resized[1]]
    return F.interpolate(x, size=frame.image_shape, mode="bilinear", align_corners=False)


def crop_to_low_res(
    crop_logits: torch.Tensor, crop: tuple[int, int, int, int], frame: Frame, fill: float = -20.0
) -> torch.Tensor:
    """Place ``(N, C, h, w)`` logits of the crop ``(x0, y0, x1, y1)`` into the whole image's 256 px decoder frame.

    Used to express masks found in a zoomed crop as low-resolution logits of the
    whole image (usable as a mask prompt); everything outside the crop and the
    padding get a confident background logit.
    """
    sx, sy = frame.scale_xy
    f = LOW_RES / frame.input_size
    x0, y0, x1, y1 = crop
    lx0, ly0 = int(round(x0 * sx * f)), int(round(y0 * sy * f))
    lx1 = min(LOW_RES, max(lx0 + 1, int(round(x1 * sx * f))))
    ly1 = min(LOW_RES, max(ly0 + 1, int(round(y1 * sy * f))))
    out = crop_logits.new_full((*crop_logits.shape[:2], LOW_RES, LOW_RES), fill)
    out[..., ly0:ly1, lx0:lx1] = F.interpolate(
        crop_logits, size=(ly1 - ly0, lx1 - lx0), mode="bilinear", align_corners=False, antialias=True
    )
    return out
