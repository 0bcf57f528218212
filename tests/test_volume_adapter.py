"""The propagation adapter (biosam.volume.adapter, biosam.train.propagation) and what it builds on: mask prompts
on any frame (biosam.prompting.preprocess.resample_to_frame) and LoRA on the mask decoder.

Real data: the StarDist synthetic 3D nuclei (stardist 0.9.2 test data) and the TotalSegmentator MR example
(Wasserthal et al. 2023), both in ../shared/data.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

import biosam
from biosam.errors import InputError
from biosam.models.lora import DECODER_TARGETS, add_lora, merge_lora
from biosam.prompting.preprocess import Frame, mask_logits, resample_to_frame
from biosam.train.propagation import AdapterSettings, LabelledVolume, disturb, slice_pairs, train_propagation_adapter
from biosam.volume import PropagationSettings, segment_volume
from biosam.volume.adapter import propagation_decoder, shipped_adapter_path

from conftest import shared_file


@pytest.fixture(scope="module")
def nuclei_3d():
    image = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "img3d.tif"))
    labels = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "mask3d.tif")).astype(np.int64)
    return image, labels


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("preprocessing", ["lite_medsam", "sam", "medsam"])
def test_a_mask_prompt_lands_on_the_same_pixels_in_a_crop(dsb_nuclei, preprocessing):
    """A nucleus mask given on the whole image and resampled onto a zoomed crop's grid marks the same pixels
    as the crop's own mask prompt made from the cropped mask (padding stays background)."""
    _, labels = dsb_nuclei
    mask = labels == np.bincount(labels.ravel())[1:].argmax() + 1  # the largest nucleus
    whole = Frame.create(labels.shape, 256, preprocessing)
    ys, xs = np.nonzero(mask)
    x0, y0 = max(0, xs.min() - 40), max(0, ys.min() - 30)
    x1, y1 = min(labels.shape[1], x0 + 120), min(labels.shape[0], y0 + 90)
    crop = Frame.create((y1 - y0, x1 - x0), 256, preprocessing)
    on_whole = torch.from_numpy(mask_logits(mask, whole))[None, None]
    moved = resample_to_frame(on_whole, whole.low_res_per_px, crop, (x0, y0))[0, 0].numpy()
    direct = mask_logits(mask[y0:y1, x0:x1], crop)
    assert direct.max() > 0 and _iou(moved > 0, direct > 0) > 0.8
    rows, cols = crop.low_res_extent
    assert (rows < 256 or cols < 256) == (preprocessing != "medsam")  # medsam stretches crops to the square
    assert (moved[rows:, :] < 0).all() and (moved[:, cols:] < 0).all()
    assert (moved[:rows, :cols] > 0).any()


def test_decoder_lora_is_used_by_every_attention_path():
    """The decoder's fast attention paths read projection weights directly: a LoRA update must reach them
    (the wrapped model equals its merged copy, and differs from the base)."""
    model = biosam.load_model("lite_medsam")
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[40.0, 50.0, 120.0, 140.0], [10.0, 10.0, 60.0, 90.0]])
    base, _ = model.decode(embedding, boxes=boxes)
    names = add_lora(model, 4, targets=DECODER_TARGETS, part="mask_decoder")
    assert len(names) == 28 and all(n.startswith("mask_decoder.transformer.") for n in names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        adapted, _ = model.decode(embedding, boxes=boxes)
        merged, _ = merge_lora(model).decode(embedding, boxes=boxes)
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)


def test_slice_pairs_include_the_slice_past_each_end():
    labels = np.zeros((6, 8, 8), np.int64)
    labels[2:4, 2:6, 2:6] = 1
    assert sorted(slice_pairs(labels, [1], min_area=1)) == [(1, 2, 1), (1, 2, 3), (1, 3, 2), (1, 3, 4)]
    mask = labels[2] == 1
    rng = np.random.default_rng(0)
    assert all(disturb(mask, rng).any() for _ in range(20))


def test_shipped_adapter_loads_for_lite_medsam_only(lite_medsam, tmp_path):
    path = shipped_adapter_path("lite_medsam")
    assert path is not None and path.is_file()
    decoder = propagation_decoder(lite_medsam)
    assert decoder is not None and decoder.image_encoder is lite_medsam.image_encoder  # slices embedded once
    assert not any("lora" in k for k in decoder.state_dict())  # merged
    changed = [k for k, v in decoder.mask_decoder.state_dict().items()
               if not torch.equal(v, lite_medsam.mask_decoder.state_dict()[k])]
    assert changed  # the adapter's update is in
    bad = tmp_path / "other.pt"
    payload = torch.load(path, weights_only=True)
    payload["biosam"]["base_checkpoint_hash"] = "0" * 32
    torch.save(payload, bad)
    with pytest.raises(InputError, match="other weights"):
        propagation_decoder(lite_medsam, bad)
    torch.save({"weights": {}}, bad)
    with pytest.raises(InputError, match="not a biosam propagation adapter"):
        propagation_decoder(lite_medsam, bad)


def test_one_call_decodes_each_prompt_with_its_own_decoder(nuclei_3d, lite_medsam):
    """Per-prompt decoders (how propagation decodes new and carried objects together) give what separate calls
    give; a list of the wrong length is refused."""
    image, labels = nuclei_3d
    predictor = biosam.Predictor(lite_medsam)
    predictor.set_image(image[15])
    ids = [int(i) for i in np.unique(labels[15])[1:4]]
    prompts = []
    for i in ids:
        ys, xs = np.nonzero(labels[15] == i)
        prompts.append(biosam.Prompt(box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)))
    adapter = propagation_decoder(lite_medsam)
    both = predictor.predict_prompts(prompts, zoom="off", decoder=[None, adapter, None])
    plain = predictor.predict_prompts([prompts[0], prompts[2]], zoom="off")
    learned = predictor.predict_prompts([prompts[1]], zoom="off", decoder=adapter)
    np.testing.assert_allclose(both.low_res_logits[[0, 2]], plain.low_res_logits, atol=1e-4)
    np.testing.assert_allclose(both.low_res_logits[[1]], learned.low_res_logits, atol=1e-4)
    assert np.abs(both.low_res_logits[1] - predictor.predict_prompts([prompts[1]], zoom="off").low_res_logits[0]).max() > 0.1
    with pytest.raises(ValueError, match="one per prompt"):
        predictor.predict_prompts(prompts, decoder=[adapter])


def test_learned_projection_needs_an_adapter(nuclei_3d, lite_medsam):
    image, labels = nuclei_3d
    ys, xs = np.nonzero(labels[15] == labels[15].max())
    prompt = biosam.Prompt(box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float), z=15)
    predictor = biosam.Predictor(lite_medsam)
    resolved = segment_volume(predictor, image, [prompt], PropagationSettings(projection="auto"), progress=False)
    learned = segment_volume(predictor, image, [prompt], PropagationSettings(projection="learned"), progress=False)
    np.testing.assert_array_equal(resolved.labels, learned.labels)  # auto takes the shipped adapter
    loaded = segment_volume(predictor, image, [prompt], adapter=propagation_decoder(lite_medsam), progress=False)
    np.testing.assert_array_equal(loaded.labels, learned.labels)  # an adapter loaded once, passed as a module
    other = propagation_decoder(biosam.load_model("lite_medsam"))  # same weights, another model's encoder
    with pytest.raises(InputError, match="made for another model"):
        segment_volume(predictor, image, [prompt], adapter=other, progress=False)


def test_training_writes_an_adapter_that_propagation_uses(nuclei_3d, lite_medsam, tmp_path):
    """A short run on a few nuclei: the file loads, records its base and history, and drives segment_volume."""
    image, labels = nuclei_3d
    sub = np.ascontiguousarray(labels[8:20])
    data = [LabelledVolume(np.ascontiguousarray(image[8:20]), sub, [int(i) for i in np.unique(sub)[1:9]], "stardist")]
    out = tmp_path / "adapter.pt"
    metrics = train_propagation_adapter(lite_medsam, data, out, AdapterSettings(epochs=1, val_fraction=0.3, seed=3),
                                        progress=False)
    assert [r["epoch"] for r in metrics["history"]] == [0, 1] and metrics["train_pairs"] > 0 < metrics["val_pairs"]
    assert 0.0 <= metrics["best_val_iou"] <= 1.0
    payload = torch.load(out, weights_only=True)
    assert payload["biosam"]["base_checkpoint_hash"] == lite_medsam.info.checkpoint_hash
    ys, xs = np.nonzero(sub[6] == data[0].ids[0])
    prompt = biosam.Prompt(box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float), z=6)
    result = segment_volume(biosam.Predictor(lite_medsam), data[0].volume, [prompt],
                            PropagationSettings(projection="learned"), progress=False, adapter=out)
    assert (result.labels == 1).sum() > 0


def test_volume_command_reports_the_projection_and_refuses_a_bad_adapter(nuclei_3d, tmp_path):
    import json

    from click.testing import CliRunner

    from biosam.cli.main import main

    image, labels = nuclei_3d
    path = tmp_path / "nuclei.tif"
    tifffile.imwrite(path, image[8:20])
    ys, xs = np.nonzero(labels[14] == labels[14].max())
    (tmp_path / "p.json").write_text(json.dumps([{"box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                          int(ys.max()) + 1], "z": 6}]))
    out = tmp_path / "labels.tif"
    args = ["volume", str(path), "--prompts", str(tmp_path / "p.json"), "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["projection"] == "learned"
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}}, bad)
    other = tmp_path / "other.tif"
    result = CliRunner().invoke(main, [*args[:-1], str(other), "--adapter", str(bad)])
    assert result.exit_code != 0 and "not a biosam propagation adapter" in result.output and not other.exists()
