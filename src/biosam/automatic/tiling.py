"""Tiles with a halo for images larger than the model input, and seamless stitching.

Each tile has an *inner* box, and the inner boxes partition the image, and an
*outer* box (the inner box grown by the halo, shifted inwards at the image
border so that it keeps the full tile size where the image allows). Models see
the outer box; only the inner box of their result is kept:

- dense maps (the instance decoder's foreground and distances) are blended:
  each tile's outer box counts, weighted by a ramp that is 0 on the outer half
  of its halo (the pixels seen with the least context) and rises to 1 across
  the next halo's width (image edges are not faded), so
  the maps cross a tile border without a step. (Pasting inner boxes alone left
  straight edges along tile borders: the decoder normalises each tile on its
  own, so two tiles disagree slightly where they meet.) Instances are found
  once on the stitched maps, so an object crossing a tile border is one object
  by construction;
- instance labels from a per-tile method (grid-prompted mask generation) keep
  each object in the one tile whose inner box holds its centre, whole, as seen
  with the halo's context; it then only fills pixels no earlier object took.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from biosam.automatic.labels import relabel
from biosam.settings import Rule, check, rule


@dataclass(frozen=True)
class Tile:
    """``inner`` and ``outer`` as ``(y0, y1, x0, x1)`` in image pixels."""

    inner: tuple[int, int, int, int]
    outer: tuple[int, int, int, int]

    @property
    def outer_slice(self) -> tuple[slice, slice]:
        y0, y1, x0, x1 = self.outer
        return slice(y0, y1), slice(x0, x1)


def _starts(length: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: (inner start, inner end, outer start, outer end) of every tile."""
    if length <= tile:
        return [(0, length, 0, length)]
    step = tile - 2 * halo
    n = -(-length // step)  # inner boxes no longer than the step leave a full halo on both sides
    edges = np.linspace(0, length, n + 1).round().astype(int)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        o0 = min(max(0, a - halo), length - tile)
        out.append((int(a), int(b), int(o0), int(o0 + tile)))
    return out


def tiles_rule(tile: int, halo: int) -> Rule:
    """Whether a tile size and halo can cover an image (the tile larger than twice the halo)."""
    return rule(tile > 0 and halo >= 0 and 2 * halo < tile,
                f"tile {tile} with halo {halo}: the tile must be larger than twice the halo (and halo >= 0)")


def check_tiles(tile: int, halo: int) -> None:
    """Refuse a tile size and halo that cannot cover an image (:class:`InputError`)."""
    check("tiles", [tiles_rule(tile, halo)])


def tile_grid(shape: tuple[int, int], tile: int, halo: int) -> list[Tile]:
    """Tiles of ``tile`` x ``tile`` pixels overlapping by ``2 * halo`` that cover ``shape``."""
    check_tiles(tile, halo)
    rows, cols = (_starts(n, tile, halo) for n in shape[:2])
    return [Tile((ya, yb, xa, xb), (yo0, yo1, xo0, xo1)) for ya, yb, yo0, yo1 in rows for xa, xb, xo0, xo1 in cols]


def _progress(tiles: list[Tile], progress: bool, what: str) -> Iterator[Tile]:
    return iter(tqdm(tiles, desc=what, unit="tile", disable=not progress or len(tiles) < 2, leave=False))


class MapStitcher:
    """Blends per-tile maps ``(C, h, w)`` into one ``(C, H, W)`` result (see the module docstring)."""

    def __init__(self, channels: int, shape: tuple[int, int], halo: int, dtype: np.dtype = np.float32) -> None:
        self.shape = tuple(shape[:2])
        self.margin, self.ramp = halo / 2, max(1, halo)
        self.total = np.zeros((channels, *self.shape), dtype=np.float32)
        self.weight = np.zeros(self.shape, dtype=np.float32)
        self.dtype = dtype

    def _axis(self, start: int, end: int, length: int) -> np.ndarray:
        i = np.arange(end - start, dtype=np.float32)
        rise = np.full_like(i, np.inf) if start == 0 else i + 0.5
        fall = np.full_like(i, np.inf) if end == length else (end - start) - i - 0.5
        return np.clip((np.minimum(rise, fall) - self.margin) / self.ramp, 0.0, 1.0)

    def add(self, tile: Tile, maps: np.ndarray) -> None:
        """Add the maps predicted for ``tile``'s outer box."""
        y0, y1, x0, x1 = tile.outer
        w = np.outer(self._axis(y0, y1, self.shape[0]), self._axis(x0, x1, self.shape[1]))
        self.total[(slice(None), *tile.outer_slice)] += np.asarray(maps, dtype=np.float32) * w
        self.weight[tile.outer_slice] += w

    def result(self) -> np.ndarray:
        return (self.total / np.maximum(self.weight, 1e-12)).astype(self.dtype, copy=False)


def stitch_maps(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    tile: int,
    halo: int,
    channels: int,
    dtype: np.dtype = np.float32,
    progress: bool = False,
) -> np.ndarray:
    """Run ``predict`` (a ``(h, w[, c])`` image -> ``(channels, h, w)`` maps) tile by tile; one ``(channels, H, W)`` result."""
    stitcher = MapStitcher(channels, image.shape[:2], halo, dtype)
    for t in _progress(tile_grid(image.shape[:2], tile, halo), progress, "tiles"):
        stitcher.add(t, predict(image[t.outer_slice]))
    return stitcher.result()


def merge_instance_tiles(
    image: np.ndarray,
    segment: Callable[[np.ndarray], np.ndarray],
    tile: int,
    halo: int,
    max_overlap: float = 0.5,
    progress: bool = False,
) -> np.ndarray:
    """Run ``segment`` (an image -> instance labels of the same size) tile by tile; one label image.

    An object belongs to the tile whose inner box holds its centre of mass; it
    is drawn only on pixels still free, and dropped when more than
    ``max_overlap`` of it is already taken (the same object found from a
    neighbouring tile).
    """
    height, width = image.shape[:2]
    labels = np.zeros((height, width), dtype=np.uint32)
    next_id = 1
    for t in _progress(tile_grid((height, width), tile, halo), progress, "tiles"):
        local = np.asarray(segment(image[t.outer_slice]))
        region = labels[t.outer_slice]  # a view: painting it paints ``labels``
        for obj in owned_objects(local, t):
            if paint_object(region, local == obj, next_id, max_overlap):
                next_id += 1
    return relabel(labels)


def owned_objects(local: np.ndarray, tile: Tile) -> np.ndarray:
    """Ids (ascending) of the objects in ``local``, the labels of ``tile``'s outer box, whose centre of mass
    lies in its inner box: the objects this tile keeps (see :func:`merge_instance_tiles`)."""
    ids = np.unique(local)
    ids = ids[ids > 0]
    if not len(ids):
        return ids
    centres = np.asarray(ndimage.center_of_mass(np.ones(local.shape), local, ids)).reshape(len(ids), 2)
    iy0, iy1, ix0, ix1 = tile.inner
    oy, _, ox, _ = tile.outer
    cy, cx = centres[:, 0] + oy, centres[:, 1] + ox
    return ids[(iy0 <= cy) & (cy < iy1) & (ix0 <= cx) & (cx < ix1)]


def paint_object(region: np.ndarray, mask: np.ndarray, new_id: int, max_overlap: float = 0.5) -> bool:
    """Draw ``mask`` as ``new_id`` on the pixels of ``region`` still 0, unless more than ``max_overlap`` of it
    is taken already (the same object kept from another tile); whether it was drawn."""
    free = mask & (region == 0)
    if free.sum() < (1.0 - max_overlap) * mask.sum():
        return False
    region[free] = new_id
    return True

