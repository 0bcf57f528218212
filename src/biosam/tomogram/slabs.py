"""The images the vesicle finder reads: a tomogram locally normalised, and slabs (means of a few slices).

A single slice of a tomogram is very noisy; the mean of a slab of slices
shows vesicles crossing it as dark rings (the bilayer) around a lumen.
Both are normalised for local contrast (minus the local mean, over the local
standard deviation, over a window of ``background_nm``) and clipped to
percentiles, then scaled to 0-255.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from biosam.errors import InputError
from biosam.io.voxel_size import VoxelSize
from biosam.tomogram.vesicles import VesicleSettings

__all__ = ["check_volume", "contrast_window", "local_contrast", "prepare_volume", "slab_centres", "slab_image"]

# Percentiles the locally normalised images are clipped to before scaling to 0-255.
_CLIP_PERCENTILES = (0.5, 99.5)


def check_volume(volume: np.ndarray) -> np.ndarray:
    """``volume`` as an array; refused unless it is a 3D tomogram of numbers, 2 or more voxels on each axis."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(
            f"expected a tomogram (Z, Y, X), got an array of shape {volume.shape}; "
            "vesicle finding needs a 3D volume, not a single image."
        )
    if min(volume.shape) < 2:
        raise InputError(f"tomogram of shape {volume.shape} is too small; it needs at least 2 voxels along each axis.")
    if volume.dtype.kind not in "iuf":
        raise InputError(f"unsupported voxel type {volume.dtype}; expected integer or floating-point voxels.")
    return volume


def contrast_window(background_nm: float, voxel: VoxelSize) -> float:
    """The local-contrast window in pixels: ``background_nm`` on slices of voxels of ``voxel``."""
    return background_nm / voxel.pixel_nm


def local_contrast(image: np.ndarray, window: float) -> np.ndarray:
    """Local contrast normalisation of 2D images (or each slice of a stack): ``(x - mean) / std``.

    Mean and standard deviation are taken over a square of ``window`` pixels
    (box filters, so the cost does not grow with the window); a stack
    ``(Z, Y, X)`` is normalised slice by slice. Returns float32.
    """
    image = np.asarray(image, dtype=np.float32)
    size = max(3, int(round(window)) | 1)
    sizes = (size,) * 2 if image.ndim == 2 else (1, size, size)
    mean = ndi.uniform_filter(image, sizes, mode="reflect")
    out = image - mean
    var = ndi.uniform_filter(out * out, sizes, mode="reflect")
    # Flat regions (padding, constant borders) have no contrast to normalise; keep them at 0.
    std = np.sqrt(np.maximum(var, 0.0, out=var), out=var)
    floor = np.float32(1e-3) * float(std.max(initial=0.0)) + np.float32(1e-12)
    out /= np.maximum(std, floor)
    return out


def _to_byte_range(image: np.ndarray, percentiles: tuple[float, float] = _CLIP_PERCENTILES) -> np.ndarray:
    """Clip to percentiles (one pair for the whole array) and scale to float32 0-255."""
    flat = image.reshape(-1)
    step = max(1, flat.size // 4_000_000)  # percentiles of a sample are plenty
    lo, hi = np.percentile(flat[::step], percentiles)
    if hi <= lo:
        return np.zeros(image.shape, np.float32)
    out = (image - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0, out=out).astype(np.float32, copy=False)


def prepare_volume(volume: np.ndarray, z_smoothing: float, window: float) -> np.ndarray:
    """The volume SAM propagates through: smoothed along z, locally normalised per slice, float32 0-255.

    ``z_smoothing`` is a Gaussian sigma in slices (0: none); ``window`` the
    local-contrast window in pixels (see :func:`local_contrast`). One intensity
    window (percentiles of the whole volume) maps all slices to 0-255.
    """
    volume = check_volume(volume).astype(np.float32)
    if z_smoothing > 0:
        volume = ndi.gaussian_filter1d(volume, z_smoothing, axis=0, mode="nearest")
    return _to_byte_range(local_contrast(volume, window))


def slab_image(volume: np.ndarray, z: int, thickness: int, window: float) -> np.ndarray:
    """Mean of ``thickness`` slices centred on slice ``z`` (cut at the volume's faces), normalised to 0-255."""
    volume = check_volume(volume)
    depth = volume.shape[0]
    if not 0 <= z < depth:
        raise InputError(f"slab depth z={z} is outside the volume (z = 0..{depth - 1}).")
    start = max(0, z - thickness // 2)
    stop = min(depth, start + thickness)
    slab = np.asarray(volume[start:stop], dtype=np.float32).mean(axis=0)
    return _to_byte_range(local_contrast(slab, window))


def slab_centres(depth: int, settings: VesicleSettings) -> list[int]:
    """Slab centre slices: ``settings.z``, the middle slice, or ``n_slabs`` evenly spaced depths (middle first)."""
    if settings.z is not None:
        if not 0 <= settings.z < depth:
            raise InputError(f"z={settings.z} is outside the volume: it has {depth} slices (z = 0..{depth - 1}).")
        return [int(settings.z)]
    if settings.n_slabs == 1:
        return [depth // 2]
    # Evenly spaced, each slab at the centre of its share of the depth.
    centres = [int((k + 0.5) * depth / settings.n_slabs) for k in range(settings.n_slabs)]
    centres = sorted(set(centres), key=lambda c: (abs(c - depth // 2), c))
    return centres
