"""Fixed 2D sine/cosine position encodings used by the SAM 2 neck and memory encoder."""

from __future__ import annotations

import math

import torch

__all__ = ["sine_position_encoding"]


def sine_position_encoding(
    channels: int, height: int, width: int, *, device: torch.device | str = "cpu", temperature: float = 10000.0
) -> torch.Tensor:
    """Position encoding of a ``height`` x ``width`` grid as a (channels, height, width) tensor.

    Rows and columns are numbered 1..n, normalised to (0, 2*pi], and each is encoded with
    ``channels // 2`` interleaved sines and cosines of geometrically spaced frequencies;
    the first half of the channels encodes y, the second half x (the layout SAM 2 was trained with).
    """
    if channels % 4:
        raise ValueError(f"channels must be a multiple of 4, got {channels}")
    half = channels // 2
    freq = torch.arange(half, dtype=torch.float32, device=device)
    freq = temperature ** (2 * torch.div(freq, 2, rounding_mode="floor") / half)

    def encode(n: int) -> torch.Tensor:
        pos = torch.arange(1, n + 1, dtype=torch.float32, device=device)
        pos = pos / (n + 1e-6) * (2 * math.pi)
        angles = pos[:, None] / freq
        # even channels take sin, odd channels cos, of the same frequency pair
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)  # (n, half)

    pos_y = encode(height)[:, None, :].expand(height, width, half)
    pos_x = encode(width)[None, :, :].expand(height, width, half)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).contiguous()
