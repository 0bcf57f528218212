"""SAM v1 mask decoder: two-way transformer, hypernetwork mask heads and IoU head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d, gelu
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts low-res mask logits and their IoU scores from image and prompt embeddings.

    Token 0 is the single-mask output, tokens 1..num_multimask_outputs the ambiguity-aware
    outputs; each token's hypernetwork MLP turns it into weights over upscaled features.
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer if transformer is not None else TwoWayTransformer(
            depth=2, embedding_dim=transformer_dim, num_heads=8, mlp_dim=2048
        )
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return logits (B, C, 4h, 4w) and IoU predictions (B, C); C = 3 if multimask else 1.

        `image_embeddings` and `dense_prompt_embeddings` may have batch 1 (shared by all B
        prompts) or B.
        """
        b = sparse_prompt_embeddings.shape[0]
        dense = dense_prompt_embeddings
        for name, t in (("image_embeddings", image_embeddings), ("dense prompt", dense)):
            if t.shape[0] not in (1, b):
                raise ValueError(f"{name} batch {t.shape[0]} does not match {b} prompts")
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            # An expanded (shared) dense prompt: keep the image side at batch 1 so the first
            # attention layer projects the image tokens once rather than once per prompt.
            dense = dense[:1]
        src = image_embeddings + dense

        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )
        hs, keys = self.transformer(src, image_pe, tokens)

        c, h, w = src.shape[1:]
        upscaled = self._upscale(keys.reshape(b, h * w, c))  # (B, h*w*16, C/8), pixels in block order
        # Only the requested outputs' masks are computed.
        first, last = (1, self.num_mask_tokens) if multimask_output else (0, 1)
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(first, last)], dim=1
        )
        masks = _raster(hyper_in @ upscaled.transpose(1, 2), h, w)
        iou_pred = self.iou_prediction_head(hs[:, 0])[:, first:last]
        return masks, iou_pred

    def _upscale(self, tokens: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` on (B, h*w, C) tokens -> (B, h*w*16, C/8) features, pixels in block order.

        A 2x2 stride-2 transposed convolution is one matrix product per pixel. Its four outputs
        per input pixel stay next to each other (block order: token, then 2x2 offsets of the
        first, then of the second upsampling), so the large feature maps are never shuffled;
        only the final masks are put in raster order (:func:`_raster`).
        """
        up1, norm, _, up2, _ = self.output_upscaling
        b = tokens.shape[0]
        x = _transposed_conv_2x2(tokens, up1).view(b, -1, up1.out_channels)
        x = gelu(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        return gelu(_transposed_conv_2x2(x, up2).view(b, -1, up2.out_channels))


def _transposed_conv_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """``conv`` (kernel 2, stride 2) on pixels ``x`` (B, N, Cin) -> (B, N, 4 * Cout), offsets (dy, dx) major."""
    weight = conv.weight.permute(0, 2, 3, 1).flatten(1)  # (Cin, Cout, 2, 2) -> (Cin, [dy, dx, Cout])
    return F.linear(x, weight.t(), conv.bias.repeat(4))


def _raster(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, K, h*w*16) masks in block order (i, j, dy1, dx1, dy2, dx2) -> (B, K, 4h, 4w) images."""
    b, k = masks.shape[:2]
    blocks = masks.view(b, k, h, w, 2, 2, 2, 2)
    return blocks.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, k, 4 * h, 4 * w)
