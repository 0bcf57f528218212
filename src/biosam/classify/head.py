"""The mask classifier's network: a small conv head on frozen SAM features masked in and out."""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2),
        nn.BatchNorm2d(cout),
        nn.PReLU(),
        nn.MaxPool2d(2),
    )


class MaskClassifier(nn.Module):
    """Class logits of candidate masks from their masked SAM features.

    Input ``(B, 2 * C, s, s)``: the encoder's top-level features multiplied by
    the candidate mask and by its complement (see
    :func:`biosam.classify.features.masked_features`). Three conv blocks
    (1x1 512->256, 3x3 256->256, 3x3 256->128; each BatchNorm, PReLU and 2x max
    pooling), dropout, global average pooling, then 128->64, LayerNorm, PReLU,
    64->``num_classes``: 1.03 M parameters for 2 classes.
    """

    def __init__(self, num_classes: int, in_channels: int = 512, dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.features = nn.Sequential(
            _conv_block(in_channels, 256, 1),
            _conv_block(256, 256, 3),
            _conv_block(256, 128, 3),
            nn.Dropout(dropout),
        )
        self.head = nn.Sequential(nn.Linear(128, 64), nn.LayerNorm(64), nn.PReLU(), nn.Linear(64, num_classes))
        # SAM features are small (std ~0.07): scaled to about unit variance, BatchNorm's running
        # statistics start near the truth and evaluation matches training after few steps.
        self.register_buffer("input_scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * self.input_scale).mean(dim=(2, 3)))
