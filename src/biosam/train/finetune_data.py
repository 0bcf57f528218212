"""The training data of SAM fine-tuning: checked image/label pairs, kept small, and random views of them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from biosam.automatic.data import as_instances, dihedral
from biosam.automatic.resample import resize_image, resize_labels, scaled_shape
from biosam.errors import BiosamError, InputError
from biosam.models.sam import Sam
from biosam.prompting.intensity import normalize_intensity
from biosam.train.finetune_settings import FinetuneSettings


@dataclass
class TrainImage:
    """A training image kept small: normalised RGB and instance labels at most ``max_zoom`` x the model input."""

    name: str
    rgb: np.ndarray  # (h, w, 3) float32 in [0, 255]
    labels: np.ndarray  # (h, w) int32 instance labels
    scale: float  # stored size / original size


def read_checked(image_path: str | os.PathLike, label_path: str | os.PathLike,
                 min_area: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An image and its instance labels, refused with an :class:`InputError` naming the file when unusable.

    Problems caught: unreadable files, empty arrays, a label image of another
    size than its image, a label image holding a single value (nothing to prompt),
    and labels without an object of ``min_area`` pixels.
    """
    from biosam.io import read_image

    arrays = []
    for path, what in ((image_path, "image"), (label_path, "label image")):
        try:
            array = np.asarray(read_image(path)[0])
        except (BiosamError, OSError, ValueError) as exc:
            raise InputError(f"{path}: the {what} cannot be read ({exc}). Replace the file or remove the pair.") from exc
        if array.size == 0:
            raise InputError(f"{path}: the {what} is empty (shape {array.shape}). Replace the file or remove the pair.")
        arrays.append(array)
    image, raw = arrays
    values = np.unique(raw)
    if values.size == 1:
        raise InputError(
            f"{label_path}: the label image holds only the value {values[0].item()}, so it has no object to prompt "
            "(all background or all foreground). Label the objects in it (0 = background) or remove the pair."
        )
    labels = as_instances(raw, str(label_path))
    size = image.shape[:2] if image.ndim == 2 or image.shape[-1] <= 4 else image.shape[1:]
    if tuple(size) != labels.shape:
        raise InputError(
            f"{label_path}: the label image is {labels.shape[1]} x {labels.shape[0]} px but its image {image_path} is "
            f"{size[1]} x {size[0]} px. Give every image a label image of the same size."
        )
    if min_area > 1 and not (np.bincount(labels.ravel())[1:] >= min_area).any():
        raise InputError(f"{label_path}: no labelled object has {min_area} pixels or more; nothing to train on. "
                         "Remove the pair or lower min_area.")
    return image, labels


def prepare_image(image: np.ndarray, labels: np.ndarray, name: str, model: Sam,
                  settings: FinetuneSettings) -> TrainImage:
    """Normalise and shrink a training image to at most ``max_zoom`` times the model input (long side)."""
    rgb = normalize_intensity(image, settings.intensity)
    limit = model.image_size * settings.max_zoom
    scale = min(1.0, limit / max(rgb.shape[:2]))
    shape = scaled_shape(rgb.shape, scale)
    # same antialiased bilinear resampling as the model input, so a whole-image view is what inference sees
    small = resize_image(rgb, shape).astype(np.float32, copy=False)
    return TrainImage(name, small, resize_labels(labels, shape).astype(np.int32), shape[0] / rgb.shape[0])


def training_view(item: TrainImage, settings: FinetuneSettings, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A random view (part at a random zoom, rotated/flipped) of a training image: ``(rgb, labels)``."""
    rgb, labels = item.rgb, item.labels
    if settings.max_zoom > 1:
        zoom = math.exp(rng.uniform(0.0, math.log(settings.max_zoom)))
        h, w = labels.shape
        ch, cw = max(8, round(h / zoom)), max(8, round(w / zoom))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        rgb, labels = rgb[y : y + ch, x : x + cw], labels[y : y + ch, x : x + cw]
    if settings.flips:
        k = int(rng.integers(0, 8))
        rgb = dihedral(rgb.transpose(2, 0, 1), k).transpose(1, 2, 0)
        labels = dihedral(labels, k)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(labels)

