"""SAM v1 ViT image encoder (ViT-B/L/H): windowed + global attention, conv neck."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock

# Largest relative-position bias (in elements) built at once. Global attention over a
# 64x64 grid would need heads*4096^2 floats (0.8 GB for ViT-B, more for batches), so
# the queries are processed in row chunks above this size; results are identical.
_MAX_BIAS_ELEMENTS = 1 << 26


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection returning channels-last tokens (B, H, W, C)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last convolution makes the NHWC result contiguous (and is faster on CPU),
        # so the whole residual stream stays in one dense layout.
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return x.permute(0, 2, 3, 1)


def _offset_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size, C) table whose [i, j] entry embeds the offset i - j along one axis."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"relative-position table has {rel_pos.shape[0]} rows, expected {2 * size - 1} "
            f"for an attention extent of {size}"
        )
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + (size - 1)]


def _pad_grid(t: torch.Tensor, multiple: int, fill: torch.Tensor | None) -> torch.Tensor:
    """Pad (B, H, W, C) at the bottom/right to a multiple of `multiple`, filling with `fill`."""
    b, h, w, c = t.shape
    hp, wp = h + (-h % multiple), w + (-w % multiple)
    if (hp, wp) == (h, w):
        return t
    out = t.new_empty(b, hp, wp, c)
    out[:, :h, :w] = t
    value = 0.0 if fill is None else fill
    out[:, h:] = value
    out[:, :h, w:] = value
    return out


class Attention(nn.Module):
    """Multi-head self-attention over a token grid, optionally in square windows.

    The decomposed relative-position term (separate height and width tables) is passed
    to `scaled_dot_product_attention` as an additive float mask.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: int = 64,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.use_rel_pos = use_rel_pos
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if use_rel_pos:
            # One row per possible offset between two positions of the attended extent.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, dim // num_heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, dim // num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        qkv = self.qkv(x)
        ws = self.window_size
        if ws:
            # Padding the projected tokens with the qkv bias equals projecting zero-padded
            # inputs (what SAM was trained with) without spending matmuls on the padding.
            qkv = _pad_grid(qkv, ws, self.qkv.bias)
            hp, wp = qkv.shape[1:3]
            qkv = qkv.view(b, hp // ws, ws, wp // ws, ws, 3 * c).transpose(2, 3)
            qkv = qkv.reshape(-1, ws, ws, 3 * c)
        nb, gh, gw, _ = qkv.shape
        q, k, v = qkv.view(nb, gh * gw, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(q, k, v, gh, gw)  # (nb, heads, gh*gw, head_dim)
        if ws:
            out = out.view(b, hp // ws, wp // ws, self.num_heads, ws, ws, -1)
            out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gh: int, gw: int
    ) -> torch.Tensor:
        if not self.use_rel_pos:
            return F.scaled_dot_product_attention(q, k, v)
        nb, heads, n, hd = q.shape
        # Per-query scores against every key row / key column (unscaled queries, as in SAM),
        # made contiguous so that the broadcast sums below come out contiguous.
        grid_q = q.reshape(nb, heads, gh, gw, hd)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, _offset_table(self.rel_pos_h, gh))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, _offset_table(self.rel_pos_w, gw))
        rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
        rows_per_chunk = max(1, _MAX_BIAS_ELEMENTS // (nb * heads * gw * n))
        rows_per_chunk = math.ceil(gh / math.ceil(gh / rows_per_chunk))  # even chunks
        # Without autograd the chunks share one bias buffer: filling fresh memory for every
        # chunk costs more in page faults than the additions themselves. Not while tracing: the ONNX
        # exporter cannot translate the shared out= buffer.
        reuse = rows_per_chunk < gh and not (rel_h.requires_grad or rel_w.requires_grad or torch.jit.is_tracing())
        buffer = q.new_empty(nb * heads * rows_per_chunk * gw * n) if reuse else None
        outs = []
        for r0 in range(0, gh, rows_per_chunk):
            r1 = min(gh, r0 + rows_per_chunk)
            shape = (nb, heads, r1 - r0, gw, gh, gw)
            h_term, w_term = rel_h[:, :, r0:r1, :, :, None], rel_w[:, :, r0:r1, :, None, :]
            if buffer is None:
                bias = h_term + w_term
            else:
                bias = torch.add(h_term, w_term, out=buffer[: math.prod(shape)].view(shape))
            bias = bias.reshape(nb, heads, (r1 - r0) * gw, n)
            outs.append(
                F.scaled_dot_product_attention(q[:, :, r0 * gw : r1 * gw], k, v, attn_mask=bias)
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP, both residual)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 0,
        grid_size: int = 64,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=window_size or grid_size,
            window_size=window_size,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM v1 image encoder: (B, 3, S, S) normalised images -> (B, out_chans, S/16, S/16)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                grid_size=grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"image encoder expects {self.img_size}x{self.img_size} inputs, "
                f"got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2)).contiguous()
