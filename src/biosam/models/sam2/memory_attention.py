"""SAM 2 memory attention: conditions the current frame's features on memories of past frames.

Attention uses 2D axial rotary position encoding (RoPE) on a square token grid: of each
head's channel pairs, the first half rotate with the token's column, the second half with
its row, at geometrically spaced frequencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common import relu

__all__ = ["AxialRoPE", "apply_rope", "RoPEAttention", "MemoryAttentionLayer", "MemoryAttention"]


class AxialRoPE(nn.Module):
    """Rotations of axial RoPE for square grids, computed once per (side, device).

    The table is cached in a plain dict, not a registered buffer: it is derived from
    ``dim`` and ``theta`` and must stay out of the state dict of the checkpoint.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"RoPE head width must be a multiple of 4, got {dim}")
        self.dim = dim
        self.theta = theta
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def forward(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Unit complex rotations (num_tokens, dim // 2) for a square grid of ``num_tokens`` tokens."""
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"RoPE needs a square token grid, got {num_tokens} tokens")
        key = (side, torch.device(device))
        if key not in self._cache:
            # Built outside inference mode so that a table first made by a predictor can
            # later take part in a training forward (inference tensors cannot be saved for backward).
            with torch.inference_mode(False), torch.no_grad():
                self._cache[key] = self._table(side, key[1])
        return self._cache[key]

    def _table(self, side: int, device: torch.device) -> torch.Tensor:
        # Same float32 arithmetic as SAM 2 (torch.polar included), so the rotations agree to the bit.
        freqs = 1.0 / (self.theta ** (torch.arange(0, self.dim, 4, device=device).float() / self.dim))
        index = torch.arange(side * side, dtype=torch.float32, device=device)
        cols, rows = index % side, torch.div(index, side, rounding_mode="floor")
        angles = torch.cat((torch.outer(cols, freqs), torch.outer(rows, freqs)), dim=1)  # (n, dim/2)
        return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` (..., n, dim) by the (m, dim // 2) complex ``rotations``.

    ``n`` may be a multiple of ``m``: several frames of the same grid, each rotated alike.
    Computed in float32 and returned in the dtype of ``x``.
    """
    n, dim = x.shape[-2:]
    m = rotations.shape[0]
    if n % m:
        raise ValueError(f"{n} tokens are not a whole number of {m}-token grids")
    # A channel pair (a, b) as the complex number a + ib: one complex product rotates it,
    # several times faster on CPU than the equivalent real-valued cos/sin arithmetic.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (dim // 2, 2)).unflatten(-3, (n // m, m)))
    return torch.view_as_real(pairs * rotations).flatten(-2).flatten(-3, -2).to(x.dtype)


class RoPEAttention(nn.Module):
    """Multi-head attention with axial RoPE on queries and keys (keys may come from a narrower input).

    With ``repeat_keys`` the keys may hold several grids (memory frames) of the query grid's
    size, each rotated with the same positions; ``num_keys_no_rope`` trailing keys (object
    pointers) get no rotation at all.
    """

    def __init__(
        self, embedding_dim: int, num_heads: int, kv_in_dim: int | None = None, repeat_keys: bool = False
    ) -> None:
        super().__init__()
        kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        if embedding_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {embedding_dim}")
        self.num_heads = num_heads
        self.repeat_keys = repeat_keys
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.v_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: torch.Tensor,
        num_keys_no_rope: int = 0,
    ) -> torch.Tensor:
        """Batch-first q (B, Nq, C), k and v (B, Nk, Ckv); ``rope``: rotations of the Nq-token grid."""
        queries = apply_rope(self._split_heads(self.q_proj(q)), rope)
        keys = self._split_heads(self.k_proj(k))
        values = self._split_heads(self.v_proj(v))
        num_rope = keys.shape[2] - num_keys_no_rope
        if num_rope != queries.shape[2] and not self.repeat_keys:
            raise ValueError("keys without repeat_keys must match the query grid")
        if num_rope > 0:
            rotated = apply_rope(keys[:, :, :num_rope], rope)
            keys = torch.cat((rotated, keys[:, :, num_rope:]), dim=2) if num_keys_no_rope else rotated
        out = F.scaled_dot_product_attention(queries, keys, values)
        b, heads, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * d))


class MemoryAttentionLayer(nn.Module):
    """Pre-norm block: RoPE self-attention, RoPE cross-attention to memory, ReLU MLP."""

    def __init__(
        self,
        d_model: int = 256,
        num_heads: int = 1,
        kv_in_dim: int = 64,
        dim_feedforward: int = 2048,
        pos_enc_at_attn: bool = False,
        pos_enc_at_cross_attn_queries: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = RoPEAttention(d_model, num_heads)
        self.cross_attn_image = RoPEAttention(d_model, num_heads, kv_in_dim=kv_in_dim, repeat_keys=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries

    def forward(
        self,
        x: torch.Tensor,
        query_pos: torch.Tensor,
        memory_keys: torch.Tensor,
        memory: torch.Tensor,
        rope: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """Batch-first tokens x (B, L, C); ``memory_keys`` already carry their positions if wanted."""
        h = self.norm1(x)
        q = h + query_pos if self.pos_enc_at_attn else h
        x = x + self.self_attn(q, q, h, rope)
        h = self.norm2(x)
        q = h + query_pos if self.pos_enc_at_cross_attn_queries else h
        x = x + self.cross_attn_image(q, memory_keys, memory, rope, num_obj_ptr_tokens)
        return x + self.linear2(relu(self.linear1(self.norm3(x))))


class MemoryAttention(nn.Module):
    """Stack of :class:`MemoryAttentionLayer` with a final LayerNorm.

    State-dict keys equal those of ``sam2.modeling.memory_attention.MemoryAttention`` as
    configured in every SAM 2 / 2.1 model; the defaults are that configuration.
    """

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 4,
        num_heads: int = 1,
        kv_in_dim: int = 64,
        dim_feedforward: int = 2048,
        rope_theta: float = 10000.0,
        pos_enc_at_input: bool = True,
        pos_enc_at_attn: bool = False,
        pos_enc_at_cross_attn_keys: bool = True,
        pos_enc_at_cross_attn_queries: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(
                d_model, num_heads, kv_in_dim, dim_feedforward, pos_enc_at_attn, pos_enc_at_cross_attn_queries
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.rope = AxialRoPE(d_model // num_heads, rope_theta)
        self.pos_enc_at_input = pos_enc_at_input
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys

    def forward(
        self,
        curr: torch.Tensor,
        memory: torch.Tensor,
        curr_pos: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """Sequence-first current tokens (L, B, C) of a square grid and memory (M, B, kv_in_dim).

        The memory holds whole frames of the same grid followed by ``num_obj_ptr_tokens``
        object-pointer tokens, which are attended without rotary encoding. Returns (L, B, C).
        """
        if curr.shape[1] != memory.shape[1]:
            raise ValueError(f"batch sizes differ: {curr.shape[1]} current vs {memory.shape[1]} memory")
        x = curr + 0.1 * curr_pos if self.pos_enc_at_input else curr
        x, query_pos = x.transpose(0, 1).contiguous(), curr_pos.transpose(0, 1)
        memory_keys = memory + memory_pos if self.pos_enc_at_cross_attn_keys else memory
        # the memory is the same for every layer: lay it out batch-first once
        memory_keys, memory = memory_keys.transpose(0, 1).contiguous(), memory.transpose(0, 1).contiguous()
        rope = self.rope(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, query_pos, memory_keys, memory, rope, num_obj_ptr_tokens)
        return self.norm(x).transpose(0, 1)
