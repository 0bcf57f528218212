"""The ``biosam`` command on real images: results, JSON, and refusals of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import biosam
from biosam.cli.main import main
from biosam.evaluate import boxes_from_labels, mask_iou

from conftest import shared_file


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory, dsb_nuclei):
    d = tmp_path_factory.mktemp("cli")
    shutil.copy(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"), d / "img.tif")
    labels = dsb_nuclei[1]
    boxes, ids = boxes_from_labels(labels)
    return d, labels, boxes[:3], ids[:3]


def test_segment_boxes_writes_labels_overlay_and_json(nuclei):
    d, labels, boxes, ids = nuclei
    out, overlay = d / "labels.tif", d / "overlay.png"
    args = ["segment", d / "img.tif", "-o", out, "--overlay", overlay, "--json"]
    for b in boxes:
        args += ["--box", ",".join(str(v) for v in b)]
    res = run(*args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [o["label"] for o in report["objects"]] == [1, 2, 3]
    written = tifffile.imread(out)
    assert written.shape == labels.shape and set(np.unique(written)) == {0, 1, 2, 3}
    for k, i in enumerate(ids, start=1):
        assert mask_iou(written == k, labels == i) > 0.6
        assert report["objects"][k - 1]["area"] == pytest.approx((written == k).sum(), rel=0.2)
    pic = iio.imread(overlay)
    assert pic.shape == (*labels.shape, 3) and pic.dtype == np.uint8


def test_existing_output_is_kept_unless_overwrite(nuclei):
    d, _, boxes, _ = nuclei
    out = d / "keep.png"
    out.write_bytes(b"precious")
    box = ",".join(str(v) for v in boxes[0])
    res = run("segment", d / "img.tif", "-o", out, "--box", box)
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    assert out.read_bytes() == b"precious"
    res = run("segment", d / "img.tif", "-o", out, "--box", box, "--overwrite")
    assert res.exit_code == 0, res.output
    assert iio.imread(out).max() == 1


def test_prompts_json_with_points_matches_api(nuclei, tmp_path):
    """Boxes, box+point and point-only objects from JSON give exactly the API's masks, in prompt order.

    LiteMedSAM was trained with box prompts only, so point quality is not asserted here; point
    logits are checked against the reference implementation in the model tests.
    """
    d, labels, boxes, _ = nuclei
    ys, xs = np.nonzero(labels == boxes_from_labels(labels)[1][3])
    point = [float(xs.mean()), float(ys.mean())]
    objects = [{"box": boxes[1].tolist()}, {"box": boxes[2].tolist(), "points": [[*point, 1]]}, {"points": [[*point, 1]]}]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(objects))
    out = tmp_path / "out.png"
    res = run("segment", d / "img.tif", "-o", out, "--prompts", prompts, "--zoom", "off")
    assert res.exit_code == 0, res.output
    written = iio.imread(out)

    predictor = biosam.Predictor(biosam.load_model("lite_medsam", device="cpu"))
    predictor.set_image(tifffile.imread(d / "img.tif"))
    expected = np.zeros(labels.shape, dtype=np.uint8)
    expected[predictor.predict(box=boxes[1], zoom="off").masks[0]] = 1
    expected[predictor.predict(box=boxes[2], points=[point], point_labels=[1], zoom="off").masks[0]] = 2
    expected[predictor.predict(points=[point], point_labels=[1], zoom="off").masks[0]] = 3
    assert (expected == 3).sum() > 20, "point-only object should produce a mask to compare"
    np.testing.assert_array_equal(written, expected)


def _assert_refused(res, *needles, outputs=()):
    assert res.exit_code != 0
    for needle in needles:
        assert needle in res.output, res.output
    for path in outputs:
        assert not path.exists(), f"{path} was left behind"
    assert "Traceback" not in res.output


def test_bad_input_is_refused_without_output(nuclei, tmp_path):
    d, _, boxes, _ = nuclei
    box = ",".join(str(v) for v in boxes[0])
    out, pic = tmp_path / "o.tif", tmp_path / "o.png"
    image = d / "img.tif"

    _assert_refused(run("segment", tmp_path / "missing.tif", "-o", out, "--box", box), "missing.tif", "not found", outputs=[out])
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(image.read_bytes()[:300])
    _assert_refused(run("segment", corrupt, "-o", out, "--box", box, "--overlay", pic), "corrupt.tif", outputs=[out, pic])
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((64, 64), np.nan, np.float32))
    _assert_refused(run("segment", nan, "-o", out, "--box", "1,1,10,10"), "nan.tif", "NaN", outputs=[out])
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((9, 32, 32), np.uint8))
    _assert_refused(run("segment", stack, "-o", out, "--box", "1,1,10,10"), "stack.tif", "slices", outputs=[out])
    _assert_refused(run("segment", image, "-o", out, "--box", "10,10,5,20"), "empty", outputs=[out])
    _assert_refused(run("segment", image, "-o", out, "--box", "600,0,700,20"), "entirely outside the image", outputs=[out])
    _assert_refused(run("segment", image, "-o", out, "--box", "1,2,3"), "x0,y0,x1,y1", outputs=[out])
    _assert_refused(run("segment", image, "-o", tmp_path / "o.jpg", "--box", box), ".jpg", outputs=[tmp_path / "o.jpg"])
    _assert_refused(run("segment", image, "-o", out), "--box", outputs=[out])
    _assert_refused(run("segment", image, "-o", out, "--box", box, "--model", "vit_bb"), "vit_bb", "vit_b", outputs=[out])
    not_ckpt = tmp_path / "weights.pth"
    not_ckpt.write_text("hello")
    _assert_refused(run("segment", image, "-o", out, "--box", box, "--model", not_ckpt), "weights.pth", outputs=[out])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.tif", "nan.tif", "stack.tif", "weights.pth"]


def test_truncated_checkpoint_is_refused(nuclei, tmp_path):
    from biosam.zoo import lite_medsam_path

    d, _, boxes, _ = nuclei
    broken = tmp_path / "lite_medsam_cut.pth"
    broken.write_bytes(lite_medsam_path().read_bytes()[: 5_000_000])
    out = tmp_path / "o.tif"
    box = ",".join(str(v) for v in boxes[0])
    _assert_refused(run("segment", d / "img.tif", "-o", out, "--box", box, "--model", broken), "lite_medsam_cut.pth", outputs=[out])


def test_models_lists_the_zoo():
    res = run("models")
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["name", "version", "architecture"]
    names = {line.split()[0] for line in lines[1:]}
    assert {"lite_medsam", "vit_b", "vit_b_lm", "vit_b_lm:v2", "medsam", "vit_t", "sam2.1_hiera_tiny"} <= names
    assert next(line for line in lines if line.startswith("vit_b_lm:v2")).split()[1] == "v2"
    lite = next(line for line in lines if line.startswith("lite_medsam"))
    assert "cached" in lite
    rows = json.loads(run("models", "--json").stdout)
    assert {r["name"]: r["cached"] for r in rows}["lite_medsam"] is True


def test_console_script_is_installed():
    exe = str(Path(sys.executable).parent / "biosam")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "segment" in res.stdout and "models" in res.stdout
