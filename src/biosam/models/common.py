"""Small layers shared by the SAM v1 modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU; in place when no gradient is needed.

    At inference the activations of the high-resolution layers are tens of MB:
    writing into a fresh buffer costs more (page faults) than the arithmetic.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU, in place when no gradient is needed (see :func:`gelu`)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.relu(x)
    return x.relu_()


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising the last axis of the NHWC view uses the fused kernel; when the
        # input is already channels-last in memory the permutes are free.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Two-layer feed-forward block: Linear -> activation -> Linear."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lin1(x)
        if type(self.act) is nn.GELU and self.act.approximate == "none":
            return self.lin2(gelu(hidden))
        if type(self.act) is nn.ReLU:
            return self.lin2(relu(hidden))
        return self.lin2(self.act(hidden))


class MLP(nn.Module):
    """Stack of Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = relu(x)
        return x
