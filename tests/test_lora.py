"""LoRA adapters: identity at start, merging, adapter-only state, loading adapters onto a base model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from biosam.models import CONFIGS, SamConfig, build_sam
from biosam.models.lora import (
    LoRALinear,
    add_lora,
    apply_adapters,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
)

# a small ViT: two blocks (one windowed, one global), enough to exercise SAM's ViT attention
TINY_VIT = SamConfig(encoder="vit", image_size=224, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,))


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same weights in a fresh module (the loaded model's ``info`` does not deep-copy)."""
    out = build_sam(model.config)
    out.load_state_dict(model.state_dict())
    return out.eval()


def _randomise_adapters(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=gen) * 0.05)


def test_lora_wraps_only_attention_projections_of_both_encoders():
    vit = build_sam(TINY_VIT)
    names = add_lora(vit, rank=2)
    assert names == [f"image_encoder.blocks.{i}.attn.{t}" for i in range(2) for t in ("qkv", "proj")]
    tiny = build_sam(CONFIGS["lite_medsam"])
    names = add_lora(tiny, rank=2, targets=("qkv",))
    # TinyViT: attention in stages 1-3 (2 + 6 + 2 blocks); the MLPs and the mask decoder are untouched
    assert len(names) == 10 and all(n.startswith("image_encoder.layers.") and n.endswith(".attn.qkv") for n in names)
    assert not any(isinstance(m, LoRALinear) for m in tiny.mask_decoder.modules())
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(tiny, rank=2, targets=("qkv",))
    with pytest.raises(ValueError, match="no attention projections"):
        add_lora(build_sam(TINY_VIT), rank=2, targets=("nothing",))


def test_only_adapters_train_and_adapter_state_has_only_them():
    model = build_sam(TINY_VIT)
    add_lora(model, rank=3, alpha=6)
    layer = model.image_encoder.blocks[0].attn.qkv
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_a.shape == (3, 64) and layer.lora_b.shape == (192, 3) and layer.scale == 2.0
    assert torch.count_nonzero(layer.lora_b) == 0
    adapters = lora_state_dict(model)
    assert sorted(adapters) == sorted(f"image_encoder.blocks.{i}.attn.{t}.lora_{ab}"
                                      for i in range(2) for t in ("qkv", "proj") for ab in "ab")


def test_lora_starts_identical_to_the_real_model(lite_medsam):
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    model = _plain_copy(lite_medsam)
    with torch.no_grad():
        before = model.embed(x)
        add_lora(model, rank=4)
        after = model.embed(x)
    assert torch.equal(before, after)  # max abs diff 0: B starts at zero


@pytest.mark.parametrize("config", ["tiny_vit", "lite_medsam"])
def test_merged_weights_compute_what_the_adapters_do(config, lite_medsam):
    base = build_sam(TINY_VIT).eval() if config == "tiny_vit" else _plain_copy(lite_medsam)
    size = base.image_size
    keys = list(base.state_dict())
    add_lora(base, rank=4, alpha=8)
    _randomise_adapters(base)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = base.embed(x)
        state = merged_state_dict(base)
        merged = merge_lora(copy.deepcopy(base))
        out = merged.embed(x)
    assert list(state) == keys  # exactly the original names, adapters folded in
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(torch.equal(state[k], v) for k, v in merged.state_dict().items())
    assert float((out - unmerged).abs().max()) <= 1e-5
    if config == "lite_medsam":  # the adapters do change the model, so the agreement above means something
        with torch.no_grad():
            assert float((lite_medsam.embed(x) - out).abs().max()) > 1e-3


def test_apply_adapters_rebuilds_the_merged_model_and_refuses_misfits():
    torch.manual_seed(0)
    base = build_sam(TINY_VIT)
    tuned = copy.deepcopy(base)
    add_lora(tuned, rank=2)
    _randomise_adapters(tuned, seed=3)
    with torch.no_grad():
        tuned.mask_decoder.iou_token.weight.add_(1.0)  # a module trained in full travels with the adapters
    tensors = lora_state_dict(tuned) | {k: v for k, v in tuned.state_dict().items() if k.startswith("mask_decoder.")}
    rebuilt = apply_adapters(copy.deepcopy(base), tensors, rank=2, alpha=2)
    expected = merged_state_dict(tuned)
    for key, value in rebuilt.state_dict().items():
        np.testing.assert_allclose(value.numpy(), expected[key].numpy(), atol=1e-7, err_msg=key)
    missing = {k: v for k, v in tensors.items() if not k.endswith("blocks.1.attn.proj.lora_b")}
    with pytest.raises(ValueError, match="1 adapter tensor.*missing.*blocks.1.attn.proj.lora_b"):
        apply_adapters(copy.deepcopy(base), missing, rank=2, alpha=2)
    with pytest.raises(ValueError, match="another shape"):
        apply_adapters(copy.deepcopy(base), tensors, rank=3, alpha=3)
