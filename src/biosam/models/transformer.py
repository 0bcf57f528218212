"""Two-way transformer of the SAM v1 mask decoder (prompt tokens <-> image tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock
from .lora import LoRALinear


class Attention(nn.Module):
    """Multi-head attention with its own q/k/v projections, optionally to a narrower width.

    Inputs of batch size 1 are broadcast against larger batches, so one image can be
    attended by many prompts without copying its tokens.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal_dim = embedding_dim // downsample_rate
        if internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {internal_dim}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal_dim)
        self.k_proj = nn.Linear(embedding_dim, internal_dim)
        self.v_proj = nn.Linear(embedding_dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """(b, n, c) -> (batch, heads, n, c / heads), broadcasting b == 1 as a view."""
        b, n, c = x.shape
        x = x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        return x.expand(batch, -1, -1, -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = max(q.shape[0], k.shape[0], v.shape[0])
        nq, nk = q.shape[1], k.shape[1]
        # Prompt tokens are few (<= ~10), image tokens many (4096). Where the many-token side is
        # per prompt, projecting it costs more than everything else; both products below move
        # the projection onto the few tokens instead (the same sums in another order).
        if nq <= _FEW < nk and k.shape[0] == v.shape[0] == batch:
            return self._few_queries(q, k, v)
        if nk <= _FEW < nq:
            return self._few_keys(q, k, v, batch)
        out = F.scaled_dot_product_attention(
            self._split_heads(self.q_proj(q), batch),
            self._split_heads(self.k_proj(k), batch),
            self._split_heads(self.v_proj(v), batch),
        )
        b, heads, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * d))

    def _head_weights(self, proj: nn.Linear) -> torch.Tensor:
        """(heads, head_dim, embedding_dim) view of a projection's weight."""
        weight = _weight(proj)
        return weight.view(self.num_heads, -1, weight.shape[1])

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of a few queries to many per-batch keys without projecting the keys.

        Scores q W_k (k)^T: the key bias adds a constant per query row, which the softmax
        ignores. Values: A (v W_v^T + b_v) = (A v) W_v^T + b_v since the rows of A sum to 1.
        """
        nq, heads = q.shape[1], self.num_heads
        queries = self._split_heads(self.q_proj(q), q.shape[0])  # (bq, heads, nq, d)
        scale = queries.shape[-1] ** -0.5
        qk = torch.einsum("bhqd,hdc->bhqc", queries, self._head_weights(self.k_proj)) * scale
        batch = k.shape[0]
        scores = qk.flatten(1, 2).expand(batch, -1, -1) @ k.transpose(1, 2)  # (batch, heads*nq, nk)
        mixed = (scores.softmax(dim=-1) @ v).view(batch, heads, nq, -1)  # (batch, heads, nq, C)
        out = torch.einsum("bhqc,hdc->bqhd", mixed, self._head_weights(self.v_proj))
        out = out + self.v_proj.bias.view(heads, -1)
        return self.out_proj(out.flatten(2))

    def _few_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> torch.Tensor:
        """Attention of many queries to a few keys, the output projection applied to the few values.

        sum_h A_h (V_h W_o,h^T) equals the projection of the concatenated heads; with per-batch
        queries the query projection moves onto the keys too: (q W_q^T + b_q) K^T = q (W_q^T K^T) + b_q K^T.
        """
        heads = self.num_heads
        keys = self._split_heads(self.k_proj(k), batch)  # (batch, heads, nk, d)
        values = self._split_heads(self.v_proj(v), batch)
        nq, nk = q.shape[1], keys.shape[2]
        scale = keys.shape[-1] ** -0.5
        # Scores are laid out (batch, heads * nk, nq): the softmax over the few keys then runs
        # across contiguous rows of queries, which vectorises (a length-7 last axis does not).
        if q.shape[0] == 1 < batch:  # queries shared by every batch entry: project them once
            queries = self._split_heads(self.q_proj(q), 1)
            scores = (keys @ queries.transpose(-1, -2)).flatten(1, 2) * scale
        else:
            qk = torch.einsum("hdc,bhkd->bhkc", self._head_weights(self.q_proj), keys).flatten(1, 2) * scale
            bias = torch.einsum("hd,bhkd->bhk", self.q_proj.bias.view(heads, -1), keys).flatten(1) * scale
            scores = torch.baddbmm(bias[..., None], qk, q.transpose(1, 2))
        attn = scores.view(batch, heads, nk, nq).softmax(dim=2).view(batch, heads * nk, nq)
        projected = torch.einsum("bhkd,chd->bhkc", values, _weight(self.out_proj).view(-1, heads, values.shape[-1]))
        return torch.baddbmm(self.out_proj.bias, attn.transpose(1, 2), projected.flatten(1, 2))


def _weight(proj: nn.Linear) -> torch.Tensor:
    """A projection's weight, a LoRA layer's update included: the fast paths above use weights directly."""
    return proj.weight + proj.delta() if isinstance(proj, LoRALinear) else proj.weight


# Token counts up to this take the projection-saving attention paths.
_FEW = 64


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            # The first layer's queries already are the prompt embeddings (which carry
            # their positions), and it replaces rather than updates them, as SAM does.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of two-way blocks plus a final token->image attention."""

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim=mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=i == 0,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (1 or B, C, h, w), its PE (1, C, h, w), tokens (B, N, C).

        Returns the updated tokens (B, N, C) and image tokens (B, h*w, C).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + out)
        return queries, keys
