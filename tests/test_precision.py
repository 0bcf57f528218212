"""The encoder precision option: fp32 exact, bf16 close, auto is fp32 (bf16 misses the agreement targets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from biosam.errors import InputError
from biosam.models import build_sam
from biosam.models.config import SamConfig
from biosam.models.precision import resolve_precision

SMALL = SamConfig(encoder="tiny_vit", image_size=64, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                  tiny_num_heads=(1, 2, 2, 2), window_sizes=(7, 7, 7, 7), patch_stride=1)


def test_resolve_precision():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(InputError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_bf16_embedding_is_close_to_fp32_and_returned_as_fp32():
    torch.manual_seed(0)
    model = build_sam(SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fp32 = model.embed(x)
        model.precision = "bf16"
        bf16 = model.embed(x)
    assert fp32.dtype == bf16.dtype == torch.float32
    rel = float((bf16 - fp32).norm() / fp32.norm())
    assert 0 < rel < 0.03  # bf16 keeps 8 bits of mantissa: close, not identical


def test_precision_recorded_in_embedding_signature(lite_medsam):
    from biosam import Predictor

    predictor = Predictor(lite_medsam)
    predictor.set_image(np.zeros((32, 32), np.uint8) + np.arange(32, dtype=np.uint8))
    assert predictor.signature()["precision"] == lite_medsam.precision == resolve_precision("auto", "cpu")


def test_cli_refuses_unknown_precision(tmp_path):
    from biosam.cli.main import main as cli

    result = CliRunner().invoke(cli, ["auto", str(tmp_path / "x.tif"), "-o", str(tmp_path / "y.tif"),
                                      "--precision", "fp16"])
    assert result.exit_code != 0 and "fp16" in result.output


def test_configure_cpu_sets_threads_and_allocator():
    import platform

    from biosam.runtime import configure_cpu

    before = torch.get_num_threads()
    try:
        applied = configure_cpu(threads=1)
        assert applied["threads"] == torch.get_num_threads() == 1
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            assert applied["keep_freed_mib"] == 256
        assert "keep_freed_mib" not in configure_cpu(keep_freed_mib=0)
    finally:
        torch.set_num_threads(before)
