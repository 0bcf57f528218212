"""Issue 14 item 4, inputs and prompts: what a new user gets wrong is refused early with a clear message (or, where
the intent is clear, done), and nothing is left behind.

Refusals that need only the image's metadata must come before the model loads: those tests replace
``biosam.load_model`` with a function that fails the test.
"""

from __future__ import annotations

import logging
import re

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

import biosam
from biosam.cli.main import main
from biosam.errors import InputError
from biosam.io import plane_index, read_image
from biosam.io.meta import ImageMeta
from biosam.models import CheckpointError
from biosam.models.checkpoint import load_sam_checkpoint, read_plain_checkpoint, read_state_dict
from biosam.models.config import CONFIGS
from biosam.prompting import Prompt
from biosam.prompting.preprocess import Frame, check_proportions
from biosam.prompting.prompts import check_prompts

NUCLEUS_BOX = "49,23,75,57"  # a nucleus of the DSB2018 image's top-left 256 x 256 crop


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(res, *needles, code: int = 1) -> str:
    """Assert a refusal: exit ``code``, the ``needles`` in the message, no traceback; return the message."""
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    for needle in needles:
        assert needle in res.output, res.output
    assert "Traceback" not in res.output
    return res.output


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads the model (what is checked here must be refused before that)."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(biosam, "load_model", load_model)



@pytest.fixture(scope="module")
def nuclei(dsb_nuclei):
    """The real DSB2018 nuclei image, its top-left 256 x 256 crop (uint8)."""
    image = dsb_nuclei[0][:256, :256]
    return np.clip(image.astype(np.float64) / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder to run in; every test asserts at its end that nothing but its own inputs remain."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def left(folder, *inputs) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in inputs)


# ----------------------------------------------------------------------------- 1. very thin images


def test_proportions_rule():
    check_proportions((3, 1536), 256, "lite_medsam")  # the short side rounds to 1 px
    check_proportions((1536, 3), 256, "lite_medsam")
    check_proportions((3, 100000), 1024, "medsam")  # square preprocessings stretch any shape
    check_proportions((3, 100000), 1024, "sam2")
    with pytest.raises(InputError, match=r"3 x 1537 px .* at most 1536 px long"):
        check_proportions((3, 1537), 256, "lite_medsam")
    with pytest.raises(InputError, match="its width would be under one pixel"):
        check_proportions((100000, 3), 1024, "sam")
    # The library refuses too (an InputError, not torch's "output size 0" RuntimeError).
    with pytest.raises(InputError, match="too elongated"):
        Frame.create((3, 100000), 256, "lite_medsam")


def test_thin_image_is_refused_before_the_model_loads(work, nuclei, no_model):
    strip = np.tile(nuclei[100:103], (1, 400))[:, :100000]  # 3 x 100000 real pixels
    iio.imwrite(work / "strip.png", strip)
    for command, extra in (("segment", ["--box", "10,0,200,3"]), ("auto", [])):
        res = run(command, "strip.png", "-o", "out.tif", *extra)
        refused(res, "strip.png: the image is 3 x 100000 px", "too elongated for the model 'lite_medsam'",
                "at most 1536 px long", "crop it")
    assert left(work, "strip.png") == []


def test_thin_image_within_the_rule_is_segmented(work, nuclei, shared_model):
    strip = np.tile(nuclei[100:103], (1, 6))[:, :1500]  # 3 x 1500: 1 px high in the 256 px model input
    iio.imwrite(work / "strip.png", strip)
    res = run("segment", "strip.png", "--box", "10,0,200,3", "-o", "out.tif")
    assert res.exit_code == 0, res.output
    assert tifffile.imread(work / "out.tif").shape == (3, 1500)
    assert left(work, "strip.png", "out.tif") == []


# ----------------------------------------------------------------------------- 2. --channel / --t / --z


def test_plane_index_refuses_absent_and_negative_indices():
    gray = ImageMeta("g.png", "png", "YX", (64, 64), "|u1")
    rgb = ImageMeta("c.png", "png", "YXC", (64, 64, 3), "|u1")
    assert plane_index(gray, z=0, t=0, channel=0) == (slice(None), slice(None))  # the one entry of an absent axis
    absent = r"g.png: --channel 7 .* no C axis \(axes YX, shape \(64, 64\)\): leave --channel out"
    with pytest.raises(InputError, match=absent):
        plane_index(gray, channel=7)
    with pytest.raises(InputError, match="--t 3 asks for one of several time points, but the data have no T axis"):
        plane_index(gray, t=3)
    with pytest.raises(InputError, match="--z 2 asks for one of several slices"):
        plane_index(gray, z=2)
    with pytest.raises(InputError, match="--channel -1: channels are numbered from 0"):
        plane_index(rgb, channel=-1)
    with pytest.raises(InputError, match="--channel 3 is out of range; axis C has 3 entries, numbered 0 to 2"):
        plane_index(rgb, channel=3)
    assert plane_index(rgb, channel=2) == (slice(None), slice(None), 2)


def test_plane_options_are_refused_before_the_model_loads(work, nuclei, no_model):
    iio.imwrite(work / "gray.png", nuclei)
    iio.imwrite(work / "rgb.png", np.dstack([nuclei] * 3), photometric="minisblack")
    tifffile.imwrite(work / "stack.tif", np.stack([nuclei[:64, :64]] * 4), photometric="minisblack")
    (work / "p.json").write_text('[{"box": [5, 5, 30, 30], "z": 1}]')
    cases = [
        ("gray.png", ["--channel", "7"], "--channel 7 asks for one of several channels, but the data have no C axis"),
        ("gray.png", ["--t", "3"], "--t 3 asks for one of several time points"),
        ("gray.png", ["--z", "3"], "--z 3 asks for one of several slices"),
        ("rgb.png", ["--channel", "-1"], "--channel -1: channels are numbered from 0"),
        ("rgb.png", ["--channel", "7"], "--channel 7 is out of range; axis C has 3 entries"),
        ("stack.tif", ["--z", "4"], "--z 4 is out of range; axis Z has 4 entries, numbered 0 to 3"),
    ]
    for image, extra, message in cases:
        box = ["--box", "5,5,30,30"]
        refused(run("segment", image, "-o", "out.tif", *box, *extra), f"{image}: {message}")
        refused(run("auto", image, "-o", "out.tif", *extra), f"{image}: {message}")
    refused(run("volume", "stack.tif", "--prompts", "p.json", "-o", "out.tif", "--channel", "2"),
            "stack.tif: --channel 2 asks for one of several channels")
    refused(run("volume", "stack.tif", "--prompts", "p.json", "-o", "out.tif", "--t", "-1"),
            "stack.tif: --t -1: time points are numbered from 0")
    assert left(work, "gray.png", "rgb.png", "stack.tif", "p.json") == []


# ----------------------------------------------------------------------------- 3. prompts checked first; clipping


def test_box_over_the_edge_is_clipped_and_one_outside_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="biosam.prompting.prompts"):
        checked = Prompt(box=[60, -5, 90, 40]).validate((100, 80))
    np.testing.assert_array_equal(checked.box, [60, 0, 80, 40])
    assert "reaches over the edge of the image (width 80, height 100)" in caplog.text
    assert "[60.0, 0.0, 80.0, 40.0]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="biosam.prompting.prompts"):
        again = checked.validate((100, 80))  # a checked prompt is not clipped (nor reported) twice
    assert caplog.text == "" and np.array_equal(again.box, checked.box)
    for box in ([80, 0, 90, 10], [-20, -20, 0, 0], [0, 100, 10, 120]):  # beyond or only touching an edge
        with pytest.raises(InputError, match=r"lies entirely outside the image \(width 80, height 100\)"):
            Prompt(box=box).validate((100, 80))
    with pytest.raises(InputError, match=r"img.tif: object 1 \(slice z=3\): box .* entirely outside"):
        check_prompts([Prompt(box=[1, 1, 9, 9], z=0), Prompt(box=[90, 90, 99, 99], z=3)], (64, 64), "img.tif")


def test_prompts_are_checked_before_the_model_loads(work, nuclei, no_model):
    volume = np.stack([nuclei[:64, :64]] * 8)
    tifffile.imwrite(work / "stack.tif", volume)
    (work / "last.json").write_text('[{"box": [5, 5, 30, 30], "z": 0}, {"box": [70, 70, 90, 90], "z": 7}]')
    (work / "deep.json").write_text('[{"box": [5, 5, 30, 30], "z": 8}]')
    message = "stack.tif: object 1 (slice z=7): box [70.0, 70.0, 90.0, 90.0] lies entirely outside the image"
    refused(run("volume", "stack.tif", "--prompts", "last.json", "-o", "out.tif"), message, "(width 64, height 64)")
    refused(run("segment", "stack.tif", "--prompts", "last.json", "-o", "out.tif"), message)
    refused(run("volume", "stack.tif", "--prompts", "deep.json", "-o", "out.tif"), "slice z=8", "8 slices")
    refused(run("segment", "stack.tif", "--prompts", "deep.json", "-o", "out.tif"),
            'object 0 has "z": 8, but stack.tif has 8 slices (z = 0..7)')
    iio.imwrite(work / "gray.png", nuclei)
    refused(run("segment", "gray.png", "--box", "300,10,400,50", "-o", "out.tif"),
            "gray.png: object 0: box [300.0, 10.0, 400.0, 50.0] lies entirely outside the image",
            "(width 256, height 256)")
    refused(run("segment", "gray.png", "--point", "256,10", "-o", "out.tif"), "lie outside the image")
    assert left(work, "stack.tif", "last.json", "deep.json", "gray.png") == []


def test_box_over_the_edge_segments_its_inside_part(work, nuclei, shared_model):
    """A nucleus at the crop's right edge, boxed with a box reaching past the edge: same labels as the box inside."""
    iio.imwrite(work / "gray.png", nuclei[:, :70])  # cuts through the nucleus at x 49..75
    assert run("segment", "gray.png", "--box", "49,23,90,57", "-o", "over.tif").exit_code == 0
    res = run("segment", "gray.png", "--box", "49,23,70,57", "-o", "inside.tif")
    assert res.exit_code == 0, res.output
    over, inside = tifffile.imread(work / "over.tif"), tifffile.imread(work / "inside.tif")
    assert inside.sum() > 100 and np.array_equal(over, inside)
    assert left(work, "gray.png", "over.tif", "inside.tif") == []


# ----------------------------------------------------------------------------- 4. wrong-shaped checkpoint tensors


@pytest.fixture(scope="module")
def lite_state(lite_medsam):
    return torch.load(lite_medsam.info.checkpoint, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("shape", [(1, 100), (1, 128), (2, 256), (256,), ()])
def test_wrong_shaped_tensor_names_file_key_shapes_and_fix(tmp_path, lite_state, shape):
    state = dict(lite_state)
    state["mask_decoder.iou_token.weight"] = torch.zeros(shape)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: checkpoint does not match the 'lite_medsam'")
    assert f"mask_decoder.iou_token.weight: expected shape (1, 256), found {shape}" in message
    assert "1 tensor(s) with a different shape" in message  # the one damaged tensor, not 127 others
    assert "damaged or was changed after saving: get a fresh copy from its publisher" in message


def test_tensors_of_an_unbuildable_width_are_a_checkpoint_error(tmp_path, lite_state):
    state = dict(lite_state)
    for key in ("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight",
                "prompt_encoder.no_mask_embed.weight", "prompt_encoder.not_a_point_embed.weight",
                "prompt_encoder.point_embeddings.0.weight"):
        state[key] = torch.zeros(*state[key].shape[:-1], 100)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"odd.pth: .*cannot be built \(8 heads do not divide .*get a fresh copy"):
        load_sam_checkpoint(path)


def test_another_architecture_is_named_with_the_fix(tmp_path, lite_state):
    path = tmp_path / "lite.pth"
    torch.save(lite_state, path)
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path, CONFIGS["vit_t"])
    assert "looks like a 'lite_medsam'" in str(info.value) and "give its path as --model" in str(info.value)


def test_sam2_mismatch_goes_through_the_same_message():
    from biosam.models.sam2 import checkpoint as sam2_checkpoint
    from biosam.models.sam2.config import SAM2_CONFIGS
    from biosam.models.sam2.model import Sam2

    config = SAM2_CONFIGS["sam2.1_hiera_tiny"]
    state = Sam2(config).state_dict()
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 100)
    with pytest.raises(CheckpointError) as info:
        sam2_checkpoint.load_sam2_state_dict(state, None, "tiny.pt")
    message = str(info.value)
    assert message.startswith("tiny.pt: checkpoint does not match")
    assert "sam_mask_decoder.iou_token.weight: expected shape (1, 256), found (1, 100)" in message
    assert "get a fresh copy from its publisher" in message


# ----------------------------------------------------------------------------- 5. misleading messages


class _Eval:
    def __reduce__(self):
        return eval, ("1 + 1",)


@pytest.mark.parametrize(
    "payload, needles",
    [
        (_Eval(), ["refused: the file asks to call eval", "could run commands",
                   "get the checkpoint from its publisher."]),
        (slice(1, 2), ["holds a pickled Python object (slice) that biosam does not load",
                       "torch.save(model.state_dict(), path)"]),
    ],
)
def test_unloadable_pickles_get_a_whole_message_without_weights_only_advice(tmp_path, payload, needles):
    path = tmp_path / "payload.pth"
    torch.save({"hook": payload, "w": torch.zeros(2)}, path)
    loaders = ((read_state_dict, CheckpointError), (lambda p: read_plain_checkpoint(p, "decoder"), InputError))
    for load, error in loaders:
        with pytest.raises(error) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ")
        for needle in needles:
            assert needle in message
        assert "weights_only" not in message and "will likely succeed" not in message and "\n" not in message
        assert message.endswith(".")  # whole sentences, not cut


def test_non_checkpoints_say_what_they_are(tmp_path):
    cases = {"empty.pth": (b"", "is empty (0 bytes)"),
             "page.pth": (b"<!DOCTYPE html><html></html>", "by its first bytes it is an HTML page"),
             "notes.pth": (b"hello", "not a PyTorch file at all (it starts with b'hello')")}
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / name}: ") + ".*" + re.escape(needle)):
            read_state_dict(tmp_path / name)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:600])
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "cut.pth")
    assert "PyTorch cannot read it (RuntimeError: PytorchStreamReader failed" in str(info.value)
    assert "truncated" in str(info.value) and "weights_only" not in str(info.value)


def test_empty_image_files_say_so(work, no_model):
    for name in ("empty.png", "empty.jpg", "empty.tif", "empty.mrc", "empty.nii.gz"):
        (work / name).write_bytes(b"")
        with pytest.raises(InputError) as info:
            read_image(work / name)
        assert str(info.value) == (f"{work / name}: is empty (0 bytes), so the copy or export did not finish. "
                                   "Copy it again from its source.")
    res = run("segment", "empty.png", "--box", "1,1,5,5", "-o", "out.tif")
    output = refused(res, "empty.png: is empty (0 bytes)")
    assert "pyav" not in output and "plugin" not in output
    (work / "notes.png").write_text("not an image")
    output = refused(run("auto", "notes.png", "-o", "out.tif"), "notes.png: is not a PNG file")
    assert "pyav" not in output
    assert left(work, "empty.png", "empty.jpg", "empty.tif", "empty.mrc", "empty.nii.gz", "notes.png") == []


def test_jpeg_output_is_refused_as_lossy(work, nuclei, no_model):
    iio.imwrite(work / "gray.png", nuclei)
    tifffile.imwrite(work / "stack.tif", np.stack([nuclei[:64, :64]] * 3), photometric="minisblack")
    for out in ("out.jpg", "out.jpeg"):
        output = refused(run("segment", "gray.png", "--box", NUCLEUS_BOX, "-o", out),
                         f"{out}: JPEG is lossy, so it cannot hold labels", "write the labels as .png or .tif")
        assert "JPEG none" not in output
    refused(run("auto", "stack.tif", "-o", "out.png"), "out.png: PNG holds 2D labels only, and these have axes ZYX")
    assert left(work, "gray.png", "stack.tif") == []


def test_zero_and_negative_numeric_options_are_refused(work, nuclei, no_model):
    iio.imwrite(work / "gray.png", nuclei)
    tifffile.imwrite(work / "tomo.tif", np.stack([nuclei[:64, :64]] * 12))
    cases = [
        (["auto", "gray.png", "-o", "out.tif", "--tile", "0"],
         "Invalid value for '--tile': 0 is not in the range x>=32"),
        (["auto", "gray.png", "-o", "out.tif", "--tile", "-256"], "'--tile'"),
        (["auto", "gray.png", "-o", "out.tif", "--halo", "-1"], "Invalid value for '--halo'"),
        (["auto", "gray.png", "-o", "out.tif", "--points-per-side", "0"], "Invalid value for '--points-per-side'"),
        (["auto", "gray.png", "-o", "out.tif", "--pred-iou-thresh", "1.5"], "Invalid value for '--pred-iou-thresh'"),
        (["tomogram", "tomo.tif", "-o", "out.mrc", "--multi-slab", "0"], "Invalid value for '--multi-slab'"),
    ]
    for args, needle in cases:
        refused(run(*args), needle, code=2)
    # the library's own rule (one owner: biosam.automatic.tiling.tiles_rule), before the image is read
    refused(run("auto", "gray.png", "-o", "out.tif", "--tile", "64", "--halo", "32"),
            "tile 64 with halo 32: the tile must be larger than twice the halo")
    assert left(work, "gray.png", "tomo.tif") == []


def test_library_tile_zero_is_not_the_default(lite_medsam, nuclei):
    from biosam.automatic.run import AutoSettings, segment_automatic

    predictor = biosam.Predictor(lite_medsam)
    with pytest.raises(InputError, match="tile 0 with halo 0"):
        segment_automatic(predictor, nuclei, AutoSettings(tile=0))

