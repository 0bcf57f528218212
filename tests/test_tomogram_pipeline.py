"""`biosam tomogram`: vesicles found and measured in a synthetic tomogram; outputs, units and refusals.

The tomogram is small (40 x 128 x 128 voxels of 10 Å, 6 vesicles of radius 14-19 nm, SNR 0.5, missing
wedge 60 degrees), so that one run of the pipeline takes about 20 s on one CPU core. Its slice
embeddings are kept in a store that the command-line run on the same tomogram (as a copick run) reuses.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import imageio.v3 as iio
import mrcfile
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import biosam
from biosam.cli.main import main
from biosam.errors import InputError
from biosam.evaluate import match_instances
from biosam.tomogram import VesicleSegmentation, VesicleSettings, segment_vesicles, synthetic_tomogram
from biosam.tomogram.measure import COLUMNS, fit_sphere, measure_vesicles, write_measurements
from biosam.labels import label_dtype
from biosam.tomogram.objects import relabel_volume, trim_objects
from biosam.tomogram.slabs import slab_centres

from conftest import make_copick_project

VOXEL = 10.0
# Measured on this tomogram: all 6 vesicles found (F1 1.0), fitted diameters 0.5-9.8% (median 3%) off.
MIN_F1 = 0.8
MAX_MEDIAN_DIAMETER_ERROR = 0.08


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tomo():
    return synthetic_tomogram((40, 128, 128), voxel_size=VOXEL, n_vesicles=6, radius_range_nm=(14, 19), snr=0.5,
                              missing_wedge_deg=60, seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embeddings") / "store.zarr"


@pytest.fixture(scope="module")
def result(tomo, lite_medsam, store) -> VesicleSegmentation:
    predictor = biosam.Predictor(lite_medsam, store=store)
    return segment_vesicles(predictor, tomo.volume, VOXEL, VesicleSettings(method="lumen"), progress=False)


def _diameter_errors(result, tomo) -> tuple[float, np.ndarray]:
    match = match_instances(result.labels, tomo.labels, 0.5)
    tp, n_pred, n_gt = len(match.pair_iou), len(match.pred_ids), len(match.gt_ids)
    table = measure_vesicles(result.labels, VOXEL, result.scores)
    rows = [list(table["label"]).index(p) for p in match.pred_ids[match.pred_index]]
    true_d = 2 * tomo.radii_nm[match.gt_ids[match.gt_index] - 1]
    return 2 * tp / (n_pred + n_gt), np.abs(table["fitted_diameter_nm"][rows] - true_d) / true_d


def test_finds_most_vesicles_with_their_size(result, tomo):
    f1, errors = _diameter_errors(result, tomo)
    assert f1 >= MIN_F1, f1
    assert np.median(errors) <= MAX_MEDIAN_DIAMETER_ERROR and errors.max() <= 0.15, errors
    assert result.labels.shape == tomo.labels.shape and result.labels.dtype == np.uint16
    assert result.slabs == [20] and result.slab.shape == (128, 128) and result.slab.dtype == np.uint8
    assert result.scores.shape == (int(result.labels.max()), 40)
    present = np.array([(result.labels == k + 1).any(axis=(1, 2)) for k in range(int(result.labels.max()))])
    assert not (~np.isnan(result.scores) & ~present).any()  # scores only on the object's slices ...
    assert (~np.isnan(result.scores)).sum(axis=1).min() >= 10  # ... and on most of them


def test_measurements_of_exact_balls_in_their_units(tomo):
    table = measure_vesicles(tomo.labels, VOXEL)
    assert list(table) == list(COLUMNS) and table["label"].tolist() == list(range(1, 7))
    counts = np.bincount(tomo.labels.ravel())[1:]
    np.testing.assert_allclose(table["volume_nm3"], counts * 1.0)  # 10 Å voxels are 1 nm³
    for axis, a in enumerate("zyx"):
        np.testing.assert_allclose(table[f"centroid_{a}_A"], tomo.centers[:, axis] * VOXEL, atol=0.5)
    true_d = 2 * tomo.radii_nm
    np.testing.assert_allclose(table["equivalent_diameter_nm"], true_d, rtol=0.02)
    np.testing.assert_allclose(table["fitted_diameter_nm"], true_d, rtol=0.02)
    for k, region in enumerate(table["label"]):
        zs = np.flatnonzero((tomo.labels == region).any(axis=(1, 2)))
        assert (table["z_first"][k], table["z_last"][k]) == (zs[0], zs[-1])
        assert table["z_extent_nm"][k] == pytest.approx(len(zs) * 1.0)
    assert np.isnan(table["mean_score"]).all()

    # Anisotropic voxels: 20 Å along z doubles z positions, volumes and z-extents, not x.
    stretched = measure_vesicles(tomo.labels, (20.0, 10.0, 10.0), scores=np.full((6, 40), 0.9))
    np.testing.assert_allclose(stretched["volume_nm3"], 2 * table["volume_nm3"])
    np.testing.assert_allclose(stretched["centroid_z_A"], 2 * table["centroid_z_A"])
    np.testing.assert_allclose(stretched["centroid_x_A"], table["centroid_x_A"])
    np.testing.assert_allclose(stretched["z_extent_nm"], 2 * table["z_extent_nm"])
    np.testing.assert_allclose(stretched["mean_score"], 0.9)


def test_voxel_size_is_checked_and_converted_in_one_place():
    from biosam.io import ImageMeta, VoxelSize, voxel_size_of

    cubic = VoxelSize.of(10.5)
    assert cubic.angstrom == (10.5, 10.5, 10.5) and cubic.nm == (1.05, 1.05, 1.05) and VoxelSize.of(cubic) is cubic
    voxel = VoxelSize.of((20.0, 10.0, 12.5))
    assert voxel.nm == (2.0, 1.0, 1.25) and voxel.voxel_nm3 == 2.5
    assert voxel.pixel_nm == pytest.approx(math.sqrt(1.25))
    for bad in (0, -10.0, float("nan"), float("inf"), (10.0, 10.0), (10.0, 10.0, 0.0), "ten", None):
        with pytest.raises(InputError, match="voxel size"):
            VoxelSize.of(bad)
    with pytest.raises(InputError, match="voxel size"):
        VoxelSize(0.0, 10.0, 10.0)
    # Refused by every user before any work.
    with pytest.raises(InputError, match="voxel size"):
        measure_vesicles(np.ones((2, 4, 4), np.uint16), (10.0, 0.0, 10.0))
    with pytest.raises(InputError, match="voxel size"):
        segment_vesicles(None, np.zeros((4, 8, 8)), -1.0)

    # From a file's metadata: its unit converted to Å; --voxel-size replaces it; neither is refused.
    meta = ImageMeta("t.tif", "tiff", "ZYX", (4, 8, 8), "uint8", spacing=dict.fromkeys("ZYX", 1.052), unit="nanometer")
    assert voxel_size_of(meta, None, "t.tif").angstrom == pytest.approx((10.52,) * 3)
    assert voxel_size_of(meta, 8.0, "t.tif") == VoxelSize.of(8.0)
    with pytest.raises(InputError, match="--voxel-size must be a positive size"):
        voxel_size_of(meta, 0.0, "t.tif")
    with pytest.raises(InputError, match="t.tif: the file does not record its voxel size.*--voxel-size"):
        voxel_size_of(ImageMeta("t.tif", "tiff", "ZYX", (4, 8, 8), "uint8"), None, "t.tif")


def test_settings_name_every_broken_rule():
    with pytest.raises(InputError, match="min_score must lie in .*; z_step must be a whole number >= 1"):
        VesicleSettings(method="lumen", min_score=2.0, z_step=0)
    with pytest.raises(InputError, match="need min_diameter_nm < max_diameter_nm"):
        VesicleSettings(min_diameter_nm=50.0, max_diameter_nm=40.0)
    with pytest.raises(InputError, match="method must be one of decoder, lumen, hough, amg"):
        VesicleSettings(method="circles")
    with pytest.raises(InputError, match="decoder method reads slabs through the whole tomogram"):
        VesicleSettings(n_slabs=3)


def test_sphere_fit():
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((200, 3))
    points = np.array([10.0, -4.0, 2.5]) + 7.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    centre, radius = fit_sphere(points)
    np.testing.assert_allclose(centre, [10.0, -4.0, 2.5], atol=1e-9)
    assert radius == pytest.approx(7.0)
    with pytest.raises(InputError, match="at least 4 points"):
        fit_sphere(points[:3])


def test_csv_table(tmp_path, tomo):
    table = measure_vesicles(tomo.labels, VOXEL)
    path = write_measurements(tmp_path / "vesicles.csv", table)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 6
    assert int(rows[2]["label"]) == 3 and float(rows[2]["volume_nm3"]) == pytest.approx(table["volume_nm3"][2])
    assert rows[0]["mean_score"] == ""  # unknown, not "nan"
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        write_measurements(path, table)
    write_measurements(path, {k: v[:2] for k, v in table.items()}, overwrite=True)
    assert len(path.read_text().splitlines()) == 3


def test_label_dtype_holds_every_label():
    """300 objects do not wrap around in 8 bits; past 65535 the labels are 32-bit."""
    labels = np.zeros((4, 40, 40), np.int64)
    ids = np.arange(1, 301) * 7  # sparse ids, relabelled to 1..300
    labels.reshape(-1)[np.arange(300) * 20] = ids
    out, old = relabel_volume(labels)
    assert out.dtype == np.uint16 and out.max() == 300 and len(np.unique(out)) == 301
    np.testing.assert_array_equal(old, ids)
    np.testing.assert_array_equal(out.reshape(-1)[np.arange(300) * 20], np.arange(1, 301))
    assert label_dtype(255) == label_dtype(65535) == np.uint16
    assert label_dtype(65536) == np.uint32


def test_trim_keeps_the_run_with_a_membrane():
    """Ends without membrane contrast, a low score or regrowth into a neighbour are cut; the middle stays."""
    depth = 12
    labels = np.zeros((depth, 20, 20), np.int64)
    radius = [3, 4, 5, 6, 6, 6, 5, 4, 3, 5, 7, 8]  # shrinks to slice 8, then grows into a neighbour
    for z, r in enumerate(radius):
        labels[z, 10 - r : 10 + r, 10 - r : 10 + r] = 1
    scores = np.full((1, depth), 0.9, np.float32)
    scores[0, 0] = 0.3  # SAM unsure on the first slice
    contrast = np.full((1, depth), 50.0, np.float32)
    contrast[0, 1] = 5.0  # no membrane on slice 1
    kept = trim_objects(labels, scores, contrast, score_drop=0.85, contrast_drop=0.3)
    present = labels.any(axis=(1, 2))
    np.testing.assert_array_equal(np.flatnonzero(present), np.arange(2, 9))
    np.testing.assert_array_equal(~np.isnan(kept[0]), present)


def test_slab_centres():
    assert slab_centres(96, VesicleSettings(method="lumen")) == [48]
    assert slab_centres(96, VesicleSettings(method="lumen", z=10)) == [10]
    assert sorted(slab_centres(100, VesicleSettings(method="lumen", n_slabs=5))) == [10, 30, 50, 70, 90]
    with pytest.raises(InputError, match="outside the volume"):
        slab_centres(96, VesicleSettings(method="lumen", z=96))
    with pytest.raises(InputError, match="not both"):
        VesicleSettings(method="lumen", z=3, n_slabs=2)


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def copick_run(tmp_path_factory, tomo, result, store):
    """The synthetic tomogram as copick run TS_SYN, and `biosam tomogram` on it (reusing the embeddings)."""
    import zarr

    from biosam.io.copick_project import import_copick

    folder = tmp_path_factory.mktemp("copick")
    config, _ = make_copick_project(folder)
    root = import_copick().from_file(str(config))
    with zarr.config.set({"default_zarr_format": 2}):
        root.new_run("TS_SYN").new_voxel_spacing(VOXEL).new_tomogram("wbp").from_numpy(
            tomo.volume, levels=1, dtype=np.float32)
    out = folder / "vesicles.mrc"
    out.write_bytes(b"an old result")  # replaced because of --overwrite
    res = run("tomogram", f"copick://{config}?run=TS_SYN", "-o", out, "--method", "lumen", "--embeddings", store,
              "--json", "--overwrite")
    assert res.exit_code == 0, res.output
    return config, out, json.loads(res.stdout)


def test_cli_writes_labels_table_overlay_and_copick(copick_run, tomo, result):
    config, out, report = copick_run
    with mrcfile.open(out) as mrc:
        labels = np.asarray(mrc.data)
        assert mrc.voxel_size.tolist() == (VOXEL, VOXEL, VOXEL)
    # Same tomogram, same settings: the command finds what the Python function found.
    np.testing.assert_array_equal(labels, result.labels)
    assert report["vesicles"] == int(labels.max()) and report["voxel_size_A"] == [VOXEL] * 3

    with open(out.with_suffix(".csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == int(labels.max()) and list(rows[0]) == list(COLUMNS)
    for row in rows:
        count = int((labels == int(row["label"])).sum())
        assert float(row["volume_nm3"]) == pytest.approx(count * 1.0)  # voxels of 1 nm³
        assert float(row["equivalent_diameter_nm"]) == pytest.approx((6 * count / math.pi) ** (1 / 3), rel=1e-4)
        assert 0 <= float(row["centroid_z_A"]) <= 39 * VOXEL and 0 < float(row["mean_score"]) <= 1
    overlay = iio.imread(out.with_name("vesicles_overlay.png"))
    assert overlay.shape == (128, 128, 3)

    from biosam.io.copick_project import import_copick

    copick_run_ = import_copick().from_file(str(config)).get_run("TS_SYN")
    (picks,) = copick_run_.get_picks(object_name="vesicle", user_id="biosam", session_id="0")
    positions, _ = picks.numpy()
    expected = np.array([[float(r["centroid_x_A"]), float(r["centroid_y_A"]), float(r["centroid_z_A"])] for r in rows])
    np.testing.assert_allclose(positions, expected, atol=1e-3)  # x, y, z in Å
    (seg,) = copick_run_.get_segmentations(name="vesicle", user_id="biosam", session_id="0", is_multilabel=True)
    import zarr

    np.testing.assert_array_equal(zarr.open_group(seg.zarr(), mode="r")["0"][:], labels)

    # A second run would overwrite the copick picks: refused before any work.
    again = run("tomogram", f"copick://{config}?run=TS_SYN", "-o", out.with_name("other.mrc"))
    assert again.exit_code != 0 and "already exist" in again.output and "--overwrite" in again.output
    assert not out.with_name("other.mrc").exists() and not out.with_name("other.csv").exists()


def _mrc(path: Path, volume: np.ndarray, voxel_size: float) -> Path:
    with mrcfile.new(path) as mrc:
        mrc.set_data(volume.astype(np.float32))
        mrc.voxel_size = voxel_size
    return path


def test_cli_refuses_2d_input(tmp_path):
    image = tmp_path / "slice.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.float32))
    res = run("tomogram", image, "-o", tmp_path / "out.mrc")
    assert res.exit_code != 0
    assert "slice.tif" in res.output and "2D image" in res.output and "3D tomogram" in res.output
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == [image]


def test_cli_refuses_z_outside_the_volume(tmp_path):
    tomo_path = _mrc(tmp_path / "tomo.mrc", np.zeros((12, 32, 32)), 10.0)
    res = run("tomogram", tomo_path, "-o", tmp_path / "out.mrc", "--z", 12)
    assert res.exit_code != 0 and "--z 12 is outside the volume" in res.output and "z = 0..11" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tomo.mrc"]
    res = run("tomogram", tomo_path, "-o", tmp_path / "out.mrc", "--z", 3, "--multi-slab", 2)
    assert res.exit_code != 0 and "not both" in res.output
    # Settings refusals name the command's options.
    res = run("tomogram", tomo_path, "-o", tmp_path / "out.mrc", "--min-diameter", 50, "--max-diameter", 40)
    assert res.exit_code != 0 and "need --min-diameter < --max-diameter" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tomo.mrc"]


def test_cli_needs_a_voxel_size(tmp_path):
    tomo_path = _mrc(tmp_path / "tomo.mrc", np.zeros((12, 32, 32)), 0.0)
    res = run("tomogram", tomo_path, "-o", tmp_path / "out.mrc")
    assert res.exit_code != 0 and "voxel size" in res.output and "--voxel-size" in res.output
    res = run("tomogram", tomo_path, "-o", tmp_path / "out.mrc", "--keep-classes", "vesicle")
    assert res.exit_code != 0 and "--keep-classes needs --classifier" in res.output


class _FakePredictor:
    def __init__(self, *args, **kwargs):
        self.info = type("Info", (), {"name": "fake"})()


@pytest.fixture
def fake_pipeline(monkeypatch, tomo):
    """`biosam tomogram` without the model: the pipeline returns the true vesicles."""
    import biosam.tomogram.pipeline as pipeline

    def segment(predictor, volume, voxel_size, settings, classifier=None, keep=None, progress=True):
        labels = tomo.labels.astype(np.uint16)
        return VesicleSegmentation(labels, np.full((6, 40), 0.9, np.float32), [20], np.zeros((128, 128), np.uint8), [6])

    monkeypatch.setattr(biosam, "load_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(biosam, "Predictor", _FakePredictor)
    monkeypatch.setattr(pipeline, "segment_vesicles", segment)


def test_cli_overwrite_and_voxel_size_option(tmp_path, tomo, fake_pipeline):
    tomo_path = _mrc(tmp_path / "tomo.mrc", tomo.volume, 0.0)  # header without a voxel size
    out = tmp_path / "res.mrc"
    out.write_bytes(b"keep me")
    res = run("tomogram", tomo_path, "-o", out, "--voxel-size", 10)
    assert res.exit_code != 0 and "already exists" in res.output and "--overwrite" in res.output
    assert out.read_bytes() == b"keep me" and not (tmp_path / "res.csv").exists()

    res = run("tomogram", tomo_path, "-o", out, "--voxel-size", 10, "--overwrite")
    assert res.exit_code == 0, res.output
    with mrcfile.open(out) as mrc:
        assert mrc.voxel_size.tolist() == (10.0, 10.0, 10.0)  # the given size, as the header had none
        np.testing.assert_array_equal(mrc.data, tomo.labels)
    assert (tmp_path / "res.csv").exists() and (tmp_path / "res_overlay.png").exists()


def test_cli_leaves_nothing_after_a_failure(tmp_path, tomo, fake_pipeline, monkeypatch):
    import biosam.io

    tomo_path = _mrc(tmp_path / "tomo.mrc", tomo.volume, 10.0)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(biosam.io, "write_image", broken)  # the overlay, written after labels and table
    res = run("tomogram", tomo_path, "-o", tmp_path / "res.tif")
    assert res.exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tomo.mrc"]
