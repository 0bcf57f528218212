"""Process-wide settings for fast CPU inference, applied only when asked for.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands
allocations above a few MB straight back to the kernel when they are freed, so
the next activation of the same size is page-faulted in again: for SAM's
16-64 MB activations that costs more than the arithmetic on them (measured in
``benchmarks/speed.py``: up to 2x for the mask decoder). :func:`configure_cpu`
keeps freed memory in the process for reuse instead. The ``biosam`` command
calls it; Python users call it once at start.
"""

from __future__ import annotations

import ctypes
import logging
import platform

import torch

logger = logging.getLogger(__name__)

# mallopt() parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def configure_cpu(threads: int | None = None, keep_freed_mib: int = 256) -> dict:
    """Tune this process for CPU inference and return what was set.

    ``threads``: torch intra-op threads (default: leave torch's choice, one per core).
    ``keep_freed_mib``: on glibc, allocations up to this size are served from the
    heap and up to this much freed memory is kept for reuse rather than returned
    to the system (0 leaves the allocator alone). Peak memory is unchanged; the
    resident size after a large step stays up to this much higher.
    """
    applied: dict = {}
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
        applied["threads"] = torch.get_num_threads()
    if keep_freed_mib > 0 and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)
            size = int(keep_freed_mib) << 20
            ok = libc.mallopt(_M_MMAP_THRESHOLD, min(size, 1 << 30)) and libc.mallopt(_M_TRIM_THRESHOLD, size)
            applied["keep_freed_mib"] = keep_freed_mib if ok else 0
        except (OSError, AttributeError):
            logger.debug("mallopt unavailable; allocator left as it is")
    return applied
