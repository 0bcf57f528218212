"""SAM v1 prompt encoder: points, boxes and low-res masks to decoder embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class FourierPositionEncoding(nn.Module):
    """Encodes 2-D positions with sin/cos of fixed random projections (Tancik et al. 2020)."""

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        # A persistent buffer: the projection is part of every SAM checkpoint.
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats)
        )

    def _encode(self, unit_xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) positions in [0, 1] -> (..., 2 * num_pos_feats), computed in fp32."""
        gaussian = self.positional_encoding_gaussian_matrix
        proj = (2 * unit_xy.float() - 1) @ gaussian.float()
        proj = (2 * math.pi) * proj
        return torch.cat([proj.sin(), proj.cos()], dim=-1).to(gaussian.dtype)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (h, w) grid, shape (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )  # (h, w, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def encode_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode (..., 2) pixel (x, y) coordinates of an (H, W) image."""
        h, w = image_size
        unit = coords.float() / torch.tensor([w, h], device=coords.device, dtype=torch.float32)
        return self._encode(unit)


class PromptEncoder(nn.Module):
    """Embeds sparse prompts (points, box corners) and a dense prompt (mask logits).

    Point labels: 1 foreground, 0 background, -1 padding ("not a point"), 2 / 3 the
    top-left / bottom-right box corners (the labels boxes are encoded with).
    """

    num_point_embeddings: int = 4

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = FourierPositionEncoding(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, shape (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _label_table(self) -> torch.Tensor:
        """(5, C) learned embeddings indexed by label + 1 (padding first)."""
        weights = [self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings]
        return torch.cat(weights, dim=0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise ValueError(
                f"points must be coords (B, K, 2) and labels (B, K), got {tuple(coords.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if labels.numel() and (labels.min() < -1 or labels.max() > 3):
            raise ValueError(
                "point labels must be 1 (fg), 0 (bg), -1 (padding) or 2/3 (box corners)"
            )
        coords = coords + 0.5  # pixel centres
        labels = labels.long()
        if pad:
            # Without a box SAM was trained with an extra padding point after the clicks.
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        pe = self.pe_layer.encode_coords(coords, self.input_image_size)
        # Padding points carry no position, only their learned embedding.
        pe = pe.masked_fill((labels == -1).unsqueeze(-1), 0.0)
        return pe + self._label_table()[labels + 1]

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.reshape(-1, 2, 2) + 0.5
        pe = self.pe_layer.encode_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return pe + corner_embed

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        expected = (1, *self.mask_input_size)
        if masks.ndim != 4 or tuple(masks.shape[1:]) != expected:
            raise ValueError(
                f"mask prompts must have shape (B, 1, {self.mask_input_size[0]}, "
                f"{self.mask_input_size[1]}), got {tuple(masks.shape)}"
            )
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return sparse (B, n, C) and dense (B, C, h, w) prompt embeddings.

        Prompts with batch size 1 are shared by all B prompts of the others (broadcast).
        Without a mask the dense embedding is an expanded view of one learned vector.
        """
        sizes = []
        if points is not None:
            sizes.append(points[0].shape[0])
        if boxes is not None:
            sizes.append(boxes.reshape(-1, 4).shape[0])
        if masks is not None:
            sizes.append(masks.shape[0])
        distinct = set(sizes) - {1}
        if len(distinct) > 1:
            raise ValueError(f"prompt batch sizes disagree: {sizes}")
        bs = distinct.pop() if distinct else 1

        weight = self.no_mask_embed.weight
        sparse = [weight.new_zeros(bs, 0, self.embed_dim)]
        if points is not None:
            point_embeddings = self._embed_points(points[0], points[1], pad=boxes is None)
            sparse.append(point_embeddings.expand(bs, -1, -1))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes).expand(bs, -1, -1))
        sparse_embeddings = torch.cat(sparse, dim=1)

        if masks is not None:
            dense = self._embed_masks(masks).expand(bs, -1, -1, -1)
        else:
            dense = weight.view(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse_embeddings, dense
