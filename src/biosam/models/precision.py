"""Numeric precision of the image encoder: ``fp32``, ``bf16`` or ``auto``.

bf16 halves memory traffic and runs on the matrix units of recent CPUs (AMX,
AVX512-BF16) and GPUs; where the hardware has no bf16 arithmetic PyTorch
emulates it, many times slower than fp32. ``auto`` is meant to pick bf16 where
it is native *and* results stay within the agreement targets (LiteMedSAM box
masks at mean IoU >= 0.98 with fp32, ViT-B embeddings within 1%). Measured
(benchmarks/speed.py), bf16 misses both (mean mask IoU 0.967, embedding error
1.4%), so ``auto`` is fp32 today; ask for ``bf16`` explicitly to trade accuracy
for speed.
"""

from __future__ import annotations

import logging

import torch

from biosam.errors import InputError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``precision`` on ``device`` (``auto``: fp32, see the module docstring)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'.")
    if precision == "auto":
        return "fp32"
    if precision == "bf16" and not native_bf16(device):
        logger.warning("bf16 on %s is emulated in software on this machine and slower than fp32", device)
    return precision
