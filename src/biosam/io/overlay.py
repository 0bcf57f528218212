"""Pictures of results: label images drawn over the input image."""

from __future__ import annotations

import numpy as np
from skimage.color import label2rgb
from skimage.draw import disk
from skimage.segmentation import find_boundaries

from biosam.prompting.prompts import Prompt

_POSITIVE = (0, 255, 0)
_NEGATIVE = (255, 0, 0)
_BOX = (255, 255, 0)


def render_overlay(rgb: np.ndarray, labels: np.ndarray, prompts: list[Prompt] | None = None, alpha: float = 0.4) -> np.ndarray:
    """Blend ``labels`` over an RGB image in [0, 255], outline each object, draw the prompts.

    Returns an ``(H, W, 3)`` uint8 image.
    """
    base = np.clip(rgb, 0, 255).astype(np.uint8)
    if labels.max() > 0:
        out = label2rgb(labels, image=base, alpha=alpha, bg_label=0, image_alpha=1.0, kind="overlay")
        out = (np.clip(out, 0, 1) * 255).astype(np.uint8)
        out[find_boundaries(labels, mode="inner")] = 255
    else:
        out = base.copy()
    h, w = labels.shape
    radius = max(2, round(max(h, w) / 200))
    for prompt in prompts or []:
        if prompt.box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
            x1, y1 = min(x1, w - 1), min(y1, h - 1)
            out[[y0, y1], x0 : x1 + 1] = _BOX
            out[y0 : y1 + 1, [x0, x1]] = _BOX
        if prompt.points is not None:
            for (x, y), label in zip(prompt.points, prompt.point_labels):
                rr, cc = disk((y, x), radius, shape=(h, w))
                out[rr, cc] = _POSITIVE if label == 1 else _NEGATIVE
    return out
