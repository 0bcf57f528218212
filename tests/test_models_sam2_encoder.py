"""Fidelity of our SAM 2 image encoder (Hiera trunk + FPN neck) vs the sam2 reference.

Both get the same seeded random weights (the reference init, the zero-initialised position
tables filled with noise, and seeded noise on every tensor so that LayerNorm affine terms and
biases matter), copied across with strict=True.
"""

from __future__ import annotations

import pytest
import torch

from biosam.models.sam2.hiera import HIERA_CONFIGS, Hiera, build_hiera
from biosam.models.sam2.image_encoder import FpnNeck, Sam2ImageEncoder, build_sam2_image_encoder

from conftest import reference
sam2 = reference("sam2")
from sam2.modeling.backbones.hieradet import Hiera as RefHiera  # noqa: E402
from sam2.modeling.backbones.image_encoder import FpnNeck as RefFpnNeck  # noqa: E402
from sam2.modeling.backbones.image_encoder import ImageEncoder as RefImageEncoder  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine  # noqa: E402

TOL = 1e-4


def _reference(name: str, seed: int = 0) -> RefImageEncoder:
    """sam2's ImageEncoder for a released trunk config, with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    trunk = RefHiera(**HIERA_CONFIGS[name])
    neck = RefFpnNeck(
        PositionEmbeddingSine(256), 256, trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest"
    )
    ref = RefImageEncoder(trunk=trunk, neck=neck, scalp=1)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if "pos_embed" in pname:
                p.normal_(std=0.02)  # zeros at init
            else:
                p.add_(torch.randn_like(p) * 0.03)
    return ref.eval()


def _ours_from(ref: RefImageEncoder, name: str) -> Sam2ImageEncoder:
    ours = build_sam2_image_encoder(name)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny_pair():
    ref = _reference("tiny")
    return ref, _ours_from(ref, "tiny")


@pytest.mark.parametrize(("size", "batch"), [(1024, 1), (512, 2)])
def test_tiny_matches_reference(tiny_pair, size, batch):
    ref, ours = tiny_pair
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.inference_mode():
        expected = ref(x)
        features, pos = ours(x)
    grids = [size // 4, size // 8, size // 16]
    assert [tuple(f.shape) for f in features] == [(batch, 256, g, g) for g in grids]
    assert len(pos) == len(expected["vision_pos_enc"]) == 3
    for ref_f, f in zip(expected["backbone_fpn"], features):
        assert ref_f.abs().max() > 0.5  # real signal, not a degenerate all-zero map
        assert _max_diff(ref_f, f) <= TOL
    for ref_p, p in zip(expected["vision_pos_enc"], pos):
        assert _max_diff(ref_p, p) <= TOL


def test_non_square_small_images_and_gradients():
    """Non-square inputs (padded windows in stages 3-4) and autograd through the in-place shortcuts."""
    ref = _reference("tiny", seed=1).train()
    ours = _ours_from(ref, "tiny").train()  # training mode, no dropout or drop path in these configs
    x = torch.randn(3, 3, 96, 160, generator=torch.Generator().manual_seed(2))
    expected = ref(x)["backbone_fpn"]
    features, _ = ours(x)
    weights = [torch.randn(f.shape, generator=torch.Generator().manual_seed(3 + i)) for i, f in enumerate(features)]
    for ref_f, f in zip(expected, features):
        assert _max_diff(ref_f, f) <= TOL
    sum((w * f).sum() for w, f in zip(weights, expected)).backward()
    sum((w * f).sum() for w, f in zip(weights, features)).backward()
    ref_grads = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        g_ref = ref_grads[pname].grad
        assert g_ref is not None and p.grad is not None, pname
        scale = max(1.0, g_ref.abs().max().item())
        assert _max_diff(g_ref, p.grad) <= 1e-3 * scale, pname


def test_position_embedding_matches_reference():
    ref = _reference("base_plus").trunk
    ours = build_hiera("base_plus")
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        for hw in [(256, 256), (128, 128), (64, 96)]:
            assert _max_diff(ref._get_pos_embed(hw), ours.position_embedding(*hw)) <= 1e-6


@pytest.mark.parametrize("name", ["tiny", "small", "base_plus", "large"])
def test_state_dict_keys_and_shapes(name):
    torch.manual_seed(0)
    ref = RefHiera(**HIERA_CONFIGS[name])
    ours = build_hiera(name)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert ours.channel_list == ref.channel_list
    neck = RefFpnNeck(PositionEmbeddingSine(256), 256, ref.channel_list)
    our_neck = FpnNeck(256, ours.channel_list)
    assert {k: v.shape for k, v in our_neck.state_dict().items()} == {
        k: v.shape for k, v in neck.state_dict().items()
    }


def test_rejects_sizes_off_the_window_grid():
    trunk = Hiera(**HIERA_CONFIGS["tiny"])
    with pytest.raises(ValueError, match="multiples of 32"):
        trunk(torch.zeros(1, 3, 100, 128))
    with pytest.raises(ValueError, match="do not match"):
        Sam2ImageEncoder(trunk, FpnNeck(256, [896, 448, 224, 112]))
