"""TinyViT image encoder as used by MobileSAM (1024 px) and LiteMedSAM (256 px).

Parameter and buffer names follow the published TinyViT/MobileSAM code so that their
checkpoints load unchanged (``patch_embed.seq.0.c.weight``, ``layers.{i}.blocks.{j}...``,
``neck.{0..3}``). Internally the attention stages keep the feature map as (B, H, W, C), so
the per-token layers (LayerNorm, Linear) and the depthwise conv (run on a channels-last view)
need no layout shuffles between them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import LayerNorm2d, gelu

__all__ = ["TinyViT"]


class ConvBN(nn.Sequential):
    """Bias-free convolution followed by BatchNorm (child names ``c`` and ``bn``)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        bn = nn.BatchNorm2d(out_chans)
        # a zero BN scale makes a freshly initialised residual branch start as the identity
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        super().__init__(OrderedDict(c=conv, bn=bn))

    def fused(self) -> tuple[Tensor, Tensor]:
        """Weight and bias of the single convolution that equals conv + BatchNorm in eval mode."""
        conv, bn = self.c, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward(x)
        # In eval mode BatchNorm is an affine map; folding it into the (small) weights saves a
        # full pass over the (large) activations.
        weight, bias = (t.to(x.dtype) for t in self.fused())
        conv = self.c
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1:
            return _pointwise(x, weight, bias)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# Above this many elements in the widest activation, the local conv blocks of the first stage run in
# horizontal strips: a strip's activations stay in cache, and no large buffer is page-faulted in.
_STRIP_ELEMENTS = 1 << 22
_STRIP_TARGET = 1 << 20


def _local_block(x: Tensor, convs: Sequence[ConvBN], residual: bool) -> Tensor:
    """1x1 conv, GELU, 3x3 depthwise conv (stride 1 or 2), GELU, 1x1 conv [+ x, GELU] on NCHW ``x``.

    Without autograd and on large inputs the result is computed strip by strip; each
    strip reads the rows its 3x3 conv needs (zero rows beyond the image, as the padding
    of the whole-image conv gives). Results equal the whole-image computation.
    """
    c1, c2, c3 = convs
    hidden = c1.c.out_channels
    height, width = x.shape[-2:]
    stride = c2.c.stride[0]
    if torch.is_grad_enabled() or c1.training or x.shape[0] * hidden * height * width <= _STRIP_ELEMENTS:
        y = gelu(c2(gelu(c1(x))))
        y = c3(y)
        return gelu(y.add_(x)) if residual else y
    (w1, b1), (w2, b2), (w3, b3) = (conv.fused() for conv in convs)
    w1, b1, w2, b2, w3, b3 = (t.to(x.dtype) for t in (w1, b1, w2, b2, w3, b3))
    out_h, out_w = (height + 2 - 3) // stride + 1, (width + 2 - 3) // stride + 1
    rows = max(1, _STRIP_TARGET // (x.shape[0] * hidden * width * stride))
    out = torch.empty((x.shape[0], c3.c.out_channels, out_h, out_w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    for o0 in range(0, out_h, rows):
        o1 = min(out_h, o0 + rows)
        lo, hi = o0 * stride - 1, (o1 - 1) * stride + 2  # input rows of the 3x3 conv, padding included
        a, b = max(lo, 0), min(hi, height)
        y = gelu(_pointwise(x[:, :, a:b], w1, b1))
        if a > lo or b < hi:
            y = F.pad(y, (0, 0, a - lo, hi - b))
        y = gelu(F.conv2d(y, w2, b2, (stride, stride), (0, 1), 1, hidden))
        y = _pointwise(y, w3, b3)
        if residual:
            y = gelu(y.add_(x[:, :, o0:o1]))
        out[:, :, o0:o1] = y
    return out


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """1x1 convolution of a channels-last NCHW tensor as one matrix product (faster than the conv path)."""
    out = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)
    return out.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Two conv-BN layers lifting the RGB input to the first stage width.

    ``patch_stride=4`` uses two 3x3 stride-2 convs (MobileSAM); ``patch_stride=1`` uses two
    1x1 stride-1 convs (LiteMedSAM, whose 256 px input already has the token grid size).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_stride: int) -> None:
        super().__init__()
        if patch_stride == 4:
            kernel, stride = 3, 2
        elif patch_stride == 1:
            kernel, stride = 1, 1
        else:
            raise ValueError(f"patch_stride must be 1 or 4, got {patch_stride}")
        hidden = embed_dim // 2
        # index 1 is the activation, so the weights sit at seq.0 and seq.2 as in the checkpoints
        self.seq = nn.Sequential(
            ConvBN(in_chans, hidden, kernel, stride), nn.GELU(), ConvBN(hidden, embed_dim, kernel, stride)
        )

    def forward(self, x: Tensor) -> Tensor:
        # channels-last from here on: oneDNN's convolutions are fastest in that layout, and the
        # attention stages want (B, H, W, C) memory anyway
        x = x.contiguous(memory_format=torch.channels_last)
        return self.seq[2](gelu(self.seq[0](x)))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        # the activation comes after the residual sum in this block design
        return _local_block(x, (self.conv1, self.conv2, self.conv3), residual=True)


class PatchMerging(nn.Module):
    """Change the width between stages; a stride-2 depthwise conv halves the resolution.

    The SAM variant keeps the resolution (``stride=1``) for the merge into the last stage so
    the encoder output stays at input / (4 * patch_stride).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C', H', W')."""
        return _local_block(x, (self.conv1, self.conv2, self.conv3), residual=False)


class ConvStage(nn.Module):
    """First stage: MBConv blocks on (B, C, H, W), then an optional merge."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one square window with learned position biases.

    One scalar bias per head and per absolute (dy, dx) offset between two tokens of the
    window; ``attention_biases`` has shape (num_heads, window_size**2). The qkv projection
    output is laid out per head as [q, k, v] (head by head), as in the checkpoints.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # offset (dy, dx) uses bias column dy * window_size + dx; derived from the window size,
        # so not stored in checkpoints
        pos = torch.arange(window_size)
        rows = pos.repeat_interleave(window_size)
        cols = pos.repeat(window_size)
        dy = (rows[:, None] - rows[None, :]).abs()
        dx = (cols[:, None] - cols[None, :]).abs()
        self.register_buffer("attention_bias_idxs", dy * window_size + dx, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(windows, N, C) tokens -> (windows, N, C)."""
        windows, tokens, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(windows, tokens, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        # (1, heads, N, N): a 4-D mask lets PyTorch pick its fused CPU kernel instead of the
        # much slower unfused fallback it uses for a 3-D mask
        bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, dim))


class TokenMLP(nn.Module):
    """Pre-norm two-layer MLP with GELU (keys ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, 3x3 depthwise conv, MLP; works on (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = ConvBN(dim, dim, kernel_size=local_conv_size, groups=dim)
        self.mlp = TokenMLP(dim, int(dim * mlp_ratio))

    def _windowed_attention(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        ws = self.window_size
        pad_h, pad_w = -height % ws, -width % ws
        # zero padding happens before the attention's LayerNorm, so padded tokens take part
        # as keys exactly as in the original implementation
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // ws, (width + pad_w) // ws
        windows = x.reshape(batch, rows, ws, cols, ws, dim).transpose(2, 3).reshape(-1, ws * ws, dim)
        windows = self.attn(windows)
        x = windows.view(batch, rows, cols, ws, ws, dim).transpose(2, 3).reshape(batch, rows * ws, cols * ws, dim)
        return x[:, :height, :width]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._windowed_attention(x)
        # channels-last view: the conv reads (B, H, W, C) memory without a copy
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class AttentionStage(nn.Module):
    """TinyViT blocks followed by an optional merge; (B, C, H, W) in and out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        # one copy into (B, H, W, C) memory; the blocks then keep that layout throughout
        x = x.permute(0, 2, 3, 1).contiguous()
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViT(nn.Module):
    """TinyViT backbone with the SAM neck: (B, 3, S, S) -> (B, 256, S/(4*patch_stride), ...).

    With the defaults (TinyViT-5M) this is MobileSAM's encoder for S=1024 and, with
    ``img_size=256, patch_stride=1``, LiteMedSAM's; both give a 64 x 64 embedding.
    """

    def __init__(
        self,
        img_size: int = 1024,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        patch_stride: int = 4,
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        in_chans: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_heads) == len(window_sizes) >= 2:
            raise ValueError("embed_dims, depths, num_heads, window_sizes need the same length (>= 2)")
        if img_size % (4 * patch_stride):
            raise ValueError(f"img_size {img_size} must be a multiple of {4 * patch_stride}")
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_stride)

        last = len(embed_dims) - 1
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            merge = None
            if i < last:
                merge = PatchMerging(dim, embed_dims[i + 1], stride=1 if i + 1 == last else 2)
            if i == 0:
                stage: nn.Module = ConvStage(dim, depth, mbconv_expand_ratio, merge)
            else:
                stage = AttentionStage(dim, depth, num_heads[i], window_sizes[i], mlp_ratio, local_conv_size, merge)
            self.layers.append(stage)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"image encoder expects {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        # the attention stages leave a channels-last tensor; hand out a standard layout
        return self.neck(x).contiguous()


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights and unit LayerNorms, as TinyViT is trained from."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
