"""Which object owns a pixel of a slice when several objects' masks meet.

Shared by both ways of following objects through a volume (SAM v1
projection in :mod:`biosam.volume.propagate`, SAM 2 memory in
:mod:`biosam.volume.sam2_tracking`): an object nearer one of its prompted
slices keeps the pixels, then the more confident one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from biosam.prompting.prompts import Prompt


class PromptedSlices:
    """Where an object's prompted slices put slice ``z``: the nearest one, and whether prompts lie on both sides."""

    def __init__(self, objects: list[list[Prompt]]) -> None:
        self.z = [np.array([int(p.z) for p in obj]) for obj in objects]

    def distance(self, i: int, z: int) -> int:
        return int(np.abs(self.z[i] - z).min())

    def by_label(self, z: int) -> np.ndarray:
        """Every object's distance from slice ``z``, indexed by label (background: never nearer)."""
        return np.array([np.iinfo(np.int64).max] + [self.distance(i, z) for i in range(len(self.z))], dtype=np.int64)

    def between(self, i: int, z: int) -> bool:
        return bool((self.z[i] < z).any() and (self.z[i] > z).any())

    def owns(self, i: int, z: int, step: int) -> bool:
        """Whether the sweep going ``step`` carries object ``i`` onto slice ``z`` (ties go forward)."""
        before, after = self.z[i][self.z[i] < z], self.z[i][self.z[i] > z]
        if step == 1:
            return not len(after) or not len(before) or z - before.max() <= after.min() - z
        return not len(before) or (len(after) and after.min() - z < z - before.max())


def claim(objects: list[int], masks: list[np.ndarray], confidence: list[float],
          distance: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Give each pixel to one object: the one nearest one of its prompted slices (then the more confident one).

    Yields ``(position in objects, own pixels)`` in that order.
    """
    rank = sorted(range(len(objects)), key=lambda k: (distance[k], -confidence[k]))
    claimed = np.zeros(masks[0].shape, dtype=bool) if masks else None
    for k in rank:
        own = masks[k] & ~claimed
        yield k, own
        claimed |= own


def write_slice(labels, z: int, drawn: dict[int, np.ndarray], distance: np.ndarray | None = None) -> None:
    """Draw object masks (0-based ids) into slice ``z`` of a NumPy or lazy (Zarr, memmap) label volume.

    ``distance`` (by label, background first): pixels already drawn by an object nearer one of its prompted
    slices than the one drawn now are kept.
    """
    if not drawn:
        return
    plane = np.array(labels[z])
    for i, own in drawn.items():
        if distance is not None:
            own = own & (distance[plane] >= distance[i + 1])
        plane[own] = i + 1
    labels[z] = plane
