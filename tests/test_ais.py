"""The instance decoder (AIS): architecture and micro-sam key layout, targets, post-processing, shipped weights."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import shared_file
from scipy import ndimage

from biosam.automatic.ais import (
    DecoderMismatchError,
    check_compatible,
    instance_segmentation,
    load_decoder,
    predict_maps,
    shipped_decoder_path,
)
from biosam.automatic.data import as_instances, distance_targets
from biosam.automatic.decoder import LITE_CONFIG, VIT_CONFIG, InstanceDecoder, config_for
from biosam.automatic.instances import maps_to_instances, typical_size
from biosam.errors import InputError
from biosam.evaluate import evaluate_instances


# ------------------------------------------------------------ architecture
def test_lite_decoder_maps_a_64px_embedding_to_256px_maps():
    assert config_for(256, 64) == LITE_CONFIG
    torch.manual_seed(0)
    decoder = InstanceDecoder(LITE_CONFIG).eval()
    with torch.inference_mode():
        maps = decoder(torch.randn(2, 256, 64, 64))
    assert maps.shape == (2, 3, 256, 256)
    assert 0.0 <= float(maps.min()) and float(maps.max()) <= 1.0


def test_vit_decoder_upsamples_16x():
    from biosam.models import CONFIGS

    vit_b = CONFIGS["vit_b"]
    assert config_for(vit_b.image_size, vit_b.image_embedding_size) == VIT_CONFIG
    torch.manual_seed(0)
    decoder = InstanceDecoder(VIT_CONFIG).eval()
    with torch.inference_mode():  # a small embedding keeps the 16x output cheap on a CPU
        maps = decoder(torch.randn(1, 256, 8, 6))
    assert maps.shape == (1, 3, 128, 96)


# Facts about torch_em's UNETR decoder as micro-sam builds it (no encoder skips,
# transposed-convolution upsampling, 256-channel SAM neck output): key -> shape.
MICRO_SAM_DECODER_KEYS = {
    "base.block.1.weight": (512, 256, 3, 3),
    "base.block.4.weight": (512, 512, 3, 3),
    "decoder.blocks.0.block.1.weight": (256, 512, 3, 3),
    "decoder.blocks.2.block.4.bias": (64,),
    "decoder.samplers.0.block.weight": (512, 256, 2, 2),
    "decoder.samplers.2.block.weight": (128, 64, 2, 2),
    "deconv1.block.0.block.weight": (256, 512, 2, 2),
    "deconv1.block.1.block.weight": (512, 512, 3, 3),
    "deconv1.block.2.running_var": (512,),
    "deconv2.block.0.block.weight": (512, 256, 2, 2),
    "deconv4.block.0.block.weight": (128, 64, 2, 2),
    "deconv4.block.2.num_batches_tracked": (),
    "deconv_out.block.weight": (64, 64, 2, 2),
    "decoder_head.block.1.weight": (64, 128, 3, 3),
    "out_conv.weight": (3, 64, 1, 1),
    "out_conv.bias": (3,),
}


def test_vit_decoder_state_dict_has_micro_sam_key_names_and_shapes():
    state = InstanceDecoder(VIT_CONFIG).state_dict()
    for key, shape in MICRO_SAM_DECODER_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert {k.split(".")[0] for k in state} == {
        "base", "decoder", "deconv1", "deconv2", "deconv3", "deconv4", "deconv_out", "decoder_head", "out_conv"
    }
    assert len(state) == 66  # 4 conv blocks x 4, 3 samplers x 2, 4 deconv blocks x 9, deconv_out 2, out_conv 2


def test_micro_sam_file_loads_and_refuses_other_models(tmp_path, lite_medsam):
    torch.manual_seed(1)
    source = InstanceDecoder(VIT_CONFIG)
    for tensor in source.state_dict().values():
        if tensor.is_floating_point():
            tensor.add_(torch.randn_like(tensor) * 0.01)
    # micro-sam keeps the SAM weights and the decoder in one file
    path = tmp_path / "vit_b_lm.pt"
    torch.save({"model_state": {"sam.prompt_encoder.pe": torch.zeros(2)}, "decoder_state": source.state_dict()}, path)
    decoder = load_decoder(path)
    for key, tensor in source.state_dict().items():
        assert torch.equal(decoder.state_dict()[key], tensor), key
    assert decoder.info["encoder"]["preprocessing"] == "sam"
    with pytest.raises(DecoderMismatchError, match="trained on the image encoder"):
        check_compatible(decoder, lite_medsam)
    # a separate *_decoder file does not name its encoder: only the size is checked
    torch.save({"decoder_state": source.state_dict()}, tmp_path / "vit_b_lm_decoder.pt")
    decoder = load_decoder(tmp_path / "vit_b_lm_decoder.pt")
    assert decoder.info["encoder"]["checkpoint_hash"] is None
    with pytest.raises(DecoderMismatchError, match="upsamples x16.*256 px inputs"):
        check_compatible(decoder, lite_medsam)


def test_strict_load_names_the_key_and_both_shapes():
    decoder = InstanceDecoder(LITE_CONFIG)
    state = InstanceDecoder(VIT_CONFIG).state_dict()
    with pytest.raises(InputError) as info:
        decoder.load_state_dict_strict(state, source="vit.pt")
    message = str(info.value)
    assert "vit.pt" in message
    assert "'base.block.1.weight' has shape (512, 256, 3, 3)" in message and "expects (64, 256, 3, 3)" in message
    state = InstanceDecoder(LITE_CONFIG).state_dict()
    state["out_conv.extra"] = torch.zeros(1)
    del state["deconv1.block.2.running_mean"]
    with pytest.raises(InputError) as info:
        decoder.load_state_dict_strict(state)
    assert "missing key 'deconv1.block.2.running_mean' (expected shape (64,))" in str(info.value)
    assert "unexpected key 'out_conv.extra' with shape (1,)" in str(info.value)


def test_fresh_decoder_of_the_wrong_size_is_refused():
    from biosam.models import CONFIGS, build_sam

    vit = build_sam(CONFIGS["vit_b"])
    with pytest.raises(DecoderMismatchError, match="upsamples x4.*1024 px inputs"):
        check_compatible(InstanceDecoder(LITE_CONFIG), vit)
    check_compatible(InstanceDecoder(VIT_CONFIG), vit)


# ---------------------------------------------------------------- targets
def test_targets_of_a_square_at_known_pixels():
    labels = np.zeros((12, 14), dtype=np.int32)
    labels[2:9, 2:9] = 7  # 7 x 7 square, centre (5, 5); ids need not start at 1
    labels[10:12, 10:14] = 3
    t = distance_targets(labels)
    assert t.shape == (3, 12, 14) and t.dtype == np.float32
    assert np.array_equal(t[0], (labels > 0).astype(np.float32))
    centre, boundary = t[1], t[2]
    assert centre[5, 5] == 0.0 and boundary[5, 5] == 0.0
    assert centre[2, 2] == pytest.approx(1.0)  # the corners are farthest from the centre
    assert centre[5, 8] == pytest.approx(3 / np.sqrt(18))
    assert boundary[2, 5] == pytest.approx(1.0)  # on the outline
    assert boundary[3, 5] == pytest.approx(2 / 3)  # one pixel in: inner distance 1 of 3
    assert centre[0, 0] == 1.0 and boundary[0, 0] == 1.0  # background
    # A two-pixel-thin object has no inside: all of it counts as innermost, so it still gets a seed.
    assert boundary[10:12, 10:14].max() == 0.0 and centre[10:12, 10:14].max() == pytest.approx(1.0)


def test_binary_masks_become_connected_components():
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[1:3, 1:3] = 255
    mask[5:8, 5:8] = 255
    mask[3, 3] = 255  # touches the first square only diagonally: a separate object with 4-connectivity
    labels = as_instances(mask)
    assert labels.max() == 3 and labels.dtype == np.int32
    touching = np.zeros((6, 6), dtype=np.uint16)
    touching[1:5, 1:3], touching[1:5, 3:5] = 40, 9  # two objects sharing an edge keep their identity
    relabelled = as_instances(touching)
    assert relabelled.max() == 2 and len(np.unique(relabelled[1:5, 1:3])) == 1


# --------------------------------------------------------- post-processing
def _two_touching_discs() -> np.ndarray:
    yy, xx = np.mgrid[:64, :96]
    d1 = np.hypot(yy - 32, xx - 34)
    d2 = np.hypot(yy - 32, xx - 60)
    labels = np.zeros((64, 96), dtype=np.int32)
    labels[d1 <= 14] = 1
    labels[(d2 <= 14) & (d2 < d1)] = 2
    return labels


def test_watershed_separates_two_touching_discs():
    gt = _two_touching_discs()
    assert ndimage.label(gt > 0)[1] == 1  # one blob for connected components
    pred = maps_to_instances(distance_targets(gt))
    assert pred.dtype == np.uint16 and set(np.unique(pred)) == {0, 1, 2}
    scores = evaluate_instances(pred, gt)
    assert scores["per_threshold"][-1]["threshold"] == pytest.approx(0.95)
    assert scores["per_threshold"][0]["f1"] == 1.0 and scores["mean_matched_iou"] > 0.9


def test_postprocessing_drops_small_objects_and_validates_maps():
    gt = _two_touching_discs()
    gt[2:5, 2:5] = 9
    maps = distance_targets(gt)
    assert maps_to_instances(maps, smoothing=0, min_size=0, min_relative_size=0).max() == 3
    assert maps_to_instances(maps, smoothing=0, min_size=20, min_relative_size=0).max() == 2
    # the 9 px square is far below a fifth of the discs' size (about 600 px each)
    assert maps_to_instances(maps, smoothing=0, min_size=0, min_relative_size=0.2).max() == 2
    assert typical_size(np.array([10, 10, 10, 100])) == 100  # fragments hardly move it
    with pytest.raises(InputError, match=r"\(3, H, W\)"):
        maps_to_instances(maps[:2])
    with pytest.raises(InputError, match="unknown post-processing parameter"):
        maps_to_instances(maps, threshold=0.3)


def test_filled_holes_keep_a_ring_shaped_foreground_whole():
    yy, xx = np.mgrid[:40, :40]
    gt = (np.hypot(yy - 20, xx - 20) <= 14).astype(np.int32)
    maps = distance_targets(gt)
    maps[0][np.hypot(yy - 20, xx - 20) <= 3] = 0.0  # a hole in the foreground, as textured nuclei leave
    filled = maps_to_instances(maps, smoothing=0, min_relative_size=0)
    assert filled.max() == 1 and filled[20, 20] == 1
    assert maps_to_instances(maps, smoothing=0, fill_holes=False, min_relative_size=0)[20, 20] == 0


# ----------------------------------------------------------- shipped decoder
def _nih_image(scale: float):
    """NIH3T3 image 45 and its labels, resized by ``scale``."""
    from biosam.automatic.resample import resize_image, resize_labels, scaled_shape

    image = iio.imread(shared_file("nuclei_nih3t3", "images", "dna-45.png"))
    gt = as_instances(iio.imread(shared_file("nuclei_nih3t3", "labels", "45.png")))
    shape = scaled_shape(image.shape, scale)
    return resize_image(image, shape), resize_labels(gt, shape)


def test_shipped_decoder_segments_nuclei_at_its_object_size(lite_medsam):
    from biosam.automatic.tiling import stitch_maps
    from biosam.prompting import Predictor

    decoder = load_decoder(model=lite_medsam)
    assert decoder.info["encoder"]["name"] == "lite_medsam"
    assert decoder.info["tile"] == 256 and decoder.info["halo"] == 32
    # NIH3T3 nuclei are about 85 px across: resized to the decoder's size, the image spans several tiles.
    image, gt = _nih_image(decoder.info["object_size"] / 85.0)
    predictor = Predictor(lite_medsam)
    maps = stitch_maps(image, lambda tile: predict_maps(predictor, decoder, tile), decoder.info["tile"],
                       decoder.info["halo"], channels=3)
    assert maps.shape == (3, *image.shape) and maps.dtype == np.float32
    from biosam.automatic.ais import decoder_postprocessing

    pred = maps_to_instances(maps, decoder_postprocessing(decoder))
    scores = evaluate_instances(pred, gt)
    assert scores["per_threshold"][0]["f1"] >= 0.8, scores["per_threshold"][0]
    assert scores["msa"] >= 0.45, scores["msa"]
    # One tile without tiling goes through the same path.
    labels = instance_segmentation(predictor, decoder, image[:256, :256])
    assert labels.shape == (256, 256) and labels.max() >= 1
    # An image smaller than the tile is padded, not enlarged: objects keep the size the decoder learnt.
    labels = instance_segmentation(predictor, decoder, image[:128, :160])
    assert predictor.frame.resized == (128, 160) and labels.shape == (128, 160)


def test_decoder_refuses_another_encoder(tmp_path, lite_medsam):
    import biosam
    from biosam.prompting import Predictor

    state = torch.load(lite_medsam.info.checkpoint, map_location="cpu", weights_only=True)
    key = next(k for k in state if k.endswith("mask_decoder.iou_prediction_head.layers.0.bias"))
    state[key] = state[key] + 1.0  # same architecture, other weights
    path = tmp_path / "other_lite_medsam.pth"
    torch.save(state, path)
    other = biosam.load_model(path, device="cpu")
    with pytest.raises(DecoderMismatchError) as info:
        load_decoder(shipped_decoder_path("lite_medsam"), other)
    message = str(info.value)
    assert "'lite_medsam'" in message and "other_lite_medsam.pth" in message
    assert "only works with the encoder" in message
    decoder = load_decoder()
    with pytest.raises(DecoderMismatchError):
        predict_maps(Predictor(other), decoder, np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(InputError, match="no nuclei decoder ships for model 'vit_b'"):
        shipped_decoder_path("vit_b")

