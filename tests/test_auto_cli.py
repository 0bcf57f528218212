"""`biosam auto`: the shipped decoder on real nuclei, tiles without seams, volumes, refusals."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from biosam.automatic.ais import load_decoder, shipped_decoder_path
from biosam.automatic.data import as_instances
from biosam.cli.main import main
from biosam.evaluate import evaluate_instances

from conftest import shared_file


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def nih_val(tmp_path_factory):
    """A 512 x 640 crop of NIH3T3 image 45 and its instance labels."""
    folder = tmp_path_factory.mktemp("auto")
    image = iio.imread(shared_file("nuclei_nih3t3", "images", "dna-45.png"))[256:768, 256:896]
    truth = as_instances(iio.imread(shared_file("nuclei_nih3t3", "labels", "45.png"))[256:768, 256:896])
    path = folder / "nuclei.tif"
    tifffile.imwrite(path, image)
    return path, image, truth


@pytest.fixture(scope="module")
def ais_result(nih_val):
    path, _, _ = nih_val
    out, overlay = path.parent / "labels.tif", path.parent / "overlay.png"
    res = run("auto", path, "-o", out, "--overlay", overlay, "--json")
    assert res.exit_code == 0, res.output
    return tifffile.imread(out), json.loads(res.stdout), overlay


def test_shipped_decoder_finds_the_nuclei(nih_val, ais_result):
    _, _, truth = nih_val
    labels, report, overlay = ais_result
    scores = evaluate_instances(labels, truth)
    f1 = next(r["f1"] for r in scores["per_threshold"] if r["threshold"] == 0.5)
    assert f1 > 0.8, scores
    assert report["objects"] == int(labels.max()) == len(np.unique(labels)) - 1  # contiguous ids
    assert report["mode"] == "ais" and report["decoder"].endswith(shipped_decoder_path().name)
    # no --object-size: the nuclei's size (about 85 px) was estimated and reported with the scale it gave
    assert 65 <= report["object_size"] <= 110 and report["scale"] == pytest.approx(
        load_decoder().info["object_size"] / report["object_size"])
    assert iio.imread(overlay).shape == (*labels.shape, 3)


def test_object_size_resizes_to_the_decoders_scale(nih_val):
    """NIH3T3 nuclei are about 85 px across; the decoder records the size it works best at (32 px)."""
    path, _, truth = nih_val
    out = path.parent / "sized.tif"
    res = run("auto", path, "-o", out, "--object-size", 85, "--json")
    assert res.exit_code == 0, res.output
    report, labels = json.loads(res.stdout), tifffile.imread(out)
    assert report["scale"] == pytest.approx(load_decoder().info["object_size"] / 85)
    assert labels.shape == truth.shape
    f1 = next(r["f1"] for r in evaluate_instances(labels, truth)["per_threshold"] if r["threshold"] == 0.5)
    assert f1 > 0.75


def test_object_size_on_small_nuclei(lite_medsam):
    """DSB2018 nuclei (about 24 px): at their own size, given or estimated, far more are found than at a wrong one."""
    image = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))[:256, :256]
    truth = as_instances(tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "mask2d.tif"))[:256, :256])
    from biosam import Predictor
    from biosam.automatic.run import AutoSettings, segment_automatic

    predictor = Predictor(lite_medsam)
    f1 = {}
    for name, settings in (("given", AutoSettings(object_size=24.0)), ("estimated", AutoSettings()),
                           ("wrong", AutoSettings(object_size=80.0))):
        labels = segment_automatic(predictor, image, settings)
        f1[name] = next(r["f1"] for r in evaluate_instances(labels, truth)["per_threshold"] if r["threshold"] == 0.5)
    assert min(f1["given"], f1["estimated"]) >= 0.75, f1
    assert min(f1["given"], f1["estimated"]) >= f1["wrong"] + 0.1, f1


def test_constant_and_volume_inputs(tmp_path, nih_val):
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.full((300, 300), 7, np.uint16))
    res = run("auto", flat, "-o", tmp_path / "flat_labels.tif")
    assert res.exit_code == 0, res.output
    assert not tifffile.imread(tmp_path / "flat_labels.tif").any()

    _, image, _ = nih_val
    stack = np.stack([image[:256, :256], np.zeros((256, 256), np.uint8), image[256:, 256:512]])
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    res = run("auto", tmp_path / "stack.tif", "-o", tmp_path / "stack_labels.tif", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    labels = tifffile.imread(tmp_path / "stack_labels.tif")
    assert labels.shape == stack.shape and [s["z"] for s in report["slices"]] == [0, 1, 2]
    assert report["slices"][1]["objects"] == 0 and not labels[1].any()
    ids0, ids2 = set(np.unique(labels[0])) - {0}, set(np.unique(labels[2])) - {0}
    assert ids0 and ids2 and not ids0 & ids2  # ids unique across the volume
    assert report["objects"] == len(ids0) + len(ids2) == labels.max()


def test_wrong_decoder_and_options_are_refused(tmp_path, nih_val):
    path, _, _ = nih_val
    data = torch.load(shipped_decoder_path(), weights_only=True)
    data["encoder"] = {**data["encoder"], "name": "vit_b_lm", "checkpoint_hash": "0" * 32}
    torch.save(data, tmp_path / "other.pt")
    out = tmp_path / "labels.tif"
    res = run("auto", path, "-o", out, "--decoder", tmp_path / "other.pt")
    assert res.exit_code != 0 and "vit_b_lm" in res.output and not out.exists()

    res = run("auto", path, "-o", out, "--mode", "amg", "--decoder", shipped_decoder_path())
    assert res.exit_code != 0 and "--decoder" in res.output and not out.exists()

    res = run("auto", path, "-o", out, "--tile", 64, "--halo", 32)
    assert res.exit_code != 0 and "halo" in res.output and not out.exists()

    res = run("auto", path, "-o", out, "--mode", "amg", "--object-size", 30)
    assert res.exit_code != 0 and "--object-size" in res.output and not out.exists()
    res = run("auto", path, "-o", out, "--object-size", 30, "--scale", 0.5)
    assert res.exit_code != 0 and "either scale or object_size" in res.output and not out.exists()
    res = run("auto", path, "-o", out, "--object-size", 0)
    assert res.exit_code != 0 and "object_size (a diameter in pixels) must be > 0" in res.output and not out.exists()
    res = run("auto", path, "-o", out, "--scale", 10)
    assert res.exit_code != 0 and "scale must lie in [0.05, 4.0]" in res.output and not out.exists()


def test_volume_objects_are_linked_in_3d(tmp_path, nih_val):
    """Three sections of the same nuclei, shifted by 2 px each: one 3D object per nucleus, unless --link-iou 0."""
    _, image, _ = nih_val
    stack = np.stack([image[100 + d : 356 + d, 100 + d : 356 + d] for d in (0, 2, 4)])
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    res = run("auto", tmp_path / "stack.tif", "-o", tmp_path / "linked.tif", "--json")
    assert res.exit_code == 0, res.output
    linked = tifffile.imread(tmp_path / "linked.tif")
    report = json.loads(res.stdout)
    per_slice = [set(np.unique(plane)) - {0} for plane in linked]
    assert len(per_slice[0]) >= 3 and len(per_slice[0] & per_slice[1] & per_slice[2]) >= 0.8 * len(per_slice[0])
    assert report["objects"] == linked.max() == len(set().union(*per_slice))
    res = run("auto", tmp_path / "stack.tif", "-o", tmp_path / "apart.tif", "--link-iou", "0")
    assert res.exit_code == 0, res.output
    apart = [set(np.unique(plane)) - {0} for plane in tifffile.imread(tmp_path / "apart.tif")]
    assert not apart[0] & apart[1] and not apart[1] & apart[2]
    assert run("auto", tmp_path / "stack.tif", "-o", tmp_path / "x.tif", "--link-iou", "2").exit_code != 0
