"""SAM 2 memory encoder: fuses a frame's image features with its predicted mask into memory tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common import LayerNorm2d, gelu
from .position import sine_position_encoding

__all__ = ["MaskDownSampler", "CXBlock", "Fuser", "MemoryEncoder"]


class MaskDownSampler(nn.Module):
    """Strided conv stack that takes a full-resolution mask down to the image-feature grid.

    Each stage divides the spatial size by ``stride`` and multiplies the channels by
    ``stride**2`` (conv -> LayerNorm2d -> GELU); a 1x1 conv then maps to ``embed_dim``.
    Layout of ``encoder`` (and so the checkpoint keys) follows SAM 2.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        total_stride: int = 16,
    ) -> None:
        super().__init__()
        num_stages = round(math.log(total_stride, stride))
        if stride**num_stages != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(num_stages):
            out_channels = channels * stride**2
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size, stride=stride, padding=padding),
                LayerNorm2d(out_channels),
                nn.GELU(),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.encoder(masks)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise conv, LayerNorm, pointwise MLP (GELU), layer scale, residual."""

    def __init__(self, dim: int = 256, kernel_size: int = 7, padding: int = 3) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The MLP runs channels-last anyway, so normalise there directly rather than
        # permuting to NHWC inside LayerNorm2d and back again.
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (y.shape[-1],), self.norm.weight, self.norm.bias, self.norm.eps)
        y = self.pwconv2(gelu(self.pwconv1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """A stack of :class:`CXBlock` applied to the mask-conditioned image features."""

    def __init__(self, dim: int = 256, num_layers: int = 2, kernel_size: int = 7, padding: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim, kernel_size, padding) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Encodes one frame's image features and mask into memory features and their positions.

    State-dict keys equal those of ``sam2.modeling.memory_encoder.MemoryEncoder`` as configured
    in every SAM 2 / 2.1 model (mask stride 16, two CXBlocks, 64 output channels).
    """

    def __init__(
        self,
        in_dim: int = 256,
        out_dim: int = 64,
        mask_kernel_size: int = 3,
        mask_stride: int = 2,
        mask_padding: int = 1,
        mask_total_stride: int = 16,
        fuser_layers: int = 2,
        fuser_kernel_size: int = 7,
        fuser_padding: int = 3,
    ) -> None:
        super().__init__()
        self.mask_downsampler = MaskDownSampler(
            in_dim, mask_kernel_size, mask_stride, mask_padding, mask_total_stride
        )
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim, fuser_layers, fuser_kernel_size, fuser_padding)
        self.out_proj: nn.Module = (
            nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()
        )
        self.out_dim = out_dim

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (B, in_dim, h, w) and mask logits (B, 1, 16h, 16w).

        With ``skip_mask_sigmoid`` the masks are taken as already in [0, 1] (e.g. binarised).
        Returns memory features and their sine position encoding, both (B, out_dim, h, w).
        """
        if not skip_mask_sigmoid:
            # the encoder was trained on probabilities, close to the binary masks it also sees
            masks = torch.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        batch, channels, height, width = x.shape
        pos = sine_position_encoding(channels, height, width, device=x.device).to(x.dtype)
        return x, pos.expand(batch, -1, -1, -1).contiguous()
