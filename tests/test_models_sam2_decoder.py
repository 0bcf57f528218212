"""SAM 2 prompt encoder + mask decoder against the official sam2 modules (weights copied across)."""

from __future__ import annotations

import pytest
import torch

from biosam.models.prompt_encoder import PromptEncoder
from biosam.models.sam2.mask_decoder import Sam2MaskDecoder, build_sam2_heads, sam2_two_way_transformer

from conftest import reference
sam2 = reference("sam2")
from sam2.modeling.sam.mask_decoder import MaskDecoder as RefMaskDecoder  # noqa: E402
from sam2.modeling.sam.prompt_encoder import PromptEncoder as RefPromptEncoder  # noqa: E402
from sam2.modeling.sam.transformer import TwoWayTransformer as RefTwoWayTransformer  # noqa: E402

TOL = 1e-4
IMAGE_SIZE = 512  # MedSAM2's input size: a 32x32 embedding grid
GRID = IMAGE_SIZE // 16
DIM = 256

# Head flags as sam2_base passes them. Every released 2.0 / 2.1 config uses the "released" set
# (plus dynamic multimask from sam2's builders); "plain" is sam2_base's defaults; "linear_obj"
# covers the single-Linear object-score head and the single-token object pointer.
FLAG_SETS = {
    "released": dict(
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
    ),
    "plain": dict(),
    "linear_obj": dict(
        pred_obj_scores=True,
        pred_obj_scores_mlp=False,
        dynamic_multimask_via_stability=True,
    ),
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter and buffer, so LayerNorms, biases and tokens are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))


def _reference_heads(flags: dict, seed: int) -> tuple[RefPromptEncoder, RefMaskDecoder]:
    """The heads as sam2_base._build_sam_heads builds them."""
    torch.manual_seed(seed)
    prompt_encoder = RefPromptEncoder(
        embed_dim=DIM,
        image_embedding_size=(GRID, GRID),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )
    decoder = RefMaskDecoder(
        num_multimask_outputs=3,
        transformer=RefTwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        **flags,
    )
    _randomise(prompt_encoder, seed + 1)
    _randomise(decoder, seed + 2)
    with torch.no_grad():
        # Keep mask logits at the scale of trained SAM 2 (|logit| up to a few tens, not ~100),
        # so the absolute tolerance means what it means for real weights.
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(0.25)
            mlp.layers[-1].bias.mul_(0.25)
    return prompt_encoder.eval(), decoder.eval()


@pytest.fixture(scope="module", params=list(FLAG_SETS))
def heads(request):
    """(flags, reference encoder, reference decoder, our encoder, our decoder), weights shared."""
    flags = FLAG_SETS[request.param]
    ref_pe, ref_dec = _reference_heads(flags, seed=len(request.param))
    ours_pe = PromptEncoder(DIM, (GRID, GRID), (IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16)
    ours_dec = Sam2MaskDecoder(transformer_dim=DIM, transformer=sam2_two_way_transformer(), **flags)
    ours_pe.load_state_dict(ref_pe.state_dict(), strict=True)
    ours_dec.load_state_dict(ref_dec.state_dict(), strict=True)
    return flags, ref_pe, ref_dec, ours_pe.eval(), ours_dec.eval()


def _prompts(case: str, gen: torch.Generator) -> dict:
    """Prompt-encoder inputs (points, boxes, masks) for one named case."""
    def xy(n: int, k: int) -> torch.Tensor:
        return torch.rand(n, k, 2, generator=gen) * IMAGE_SIZE

    def boxes(n: int) -> torch.Tensor:
        corners = xy(n, 2).sort(dim=1).values
        return corners.reshape(n, 4)

    points = boxes_in = masks = None
    if case == "one_point":
        points = (xy(1, 1), torch.tensor([[1]], dtype=torch.int32))
    elif case == "points_with_negative":
        points = (xy(1, 3), torch.tensor([[1, 0, 1]], dtype=torch.int32))
    elif case == "box":
        boxes_in = boxes(1)
    elif case == "box_as_point_labels":  # how SAM2ImagePredictor passes boxes (labels 2, 3)
        points = (boxes(1).reshape(1, 2, 2), torch.tensor([[2, 3]], dtype=torch.int32))
    elif case == "box_and_points":
        points = (xy(1, 2), torch.tensor([[1, 0]], dtype=torch.int32))
        boxes_in = boxes(1)
    elif case == "padded_points_and_mask":
        points = (xy(1, 3), torch.tensor([[0, 1, -1]], dtype=torch.int32))
        masks = 4 * torch.randn(1, 1, 4 * GRID, 4 * GRID, generator=gen)
    elif case == "mask_only":  # sam2_base passes one padding point when there are no clicks
        points = (torch.zeros(1, 1, 2), -torch.ones(1, 1, dtype=torch.int32))
        masks = 4 * torch.randn(1, 1, 4 * GRID, 4 * GRID, generator=gen)
    elif case == "boxes16":
        boxes_in = boxes(16)
    else:
        raise ValueError(case)
    return dict(points=points, boxes=boxes_in, masks=masks)


CASES = [
    "one_point",
    "points_with_negative",
    "box",
    "box_as_point_labels",
    "box_and_points",
    "padded_points_and_mask",
    "mask_only",
    "boxes16",
]


def _images(gen: torch.Generator, batch: int, ref_dec: RefMaskDecoder, ours: Sam2MaskDecoder):
    """Image embeddings and (reference, ours) high-res features from random backbone levels."""
    image = torch.randn(batch, DIM, GRID, GRID, generator=gen)
    if not ref_dec.use_high_res_features:
        return image, None, None
    level0 = torch.randn(batch, DIM, 4 * GRID, 4 * GRID, generator=gen)
    level1 = torch.randn(batch, DIM, 2 * GRID, 2 * GRID, generator=gen)
    # sam2_base.forward_image applies the decoder's conv_s0 / conv_s1 to backbone levels 0 / 1
    ref_high = [ref_dec.conv_s0(level0), ref_dec.conv_s1(level1)]
    return image, ref_high, ours.project_high_res_features(level0, level1)


def _compare(ref_out, our_out) -> dict[str, float]:
    names = ("masks", "iou", "tokens", "object_score")
    diffs = {name: _max_diff(r, o) for name, r, o in zip(names, ref_out, our_out)}
    assert all(d <= TOL for d in diffs.values()), diffs
    return diffs


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_matches_reference(heads, case, multimask):
    flags, ref_pe, ref_dec, ours_pe, ours_dec = heads
    gen = torch.Generator().manual_seed(CASES.index(case) + 10 * multimask)
    prompts = _prompts(case, gen)

    ref_sparse, ref_dense = ref_pe(**prompts)
    our_sparse, our_dense = ours_pe(**prompts)
    assert _max_diff(ref_sparse, our_sparse) <= 1e-5
    assert _max_diff(ref_dense, our_dense) <= 1e-5
    assert _max_diff(ref_pe.get_dense_pe(), ours_pe.get_dense_pe()) <= 1e-5

    n = ref_sparse.shape[0]
    image, ref_high, our_high = _images(gen, 1, ref_dec, ours_dec)
    common = dict(multimask_output=multimask, repeat_image=True)
    ref_out = ref_dec(image, ref_pe.get_dense_pe(), ref_sparse, ref_dense, high_res_features=ref_high, **common)
    our_out = ours_dec(image, ours_pe.get_dense_pe(), our_sparse, our_dense, high_res_features=our_high, **common)
    _compare(ref_out, our_out)

    m = 3 if multimask else 1
    t = 3 if multimask and flags.get("use_multimask_token_for_obj_ptr") else 1
    masks, iou, tokens, obj = our_out
    assert masks.shape == (n, m, 4 * GRID, 4 * GRID)
    assert iou.shape == (n, m) and tokens.shape == (n, t, DIM) and obj.shape == (n, 1)
    if not flags.get("pred_obj_scores"):
        assert torch.equal(obj, torch.full((n, 1), 10.0))
    if flags.get("iou_prediction_use_sigmoid"):
        assert 0 < iou.min() and iou.max() < 1


@pytest.mark.parametrize("multimask", [True, False])
@torch.no_grad()
def test_batched_images_match_reference(heads, multimask):
    """Two different images, one prompt each (repeat_image=False, as sam2_base tracks objects)."""
    _, ref_pe, ref_dec, ours_pe, ours_dec = heads
    gen = torch.Generator().manual_seed(7)
    coords = torch.rand(2, 2, 2, generator=gen) * IMAGE_SIZE
    labels = torch.tensor([[1, -1], [1, 0]], dtype=torch.int32)
    masks = 4 * torch.randn(2, 1, 4 * GRID, 4 * GRID, generator=gen)
    ref_sparse, ref_dense = ref_pe(points=(coords, labels), boxes=None, masks=masks)
    our_sparse, our_dense = ours_pe(points=(coords, labels), boxes=None, masks=masks)
    image, ref_high, our_high = _images(gen, 2, ref_dec, ours_dec)
    common = dict(multimask_output=multimask, repeat_image=False)
    ref_out = ref_dec(image, ref_pe.get_dense_pe(), ref_sparse, ref_dense, high_res_features=ref_high, **common)
    our_out = ours_dec(image, ours_pe.get_dense_pe(), our_sparse, our_dense, high_res_features=our_high, **common)
    _compare(ref_out, our_out)


@torch.no_grad()
def test_dynamic_selection_takes_both_branches():
    """With a threshold between the prompts' stability scores, some keep the single mask, some fall back."""
    flags = FLAG_SETS["released"]
    ref_pe, ref_dec = _reference_heads(flags, seed=3)
    ours_pe, ours_dec = build_sam2_heads(IMAGE_SIZE, sam2_1=True)
    ours_pe.load_state_dict(ref_pe.state_dict(), strict=True)
    ours_dec.load_state_dict(ref_dec.state_dict(), strict=True)
    ours_dec.eval()
    gen = torch.Generator().manual_seed(11)
    sparse, dense = ref_pe(**_prompts("boxes16", gen))
    image, ref_high, our_high = _images(gen, 1, ref_dec, ours_dec)
    pe = ref_pe.get_dense_pe()

    all_masks, all_iou, _, _ = ref_dec.predict_masks(image, pe, sparse, dense, True, ref_high)
    stability = ref_dec._get_stability_scores(all_masks[:, 0])
    thresh = stability.median().item()
    ref_dec.dynamic_multimask_stability_thresh = ours_dec.dynamic_multimask_stability_thresh = thresh
    stable = stability >= thresh
    assert 0 < stable.sum() < len(stable)
    args = (image, pe, sparse, dense, False, True, ref_high)
    ref_out = ref_dec(*args)
    our_out = ours_dec(image, pe, sparse, dense, False, True, our_high)
    _compare(ref_out, our_out)
    best = all_iou[:, 1:].argmax(dim=1) + 1
    fallback = all_masks[torch.arange(16), best]
    expected = torch.where(stable[:, None, None], all_masks[:, 0], fallback)
    assert _max_diff(our_out[0][:, 0], expected) <= TOL
    # the fallback masks differ from the single-mask ones, so a wrong choice would be caught
    assert _max_diff(fallback[~stable], all_masks[~stable, 0]) > 1.0

    # training mode switches the dynamic selection off: always the single-mask token
    ref_dec.train()
    ours_dec.train()
    _compare(ref_dec(*args), ours_dec(image, pe, sparse, dense, False, True, our_high))
    assert _max_diff(ours_dec(image, pe, sparse, dense, False, True, our_high)[0][:, 0], all_masks[:, 0]) <= TOL


def test_build_heads_state_dict_matches_sam2():
    """build_sam2_heads has exactly the checkpoint's keys and shapes for both releases."""
    ref_pe, ref_dec = _reference_heads(FLAG_SETS["released"], seed=0)
    for sam2_1 in (True, False):
        ours_pe, ours_dec = build_sam2_heads(IMAGE_SIZE, sam2_1=sam2_1)
        for ours, ref in ((ours_pe, ref_pe), (ours_dec, ref_dec)):
            ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
            ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
            assert ours_shapes == ref_shapes
    assert "conv_s0.weight" in ours_dec.state_dict() and "pred_obj_score_head.layers.2.weight" in ours_dec.state_dict()
    assert ours_pe.image_embedding_size == (GRID, GRID) and ours_pe.mask_input_size == (4 * GRID, 4 * GRID)
    assert build_sam2_heads(1024)[0].image_embedding_size == (64, 64)


def test_rejects_wrong_image_batch():
    _, decoder = build_sam2_heads(256, dynamic_multimask=False)
    grid = 256 // 16
    sparse = torch.zeros(3, 2, DIM)
    dense = torch.zeros(1, DIM, grid, grid)
    high = [torch.zeros(1, 32, 4 * grid, 4 * grid), torch.zeros(1, 64, 2 * grid, 2 * grid)]
    with pytest.raises(ValueError, match="image_embeddings batch"):
        decoder(torch.zeros(2, DIM, grid, grid), torch.zeros(1, DIM, grid, grid), sparse, dense, True, True, high)
    with pytest.raises(ValueError, match="high_res_features"):
        decoder(torch.zeros(1, DIM, grid, grid), torch.zeros(1, DIM, grid, grid), sparse, dense, True, True, None)
