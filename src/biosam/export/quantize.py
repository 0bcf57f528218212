"""int8 ONNX files: dynamic quantization of the weights (activations quantized on the fly by onnxruntime)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from biosam.errors import InputError
from biosam.io.files import atomic_path

log = logging.getLogger(__name__)

#: What ``quantize=`` accepts.
QUANTIZATIONS = ("int8",)
# Only the matrix products, with one scale per output channel: measured on LiteMedSAM's nuclei boxes
# (mean mask IoU against fp32), int8 convolutions too gave 0.71, one scale per tensor 0.86, this 0.95.
_OPS = ["MatMul"]


def require_quantization():
    """onnxruntime's quantization tools, or :class:`InputError` naming the extra to install."""
    try:
        from onnxruntime import quantization
    except ImportError:
        raise InputError("int8 quantization needs onnxruntime: pip install 'biosam[export]'.") from None
    return quantization


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer warns on the root logger (advice to pre-process the model for static
    quantization, shapes it could not infer); those notes go to our debug log instead."""

    def to_debug(record: logging.LogRecord) -> bool:
        log.debug("onnxruntime: %s", record.getMessage())
        return False

    root = logging.getLogger()
    root.addFilter(to_debug)
    try:
        yield
    finally:
        root.removeFilter(to_debug)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``src`` (an ONNX file) with int8 weights to ``dst`` (atomically); return ``dst``.

    Masks from int8 files differ a little from fp32 ones (see the README's table); use them
    where size or speed matter more.
    """
    quantization = require_quantization()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"{src}: ONNX file not found.")
    with atomic_path(dst) as tmp, _quiet_root_logger():
        quantization.quantize_dynamic(str(src), str(tmp), weight_type=quantization.QuantType.QInt8, per_channel=True,
                                      op_types_to_quantize=_OPS)
    log.info("quantized %s -> %s (%.1f -> %.1f MB)", src, dst, src.stat().st_size / 1e6, dst.stat().st_size / 1e6)
    return dst
