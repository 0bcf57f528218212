"""Instance segmentation scores: hand-built cases with known answers, real nuclei labels, and the command."""

from __future__ import annotations

import json
import logging
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from skimage.filters import threshold_otsu
from skimage.measure import label
from skimage.morphology import dilation, erosion

from biosam.cli.evaluate import evaluate
from biosam.errors import InputError
from biosam.evaluate import MSA_THRESHOLDS, evaluate_instances, instance_counts, mask_iou, match_instances

from conftest import shared_file


def rows(result: dict) -> dict[float, dict]:
    return {r["threshold"]: r for r in result["per_threshold"]}


def overlapping_pairs(pred: np.ndarray, gt: np.ndarray) -> list[tuple[float, int, int]]:
    """(IoU, pred id, gt id) of every overlapping pair, from one mask per object: slow and independent."""
    pairs = []
    for g in np.unique(gt)[1:]:
        inside = gt == g
        pairs += [(mask_iou(pred == p, inside), p, g) for p in np.unique(pred[inside]) if p]
    return sorted(pairs, reverse=True)


def greedy(pairs: list[tuple[float, int, int]], threshold: float) -> list[float]:
    """IoU of the pairs matched at ``threshold``; greedy is optimal for thresholds >= 0.5."""
    used_p, used_g, matched = set(), set(), []
    for iou, p, g in pairs:
        if iou >= threshold and p not in used_p and g not in used_g:
            used_p.add(p), used_g.add(g), matched.append(iou)
    return matched


def check_against_reference(pred: np.ndarray, gt: np.ndarray) -> dict:
    result = evaluate_instances(pred, gt)
    n_pred, n_gt = len(np.unique(pred[pred > 0])), len(np.unique(gt[gt > 0]))
    assert (result["n_pred"], result["n_gt"]) == (n_pred, n_gt)
    sa, pairs = [], overlapping_pairs(pred, gt)
    for t, row in rows(result).items():
        tp = len(greedy(pairs, t))
        assert (row["tp"], row["fp"], row["fn"]) == (tp, n_pred - tp, n_gt - tp)
        assert row["f1"] == pytest.approx(2 * tp / (n_pred + n_gt))
        sa.append(tp / (n_pred + n_gt - tp))
    assert result["msa"] == pytest.approx(np.mean(sa))
    assert result["mean_matched_iou"] == pytest.approx(np.mean(greedy(pairs, 0.5)))
    assert result["dice"] == pytest.approx(2 * ((pred > 0) & (gt > 0)).sum() / ((pred > 0).sum() + (gt > 0).sum()))
    return result


# --- hand-built cases -------------------------------------------------------------------------


def test_shifted_square_has_known_iou():
    gt = np.zeros((40, 40), np.uint8)
    gt[10:20, 10:20] = 1
    pred = np.roll(gt, 2, axis=1) * 7  # 80 shared pixels of 120: IoU 2/3
    result = evaluate_instances(pred, gt)
    for t, row in rows(result).items():
        tp = int(t <= 2 / 3)
        assert (row["tp"], row["fp"], row["fn"]) == (tp, 1 - tp, 1 - tp)
        assert row["sa"] == row["f1"] == row["precision"] == row["recall"] == tp
    assert result["msa"] == pytest.approx(0.4)  # SA 1 at 0.5, 0.55, 0.6, 0.65
    assert result["mean_matched_iou"] == pytest.approx(2 / 3)
    assert result["pq"] == pytest.approx(2 / 3)
    assert result["dice"] == pytest.approx(0.8)
    match = match_instances(pred, gt)
    assert match.pred_ids.tolist() == [7] and match.gt_ids.tolist() == [1]
    assert match.pair_iou.tolist() == pytest.approx([2 / 3])


def test_split_and_merged_objects():
    gt = np.zeros((20, 30), np.int32)
    gt[5:15, 5:25] = 4
    halves = gt.copy()
    halves[:, 15:][halves[:, 15:] > 0] = 9  # two halves of IoU exactly 0.5 with the whole
    split = rows(evaluate_instances(halves, gt))
    assert (split[0.5]["tp"], split[0.5]["fp"], split[0.5]["fn"]) == (1, 1, 0)
    assert split[0.5]["precision"] == 0.5 and split[0.5]["recall"] == 1.0 and split[0.5]["sa"] == 0.5
    assert (split[0.55]["tp"], split[0.55]["fp"], split[0.55]["fn"]) == (0, 2, 1)
    merged = rows(evaluate_instances(gt, halves))  # the same pair seen from the other side
    assert (merged[0.5]["tp"], merged[0.5]["fp"], merged[0.5]["fn"]) == (1, 0, 1)
    assert merged[0.5]["precision"] == 1.0 and merged[0.5]["recall"] == 0.5


def test_low_threshold_matching_maximises_pairs_not_total_iou():
    gt = np.zeros((10, 20), np.uint8)
    gt[:, :10], gt[:, 10:] = 1, 2
    pred = np.zeros_like(gt)
    pred[:, :3], pred[:, 3:13] = 5, 6  # IoU 6-1: 70/130, 6-2: 30/170, 5-1: 30/100
    best = match_instances(pred, gt, threshold=0.5)
    assert [(best.pred_ids[p], best.gt_ids[g]) for p, g in zip(best.pred_index, best.gt_index)] == [(6, 1)]
    low = match_instances(pred, gt, threshold=0.15)  # two pairs beat the single best one
    assert sorted((low.pred_ids[p], low.gt_ids[g]) for p, g in zip(low.pred_index, low.gt_index)) == [(5, 1), (6, 2)]
    assert sorted(low.pair_iou) == pytest.approx([30 / 170, 0.3])
    assert low.iou.shape == (2, 2) and low.iou.nnz == 3


def test_empty_images():
    empty, one = np.zeros((8, 8), np.uint16), np.zeros((8, 8), np.uint16)
    one[2:5, 2:5] = 3
    both = evaluate_instances(empty, empty)
    assert both["msa"] == both["dice"] == both["mean_matched_iou"] == both["pq"] == 1.0
    assert all(r["f1"] == r["precision"] == r["recall"] == 1.0 and r["tp"] + r["fp"] + r["fn"] == 0
               for r in both["per_threshold"])
    for pred, gt, fp, fn in ((empty, one, 0, 1), (one, empty, 1, 0)):
        res = evaluate_instances(pred, gt)
        assert res["msa"] == res["dice"] == res["mean_matched_iou"] == 0.0
        assert all((r["tp"], r["fp"], r["fn"], r["f1"], r["precision"], r["recall"]) == (0, fp, fn, 0, 0, 0)
                   for r in res["per_threshold"])


def test_refuses_bad_labels():
    gt = np.zeros((6, 6), np.uint8)
    gt[1:3, 1:3] = 1
    with pytest.raises(InputError, match=r"shape \(6, 5\) differs from ground truth shape \(6, 6\)"):
        evaluate_instances(gt[:, :5], gt)
    with pytest.raises(InputError, match="pred: holds non-integer values"):
        evaluate_instances(gt + 0.5, gt)
    with pytest.raises(InputError, match="gt: has negative label -1"):
        evaluate_instances(gt, gt.astype(np.int8) - 1)
    with pytest.raises(InputError, match="pred: dtype <U1 is not an integer label image"):
        evaluate_instances(np.full(gt.shape, "a"), gt)
    with pytest.raises(InputError, match=r"thresholds \[0.0\]"):
        evaluate_instances(gt, gt, thresholds=[0.0])
    assert evaluate_instances(gt.astype(np.float32), gt.astype(bool)) == evaluate_instances(gt, gt)


# --- real label images ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dsb(dsb_nuclei):
    gt = np.asarray(dsb_nuclei[1])
    footprint = np.ones((1, 2), bool)  # removes one pixel column per object
    eroded = np.where(erosion(gt, footprint) == dilation(gt, footprint), gt, 0)
    return gt, eroded


def permuted(labels: np.ndarray, seed: int) -> np.ndarray:
    ids = np.unique(labels)[1:]
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    lut[ids] = np.random.default_rng(seed).permutation(ids.size) * 37 + 1000
    return lut[labels].astype(np.int32)


def test_dsb_labels_against_themselves(dsb):
    gt, _ = dsb
    result = evaluate_instances(gt, gt)
    assert result["n_gt"] == result["n_pred"] == 125
    assert result["msa"] == result["mean_matched_iou"] == result["dice"] == 1.0
    assert all(r["f1"] == 1.0 and r["tp"] == 125 for r in result["per_threshold"])
    assert evaluate_instances(permuted(gt, 0), gt) == result


def test_dsb_eroded_labels(dsb):
    gt, eroded = dsb
    result = check_against_reference(eroded, gt)
    kept = np.array([(eroded == i).sum() / (gt == i).sum() for i in np.unique(gt)[1:]])  # eroded is inside gt
    by_t = rows(result)
    for t in MSA_THRESHOLDS:
        assert by_t[t]["tp"] == (kept >= t).sum()
    assert by_t[0.5]["f1"] == 1.0 and by_t[0.9]["f1"] < 0.97
    assert result["mean_matched_iou"] == pytest.approx(kept.mean())
    # Ids, their order and the integer type do not matter.
    same = evaluate_instances(permuted(eroded, 1).astype(np.uint64), permuted(gt, 2))
    assert same == result


def test_nih3t3_otsu_against_reference():
    gt = label(iio.imread(shared_file("nuclei_nih3t3", "labels", "45.png")) > 0, connectivity=1)
    image = iio.imread(shared_file("nuclei_nih3t3", "images", "dna-45.png"))
    pred = label(image > threshold_otsu(image), connectivity=1)
    result = check_against_reference(pred, gt)
    assert 0 < rows(result)[0.5]["tp"] < result["n_gt"] < result["n_pred"]  # a real, imperfect prediction


def test_pooling_sums_counts(dsb):
    gt, eroded = dsb
    from biosam.evaluate import aggregate

    a, b = instance_counts(eroded, gt), instance_counts(gt[:200], gt[:200])
    pooled = aggregate([a, b])
    ra, rb = rows(a.summary()), rows(b.summary())
    for t, row in rows(pooled).items():
        tp, fp, fn = (ra[t][k] + rb[t][k] for k in ("tp", "fp", "fn"))
        assert (row["tp"], row["fp"], row["fn"]) == (tp, fp, fn)
        assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert pooled["images"] == 2 and pooled["mean_image_msa"] == pytest.approx((a.msa + 1.0) / 2)


# --- the command ------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(evaluate, [str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, dsb):
    gt, eroded = dsb
    root = tmp_path_factory.mktemp("evaluate")
    (root / "pred").mkdir(), (root / "gt").mkdir()
    tifffile.imwrite(root / "pred" / "dsb.tif", eroded)
    tifffile.imwrite(root / "gt" / "dsb.tif", gt)
    image = iio.imread(shared_file("nuclei_nih3t3", "images", "dna-45.png"))
    iio.imwrite(root / "pred" / "45.png", label(image > threshold_otsu(image), connectivity=1).astype(np.uint16))
    shutil.copy(shared_file("nuclei_nih3t3", "labels", "45.png"), root / "gt" / "45.png")  # binary 0/255
    (root / "pred" / "notes.txt").write_text("not an image")
    return root


def test_cli_files_table_and_json(folders, dsb):
    pred, gt = folders / "pred" / "dsb.tif", folders / "gt" / "dsb.tif"
    table = invoke(pred, gt, "--thresholds", "0.9,0.5")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["image", "gt", "pred", "F1@0.5", "mSA", "mIoU", "Dice"] and lines[1].startswith("dsb ")
    assert [line.split()[0] for line in lines[-3:]] == ["IoU", "0.5", "0.9"]
    res = invoke(pred, gt, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["thresholds"] == list(MSA_THRESHOLDS)
    assert report["images"]["dsb"] == evaluate_instances(*dsb[::-1])


def test_cli_folders_pool_images(folders, caplog):
    with caplog.at_level(logging.WARNING):
        res = invoke(folders / "pred", folders / "gt", "--json")
    assert res.exit_code == 0, res.output
    assert "45.png is a binary mask" in caplog.text
    report = json.loads(res.output[res.output.index("{"):])
    assert sorted(report["images"]) == ["45", "dsb"]
    assert report["images"]["45"]["n_gt"] == 47  # connected components of the binary mask
    agg = report["aggregate"]
    assert agg["n_gt"] == 47 + 125 and agg["images"] == 2
    assert agg["per_threshold"][0]["tp"] == sum(r["per_threshold"][0]["tp"] for r in report["images"].values())
    assert agg["mean_image_msa"] == pytest.approx(np.mean([r["msa"] for r in report["images"].values()]))


def test_cli_refusals(folders, tmp_path):
    (tmp_path / "gt").mkdir()
    for name in ("dsb.tif", "45.png"):
        shutil.copy(folders / "gt" / name, tmp_path / "gt" / name)
    shutil.copy(folders / "gt" / "dsb.tif", tmp_path / "gt" / "extra.tif")
    res = invoke(folders / "pred", tmp_path / "gt")
    assert isinstance(res.exception, InputError) and res.exit_code == 1
    assert "no counterpart" in str(res.exception) and "only in" in str(res.exception) and "extra" in str(res.exception)
    res = invoke(folders / "pred" / "dsb.tif", folders / "gt" / "45.png")
    assert isinstance(res.exception, InputError) and "differs from ground truth shape" in str(res.exception)
    assert "dsb.tif vs" in str(res.exception)
    res = invoke(folders / "pred" / "dsb.tif", folders / "gt")
    assert isinstance(res.exception, InputError) and "not a file and a folder" in str(res.exception)
    res = invoke(folders / "pred" / "dsb.tif", folders / "gt" / "dsb.tif", "--thresholds", "0.5,high")
    assert isinstance(res.exception, InputError) and "--thresholds" in str(res.exception)
