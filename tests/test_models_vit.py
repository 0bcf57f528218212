"""Fidelity of our SAM v1 modules (ViT-B, prompt encoder, mask decoder) vs segment-anything.

Both models get the same seeded random weights (a random init, then seeded noise on every
tensor so that LayerNorm affine terms, biases, relative positions and the absolute position
embedding all matter). The expensive ViT-B forward runs once per implementation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from biosam.models import CONFIGS, SamConfig, build_sam
from biosam.models import vit as vit_module
from biosam.models.vit import ImageEncoderViT

from conftest import reference
segment_anything = reference("segment_anything")

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
TOL = 1e-4
SAM_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
SAM_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Add seeded noise to every parameter and buffer (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            # Relative positions start at zero in SAM; give them weight so they shape attention.
            scale = 0.3 if "rel_pos" in name else 0.05
            tensor.add_(torch.randn(tensor.shape, generator=gen) * scale)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = segment_anything.sam_model_registry["vit_b"]()
    _perturb(ref, seed=1)
    ref.eval()
    ours = build_sam(CONFIGS["vit_b"])
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    return ref, ours


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """ihc.png cropped to a 3:4 portrait, resized to 1024 x 768, normalised, padded to 1024."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA.resolve()} (../shared/data)")
    import imageio.v3 as iio

    rgb = iio.imread(SHARED_DATA / "skimage_bundled" / "ihc.png")[:, :384, :3]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(1024, 768), mode="bilinear", align_corners=False)
    x = (x - SAM_MEAN) / SAM_STD
    return F.pad(x, (0, 1024 - 768, 0, 0))


@pytest.fixture(scope="module")
def embeddings(models, image):
    ref, ours = models
    with torch.inference_mode():
        return ref.image_encoder(image), ours.embed(image)


def _ref_decode(ref, embedding, points=None, boxes=None, masks=None, multimask=False):
    sparse, dense = ref.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return ref.mask_decoder(
        image_embeddings=embedding,
        image_pe=ref.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


POINTS = torch.tensor([[[300.0, 420.0], [520.0, 610.0], [150.0, 800.0]]])
LABELS = torch.tensor([[1, 1, 0]])
BOX = torch.tensor([[120.0, 260.0, 610.0, 880.0]])
BOXES = torch.tensor(
    [[120.0, 260.0, 610.0, 880.0], [10.0, 10.0, 200.0, 300.0], [400.0, 50.0, 760.0, 500.0],
     [0.0, 600.0, 767.0, 1023.0]]
)


def test_state_dict_matches_reference(models):
    ref, ours = models
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in our_sd
    # The reference keeps pixel statistics as non-persistent buffers; ours has none at all.
    assert hasattr(ref, "pixel_mean") and "pixel_mean" not in ref_sd
    assert not any("pixel" in name for name, _ in ours.named_buffers())
    assert ours.image_size == 1024


def test_image_embedding_matches_reference(embeddings):
    ref_emb, our_emb = embeddings
    assert our_emb.shape == (1, 256, 64, 64)
    assert our_emb.is_contiguous()
    assert our_emb.std() > 0.1  # not a degenerate output
    assert _max_diff(our_emb, ref_emb) <= TOL


PROMPTS = {
    "points": dict(points=(POINTS, LABELS)),
    "box": dict(boxes=BOX),
    "box+points": dict(points=(POINTS[:, :1], LABELS[:, :1]), boxes=BOX),
    "batch_boxes": dict(boxes=BOXES),
}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_decode_matches_reference(models, embeddings, kind, multimask):
    ref, ours = models
    ref_emb, our_emb = embeddings
    prompt = PROMPTS[kind]
    coords, labels = prompt.get("points", (None, None))
    with torch.inference_mode():
        ref_logits, ref_iou = _ref_decode(ref, ref_emb, multimask=multimask, **prompt)
        # Our full pipeline: our embedding, batch 1 even for a batch of boxes.
        logits, iou = ours.decode(our_emb, coords, labels, prompt.get("boxes"), multimask=multimask)
    n = 3 if multimask else 1
    assert logits.shape == (ref_logits.shape[0], n, 256, 256) and iou.shape == ref_iou.shape
    assert _max_diff(logits, ref_logits) <= TOL
    assert _max_diff(iou, ref_iou) <= TOL


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_prompt_matches_reference(models, embeddings, multimask):
    ref, ours = models
    ref_emb, our_emb = embeddings
    with torch.inference_mode():
        first, scores = _ref_decode(
            ref, ref_emb, points=(POINTS[:, :1], LABELS[:, :1]), multimask=True
        )
        previous = first[:, scores.argmax(dim=1)]  # low-res logits of the best first mask
        assert previous.shape == (1, 1, 256, 256)
        ref_logits, ref_iou = _ref_decode(
            ref, ref_emb, points=(POINTS, LABELS), masks=previous, multimask=multimask
        )
        logits, iou = ours.decode(
            our_emb, POINTS, LABELS, mask_inputs=previous, multimask=multimask
        )
    assert _max_diff(logits, ref_logits) <= TOL
    assert _max_diff(iou, ref_iou) <= TOL


def test_shared_embedding_equals_repeated(models, embeddings):
    """A batch-1 embedding shared by N prompts gives what N explicit copies give."""
    _, ours = models
    _, emb = embeddings
    with torch.inference_mode():
        shared = ours.decode(emb, boxes=BOXES, multimask=True)
        repeated_emb = emb.expand(len(BOXES), -1, -1, -1).clone()
        repeated = ours.decode(repeated_emb, boxes=BOXES, multimask=True)
    for a, b in zip(shared, repeated):
        assert _max_diff(a, b) <= 1e-5


def test_corner_labels_encode_like_a_box(models):
    _, ours = models
    pe = ours.prompt_encoder
    with torch.inference_mode():
        as_points, _ = pe((BOX.view(1, 2, 2), torch.tensor([[2, 3]])), None, None)
        as_box, _ = pe(None, BOX, None)
    assert as_points.shape == (1, 3, 256)  # two corners + padding point
    assert _max_diff(as_points[:, :2], as_box) <= 1e-6


def test_prompt_errors(models, embeddings):
    _, ours = models
    _, emb = embeddings
    with pytest.raises(ValueError, match="labels"):
        ours.decode(emb, POINTS, torch.tensor([[1, 5, 0]]))
    with pytest.raises(ValueError, match="together"):
        ours.decode(emb, POINTS)
    with pytest.raises(ValueError, match="batch"):
        ours.decode(emb, POINTS.expand(2, -1, -1), LABELS.expand(2, -1), boxes=BOXES)
    with pytest.raises(ValueError, match="mask prompts"):
        ours.decode(emb, POINTS, LABELS, mask_inputs=torch.zeros(1, 1, 64, 64))


def test_small_vit_chunked_attention_matches_reference(monkeypatch):
    """Windows with padding, a global block split into query chunks, batch 2."""
    from functools import partial

    kwargs = dict(img_size=256, embed_dim=96, depth=3, num_heads=3, global_attn_indexes=(1,))
    torch.manual_seed(2)
    ref = segment_anything.modeling.ImageEncoderViT(
        **kwargs, use_rel_pos=True, window_size=14, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)
    )
    _perturb(ref, seed=3)
    ours = ImageEncoderViT(**kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    monkeypatch.setattr(vit_module, "_MAX_BIAS_ELEMENTS", 10_000)  # forces 16 one-row chunks
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = ref.eval()(x)
        assert _max_diff(ours.eval()(x), expected) <= TOL
    # With autograd on, the chunks build separate bias tensors and gradients reach rel_pos.
    out = ours(x)
    assert _max_diff(out.detach(), expected) <= TOL
    out.sum().backward()
    assert ours.blocks[1].attn.rel_pos_h.grad.abs().sum() > 0


def test_vit_at_512_pixels_shapes():
    config = SamConfig(
        encoder="vit", image_size=512, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)
    )
    model = build_sam(config).eval()
    assert model.image_size == 512
    with torch.inference_mode():
        emb = model.embed(torch.randn(1, 3, 512, 512))
        assert emb.shape == (1, 256, 32, 32)
        box = torch.tensor([[10.0, 20.0, 300.0, 400.0]])
        logits, iou = model.decode(emb, boxes=box, multimask=True)
        assert logits.shape == (1, 3, 128, 128) and iou.shape == (1, 3)
        with pytest.raises(ValueError, match="512x512"):
            model.embed(torch.randn(1, 3, 1024, 1024))
