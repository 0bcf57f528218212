"""Intensity normalisation, model-input geometry and prompt validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biosam.errors import InputError
from biosam.prompting import Prompt, read_prompts
from biosam.prompting.intensity import normalize_intensity
from biosam.prompting.preprocess import Frame, logits_to_image, model_input


def test_uint8_gray_is_stretched_like_any_other_type():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4) * 5  # a dim 8-bit image: 0..55 of 255
    rgb = normalize_intensity(img)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.float32
    assert rgb.min() == 0 and rgb.max() == 255 and np.all(np.diff(rgb[..., 1].ravel()) > 0)
    np.testing.assert_allclose(rgb, normalize_intensity(img.astype(np.uint16) * 257), atol=1e-3)  # its 16-bit twin
    np.testing.assert_array_equal(normalize_intensity(img, "none")[..., 1], img)  # "none" keeps the values


def test_uint16_is_scaled_by_percentiles(dsb_nuclei):
    image, _ = dsb_nuclei  # real uint16 fluorescence image
    rgb = normalize_intensity(image)
    lo, hi = np.percentile(image, (1.0, 99.8))
    assert rgb.min() == 0 and rgb.max() == 255
    bright = image >= hi
    assert bright.any() and np.all(rgb[bright, 0] == 255)
    mid = (image > lo) & (image < hi)
    np.testing.assert_allclose(rgb[mid, 0], (image[mid] - lo) * 255 / (hi - lo), rtol=1e-5)


def test_signed_and_float_images_map_to_0_255():
    ct = np.linspace(-1000, 2000, 64 * 64).reshape(64, 64).astype(np.int16)
    out = normalize_intensity(ct)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[..., 0].ravel()) >= 0)  # monotone mapping keeps order
    out_f = normalize_intensity(ct.astype(np.float64) / 7)
    np.testing.assert_allclose(out, out_f, atol=1e-3)


def test_channel_layouts():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(normalize_intensity(np.moveaxis(rgb, -1, 0)), normalize_intensity(rgb))
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(normalize_intensity(rgba), normalize_intensity(rgb))
    two = rng.random((20, 30, 2)).astype(np.float32)
    comp = normalize_intensity(two)
    assert np.all(comp[..., 0] == comp[..., 2])  # documented grayscale composite
    assert normalize_intensity(np.zeros((5, 6), np.uint16)).max() == 0  # constant image: no division by zero


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((12, 40, 50), np.uint8), "stack of 12 slices"),
        (np.zeros((2, 3, 4, 5), np.uint8), "2D image"),
        (np.array(["a", "b"]), "pixel type"),
    ],
)
def test_bad_images_are_refused(bad, message):
    with pytest.raises(InputError, match=message):
        normalize_intensity(bad)


def test_frames_map_coordinates_like_each_family():
    sam = Frame.create((500, 1000), 1024, "sam")
    assert sam.resized == (512, 1024)
    np.testing.assert_allclose(sam.to_model([[100, 50, 200, 100]]), [[102.4, 51.2, 204.8, 102.4]])
    med = Frame.create((500, 1000), 1024, "medsam")  # MedSAM squashes to a square: per-axis scale
    np.testing.assert_allclose(med.to_model([10, 10]), [10.24, 20.48])


def test_model_input_families():
    rgb = np.random.default_rng(1).random((100, 50, 3)).astype(np.float32) * 255
    lite = model_input(rgb, Frame.create((100, 50), 256, "lite_medsam"), "lite_medsam")
    assert lite.shape == (1, 3, 256, 256)
    assert float(lite[..., :, :128].min()) == 0.0 and float(lite[..., :, :128].max()) == pytest.approx(1.0)
    assert torch.all(lite[..., 128:] == 0)  # padded bottom/right
    sam = model_input(rgb, Frame.create((100, 50), 1024, "sam"), "sam")
    assert sam.shape == (1, 3, 1024, 1024) and torch.all(sam[..., 512:] == 0)
    assert float(sam[..., :512].mean()) == pytest.approx(float(((sam[..., :512]).mean())))
    med = model_input(rgb, Frame.create((100, 50), 1024, "medsam"), "medsam")
    assert med.shape == (1, 3, 1024, 1024) and float(med.min()) == 0.0 and float(med.max()) == pytest.approx(1.0)


def test_logits_round_trip_to_image_size():
    frame = Frame.create((300, 600), 256, "lite_medsam")
    low = torch.full((2, 1, 256, 256), -5.0)
    low[:, :, 10:20, 30:50] = 5.0  # in the valid (unpadded) upper half
    full = logits_to_image(low, frame, "lite_medsam")
    assert full.shape == (2, 1, 300, 600)
    ys, xs = np.nonzero(full[0, 0].numpy() > 0)
    scale = 600 / 256
    assert abs(xs.min() - 30 * scale) <= 2 and abs(xs.max() - 50 * scale) <= 3
    assert abs(ys.min() - 10 * scale) <= 2 and abs(ys.max() - 20 * scale) <= 3


@pytest.mark.parametrize(
    "prompt, message",
    [
        (Prompt(box=[10, 10, 5, 20]), "empty"),
        (Prompt(box=[10, 10, 10, 20]), "empty"),
        (Prompt(box=[-15, 0, -5, 10]), "entirely outside the image"),
        (Prompt(box=[0, 100, 10, 120]), "entirely outside the image"),
        (Prompt(box=[0, 0, 10]), "4 finite numbers"),
        (Prompt(box="a,b,c,d"), "numbers"),
        (Prompt(points=[[50, 120]]), "outside the image"),
        (Prompt(points=[[5, 5]], point_labels=[2]), "0 or 1"),
        (Prompt(), "at least"),
    ],
)
def test_bad_prompts_are_refused(prompt, message):
    with pytest.raises(InputError, match=message):
        prompt.validate((100, 80))


def test_read_prompts(tmp_path):
    good = tmp_path / "p.json"
    good.write_text('[{"box": [1, 2, 30, 40]}, {"points": [[5, 6], [7, 8, 0]]}, {"box": [0,0,9,9], "points": [[3,3,1]]}]')
    prompts = read_prompts(good)
    assert len(prompts) == 3
    np.testing.assert_array_equal(prompts[1].point_labels, [1, 0])
    for text, message in [("{}", "non-empty JSON list"), ("[{\"boxx\": [1,2,3,4]}]", "object 0"), ("[{\"points\": [[1]]}]", "points"), ("not json", "valid JSON")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(InputError, match=message):
            read_prompts(bad)
