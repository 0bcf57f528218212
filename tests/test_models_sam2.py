"""The assembled SAM 2 / 2.1 model against sam2's SAM2Base and SAM2ImagePredictor.

The reference models are built from sam2's own yamls (hydra), get seeded random weights with
noise on every tensor, and are copied into ours with strict=True: through a checkpoint file
and ``biosam.load_model`` for the predictor comparisons, so the loading path is tested too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import biosam
from biosam.models.checkpoint import CheckpointError
from biosam.models.sam2.checkpoint import (
    infer_sam2_config,
    is_sam2_state_dict,
    load_sam2_checkpoint,
    load_sam2_state_dict,
)
from biosam.models.sam2.config import SAM2_CONFIGS, Sam2Config
from biosam.models.sam2.model import DECODE_SIZE, Sam2
from biosam.prompting.preprocess import Frame, logits_to_image, model_input

from conftest import reference
sam2 = reference("sam2")
from sam2.build_sam import build_sam2  # noqa: E402
from sam2.modeling.sam2_utils import get_1d_sine_pe  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

from conftest import shared_file  # noqa: E402

TOL = 1e-4
_YAML_TRUNK = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
# A 400 x 300 crop of the DSB nuclei image and three nuclei in it (boxes x0, y0, x1, y1; centres).
_CROP = (slice(60, 360), slice(40, 440))
_BOXES = np.array([[136, 154, 172, 180], [341, 135, 368, 170], [176, 198, 203, 231]], dtype=np.float64)
_CENTRES = np.array([[152, 166], [353, 152], [189, 214]], dtype=np.float64)


def _yaml(config: Sam2Config) -> str:
    version = "sam2.1" if config.sam2_1 else "sam2"
    return f"configs/{version}/{version}_hiera_{_YAML_TRUNK[config.trunk]}.yaml"


def _reference(config: Sam2Config, seed: int = 0, randomise: bool = True) -> torch.nn.Module:
    """sam2's SAM2Base for ``config`` as its builder makes it (eval, dynamic multimask), random weights."""
    torch.manual_seed(seed)
    ref = build_sam2(_yaml(config), ckpt_path=None, device="cpu",
                     hydra_overrides_extra=[f"++model.image_size={config.image_size}"])
    if randomise:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, tensor in ref.state_dict().items():
                # the encoder is deep: smaller noise keeps its activations in range
                scale = 0.03 if name.startswith("image_encoder.") else 0.1
                tensor.add_(scale * torch.randn(tensor.shape, generator=gen))
            for mlp in ref.sam_mask_decoder.output_hypernetworks_mlps:
                # moderate mask logits, so that few pixels sit near the 0 threshold
                mlp.layers[-1].weight.mul_(0.25)
                mlp.layers[-1].bias.mul_(0.25)
    return ref.eval()


def _ours(ref: torch.nn.Module, config: Sam2Config) -> Sam2:
    model = Sam2(config)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()


def _max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = (x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _assert_same_masks(ours: np.ndarray, ref: np.ndarray) -> None:
    """Identical masks, or IoU >= 0.999 where a logit sits right at the threshold."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    ours, ref = ours.reshape(-1, *ours.shape[-2:]), ref.reshape(-1, *ref.shape[-2:])
    for o, r in zip(ours, ref):
        assert r.sum() > 0 and (~r).sum() > 0  # a real mask, not empty or full
        union = (o | r).sum()
        assert (o == r).all() or (o & r).sum() / union >= 0.999


@pytest.fixture(scope="module")
def crop_uint8():
    import tifffile

    image = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))[_CROP]
    assert image.max() < 256
    return image.astype(np.uint8)


def _pair(config: Sam2Config, image: np.ndarray, folder, filename: str):
    """(sam2 predictor, biosam predictor) on ``image``, ours loaded from a checkpoint file."""
    ref = _reference(config)
    path = folder / filename
    torch.save({"model": ref.state_dict()}, path)
    model = biosam.load_model(path, device="cpu", precision="fp32")
    ref_predictor = SAM2ImagePredictor(ref)
    grid = config.image_embedding_size
    # SAM2ImagePredictor assumes 1024 px inputs; MedSAM2's code sets these for 512 px.
    ref_predictor._bb_feat_sizes = [(4 * grid, 4 * grid), (2 * grid, 2 * grid), (grid, grid)]
    ref_predictor.set_image(np.repeat(image[..., None], 3, axis=-1))
    ours = biosam.Predictor(model)
    with torch.inference_mode():
        ours.set_image(image, "none")  # the reference gets these uint8 pixels as they are
    return ref_predictor, ours


@pytest.fixture(scope="module")
def pair_1024(crop_uint8, tmp_path_factory):
    return _pair(SAM2_CONFIGS["sam2.1_hiera_tiny"], crop_uint8, tmp_path_factory.mktemp("sam2"), "sam2.1_hiera_tiny.pt")


@pytest.fixture(scope="module")
def pair_512(crop_uint8, tmp_path_factory):
    # named like MedSAM2's file, which is how load_model knows it runs at 512 px
    return _pair(SAM2_CONFIGS["medsam2"], crop_uint8, tmp_path_factory.mktemp("medsam2"), "MedSAM2_latest.pt")


# ------------------------------------------------------------------ architecture and loading
@pytest.mark.parametrize("name", [n for n in SAM2_CONFIGS if n != "medsam2"])
def test_state_dict_equals_reference_for_every_release(name):
    config = SAM2_CONFIGS[name]
    ref = _reference(config, randomise=False)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = Sam2(config).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert ("no_obj_embed_spatial" in expected) == config.sam2_1
    assert ("obj_ptr_tpos_proj.weight" in expected) == config.sam2_1
    # and the variant is recognised from the tensors alone
    assert is_sam2_state_dict(expected)
    assert infer_sam2_config(ref.state_dict()) == config
    # the release flags are those of sam2's yaml
    for flag in ("no_obj_embed_spatial", "add_tpos_enc_to_obj_ptrs", "proj_tpos_enc_in_obj_ptrs",
                 "use_signed_tpos_enc_to_obj_ptrs", "sigmoid_scale_for_mem_enc", "sigmoid_bias_for_mem_enc",
                 "directly_add_no_mem_embed", "multimask_output_in_sam", "multimask_min_pt_num",
                 "multimask_max_pt_num", "multimask_output_for_tracking", "use_obj_ptrs_in_encoder",
                 "max_obj_ptrs_in_encoder", "only_obj_ptrs_in_the_past_for_eval", "fixed_no_obj_ptr",
                 "soft_no_obj_ptr", "use_mlp_for_obj_ptr_proj", "num_maskmem", "max_cond_frames_in_attn",
                 "memory_temporal_stride_for_eval", "non_overlap_masks_for_mem_enc",
                 "use_mask_input_as_output_without_sam", "binarize_mask_from_pts_for_mem_enc"):
        value = getattr(ref, flag)
        if flag == "no_obj_embed_spatial":
            value = value is not None
        assert getattr(config, flag) == value, flag
    assert ref.sam_mask_decoder.dynamic_multimask_via_stability == config.dynamic_multimask


def test_loading_errors_name_the_problem():
    state = Sam2(SAM2_CONFIGS["sam2_hiera_tiny"]).state_dict()
    mixed = dict(state, no_obj_embed_spatial=torch.zeros(1, 64))
    with pytest.raises(CheckpointError, match="mixes the SAM 2.0 and 2.1"):
        load_sam2_state_dict(mixed, source="mixed.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(3\): no_obj_embed_spatial") as info:
        load_sam2_state_dict(state, SAM2_CONFIGS["sam2.1_hiera_tiny"], source="v20.pt")
    assert "looks like a 'sam2_hiera_tiny' (SAM 2.0" in str(info.value)
    bad = dict(state)
    bad["obj_ptr_proj.layers.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"obj_ptr_proj.layers.0.weight: expected shape \(256, 256\)"):
        load_sam2_state_dict(bad, source="bad.pt")
    other = {k: v for k, v in state.items() if not k.startswith("image_encoder.trunk.blocks.11.")}
    with pytest.raises(CheckpointError, match="matches no released SAM 2 trunk"):
        load_sam2_state_dict(other, source="other.pt")
    with pytest.raises(CheckpointError, match="not a SAM 2 checkpoint"):
        infer_sam2_config({"a": torch.zeros(1)})


def test_load_model_routes_files_and_zoo_names(pair_512, tmp_path, monkeypatch):
    """A SAM 2 file is recognised by its keys; its size comes from the zoo entry / file name."""
    _, ours = pair_512
    model = ours.model
    assert isinstance(model, Sam2) and model.config == SAM2_CONFIGS["medsam2"]
    assert model.image_size == 512 and model.info.preprocessing == "sam2" and model.precision == "fp32"
    # same tensors under a name no zoo entry has: SAM 2.1 tiny at 1024 px
    other = tmp_path / "finetuned.pth"
    other.symlink_to(model.info.checkpoint)
    loaded = biosam.load_model(other, device="cpu")
    assert loaded.config == SAM2_CONFIGS["sam2.1_hiera_tiny"] and loaded.info.preprocessing == "sam2"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # the plain loader: size by file name unless given
    assert load_sam2_checkpoint(model.info.checkpoint).config == SAM2_CONFIGS["medsam2"]
    assert load_sam2_checkpoint(model.info.checkpoint, image_size=1024).config == SAM2_CONFIGS["sam2.1_hiera_tiny"]
    # a zoo name of the SAM 2 family (resolution stubbed: the registry may not allow downloads)
    import biosam.load as load_module
    from biosam.zoo import REGISTRY

    monkeypatch.setattr(load_module, "resolve_checkpoint", lambda name: (other, REGISTRY[name]))
    zoo = biosam.load_model("medsam2", device="cpu")
    assert zoo.config == SAM2_CONFIGS["medsam2"] and zoo.info.name == "medsam2" and zoo.info.preprocessing == "sam2"


# ----------------------------------------------------------------------- preprocessing
def test_sam2_preprocessing_matches_sam2_transforms(crop_uint8):
    from sam2.utils.transforms import SAM2Transforms

    rgb = np.repeat(crop_uint8[..., None], 3, axis=-1)
    for size in (1024, 512):
        frame = Frame.create(rgb.shape[:2], size, "sam2")
        assert frame.resized == (size, size)
        ours = model_input(rgb.astype(np.float32), frame, "sam2")
        ref = SAM2Transforms(size, 0.0)(rgb)[None]
        assert _max_diff(ours, ref) <= 1e-5
        # coordinates: x * S / W, y * S / H
        assert np.allclose(frame.to_model(np.array([[100.0, 30.0]])), [[100 * size / 400, 30 * size / 300]])


def test_logits_of_512_px_models_reach_the_image_like_sam2():
    frame = Frame.create((300, 400), 512, "sam2")
    native = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    on_frame = F.interpolate(native, scale_factor=2, mode="nearest")  # what Sam2.decode hands over
    expected = F.interpolate(native, size=(300, 400), mode="bilinear", align_corners=False)
    assert torch.equal(logits_to_image(on_frame, frame, "sam2"), expected)
    at_1024 = torch.randn(1, 1, 256, 256)
    assert torch.equal(logits_to_image(at_1024, Frame.create((300, 400), 1024, "sam2"), "sam2"),
                       F.interpolate(at_1024, size=(300, 400), mode="bilinear", align_corners=False))


# ------------------------------------------------------------- SAM2ImagePredictor fidelity
def _compare_embeddings(ref_predictor, ours) -> None:
    model = ours.model
    feats = model.unpack_features(ours.embedding)
    ref = ref_predictor._features
    top = feats.embedding + model.no_mem_embed.view(1, -1, 1, 1)
    assert ref["image_embed"].abs().max() > 0.5
    assert _max_diff(top, ref["image_embed"]) <= TOL
    for level, ref_level in zip(feats.high_res, ref["high_res_feats"]):
        assert ref_level.abs().max() > 0.05
        assert _max_diff(level, ref_level) <= TOL


def _predict_both(ref_predictor, ours, native: int, **prompt):
    """Run one prompt set through both predictors; returns ours and sam2's (masks, scores, low_res)."""
    ref_kwargs = {
        "point_coords": prompt.get("points"), "point_labels": prompt.get("point_labels"),
        "box": prompt.get("box"), "mask_input": prompt.get("ref_mask"), "multimask_output": prompt["multimask"],
    }
    ref_masks, ref_scores, ref_low = ref_predictor.predict(**ref_kwargs)
    with torch.inference_mode():
        result = ours.predict(points=prompt.get("points"), point_labels=prompt.get("point_labels"),
                              box=prompt.get("box"), mask=prompt.get("mask"), multimask=prompt["multimask"], zoom="off")
    low = result.low_res_logits
    assert low.shape[-1] == DECODE_SIZE
    step = DECODE_SIZE // native
    low = np.clip(low[..., ::step, ::step], -32.0, 32.0)  # sam2 hands out clamped logits
    masks, scores = result.masks, result.scores
    if ref_masks.ndim == 4 and masks.ndim == 3:  # batched single-mask prompts
        masks, scores = masks[:, None], scores[:, None]
    assert _max_diff(low.reshape(ref_low.shape), ref_low) <= TOL
    assert _max_diff(scores.reshape(ref_scores.shape), ref_scores) <= TOL
    _assert_same_masks(masks.reshape(ref_masks.shape), ref_masks.astype(bool))
    return result, ref_low


def _check_prompts(ref_predictor, ours, native: int) -> None:
    box, centre = _BOXES[0], _CENTRES[0]
    labels2 = np.array([1, 0])
    two = np.array([centre, _CENTRES[2]])
    # one click: single mask (dynamic fallback) and multimask
    _predict_both(ref_predictor, ours, native, points=centre[None], point_labels=np.array([1]), multimask=False)
    first, ref_first = _predict_both(ref_predictor, ours, native, points=centre[None],
                                     point_labels=np.array([1]), multimask=True)
    # a box; box + clicks; box with multimask
    _predict_both(ref_predictor, ours, native, box=box, multimask=False)
    _predict_both(ref_predictor, ours, native, box=box, points=two, point_labels=labels2, multimask=False)
    _predict_both(ref_predictor, ours, native, box=_BOXES[1], multimask=True)
    # several objects at once (a shared embedding)
    _predict_both(ref_predictor, ours, native, box=_BOXES, multimask=False)
    # the previous low-res logits as mask prompt, with a new click
    best = int(np.argmax(first.scores))
    _predict_both(ref_predictor, ours, native, points=two, point_labels=labels2, multimask=False,
                  mask=first.low_res_logits[best], ref_mask=ref_first[best][None])


def test_image_predictor_fidelity_1024(pair_1024):
    ref_predictor, ours = pair_1024
    assert ours.embedding.shape == (1, 1024, 64, 64)
    _compare_embeddings(ref_predictor, ours)
    _check_prompts(ref_predictor, ours, native=256)


def test_image_predictor_fidelity_512_medsam2_shape(pair_512):
    ref_predictor, ours = pair_512
    assert ours.embedding.shape == (1, 1024, 32, 32)
    _compare_embeddings(ref_predictor, ours)
    _check_prompts(ref_predictor, ours, native=128)


def test_embedding_store_and_saved_embeddings(pair_512, crop_uint8, tmp_path):
    _, ours = pair_512
    model = ours.model
    kwargs = dict(box=_BOXES, zoom="off")
    with torch.inference_mode():
        expected = ours.predict(**kwargs)
        ours.save_embedding(tmp_path / "e.npz")
        restored = biosam.Predictor(model)
        restored.load_embedding(tmp_path / "e.npz", crop_uint8, "none")
        assert torch.equal(restored.embedding, ours.embedding)
        again = restored.predict(**kwargs)
        stored = biosam.Predictor(model, store=tmp_path / "store.zarr")
        stored.set_image(crop_uint8, "none")
        cached = biosam.Predictor(model, store=tmp_path / "store.zarr")
        cached.set_image(crop_uint8, "none")
    assert cached.store.hits == 1 and len(cached.store) == 1
    assert torch.equal(cached.embedding, ours.embedding)
    assert np.array_equal(again.low_res_logits, expected.low_res_logits)
    assert np.array_equal(again.masks, expected.masks)


def test_decode_shares_the_embedding_and_chunks_prompts(pair_512):
    _, ours = pair_512
    model = ours.model
    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(11, 2, generator=gen) * 400 + 50
    boxes = torch.cat([xy - 30, xy + 30], dim=1)
    points = torch.rand(11, 2, 2, generator=gen) * 500
    labels = torch.randint(0, 2, (11, 2), generator=gen)
    with torch.inference_mode():
        low, iou = model.decode(ours.embedding, points, labels, boxes, multimask=True)  # 11 > 8: two chunks
        assert low.shape == (11, 3, DECODE_SIZE, DECODE_SIZE) and iou.shape == (11, 3)
        for i in (0, 9):
            one_low, one_iou = model.decode(ours.embedding, points[i : i + 1], labels[i : i + 1], boxes[i : i + 1],
                                            multimask=True)
            # batched and one-at-a-time sums differ in rounding only
            assert _max_diff(one_low, low[i : i + 1]) <= 1e-4 and _max_diff(one_iou, iou[i : i + 1]) <= 1e-4
        # one click shared by all boxes equals the click repeated
        shared, _ = model.decode(ours.embedding, points[:1], labels[:1], boxes)
        repeated, _ = model.decode(ours.embedding, points[:1].expand(11, -1, -1), labels[:1].expand(11, -1), boxes)
        assert _max_diff(shared, repeated) <= 1e-5
        # a per-prompt (batch N) embedding gives the same as the shared one
        per_prompt, _ = model.decode(ours.embedding.expand(3, -1, -1, -1), points[:3], labels[:3], boxes[:3])
        shared3, _ = model.decode(ours.embedding, points[:3], labels[:3], boxes[:3])
        assert _max_diff(per_prompt, shared3) <= 1e-4
        with pytest.raises(ValueError, match="packed SAM 2 image embedding"):
            model.decode(torch.zeros(1, 256, 32, 32), boxes=boxes)


def test_bf16_embedding_is_fp32_and_close():
    model = Sam2(SAM2_CONFIGS["sam2.1_hiera_tiny"]).eval()
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model.image_features(x)
        model.precision = "bf16"
        half = model.image_features(x)
    for a, b in zip((full.embedding, *full.high_res), (half.embedding, *half.high_res)):
        assert b.dtype == torch.float32
        assert _max_diff(a, b) <= 0.05 * a.abs().max().item()


# ----------------------------------------------------------------------- tracker steps
@pytest.fixture(scope="module")
def models_512():
    config = SAM2_CONFIGS["medsam2"]
    ref = _reference(config, seed=5)
    return ref, _ours(ref, config)


def _frame_inputs(b: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, 256, 32, 32, generator=gen)
    high_res = [torch.randn(b, 32, 128, 128, generator=gen), torch.randn(b, 64, 64, 64, generator=gen)]
    return feats, high_res, gen


def _assert_heads_equal(ours, ref) -> None:
    assert len(ours) == len(ref) == 7
    for name, a, b in zip(ours._fields, ours, ref):
        assert _max_diff(a, b) <= TOL, name


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("absent", [False, True])
def test_forward_sam_heads_matches_reference(models_512, multimask, absent):
    ref, ours = models_512
    feats, high_res, gen = _frame_inputs(3, seed=int(multimask) + 2 * int(absent))
    coords = torch.rand(3, 2, 2, generator=gen) * 512
    labels = torch.tensor([[1, 0], [1, 1], [2, 3]], dtype=torch.int32)
    masks = torch.randn(3, 1, 512, 512, generator=gen)
    head = "sam_mask_decoder.pred_obj_score_head.layers.2.bias"
    saved = ours.state_dict()[head].clone()
    with torch.inference_mode():
        # force either branch: object present, or absent (masks at NO_OBJECT_SCORE, the no-object pointer)
        for model in (ref, ours):
            model.state_dict()[head].add_(-100.0 if absent else 100.0)
        try:
            for kwargs in (dict(point_coords=coords, point_labels=labels), dict(mask_inputs=masks), {}):
                expected = ref._forward_sam_heads(
                    feats, point_inputs=None if "point_coords" not in kwargs else
                    {"point_coords": coords, "point_labels": labels},
                    mask_inputs=kwargs.get("mask_inputs"), high_res_features=high_res, multimask_output=multimask,
                )
                got = ours.forward_sam_heads(feats, high_res, multimask=multimask, **kwargs)
                _assert_heads_equal(got, expected)
                assert bool((got.object_score_logits <= 0).all()) == absent
        finally:
            for model in (ref, ours):
                model.state_dict()[head].copy_(saved)


def test_mask_as_output_matches_reference(models_512):
    ref, ours = models_512
    feats, high_res, gen = _frame_inputs(2, seed=7)
    masks = (torch.rand(2, 1, 512, 512, generator=gen) > 0.7).float()
    masks[1] = 0  # an empty mask: the object is absent
    with torch.inference_mode():
        expected = ref._use_mask_as_output(feats, high_res, masks)
        _assert_heads_equal(ours.mask_as_output(feats, high_res, masks), expected)


@pytest.mark.parametrize("binarize", [False, True])
def test_encode_memory_matches_reference(models_512, binarize):
    ref, ours = models_512
    feats, _, gen = _frame_inputs(2, seed=11)
    logits = 4 * torch.randn(2, 1, 512, 512, generator=gen)
    scores = torch.tensor([[2.0], [-1.0]])  # present, absent
    ref.binarize_mask_from_pts_for_mem_enc = binarize
    with torch.inference_mode():
        expected, expected_pos = ref._encode_new_memory(
            [feats.flatten(2).permute(2, 0, 1)], [(32, 32)], logits, scores, is_mask_from_pts=True
        )
        got, pos = ours.encode_memory(feats, logits, scores, binarize=binarize)
    ref.binarize_mask_from_pts_for_mem_enc = False
    assert expected.abs().max() > 0.1
    assert _max_diff(got, expected) <= TOL
    assert _max_diff(pos, expected_pos[0]) <= TOL
    # the absent frame differs from its present twin by the no-object embedding only
    with torch.inference_mode():
        present, _ = ours.encode_memory(feats, logits, torch.tensor([[2.0], [1.0]]), binarize=binarize)
    shift = (got - present)[1].mean(dim=(1, 2))
    assert _max_diff(shift, ours.no_obj_embed_spatial[0]) <= 1e-5


def test_memory_attention_and_object_pointers_match_reference(models_512):
    ref, ours = models_512
    feats, _, gen = _frame_inputs(2, seed=13)
    position = ours.image_encoder.neck.position_encoding(feats)
    frames = torch.randn(2 * 1024, 2, 64, generator=gen)
    frames_pos = torch.randn(2 * 1024, 2, 64, generator=gen)
    pointers = torch.randn(3, 2, 256, generator=gen)
    offsets = torch.tensor([1, 4, -2])
    with torch.inference_mode():
        # temporal encoding of pointers, as SAM 2.1 computes it when conditioning a frame
        ref_pos = ref.obj_ptr_tpos_proj(get_1d_sine_pe(offsets / 15, dim=256))
        pos = ours.object_pointer_positions(offsets, 15)
        assert _max_diff(pos, ref_pos) <= 1e-5
        tokens, token_pos = ours.object_pointer_tokens(pointers, pos[:, None].expand(-1, 2, -1))
        assert tokens.shape == (12, 2, 64) and token_pos.shape == (12, 2, 64)
        assert torch.equal(tokens[:4, 0].reshape(-1), pointers[0, 0])
        memory = torch.cat([frames, tokens])
        memory_pos = torch.cat([frames_pos, token_pos])
        expected = ref.memory_attention(
            curr=[feats.flatten(2).permute(2, 0, 1)], curr_pos=[position.flatten(2).permute(2, 0, 1)],
            memory=memory, memory_pos=memory_pos, num_obj_ptr_tokens=12,
        )
        got = ours.attend_to_memory(feats, position, memory, memory_pos, num_obj_ptr_tokens=12)
    assert _max_diff(got, expected.permute(1, 2, 0).reshape(2, 256, 32, 32)) <= TOL
    # object pointers from decoder tokens
    with torch.inference_mode():
        scores = torch.tensor([[1.0], [-1.0]])
        token = torch.randn(2, 256, generator=gen)
        ptr = ours.object_pointer(token, scores)
        expected_ptr = ref.obj_ptr_proj(token)
        expected_ptr = torch.tensor([[1.0], [0.0]]) * expected_ptr + torch.tensor([[0.0], [1.0]]) * ref.no_obj_ptr
    assert _max_diff(ptr, expected_ptr) <= 1e-5


def test_sam2_0_has_no_pointer_time_encoding_or_no_object_memory():
    config = SAM2_CONFIGS["sam2_hiera_tiny"]
    model = Sam2(config).eval()
    assert model.no_obj_embed_spatial is None and model.obj_ptr_tpos_proj is None
    assert torch.equal(model.object_pointer_positions(torch.tensor([1, 2]), 15), torch.zeros(2, 64))
    feats, logits = torch.randn(1, 256, 64, 64), torch.randn(1, 1, 1024, 1024)
    with torch.inference_mode():
        present, _ = model.encode_memory(feats, logits, torch.tensor([[1.0]]))
        absent, _ = model.encode_memory(feats, logits, torch.tensor([[-1.0]]))
    assert present.shape == (1, 64, 64, 64)
    assert torch.equal(present, absent)
