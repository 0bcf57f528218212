"""Inputs of the exported files from an image and prompts, computed as :class:`biosam.Predictor` does.

For users running the ONNX or TorchScript files with biosam installed; the README lists the same
steps for those without it.
"""

from __future__ import annotations

import numpy as np

from biosam.errors import InputError
from biosam.prompting.intensity import normalize_intensity
from biosam.prompting.preprocess import Frame, model_input

FAMILIES = ("sam", "sam2")
# Point labels of the SAM ONNX convention.
BOX_CORNER_LABELS = (2.0, 3.0)
PADDING_LABEL = -1.0


def encoder_input(
    image: np.ndarray, image_size: int, preprocessing: str, intensity: str = "auto"
) -> tuple[np.ndarray, Frame]:
    """The encoder's ``image`` input (1, 3, S, S) float32 for a 2D image, and the :class:`Frame` that maps
    image pixels to model-input pixels (for :func:`decoder_inputs`)."""
    rgb = normalize_intensity(np.asarray(image), intensity)
    frame = Frame.create(rgb.shape[:2], image_size, preprocessing)
    return model_input(rgb, frame, preprocessing).numpy(), frame


def decoder_inputs(
    frame: Frame,
    family: str = "sam",
    box: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    low_res_size: int = 256,
) -> dict[str, np.ndarray]:
    """The prompt inputs of the exported decoder for one object (coordinates in original image pixels).

    ``box`` (4,) x0, y0, x1, y1; ``points`` (K, 2) x, y with ``point_labels`` (K,) (1 object,
    0 background; default all 1); ``mask`` the (4h, 4w) ``low_res_masks`` of an earlier call;
    ``low_res_size`` = 4h, the side of ``mask_input`` (256; 128 for a 512 px SAM 2 model).
    The tokens are laid out as our models take them: SAM (``family="sam"``) the points, then the
    box corners (labels 2, 3), a padding point (label -1) only without a box; SAM 2 the box
    corners first, then the points, and always a padding point.
    """
    if family not in FAMILIES:
        raise InputError(f"family must be one of {FAMILIES}, got '{family}'.")
    coords, labels = [], []
    if points is not None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        lab = np.ones(len(pts)) if point_labels is None else np.asarray(point_labels, dtype=np.float64).reshape(-1)
        if len(lab) != len(pts):
            raise InputError(f"{len(pts)} points but {len(lab)} point labels.")
        coords.append(frame.to_model(pts))
        labels.append(lab)
    if box is not None:
        corners = frame.to_model(np.asarray(box, dtype=np.float64).reshape(4)).reshape(2, 2)
        where = 0 if family == "sam2" else len(coords)
        coords.insert(where, corners)
        labels.insert(where, np.array(BOX_CORNER_LABELS))
    if coords and (family == "sam2" or box is None):
        coords.append(np.zeros((1, 2)))
        labels.append(np.array([PADDING_LABEL]))
    point_coords = np.concatenate(coords) if coords else np.zeros((0, 2))
    point_label_arr = np.concatenate(labels) if labels else np.zeros(0)
    if mask is None:
        mask_input, has_mask = np.zeros((1, 1, low_res_size, low_res_size), np.float32), 0.0
    else:
        mask_input, has_mask = np.asarray(mask, dtype=np.float32).reshape(1, 1, *np.shape(mask)[-2:]), 1.0
    return {
        "point_coords": point_coords[None].astype(np.float32),
        "point_labels": point_label_arr[None].astype(np.float32),
        "mask_input": mask_input,
        "has_mask_input": np.array([has_mask], np.float32),
        "orig_im_size": np.array(frame.image_shape, np.float32),
    }
