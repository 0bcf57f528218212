"""Prompted segmentation with the real LiteMedSAM weights on real labelled images."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import biosam
from biosam.errors import EmbeddingMismatchError, InputError
from biosam.evaluate import boxes_from_labels, mask_iou
from biosam.prompting.preprocess import Frame, logits_to_image

from conftest import shared_file


@pytest.fixture(scope="module")
def nuclei_predictor(lite_medsam, dsb_nuclei):
    predictor = biosam.Predictor(lite_medsam)
    predictor.set_image(dsb_nuclei[0])
    return predictor


@pytest.fixture(scope="module")
def nuclei_boxes(dsb_nuclei):
    labels = dsb_nuclei[1]
    boxes, ids = boxes_from_labels(labels)
    # 20 objects spread over the image, all of usable size
    areas = np.array([(labels == i).sum() for i in ids])
    pick = np.flatnonzero(areas >= 30)[::5][:20]
    return boxes[pick], ids[pick]


@pytest.fixture(scope="module")
def off_and_auto(nuclei_predictor, nuclei_boxes):
    boxes, _ = nuclei_boxes
    return nuclei_predictor.predict(box=boxes, zoom="off"), nuclei_predictor.predict(box=boxes, zoom="auto")


def test_batched_boxes_give_masks_at_image_size(off_and_auto, nuclei_boxes, dsb_nuclei):
    boxes, ids = nuclei_boxes
    labels = dsb_nuclei[1]
    for result in off_and_auto:
        n = len(boxes)
        assert result.masks.shape == (n, *labels.shape) and result.masks.dtype == bool
        assert result.scores.shape == (n,) and result.low_res_logits.shape == (n, 1, 256, 256)
        ious = [mask_iou(m, labels == i) for m, i in zip(result.masks, ids)]
        assert np.mean(ious) > 0.7, ious
        # Every mask sits on its own nucleus: most of it inside its prompt box.
        for m, (x0, y0, x1, y1) in zip(result.masks, boxes):
            inside = m[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].sum()
            assert inside >= 0.8 * m.sum() > 0


def test_batched_equals_one_by_one(nuclei_predictor, nuclei_boxes):
    boxes, _ = nuclei_boxes
    for zoom in ("off", "auto"):
        batch = nuclei_predictor.predict(box=boxes[:3], zoom=zoom)
        for k in range(3):
            single = nuclei_predictor.predict(box=boxes[k], zoom=zoom)
            assert single.masks.shape == (1, *batch.masks.shape[1:])
            assert mask_iou(single.masks[0], batch.masks[k]) > 0.99
            np.testing.assert_allclose(single.scores[0], batch.scores[k], atol=1e-4)


def test_zoom_improves_small_objects(off_and_auto, nuclei_boxes, dsb_nuclei):
    _, ids = nuclei_boxes
    labels = dsb_nuclei[1]
    off, auto = off_and_auto
    assert not off.zoomed.any() and auto.zoomed.all()  # nuclei of ~15 px in 512 px: all small at 256 px
    iou_off = np.mean([mask_iou(m, labels == i) for m, i in zip(off.masks, ids)])
    iou_auto = np.mean([mask_iou(m, labels == i) for m, i in zip(auto.masks, ids)])
    assert iou_auto > iou_off + 0.02, (iou_off, iou_auto)


def test_points_multimask_and_mask_prompt(nuclei_predictor, nuclei_boxes, dsb_nuclei, off_and_auto):
    boxes, ids = nuclei_boxes
    labels = dsb_nuclei[1]
    obj = labels == ids[0]
    ys, xs = np.nonzero(obj)
    centre = np.array([[xs.mean(), ys.mean()]])
    multi = nuclei_predictor.predict(points=centre, point_labels=[1], multimask=True)
    assert multi.masks.shape == (3, *labels.shape) and multi.scores.shape == (3,)
    best = multi.masks[np.argmax(multi.scores)]
    assert best[int(centre[0, 1]), int(centre[0, 0])]
    # LiteMedSAM was trained on boxes only: a point is weak, but a box plus the previous
    # low-res logits as mask prompt (SAM's iterative refinement) stays on the nuclei.
    first = off_and_auto[0]
    refined = nuclei_predictor.predict(box=boxes, mask=first.low_res_logits, zoom="auto")
    assert refined.zoomed.any()  # the whole image's mask prompts are resampled onto each zoomed crop
    assert np.mean([mask_iou(m, labels == i) for m, i in zip(refined.masks, ids)]) > 0.6
    assert not np.array_equal(refined.low_res_logits, first.low_res_logits)  # the mask prompt is used


def test_low_res_logits_of_zoomed_objects_describe_the_same_mask(off_and_auto):
    auto = off_and_auto[1]
    frame = Frame.create(auto.masks.shape[-2:], 256, "lite_medsam")
    back = logits_to_image(torch.from_numpy(auto.low_res_logits), frame, "lite_medsam").numpy()[:, 0] > 0
    for a, b in zip(auto.masks, back):
        assert mask_iou(a, b) > 0.6  # same object, at the coarser 256 px resolution


def test_ct_organs_with_box_prompts(lite_medsam):
    """SAM-Med2D CT slice: liver, spleen, aorta, inferior vena cava from their boxes."""
    image = iio.imread(shared_file("sammed2d_ct_demo", "images", "amos_0006_90.png"))
    predictor = biosam.Predictor(lite_medsam)
    predictor.set_image(image)
    scores = {}
    for organ in ("liver", "spleen", "aorta", "inferior_vena_cava"):
        gt = iio.imread(shared_file("sammed2d_ct_demo", "masks", f"amos_0006_90_{organ}_000.png")) > 0
        boxes, _ = boxes_from_labels(gt.astype(np.uint8))
        scores[organ] = mask_iou(predictor.predict(box=boxes[0]).masks[0], gt)
    # Measured with LiteMedSAM: liver 0.89, spleen 0.29, aorta 0.57, IVC 0.60. The thin spleen
    # section is hard for this model; the liver and the mean guard the preprocessing path.
    assert scores["liver"] > 0.85, scores
    assert np.mean(list(scores.values())) > 0.5, scores


def test_embedding_store_round_trip_and_refusal(lite_medsam, dsb_nuclei, nuclei_boxes, tmp_path):
    image = dsb_nuclei[0]
    predictor = biosam.Predictor(lite_medsam)
    predictor.set_image(image)
    expected = predictor.predict(box=nuclei_boxes[0][:3], zoom="off")
    path = predictor.save_embedding(tmp_path / "emb.npz")

    other = biosam.Predictor(lite_medsam)
    other.load_embedding(path, image)
    again = other.predict(box=nuclei_boxes[0][:3], zoom="off")
    np.testing.assert_array_equal(again.masks, expected.masks)

    changed = image.copy()
    changed[0, 0] += 1
    with pytest.raises(EmbeddingMismatchError, match="image_hash"):
        other.load_embedding(path, changed)
    sam_preproc = biosam.load_model("lite_medsam", device="cpu", preprocessing="sam")
    with pytest.raises(EmbeddingMismatchError, match="preprocessing"):
        biosam.Predictor(sam_preproc).load_embedding(path, image)
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(InputError, match="not a biosam embedding"):
        other.load_embedding(tmp_path / "junk.npz", image)


def test_any_dtype_and_layout_segments_the_same_object(lite_medsam, dsb_nuclei, nuclei_boxes):
    """uint16 original, float32 copy, and 3-channel uint8 rendering all find the same nucleus."""
    image, labels = dsb_nuclei
    box, i = nuclei_boxes[0][0], nuclei_boxes[1][0]
    predictor = biosam.Predictor(lite_medsam)
    masks = []
    eight_bit = (biosam.prompting.intensity.normalize_intensity(image)).astype(np.uint8)
    for variant in (image, image.astype(np.float32) * 3.5 - 10, eight_bit, np.moveaxis(eight_bit, -1, 0)):
        predictor.set_image(variant)
        masks.append(predictor.predict(box=box).masks[0])
    for m in masks:
        assert mask_iou(m, labels == i) > 0.6
        assert mask_iou(m, masks[0]) > 0.9


def test_predict_before_set_image_is_an_error(lite_medsam):
    with pytest.raises(RuntimeError, match="set_image"):
        biosam.Predictor(lite_medsam).predict(box=[0, 0, 5, 5])
