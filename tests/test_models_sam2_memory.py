"""SAM 2 memory encoder and memory attention against the official sam2 modules.

The reference modules are built directly with the parameters of the sam2.1_hiera_t config
(every SAM 2 / 2.1 size uses the same memory modules), given seeded random weights, and
their state dicts are loaded strictly into ours.
"""

from __future__ import annotations

import pytest
import torch

from biosam.models.sam2.memory_attention import AxialRoPE, MemoryAttention, apply_rope
from biosam.models.sam2.memory_encoder import MemoryEncoder

from conftest import reference
sam2 = reference("sam2")
from sam2.modeling import memory_attention as ref_attention  # noqa: E402
from sam2.modeling import memory_encoder as ref_encoder  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine, apply_rotary_enc, compute_axial_cis  # noqa: E402
from sam2.modeling.sam.transformer import RoPEAttention as RefRoPEAttention  # noqa: E402

TOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value so that no term (layer scale, norms, biases) is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:  # biases, norm weights, layer scales
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                # sharper attention, so that positions (RoPE) visibly change the result
                p.mul_(3.0)


def _ref_memory_encoder() -> torch.nn.Module:
    block = ref_encoder.CXBlock(dim=256, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True)
    return ref_encoder.MemoryEncoder(
        out_dim=64,
        mask_downsampler=ref_encoder.MaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=ref_encoder.Fuser(block, num_layers=2),
        position_encoding=PositionEmbeddingSine(num_pos_feats=64, normalize=True, scale=None, temperature=10000),
    )


def _ref_memory_attention() -> torch.nn.Module:
    self_attention = RefRoPEAttention(
        rope_theta=10000.0, feat_sizes=[64, 64], embedding_dim=256, num_heads=1, downsample_rate=1, dropout=0.1
    )
    cross_attention = RefRoPEAttention(
        rope_theta=10000.0,
        feat_sizes=[64, 64],
        rope_k_repeat=True,
        embedding_dim=256,
        num_heads=1,
        downsample_rate=1,
        dropout=0.1,
        kv_in_dim=64,
    )
    layer = ref_attention.MemoryAttentionLayer(
        activation="relu",
        cross_attention=cross_attention,
        d_model=256,
        dim_feedforward=2048,
        dropout=0.1,
        pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        self_attention=self_attention,
    )
    return ref_attention.MemoryAttention(d_model=256, pos_enc_at_input=True, layer=layer, num_layers=4)


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    ref = _ref_memory_encoder()
    _randomize(ref, 1)
    ours = MemoryEncoder()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


@pytest.fixture(scope="module")
def attentions():
    torch.manual_seed(0)
    ref = _ref_memory_attention()
    _randomize(ref, 2)
    ours = MemoryAttention()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_memory_encoder_matches_reference(encoders, skip_mask_sigmoid):
    ref, ours = encoders
    gen = torch.Generator().manual_seed(3)
    pix_feat = torch.randn(1, 256, 32, 32, generator=gen)
    masks = 4 * torch.randn(1, 1, 512, 512, generator=gen)
    if skip_mask_sigmoid:
        masks = (masks > 0).float()
    with torch.no_grad():
        expected = ref(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
        features, pos = ours(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
    assert features.shape == (1, 64, 32, 32)
    assert _max_diff(features, expected["vision_features"]) <= TOL
    assert _max_diff(pos, expected["vision_pos_enc"][0]) == 0.0
    # the mask path contributes: an empty mask gives different memory features
    with torch.no_grad():
        empty, _ = ours(pix_feat, torch.zeros_like(masks), skip_mask_sigmoid=True)
    assert _max_diff(empty, features) > 1e-2


def test_memory_encoder_batch_positions(encoders):
    _, ours = encoders
    gen = torch.Generator().manual_seed(4)
    pix_feat = torch.randn(2, 256, 8, 8, generator=gen)
    masks = torch.randn(2, 1, 128, 128, generator=gen)
    with torch.no_grad():
        features, pos = ours(pix_feat, masks)
        single, _ = ours(pix_feat[1:], masks[1:])
    assert pos.shape == features.shape == (2, 64, 8, 8)
    assert torch.equal(pos[0], pos[1])
    assert _max_diff(features[1:], single) <= 1e-5


@pytest.mark.parametrize("side", [32, 64])
def test_rope_tables_match_reference(side):
    rope = AxialRoPE(256)
    rotations = rope(side * side, torch.device("cpu"))
    freqs_cis = compute_axial_cis(dim=256, end_x=side, end_y=side, theta=10000.0)
    assert torch.equal(rotations, freqs_cis)
    assert rope(side * side, torch.device("cpu")) is rotations  # cached per grid size

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, side * side, 256, generator=gen)
    k = torch.randn(2, 1, 3 * side * side, 256, generator=gen)
    ref_q, ref_k = apply_rotary_enc(q, k, freqs_cis, repeat_freqs_k=True)
    assert _max_diff(apply_rope(q, rotations), ref_q) <= 1e-6
    assert _max_diff(apply_rope(k, rotations), ref_k) <= 1e-6
    # a rotation keeps the norm of every channel pair and moves the pairs off token 0
    pair_norm = q.unflatten(-1, (128, 2)).norm(dim=-1)
    rotated = apply_rope(q, rotations)
    assert _max_diff(rotated.unflatten(-1, (128, 2)).norm(dim=-1), pair_norm) <= 1e-5
    assert torch.equal(rotated[:, :, 0], q[:, :, 0]) and _max_diff(rotated, q) > 0.5


def _memory_inputs(side: int, batch: int, frames: int, pointers: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n = side * side
    curr = torch.randn(n, batch, 256, generator=gen)
    curr_pos = torch.randn(n, batch, 256, generator=gen)
    memory = torch.randn(frames * n + pointers, batch, 64, generator=gen)
    memory_pos = torch.randn(frames * n + pointers, batch, 64, generator=gen)
    return curr, memory, curr_pos, memory_pos


@pytest.mark.parametrize(
    ("side", "batch", "frames", "pointers"),
    [(32, 1, 2, 4), (32, 2, 2, 4), (32, 1, 2, 0), (32, 2, 2, 0), (64, 1, 1, 4)],
)
def test_memory_attention_matches_reference(attentions, side, batch, frames, pointers):
    ref, ours = attentions
    curr, memory, curr_pos, memory_pos = _memory_inputs(side, batch, frames, pointers, seed=side + batch + pointers)
    with torch.no_grad():
        expected = ref(curr=curr, memory=memory, curr_pos=curr_pos, memory_pos=memory_pos, num_obj_ptr_tokens=pointers)
        out = ours(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=pointers)
    assert out.shape == (side * side, batch, 256)
    diff = _max_diff(out, expected)
    assert diff <= TOL, diff


def test_memory_attention_pointers_skip_rope(attentions):
    """Rotating the pointer tokens as if they were grid tokens changes the result."""
    _, ours = attentions
    side, pointers = 16, 256  # 256 pointers: exactly one extra grid, so rotating them is possible
    curr, memory, curr_pos, memory_pos = _memory_inputs(side, 1, 1, pointers, seed=7)
    with torch.no_grad():
        excluded = ours(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=pointers)
        rotated = ours(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=0)
    assert _max_diff(excluded, rotated) > 1e-3
    # the RoPE tables are a cache, never part of the checkpoint
    assert not any("rope" in key for key in ours.state_dict())


def test_memory_attention_rejects_partial_grid(attentions):
    _, ours = attentions
    curr, memory, curr_pos, memory_pos = _memory_inputs(8, 1, 1, 3, seed=8)
    with pytest.raises(ValueError, match="grid"):
        ours(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=0)
