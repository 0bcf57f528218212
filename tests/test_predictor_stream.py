"""Many prompts in bounded memory (decoded in chunks, drawn straight into the labels) and the warnings about
results that cannot be trusted (points for a box-trained model, empty objects, blank images)."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from scipy import ndimage

import biosam
import biosam.prompting.predictor as predictor_module
from biosam.evaluate import boxes_from_labels
from biosam.prompting.intensity import check_contrast
from biosam.prompting.zoom import Crop, ZoomSettings, _window, plan_crops

from conftest import shared_file


@pytest.fixture(scope="module")
def nih3t3():
    """The real NIH3T3 nuclei image dna-0 (1024 x 1344) and its nuclei as instance labels."""
    image = iio.imread(shared_file("nuclei_nih3t3", "images", "dna-0.png"))
    truth = ndimage.label(iio.imread(shared_file("nuclei_nih3t3", "labels", "0.png")) > 0)[0]
    return image, truth


@pytest.fixture(scope="module")
def many_boxes(nih3t3):
    """Every nucleus's box, the same boxes shifted by a few pixels (overlapping neighbours), and two large boxes."""
    _, truth = nih3t3
    boxes, _ = boxes_from_labels(truth)
    rng = np.random.default_rng(0)
    shifted = boxes + rng.uniform(-6, 6, boxes.shape)
    h, w = truth.shape
    boxes = np.concatenate([boxes, shifted, [[100, 100, 900, 700], [0, 0, w, h]]])
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return boxes


@pytest.fixture(scope="module")
def predictor(lite_medsam, nih3t3):
    p = biosam.Predictor(lite_medsam, batch_size=16)
    p.set_image(nih3t3[0])
    return p


@pytest.mark.parametrize("zoom", ["auto", "off"])
def test_streamed_labels_equal_all_masks_at_once(predictor, many_boxes, zoom, monkeypatch):
    """Labels drawn chunk by chunk are exactly those of every mask held at once (Prediction.to_labels)."""
    prompts = [biosam.Prompt(box=b) for b in many_boxes]
    assert len(prompts) > 4 * predictor.batch_size
    whole = predictor.predict_prompts(prompts, zoom=zoom)
    if zoom == "auto":
        assert 0 < whole.zoomed.sum() < len(prompts)  # both paths: zoomed crops and the whole image
    # image-size logits a few objects at a time: same numbers
    monkeypatch.setattr(predictor_module, "UPSAMPLE_BYTES", 3 * 4 * 1024 * 1344)
    streamed = predictor.predict_labels(prompts, zoom=zoom)
    expected = whole.to_labels()
    np.testing.assert_array_equal(streamed.labels, expected)
    np.testing.assert_array_equal(streamed.scores, whole.scores[:, 0])
    np.testing.assert_array_equal(streamed.areas, whole.masks[:, 0].sum(axis=(1, 2)))
    np.testing.assert_array_equal(streamed.visible_areas, [(expected == k + 1).sum() for k in range(len(prompts))])
    np.testing.assert_array_equal(streamed.zoomed, whole.zoomed)
    assert streamed.warnings == []


def test_chunks_bound_memory(predictor, many_boxes, monkeypatch):
    """No chunk holds more than a decoder batch of objects or more image-size logits than the budget, and the
    label path never allocates anything the size of all objects' masks."""
    budget = 5 * 4 * 1024 * 1344  # five image-size float32 logit maps
    monkeypatch.setattr(predictor_module, "UPSAMPLE_BYTES", budget)
    prompts = [biosam.Prompt(box=b).validate(predictor.image_shape) for b in many_boxes]
    sizes = []
    for chunk in predictor._chunks(prompts, multimask=False, zoom="off", progress=False):
        assert len(chunk.idx) <= predictor.batch_size
        assert chunk.logits.element_size() * chunk.logits.numel() <= budget
        sizes.append(len(chunk.idx))
    assert sum(sizes) == len(prompts) and max(sizes) == 5

    n, (h, w) = len(prompts), predictor.image_shape
    tracemalloc.start()  # NumPy reports its allocations here (torch's are bounded by the chunks above)
    try:
        result = predictor.predict_labels(prompts, zoom="off")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.labels.shape == (h, w) and result.areas.shape == (n,)
    assert peak < n * h * w / 4, (peak, n * h * w)  # all boolean masks at once would be n * h * w bytes


def test_ids_label_objects_and_progress_shows_for_many(predictor, many_boxes, capsys):
    boxes = many_boxes[-20:]
    prompts = [biosam.Prompt(box=b) for b in boxes]
    ids = np.arange(1, 41, 2)  # e.g. a slice's objects among those of a volume
    plain = predictor.predict_labels(prompts, zoom="off", progress=True)
    assert "objects" in capsys.readouterr().err  # 20 objects, more than one batch of 16
    numbered = predictor.predict_labels(prompts, zoom="off", ids=ids)
    np.testing.assert_array_equal(numbered.labels, np.concatenate([[0], ids])[plain.labels])
    predictor.predict_labels(prompts[:3], zoom="off", progress=True)
    assert "objects" not in capsys.readouterr().err  # a few objects: no bar
    with pytest.raises(biosam.errors.InputError, match="increasing"):
        predictor.predict_labels(prompts, zoom="off", ids=ids[::-1])


def _reference_plan(extents, image_shape, settings):
    """plan_crops's first-fit rule written as the plain loop over windows it replaced."""
    sizes = np.maximum(extents[:, 2] - extents[:, 0], extents[:, 3] - extents[:, 1])
    sides = np.maximum(sizes * settings.context, settings.min_crop)
    wanted = (sizes * 256 / max(image_shape) < settings.min_size) & (sides < max(image_shape))
    crops = []
    for i in sorted(np.flatnonzero(wanted), key=lambda k: -sizes[k]):
        margin = (sides[i] - sizes[i]) / 4
        for crop in crops:
            x0, y0, x1, y1 = crop.box
            inside = (extents[i, 0] - margin >= x0 and extents[i, 1] - margin >= y0
                      and extents[i, 2] + margin <= x1 and extents[i, 3] + margin <= y1)
            if inside and sides[i] >= max(x1 - x0, y1 - y0) / 1.5:
                crop.objects.append(int(i))
                break
        else:
            centre = (extents[i, :2] + extents[i, 2:]) / 2
            crops.append(Crop(_window(centre, sides[i], image_shape), [int(i)]))
    return crops


def test_crop_plan_for_thousands_of_boxes_is_the_first_fit(many_boxes):
    rng = np.random.default_rng(1)
    sizes = (many_boxes[:, 2:] - many_boxes[:, :2])[rng.integers(0, len(many_boxes) - 2, 3000)]
    start = rng.uniform(0, 1, (3000, 2)) * ([1344, 1024] - sizes)
    extents = np.concatenate([start, start + sizes], axis=1)
    crops, whole = plan_crops(extents, (1024, 1344), "auto")
    reference = _reference_plan(extents, (1024, 1344), ZoomSettings())
    assert [(c.box, c.objects) for c in crops] == [(c.box, c.objects) for c in reference]
    assert len(crops) > 100 and sorted(whole + [i for c in crops for i in c.objects]) == list(range(3000))


# ---------------------------------------------------------------- warnings


def test_check_contrast_flags_blank_planes_only(nih3t3, dsb_nuclei):
    assert check_contrast(np.zeros((64, 64), np.uint16), "blank.tif").startswith("blank.tif: the image has no contrast")
    assert "every pixel is 7.5" in check_contrast(np.full((64, 64, 3), 7.5, np.float32), "x")
    noisy = np.random.default_rng(0).integers(127, 130, (64, 64)).astype(np.uint8)  # flat grey with 1-level noise
    assert "127-129" in check_contrast(noisy, "x")
    assert check_contrast(1000 + np.random.default_rng(0).random((64, 64)), "x")  # 1000 +- 0.5: no contrast
    sparse = np.zeros((512, 512), np.uint16)
    sparse[10:20, 10:20] = 40  # one small object on an empty background is content
    assert check_contrast(sparse, "x") is None
    assert check_contrast(nih3t3[0], "x") is None and check_contrast(dsb_nuclei[0], "x") is None


def test_box_only_models_warn_about_points(lite_medsam, predictor, nih3t3):
    assert lite_medsam.info.box_only
    _, truth = nih3t3
    ys, xs = np.nonzero(truth == 5)
    point = [[float(xs.mean()), float(ys.mean())]]
    box = boxes_from_labels(truth)[0][4]
    result = predictor.predict_labels([biosam.Prompt(box=box), biosam.Prompt(points=point)], zoom="off")
    assert any("objects without a box (label 2)" in w and "box prompts only" in w for w in result.warnings)
    assert predictor.prompt_warnings([biosam.Prompt(box=box)]) == []
    info = lite_medsam.info
    tuned = type(info)(info.name, info.preprocessing, info.checkpoint, spec=info.spec, metadata={"base_model": "x"})
    assert not tuned.box_only  # fine-tuned by biosam: may have learnt points


def _segment(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biosam", "segment", *map(str, args), "--json", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)


def test_cli_warns_about_points_with_the_box_model(tmp_path, dsb_nuclei):
    image = shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif")
    labels = dsb_nuclei[1]
    ys, xs = np.nonzero(labels == labels.max())
    far = "5,5" if labels[5, 5] == 0 else "2,2"  # a point on empty background: nothing there
    objects = [{"points": [[float(xs.mean()), float(ys.mean())]]}, {"points": [[float(v) for v in far.split(",")]]}]
    prompts = tmp_path / "points.json"
    prompts.write_text(json.dumps(objects))
    res = _segment(image, "-o", tmp_path / "out.tif", "--prompts", prompts)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert any("objects without a box (labels 1, 2)" in w for w in report["warnings"]), report["warnings"]
    assert "lite_medsam was trained with box prompts only" in res.stderr
    areas = [o["area"] for o in report["objects"]]
    if 0 in areas:  # what the warning is about: an empty object is named too
        assert any("came back empty" in w for w in report["warnings"])
        assert "came back empty" in res.stderr


def test_cli_warns_about_a_blank_image(tmp_path):
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((256, 256), 300, np.uint16))
    res = _segment(blank, "-o", tmp_path / "out.tif", "--box", "20,20,120,120")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert len(report["warnings"]) >= 1 and "no contrast (every pixel is 300)" in report["warnings"][0]
    assert "unreliable" in res.stderr and "blank.tif" in res.stderr
    assert tifffile.imread(tmp_path / "out.tif").shape == (256, 256)
