"""SAM 2 / 2.1 image encoder: Hiera trunk + FPN neck, with sine position encodings per level."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .hiera import HIERA_CONFIGS, Hiera, build_hiera
from .position import sine_position_encoding

__all__ = ["FpnNeck", "Sam2ImageEncoder", "build_sam2_image_encoder"]


class FpnNeck(nn.Module):
    """Feature pyramid over the trunk maps: a 1x1 lateral conv per level, top-down sums on some levels.

    ``backbone_channel_list`` lists the trunk channels lowest resolution first (``Hiera.channel_list``);
    ``convs[j]`` is the lateral of that j-th entry. Output level ``i`` (0 = highest resolution) adds
    the upsampled output of level ``i + 1`` only if ``i`` is in ``fpn_top_down_levels``. Defaults are
    the values of the released models.
    """

    def __init__(
        self,
        d_model: int = 256,
        backbone_channel_list: Sequence[int] = (768, 384, 192, 96),
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fpn_interp_model: str = "nearest",
        fuse_type: str = "sum",
        fpn_top_down_levels: Sequence[int] | None = (2, 3),
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(c, d_model, kernel_size, stride=stride, padding=padding)))
            for c in backbone_channel_list
        )
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type
        levels = range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = list(levels)
        self._position_cache: dict[tuple, torch.Tensor] = {}

    def forward(
        self, xs: Sequence[torch.Tensor], drop_lowest: int = 0
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Trunk maps (highest resolution first) -> (features, position encodings), same order.

        The ``drop_lowest`` lowest-resolution levels still feed the top-down path but are not
        returned (and get no position encoding).
        """
        n = len(self.convs)
        if len(xs) != n:
            raise ValueError(f"neck has {n} levels, got {len(xs)} feature maps")
        if not 0 <= drop_lowest < n:
            raise ValueError(f"drop_lowest must be in [0, {n - 1}], got {drop_lowest}")
        features: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        prev = None
        for i in reversed(range(n)):  # from the lowest resolution up
            lateral = self.convs[n - 1 - i](xs[i])
            if prev is not None and i in self.fpn_top_down_levels:
                # Upsampled in fp32 as the released models were run (a bf16 lateral then sums to fp32).
                top_down = F.interpolate(
                    prev.float(),
                    scale_factor=2.0,
                    mode=self.fpn_interp_model,
                    align_corners=None if self.fpn_interp_model == "nearest" else False,
                )
                prev = lateral + top_down
                if self.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            features[i] = prev
        features = features[: n - drop_lowest]
        pos = [self.position_encoding(f) for f in features]
        return features, pos

    def position_encoding(self, feature: torch.Tensor) -> torch.Tensor:
        """Sine position encoding for a (B, C, H, W) feature map.

        The table depends only on the grid size, so it is computed once per size, device and
        dtype and returned as a batch-expanded view: treat the result as read-only.
        """
        b, _, h, w = feature.shape
        key = (h, w, feature.device, feature.dtype)
        table = self._position_cache.get(key)
        if table is None:
            # A plain tensor even when called under inference_mode, so it can join autograd graphs later.
            with torch.inference_mode(False):
                table = sine_position_encoding(self.d_model, h, w, device=feature.device).to(feature.dtype)
            self._position_cache[key] = table
        return table.expand(b, -1, -1, -1)


class Sam2ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck. (B, 3, H, W) -> (features, position encodings), highest resolution first.

    The ``scalp`` lowest-resolution levels are dropped from the outputs (released models: 1, so a
    1024 px image gives 256-channel maps at 256², 128² and 64²).
    """

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"trunk channels {trunk.channel_list} do not match the neck's {neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.neck(self.trunk(x), drop_lowest=self.scalp)


def build_sam2_image_encoder(name: str) -> Sam2ImageEncoder:
    """Image encoder of a released SAM 2 / 2.1 model: ``tiny``, ``small``, ``base_plus`` or ``large``."""
    if name not in HIERA_CONFIGS:
        raise ValueError(f"unknown SAM 2 image encoder {name!r}; expected one of {', '.join(HIERA_CONFIGS)}")
    trunk = build_hiera(name)
    return Sam2ImageEncoder(trunk, FpnNeck(256, trunk.channel_list), scalp=1)
