"""Prompts for one object, their validation, and reading them from JSON."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biosam.errors import InputError
from biosam.prompting.preprocess import LOW_RES

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    """The prompts describing one object, in original image pixels.

    ``box`` is ``(x0, y0, x1, y1)``; ``points`` is ``(K, 2)`` (x, y) with
    ``point_labels`` 1 (object) or 0 (background), all 1 when omitted; ``mask``
    is a ``(256, 256)`` low-resolution logit map as returned by a previous
    prediction. ``z`` is the slice the object is on, for volumes (the 2D
    predictor ignores it); ``object`` (volumes only) names the object when one
    object is prompted on several slices: prompts sharing it are one object.
    """

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    z: int | None = None
    object: int | None = None

    def validate(self, image_shape: tuple[int, int]) -> Prompt:
        """Return a checked copy with float arrays; raise :class:`InputError` for unusable prompts.

        A box reaching over the image's edge is clipped to the image (with a
        logged warning); one with no part inside the image is refused.
        """
        h, w = image_shape
        box = points = labels = mask = None
        if self.box is not None:
            box = _as_float(self.box, "box").reshape(-1)
            if box.size != 4 or not np.isfinite(box).all():
                raise InputError(f"a box needs 4 finite numbers x0,y0,x1,y1, got {self.box!r}.")
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                raise InputError(f"box {box.tolist()} is empty: x1 must exceed x0 and y1 must exceed y0.")
            inside = np.minimum(np.maximum(box, 0.0), [w, h, w, h])
            if inside[2] <= inside[0] or inside[3] <= inside[1]:
                raise InputError(
                    f"box {box.tolist()} lies entirely outside the image (width {w}, height {h}); "
                    "coordinates are pixels of the original image, x to the right and y down from the top-left corner."
                )
            if not np.array_equal(inside, box):
                logger.warning("box %s reaches over the edge of the image (width %d, height %d); using its part "
                               "inside the image, %s", box.tolist(), w, h, inside.tolist())
                box = inside
        if self.points is not None:
            points = _as_float(self.points, "points")
            if points.size == 0 or points.shape[-1] != 2 or not np.isfinite(points).all():
                raise InputError(f"points must be finite (x, y) pairs, got {self.points!r}.")
            points = points.reshape(-1, 2)
            if (points[:, 0] < 0).any() or (points[:, 0] >= w).any() or (points[:, 1] < 0).any() or (points[:, 1] >= h).any():
                raise InputError(f"point(s) {points.tolist()} lie outside the image (width {w}, height {h}).")
            labels = np.ones(len(points), dtype=np.int64) if self.point_labels is None else np.asarray(self.point_labels).reshape(-1)
            if len(labels) != len(points) or not np.isin(labels, (0, 1)).all():
                raise InputError(f"point labels must be 0 or 1, one per point; got {np.asarray(self.point_labels).tolist()}.")
            labels = labels.astype(np.int64)
        if self.mask is not None:
            mask = _as_float(self.mask, "mask").astype(np.float32)
            if mask.size != LOW_RES * LOW_RES:
                raise InputError(f"a mask prompt must be {LOW_RES}x{LOW_RES} low-resolution logits, got shape {mask.shape}.")
            mask = mask.reshape(LOW_RES, LOW_RES)
        if box is None and points is None and mask is None:
            raise InputError("an object needs at least a box, a point or a mask prompt.")
        return Prompt(box, points, labels, mask, self.z, self.object)

    def extent(self) -> np.ndarray:
        """The object's extent ``(x0, y0, x1, y1)`` if known from a box, else NaNs."""
        return self.box if self.box is not None else np.full(4, np.nan)

    @property
    def structure(self) -> tuple[bool, int, bool]:
        """Prompts with the same structure can be decoded in one batched call."""
        return self.box is not None, 0 if self.points is None else len(self.points), self.mask is not None


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The box ``(x0, y0, x1, y1)`` (pixels, exclusive ends, float64) around a non-empty 2D mask."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise InputError("an empty mask has no box.")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def check_prompts(prompts: list[Prompt], image_shape: tuple[int, int], source: str) -> list[Prompt]:
    """Validate every object's prompts against an image of ``image_shape`` (height, width) before any work.

    Returns the checked copies (:meth:`Prompt.validate`: boxes reaching over the
    edge clipped to the image); the first unusable object raises
    :class:`InputError` naming ``source`` (the image) and the object's index.
    """
    checked = []
    for i, prompt in enumerate(prompts):
        try:
            checked.append(prompt.validate(image_shape))
        except InputError as exc:
            where = "" if prompt.z is None else f" (slice z={prompt.z})"
            raise InputError(f"{source}: object {i}{where}: {exc}") from None
    return checked


def _as_float(value, what: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be numbers, got {value!r}.") from exc


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read ``[{"box": [x0, y0, x1, y1], "points": [[x, y, label], ...], "z": 12}, ...]`` from a JSON file.

    ``box`` or ``points`` may be omitted (not both); a point without a label is a
    foreground point; ``z`` (a slice index, for volumes) is optional, and so is
    ``object`` (an integer: entries sharing it are one object on several slices).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: prompts file not found.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a valid JSON prompts file ({exc}).") from exc
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON list of objects like {{\"box\": [x0, y0, x1, y1]}}.")
    prompts = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict) or not ({"box", "points"} & obj.keys()) or (obj.keys() - {"box", "points", "z", "object"}):
            raise InputError(
                f"{path}: object {i} must have a 'box' and/or 'points' key (and optionally 'z' and 'object') and "
                f"nothing else, got {obj!r}."
            )
        z, name = obj.get("z"), obj.get("object")
        if z is not None and (isinstance(z, bool) or not isinstance(z, int) or z < 0):
            raise InputError(f"{path}: object {i}: 'z' must be a slice index (an integer >= 0), got {z!r}.")
        if name is not None and (isinstance(name, bool) or not isinstance(name, int)):
            raise InputError(f"{path}: object {i}: 'object' must be an integer naming the object, got {name!r}.")
        points = labels = None
        if "points" in obj:
            try:
                rows = [list(p) for p in obj["points"]]
                points = np.array([r[:2] for r in rows], dtype=np.float64)
                labels = np.array([r[2] if len(r) > 2 else 1 for r in rows])
                if any(len(r) not in (2, 3) for r in rows):
                    raise ValueError("points are [x, y] or [x, y, label]")
            except (TypeError, ValueError) as exc:
                raise InputError(f"{path}: object {i}: points must be [[x, y, label], ...] ({exc}).") from exc
        prompts.append(Prompt(box=obj.get("box"), points=points, point_labels=labels, z=z, object=name))
    return prompts
