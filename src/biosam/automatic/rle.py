"""Run-length encoding of boolean masks, so that thousands of candidate masks fit in memory.

A mask of an ``(H, W)`` image is stored as its foreground runs in row-major
order: ``starts`` (flat pixel indices) and ``lengths``. Runs are maximal (two
runs never touch), so equal masks have equal encodings. A run may continue
from the end of one row onto the next when the mask covers both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from biosam.errors import InputError


@dataclass(frozen=True, eq=False)
class Rle:
    """Foreground runs of one boolean mask of shape ``shape`` (row-major flat indices)."""

    shape: tuple[int, int]
    starts: np.ndarray
    lengths: np.ndarray

    @property
    def area(self) -> int:
        """Number of foreground pixels."""
        return int(self.lengths.sum())

    def row_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The runs cut at row ends: ``(rows, col_start, col_stop)`` with exclusive stops."""
        w = self.shape[1]
        starts, stops = self.starts, self.starts + self.lengths
        first_row, last_row = starts // w, (stops - 1) // w
        n_rows = last_row - first_row + 1
        rows = np.repeat(first_row, n_rows) + _ranges(n_rows)
        c0 = np.where(rows == np.repeat(first_row, n_rows), np.repeat(starts % w, n_rows), 0)
        c1 = np.where(rows == np.repeat(last_row, n_rows), np.repeat((stops - 1) % w + 1, n_rows), w)
        return rows, c0, c1

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Tight box ``(x0, y0, x1, y1)`` with exclusive ends (slice ``[y0:y1, x0:x1]``); zeros when empty."""
        if len(self.starts) == 0:
            return (0, 0, 0, 0)
        rows, c0, c1 = self.row_segments()
        return int(c0.min()), int(rows[0]), int(c1.max()), int(rows[-1]) + 1

    def to_mask(self, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Decode to a boolean array: the whole mask, or only ``window`` ``(x0, y0, x1, y1)``."""
        h, w = self.shape
        x0, y0, x1, y1 = window if window is not None else (0, 0, w, h)
        out_h, out_w = max(y1 - y0, 0), max(x1 - x0, 0)
        if len(self.starts) == 0 or out_h == 0 or out_w == 0:
            return np.zeros((out_h, out_w), dtype=bool)
        rows, c0, c1 = self.row_segments()
        c0, c1 = np.clip(c0, x0, x1) - x0, np.clip(c1, x0, x1) - x0
        keep = (rows >= y0) & (rows < y1) & (c1 > c0)
        rows, c0, c1 = rows[keep] - y0, c0[keep], c1[keep]
        # +1 where a segment starts, -1 where it stops; the running sum is 1 inside segments.
        edges = np.zeros((out_h, out_w + 1), dtype=np.int8)
        np.add.at(edges, (rows, c0), 1)
        np.add.at(edges, (rows, c1), -1)
        return np.cumsum(edges, axis=1, dtype=np.int8)[:, :out_w] > 0


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(c)`` for every ``c`` in ``counts``."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)


def encode(mask: np.ndarray) -> Rle:
    """Encode one 2D boolean mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a mask to encode must be 2D, got shape {mask.shape}.")
    return encode_masks(torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None], mask.shape)[0]


def encode_masks(
    masks: torch.Tensor, image_shape: tuple[int, int], offset: tuple[int, int] = (0, 0)
) -> list[Rle]:
    """Encode ``(B, h, w)`` boolean masks that lie at ``offset`` ``(x, y)`` inside an ``image_shape`` image.

    Transitions are found on the masks' device; only run positions are copied to the host.
    """
    b, h, w = masks.shape
    height, width = image_shape
    x0, y0 = offset
    if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
        raise InputError(f"masks of size {(h, w)} at offset {offset} do not fit in an image of shape {image_shape}.")
    if b == 0:
        return []
    # A background column on both sides of every row: each row's runs open and close inside it.
    padded = F.pad(masks.to(torch.uint8), (1, 1)).reshape(b, -1)
    change = torch.nonzero(padded[:, 1:] != padded[:, :-1]).cpu().numpy()
    ids = change[0::2, 0]
    pos_start, pos_stop = change[0::2, 1] + 1, change[1::2, 1] + 1  # first pixel in / after the run
    row = pos_start // (w + 2)
    col_start, col_stop = pos_start % (w + 2) - 1, pos_stop % (w + 2) - 1
    starts = (y0 + row) * width + x0 + col_start
    stops = starts + (col_stop - col_start)
    # Join runs that continue across a row end (only possible when the masks span the full width).
    joined = np.zeros(len(starts), dtype=bool)
    if len(starts) > 1:
        joined[1:] = (ids[1:] == ids[:-1]) & (starts[1:] == stops[:-1])
    first, last = ~joined, np.append(~joined[1:], True)[: len(joined)]
    ids, starts, stops = ids[first], starts[first], stops[last]
    bounds = np.searchsorted(ids, np.arange(b + 1))
    shape = (int(height), int(width))
    starts, lengths = starts.astype(np.int64), (stops - starts).astype(np.int64)
    return [Rle(shape, starts[bounds[i] : bounds[i + 1]], lengths[bounds[i] : bounds[i + 1]]) for i in range(b)]
