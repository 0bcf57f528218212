"""Numeric precision of the image encoder: ``fp32``, ``bf16`` or ``auto``.

bf16 halves memory traffic and runs on the matrix units of recent CPUs (AMX,
AVX512-BF16) and GPUs. Where the hardware has no bf16 arithmetic PyTorch
emulates it, which is many times slower than fp32, so ``auto`` picks bf16 only
where it is native.
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
    """``fp32`` or ``bf16`` for ``precision`` on ``device`` (``auto``: bf16 only where native)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'.")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        logger.warning("bf16 on %s is emulated in software on this machine and slower than fp32", device)
    return precision
