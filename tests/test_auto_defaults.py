"""`biosam auto` with its defaults on images of other microscopes: intensity, object size, background, tiles.

BBBC007 (Drosophila Kc167 DNA, sparse labels) is in none of the shipped decoder's training sets.
"""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
from scipy import ndimage

from biosam import Predictor
from biosam.automatic.ais import load_decoder
from biosam.automatic.data import as_instances, bbbc007_pairs, read_pair
from biosam.automatic.run import AutoSettings, segment_automatic, working_scale
from biosam.automatic.tiling import tile_grid
from biosam.evaluate import evaluate_instances
from biosam.prompting.intensity import normalize_intensity
from biosam.train.augment import store_as

from conftest import SHARED_DATA, shared_file


def f1_at_half(pred, truth) -> float:
    return next(r["f1"] for r in evaluate_instances(pred, truth)["per_threshold"] if r["threshold"] == 0.5)


@pytest.fixture(scope="module")
def predictor(lite_medsam):
    return Predictor(lite_medsam)


@pytest.fixture(scope="module")
def dsb(dsb_nuclei):
    image, labels = dsb_nuclei
    return image, as_instances(labels)


def test_dim_8bit_and_16bit_twins_give_the_same_objects(predictor, dsb):
    """The same nuclei stored as dim 8-bit (brightest pixel 50) and as 16-bit: both normalised, same result."""
    image, truth = dsb
    dim, deep = store_as(image, np.uint8, 50), store_as(image, np.uint16, 4000)
    a, b = normalize_intensity(dim)[..., 0], normalize_intensity(deep)[..., 0]
    assert np.abs(a - b).mean() < 3.0  # grey levels of 255 after normalisation: only 8-bit rounding differs
    labels = [segment_automatic(predictor, x) for x in (dim, deep)]
    scores = [f1_at_half(x, truth) for x in labels]
    assert min(scores) >= 0.75 and abs(scores[0] - scores[1]) <= 0.03, scores
    assert f1_at_half(labels[0], labels[1]) >= 0.9  # the same objects, not only the same score
    for found in labels:  # the dim image's dark background stays empty
        ids = np.unique(found[found > 0])
        stray = np.setdiff1d(ids, np.unique(found[truth > 0]))
        assert len(stray) <= 0.02 * len(ids), (len(stray), len(ids))


@pytest.mark.parametrize("image_path, low, high", [
    (("stardist_dsb2018_nuclei_2d", "img2d.tif"), 18.0, 30.0),  # labelled median 23.7 px
    (("nuclei_nih3t3", "images", "dna-45.png"), 65.0, 110.0),  # labelled median about 85 px
])
def test_object_size_is_estimated_from_the_image(predictor, image_path, low, high):
    image = iio.imread(shared_file(*image_path))
    info: dict = {}
    segment_automatic(predictor, image, info=info)
    assert low <= info["object_size"] <= high, info
    assert info["scale"] == pytest.approx(load_decoder().info["object_size"] / info["object_size"])


def test_bbbc007_nuclei_are_found_without_being_told_their_size(predictor):
    """A microscope the decoder never saw, nuclei of about 16 px, dim 16-bit: labelled nuclei found."""
    shared_file("bbbc007_sparse_instances", "images")
    found = total = 0
    for image_path, label_path in bbbc007_pairs(SHARED_DATA):
        image, truth = read_pair(image_path, label_path)
        pred = segment_automatic(predictor, image)
        for obj in range(1, truth.max() + 1):
            mask = truth == obj
            ids, counts = np.unique(pred[mask], return_counts=True)
            best = ids[np.argmax(counts)]
            iou = 0.0 if best == 0 else (mask & (pred == best)).sum() / (mask | (pred == best)).sum()
            found += iou >= 0.5
            total += 1
    assert found >= 0.8 * total, (found, total)


def test_no_objects_in_empty_images(predictor):
    """Background only: camera noise (dim 8-bit, 16-bit) and a real nucleus-free region of an NIH3T3 image."""
    rng = np.random.default_rng(0)
    images = {"noise8": rng.poisson(3.0, (300, 300)).astype(np.uint8),
              "noise16": (400 + rng.normal(0, 20, (400, 500))).astype(np.uint16)}
    for number, y, x in ((1, 691, 281),):
        labels = iio.imread(shared_file("nuclei_nih3t3", "labels", f"{number}.png"))[y : y + 256, x : x + 256]
        assert not labels.any()
        images[f"nih3t3 {number}"] = iio.imread(shared_file("nuclei_nih3t3", "images", f"dna-{number}.png"))[
            y : y + 256, x : x + 256]
    for name, image in images.items():
        assert segment_automatic(predictor, image).max() == 0, name


def test_tile_grid_does_not_shape_the_objects(predictor, dsb):
    """DSB2018 cut into tiles at four offsets: the same objects, and no object edge runs along a tile border."""
    image, truth = dsb
    settings = AutoSettings(object_size=24.0)  # a fixed scale, so only the tile grid moves
    scale = working_scale(settings, load_decoder())
    tile = int(load_decoder().info["tile"])
    offsets = ((0, 0), (40, 0), (0, 90), (70, 130))
    results = {}
    for dy, dx in offsets:
        labels = segment_automatic(predictor, image[dy:, dx:], settings)
        results[(dy, dx)] = labels
        # Tile borders of this run, in image pixels.
        scaled = (round(labels.shape[0] * scale), round(labels.shape[1] * scale))
        rows = sorted({t.inner[0] for t in tile_grid(scaled, tile, tile // 8)} - {0})
        cols = sorted({t.inner[2] for t in tile_grid(scaled, tile, tile // 8)} - {0})
        assert rows and cols, "the image must span several tiles"
        for axis, lines in ((0, rows), (1, cols)):
            for line in lines:
                at = round(line / scale)
                assert _longest_edge_run(labels, at, axis) <= max(
                    8, max(_longest_edge_run(labels, at + d, axis) for d in (-12, -6, 6, 12))), (dy, dx, axis, at)
    reference = results[(0, 0)]
    for (dy, dx), labels in results.items():
        # Objects cut by the crop's own edge differ for a reason other than tiles: compare the others.
        common = _inside(reference[dy:, dx:])
        assert f1_at_half(_inside(labels), common) >= 0.95, (dy, dx)
        assert f1_at_half(labels, truth[dy:, dx:]) >= 0.75, (dy, dx)


def _inside(labels: np.ndarray) -> np.ndarray:
    """``labels`` without the objects that touch the image border."""
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.where(np.isin(labels, border), 0, labels)


def _longest_edge_run(labels: np.ndarray, at: int, axis: int) -> int:
    """Longest run of consecutive pixels along line ``at`` where an object ends exactly on that line."""
    a, b = (labels[at - 1], labels[at]) if axis == 0 else (labels[:, at - 1], labels[:, at])
    edge = (a != b) & ((a > 0) | (b > 0))
    runs, _ = ndimage.label(edge)
    return int(np.bincount(runs)[1:].max()) if runs.max() else 0
