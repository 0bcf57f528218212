"""Hiera trunk of the SAM 2 / 2.1 image encoder (hierarchical windowed ViT with query pooling).

Parameter names and shapes equal those of the released checkpoints (``image_encoder.trunk.*``).
The residual stream stays channels-last, (B, H, W, C), from the patch embedding to the last block.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..common import gelu

__all__ = ["HIERA_CONFIGS", "Hiera", "MultiScaleAttention", "MultiScaleBlock", "PatchEmbed", "build_hiera"]

# Trunk hyper-parameters of the released SAM 2 and SAM 2.1 models (both releases share them).
HIERA_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "small": dict(
        embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "base_plus": dict(
        embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
        window_pos_embed_bkg_spatial_size=(14, 14),
    ),
    "large": dict(
        embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
        window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8),
    ),
}


def _add_into(out: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``out + other``, written into ``out`` when that keeps the promoted dtype.

    ``out`` must be a fresh tensor (a layer output nobody else holds). Under autocast a
    bf16 branch added to an fp32 residual must give fp32, so then a new tensor is made.
    """
    if out.dtype == torch.result_type(out, other) and out.shape == torch.broadcast_shapes(out.shape, other.shape):
        return out.add_(other)
    return out + other


def _drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth (training only): zero the branch for a random subset of samples."""
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def _max_pool(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Max over non-overlapping ``stride`` cells of the two grid axes of (N, H, W, ...).

    Equals MaxPool2d(kernel=stride, stride=stride) (trailing rows/columns dropped) on the
    channels-last layout; strided slices avoid permuted copies of the input.
    """
    for axis, s in ((1, stride[0]), (2, stride[1])):
        n = x.shape[axis] // s
        lead = (slice(None),) * axis
        x = functools.reduce(torch.maximum, [x[lead + (slice(i, n * s, s),)] for i in range(s)])
    return x


def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nH * nW, ws, ws, C) windows, zero-padding the grid at the bottom/right."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % ws, -w % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    nh, nw = (h + pad_h) // ws, (w + pad_w) // ws
    return x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws, ws, c)


def _bicubic_matrix(size_out: int, size_in: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) matrix of 1-D bicubic resizing as done by F.interpolate (align_corners=False).

    Obtained by resizing unit impulses, so border handling and coefficients are PyTorch's own.
    """
    impulses = torch.eye(size_in, dtype=like.dtype, device=like.device).view(size_in, 1, size_in, 1)
    return F.interpolate(impulses, size=(size_out, 1), mode="bicubic")[:, 0, :, 0].T


class PatchEmbed(nn.Module):
    """7x7 stride-4 convolution returning channels-last tokens (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last convolution returns the NHWC tokens densely laid out (and is faster on CPU).
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid, in square windows or global.

    With ``q_stride`` the queries are max-pooled inside each window, so the output grid is
    smaller by that stride (Hiera's stage transitions); keys and values keep full resolution.
    Windows at the bottom/right edge are completed with zero tokens, which take part as keys.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        q_stride: tuple[int, int] | None = None,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"dim_out {dim_out} is not divisible by num_heads {num_heads}")
        if q_stride and window_size and (window_size % q_stride[0] or window_size % q_stride[1]):
            raise ValueError(f"window size {window_size} is not divisible by the query stride {q_stride}")
        self.num_heads = num_heads
        self.q_stride = tuple(q_stride) if q_stride else None
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H', W', dim_out), plus ``residual`` if given.

        H' = H // stride with query pooling, else H. Adding the residual here lets it be
        fused with the reordering of the windows back into one grid.
        """
        b, h_in, w_in, _ = x.shape
        sh, sw = self.q_stride or (1, 1)
        h, w = h_in // sh, w_in // sw  # output grid (MaxPool2d floors)
        ws = self.window_size
        if ws:
            x = _partition(x, ws)
        nb, gh, gw, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(3)  # each (nb, gh, gw, heads, hd)
        if self.q_stride:
            q = _max_pool(q, self.q_stride)
        qh, qw = q.shape[1:3]
        out = F.scaled_dot_product_attention(
            q.flatten(1, 2).transpose(1, 2), k.flatten(1, 2).transpose(1, 2), v.flatten(1, 2).transpose(1, 2)
        )
        out = self.proj(out.transpose(1, 2).flatten(2))  # (nb, qh * qw, dim_out)
        c = out.shape[-1]
        if not ws:
            out = out.view(b, qh, qw, c)
            return out if residual is None else _add_into(out, residual)
        nh, nw = -(-h_in // ws), -(-w_in // ws)
        out = out.view(b, nh, nw, qh, qw, c).transpose(2, 3)  # (b, nh, qh, nw, qw, c), grid order
        if residual is not None and (nh * qh, nw * qw) == (h, w):
            # No padding to crop: add straight from the window layout, skipping a reordering copy.
            return (residual.reshape(b, nh, qh, nw, qw, c) + out).reshape(b, h, w, c)
        out = out.reshape(b, nh * qh, nw * qw, c)[:, :h, :w]
        return out if residual is None else residual + out


class _Mlp(nn.Module):
    """Linear -> GELU -> Linear, with the parameter names of the checkpoints (``layers.0/1``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](gelu(self.layers[0](x)))


class MultiScaleBlock(nn.Module):
    """Pre-norm Hiera block; at a stage transition it widens the channels and pools the grid.

    The transition's shortcut is the max-pooled linear projection (``proj``) of the normalised input.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        q_stride: tuple[int, int] | None = None,
        window_size: int = 0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if q_stride and dim == dim_out:
            raise ValueError("a query-pooling block must change the channel count (its shortcut is projected)")
        self.dim, self.dim_out = dim, dim_out
        self.q_stride = tuple(q_stride) if q_stride else None
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride=q_stride, window_size=window_size)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = _Mlp(dim_out, int(dim_out * mlp_ratio))
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        shortcut = x
        if self.proj is not None:
            shortcut = self.proj(y)
            if self.q_stride:
                shortcut = _max_pool(shortcut, self.q_stride)
        if self.training and self.drop_path > 0.0:
            x = shortcut + _drop_path(self.attn(y), self.drop_path)
            return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path)
        x = self.attn(y, residual=shortcut)
        return _add_into(self.mlp(self.norm2(x)), x)


class Hiera(nn.Module):
    """Hiera trunk: (B, 3, H, W) images -> one (B, C_i, H_i, W_i) map per stage, highest resolution first.

    H and W must be multiples of 32 (4x patch stride times 8x pooling, and the window position
    embedding tiles the stride-4 grid). Defaults are those of the reference class; the released
    trunks are in :data:`HIERA_CONFIGS` (see :func:`build_hiera`). ``drop_path_rate`` only acts in
    training mode.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        drop_path_rate: float = 0.0,
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        stages: tuple[int, ...] = (2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        window_spec: tuple[int, ...] = (8, 4, 14, 7),
        global_att_blocks: tuple[int, ...] | None = (12, 16, 20),
        return_interm_layers: bool = True,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"{len(stages)} stages but {len(window_spec)} window sizes")
        if not 0 <= q_pool < len(stages):
            raise ValueError(f"q_pool must be in [0, {len(stages) - 1}], got {q_pool}")
        depth = sum(stages)
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        pool_blocks = {end + 1 for end in self.stage_ends[:q_pool]}
        global_blocks = set(global_att_blocks or ())
        self.return_interm_layers = return_interm_layers

        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        # Windowed position embedding (arXiv:2311.05613): a coarse background table resized to
        # the grid, plus one window-sized table repeated over it.
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))

        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList()
        dim, stage = embed_dim, 0
        for i in range(depth):
            # The first block of a stage still attends in the previous stage's window (the one its
            # input grid is laid out in); it pools that window down to the new stage's grid.
            window = 0 if i in global_blocks else window_spec[stage]
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out, num_heads, stage = int(dim * dim_mul), int(num_heads * head_mul), stage + 1
            self.blocks.append(
                MultiScaleBlock(
                    dim, dim_out, num_heads,
                    q_stride=q_stride if i in pool_blocks else None,
                    window_size=window,
                    drop_path=rates[i],
                )
            )
            dim = dim_out
        ends = self.stage_ends if return_interm_layers else self.stage_ends[-1:]
        # Channels per returned map, lowest resolution first (the order the FPN neck is configured in).
        self.channel_list = [self.blocks[i].dim_out for i in reversed(ends)]

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """(1, height, width, C) position embedding of a stride-4 token grid.

        The background table is resized bicubically (as F.interpolate, align_corners=False)
        and the window table is repeated over the grid.
        """
        ws = self.pos_embed_window.shape[-1]
        if height % ws or width % ws:
            raise ValueError(
                f"token grid {height}x{width} is not a multiple of the {ws}x{ws} position window; "
                f"image sides must be multiples of {4 * ws}"
            )
        table = self.pos_embed[0]  # (C, h0, w0)
        c, h0, w0 = table.shape
        # Bicubic resizing is separable and linear: two small matrix products, producing the
        # channels-last layout directly (the interpolation kernel is slow on a 7x7 source).
        rows = _bicubic_matrix(height, h0, table)  # (height, h0)
        cols = _bicubic_matrix(width, w0, table)  # (width, w0)
        pos = (rows @ table.permute(1, 2, 0).reshape(h0, w0 * c)).view(height, w0, c)
        pos = torch.matmul(cols, pos)  # (height, width, C)
        window = self.pos_embed_window[0].permute(1, 2, 0)  # (ws, ws, C)
        tiles = pos.view(height // ws, ws, width // ws, ws, c)
        return _add_into(tiles, window[:, None]).view(1, height, width, c)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> list of (B, C_i, H/4/2^i, W/4/2^i) maps (NCHW views of channels-last data)."""
        x = self.patch_embed(x)
        x = _add_into(x, self.position_embedding(x.shape[1], x.shape[2]))
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.stage_ends[-1] or (self.return_interm_layers and i in self.stage_ends):
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


def build_hiera(name: str, **overrides) -> Hiera:
    """Hiera trunk of a released SAM 2 / 2.1 model: ``tiny``, ``small``, ``base_plus`` or ``large``."""
    if name not in HIERA_CONFIGS:
        raise ValueError(f"unknown Hiera config {name!r}; expected one of {', '.join(HIERA_CONFIGS)}")
    return Hiera(**{**HIERA_CONFIGS[name], **overrides})
