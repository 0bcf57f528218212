"""The napari widgets for automatic segmentation and tomogram vesicles give what the library gives.

The widgets run on a ``ViewerModel`` (nothing is drawn, so offscreen Qt suffices) with real Qt widgets;
each run goes through the widget's background worker, waited for with ``qtbot.waitUntil``.
"""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no display in CI; set before napari loads Qt
pytest.importorskip("napari", reason="napari is not installed (pip install 'biosam[napari]')")
pytest.importorskip("qtpy.QtWidgets", reason="no Qt binding is installed (pip install 'biosam[napari]')")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed (pip install 'biosam[test]')")

from napari.components import ViewerModel  # noqa: E402
from napari.utils.notifications import NotificationSeverity, notification_manager  # noqa: E402

from biosam import Predictor  # noqa: E402
from biosam.automatic.run import AutoSettings, segment_automatic  # noqa: E402
from biosam.tomogram import VesicleSettings, measure_vesicles, segment_vesicles, synthetic_tomogram  # noqa: E402
from biosam.tomogram.measure import COLUMNS  # noqa: E402

from conftest import shared_file  # noqa: E402

VOXEL = 10.0
RUN_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def nuclei() -> np.ndarray:
    """A 384 x 384 crop of the real NIH3T3 nuclei image 45 (nuclei about 85 px across)."""
    return iio.imread(shared_file("nuclei_nih3t3", "images", "dna-45.png"))[256:640, 256:640]


@pytest.fixture(scope="module")
def tomo():
    """A small generated tomogram (40 x 112 x 112 voxels of 10 Å, 5 vesicles): one run takes seconds."""
    return synthetic_tomogram((40, 112, 112), voxel_size=VOXEL, n_vesicles=5, radius_range_nm=(12, 16), snr=0.5,
                              missing_wedge_deg=60, seed=0)


def errors_since(count: int) -> list[str]:
    """Error notifications dispatched after the first ``count`` records."""
    return [n.message for n in notification_manager.records[count:] if n.severity == NotificationSeverity.ERROR]


def finish(qtbot, widget) -> None:
    """Start the widget's run and wait for its worker to end."""
    worker = widget.run()
    assert worker is not None, errors_since(0)[-3:]
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)


@pytest.fixture
def viewer():
    return ViewerModel()


def test_automatic_widget_gives_the_librarys_labels(qtbot, viewer, nuclei):
    from biosam.napari.automatic import AutomaticWidget

    image = viewer.add_image(nuclei, name="nuclei", scale=(0.5, 0.5), translate=(10.0, 20.0))
    widget = AutomaticWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.image_box.currentText() == "nuclei" and widget.mode_box.currentText() == "ais"
    assert widget.model_selector.model_name() == "lite_medsam"
    finish(qtbot, widget)

    layer = widget.result_layer
    assert layer is not None and layer.name == "nuclei objects" and layer in viewer.layers
    expected = segment_automatic(Predictor(widget.model_selector.load()), nuclei, AutoSettings())
    assert expected.max() >= 3  # a real result, not an empty image
    np.testing.assert_array_equal(layer.data, expected)
    assert layer.data.dtype == expected.dtype
    np.testing.assert_array_equal(layer.scale, image.scale)
    np.testing.assert_array_equal(layer.translate, image.translate)


def test_automatic_widget_links_the_slices_of_a_volume(qtbot, viewer, nuclei):
    from biosam.napari.automatic import AutomaticWidget

    crop = nuclei[:256, :256]
    viewer.add_image(np.stack([crop, crop, np.zeros_like(crop)]), name="stack")
    widget = AutomaticWidget(viewer)
    qtbot.addWidget(widget)
    widget.object_size_edit.setText("85")
    finish(qtbot, widget)

    labels = widget.result_layer.data
    expected = segment_automatic(Predictor(widget.model_selector.load()), crop, AutoSettings(object_size=85))
    assert labels.shape == (3, 256, 256) and expected.max() >= 2
    # The same nuclei on two slices are the same 3D objects; the blank slice has none.
    np.testing.assert_array_equal(labels[0], expected)
    np.testing.assert_array_equal(labels[1], expected)
    assert not labels[2].any()

    # Stopped after its first slice: no layer.
    layers = len(viewer.layers)
    widget.run_button.click()
    assert widget.worker is not None and widget.run_button.text() == "Stop"
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    assert len(viewer.layers) == layers and widget.status.text().startswith("stopped")

    # Only the current slice: labels on that slice of a volume of the layer's shape.
    viewer.dims.set_point(0, 1)
    widget.current_slice_box.setChecked(True)
    finish(qtbot, widget)
    one = widget.result_layer.data
    assert one.shape == (3, 256, 256) and not one[0].any() and not one[2].any()
    np.testing.assert_array_equal(one[1], expected)


def test_automatic_widget_amg_takes_the_models_defaults_and_the_fields(qtbot, viewer, nuclei):
    from biosam.automatic.run import amg_settings_for
    from biosam.napari.automatic import AutomaticWidget

    crop = nuclei[:256, :256]
    viewer.add_image(crop, name="nuclei")
    widget = AutomaticWidget(viewer)
    qtbot.addWidget(widget)
    widget.mode_box.setCurrentText("amg")
    widget.amg_edits["points_per_side"].setText("8")  # a coarse grid keeps the test fast
    finish(qtbot, widget)

    model = widget.model_selector.load()
    amg = amg_settings_for(model, points_per_side=8)
    assert amg.prompt == "boxes"  # LiteMedSAM's own default, kept for the fields left blank
    expected = segment_automatic(Predictor(model), crop, AutoSettings(mode="amg", amg=amg))
    assert expected.max() >= 1
    np.testing.assert_array_equal(widget.result_layer.data, expected)


@pytest.mark.parametrize(("field", "text", "message"), [
    ("tile_edit", "0", "tile 0"),
    ("halo_edit", "-2", "halo"),
    ("object_size_edit", "big", "Object size: 'big' is not a number"),
])
def test_automatic_widget_refuses_bad_settings(qtbot, viewer, field, text, message):
    from biosam.napari.automatic import AutomaticWidget

    viewer.add_image(np.random.default_rng(0).random((64, 64)), name="noise")
    widget = AutomaticWidget(viewer)
    qtbot.addWidget(widget)
    getattr(widget, field).setText(text)
    before = len(notification_manager.records)
    assert widget.run() is None and widget.worker is None
    errors = errors_since(before)
    assert len(errors) == 1 and message in errors[0], errors
    assert [layer.name for layer in viewer.layers] == ["noise"]


def test_automatic_widget_refuses_bad_amg_thresholds(qtbot, viewer):
    from biosam.napari.automatic import AutomaticWidget

    viewer.add_image(np.random.default_rng(0).random((64, 64)), name="noise")
    widget = AutomaticWidget(viewer)
    qtbot.addWidget(widget)
    widget.mode_box.setCurrentText("amg")
    assert widget.amg_group.isVisibleTo(widget) and not widget.ais_group.isVisibleTo(widget)
    # Blank fields show the model's own defaults (LiteMedSAM's box grid).
    assert widget.amg_edits["pred_iou_thresh"].placeholderText().startswith("0.8 ")
    widget.amg_edits["stability_score_thresh"].setText("1.5")
    before = len(notification_manager.records)
    assert widget.run() is None
    errors = errors_since(before)
    assert len(errors) == 1 and "'Stability threshold'" in errors[0], errors
    assert len(viewer.layers) == 1


def test_a_failure_in_the_worker_is_shown_and_the_widget_is_ready_again(qtbot, viewer, nuclei, monkeypatch):
    """A RuntimeError (how torch reports running out of memory) inside the run: superqt's generator workers
    dropped it silently, and the widget stayed on *Stop* for good."""
    import biosam.napari.automatic as automatic

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
        yield  # a generator, as segment_planes is

    monkeypatch.setattr(automatic, "segment_planes", broken)
    viewer.add_image(nuclei[:64, :64], name="small")
    widget = automatic.AutomaticWidget(viewer)
    qtbot.addWidget(widget)
    count = len(notification_manager.records)
    finish(qtbot, widget)
    assert widget.status.text() == "failed: out of memory" and widget.result_layer is None
    assert widget.run_button.text() == "Segment" and widget.progress.maximum() == 1
    assert any("out of memory" in m for m in errors_since(count))


def test_tomogram_widget_gives_the_pipelines_vesicles_and_measurements(qtbot, viewer, tomo, tmp_path):
    from biosam.napari.tomogram import TomogramWidget

    # The layer's scale in Å (napari units) gives the voxel size.
    viewer.add_image(tomo.volume, name="tomo", scale=(VOXEL,) * 3, units=("angstrom",) * 3)
    widget = TomogramWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.voxel_edit.text() == "10" and widget.method_box.currentText() == "decoder"
    csv = tmp_path / "vesicles.csv"
    widget.csv_edit.setText(str(csv))
    finish(qtbot, widget)

    layer = widget.result_layer
    assert layer is not None and layer.name == "tomo vesicles"
    expected = segment_vesicles(Predictor(widget.model_selector.load()), tomo.volume, VOXEL, VesicleSettings(),
                                progress=False)
    count = int(expected.labels.max())
    assert count >= 2
    np.testing.assert_array_equal(layer.data, expected.labels)
    np.testing.assert_array_equal(layer.scale, (VOXEL,) * 3)

    features = layer.features
    assert len(features) == count and list(features.columns) == ["index", *COLUMNS]
    assert features["index"].tolist() == features["label"].tolist() == list(range(1, count + 1))
    table = measure_vesicles(expected.labels, VOXEL, expected.scores)
    for name in COLUMNS:
        np.testing.assert_allclose(features[name].to_numpy(dtype=float), table[name].astype(float), equal_nan=True)
    lines = csv.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == count + 1


def test_tomogram_widget_refusals(qtbot, viewer, tmp_path):
    from biosam.napari.tomogram import TomogramWidget

    volume = np.random.default_rng(1).random((1, 48, 48)).astype(np.float32)
    viewer.add_image(volume, name="thin")  # pixel units: no voxel size known
    widget = TomogramWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.voxel_edit.text() == ""

    before = len(notification_manager.records)
    assert widget.run() is None
    assert any("voxel size" in e for e in errors_since(before))

    widget.voxel_edit.setText("10")
    widget.min_diameter_spin.setValue(200.0)  # above the maximum
    before = len(notification_manager.records)
    assert widget.run() is None
    assert any("'Min diameter (nm)' < 'Max diameter (nm)'" in e for e in errors_since(before))

    widget.min_diameter_spin.setValue(20.0)
    existing = tmp_path / "old.csv"
    existing.write_text("keep me\n")
    widget.csv_edit.setText(str(existing))
    before = len(notification_manager.records)
    assert widget.run() is None
    assert any("old.csv" in e for e in errors_since(before))
    assert existing.read_text() == "keep me\n"

    # Refused by the pipeline inside the worker (one slice is no tomogram): a notification, no layer.
    widget.csv_edit.clear()
    before = len(notification_manager.records)
    finish(qtbot, widget)
    assert errors_since(before) and widget.result_layer is None
    assert [layer.name for layer in viewer.layers] == ["thin"]


def test_tomogram_widget_takes_the_voxel_size_from_biosams_reader_and_samples(qtbot, viewer, tmp_path):
    import mrcfile

    from biosam.napari.reader import get_reader
    from biosam.napari.sample import TOMOGRAM_VOXEL_SIZE, tomogram
    from biosam.napari.tomogram import TomogramWidget

    path = tmp_path / "tomo.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 16, 16), np.float32))
        mrc.voxel_size = (12.5, 12.5, 25.0)  # x, y, z as MRC headers hold them
    for data, kwargs, _ in get_reader(str(path))(str(path)):
        viewer.add_image(data, **kwargs)
    widget = TomogramWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.voxel_edit.text() == "25, 12.5, 12.5"  # z, y, x
    assert widget.voxel_size().angstrom == (25.0, 12.5, 12.5)

    for data, kwargs, _ in tomogram():
        viewer.add_image(data, **kwargs)
    widget.image_box.setCurrentText("synthetic tomogram")
    assert widget.voxel_edit.text() == f"{TOMOGRAM_VOXEL_SIZE:g}"


def test_widget_labels_are_saved_in_their_images_geometry(qtbot, viewer, tmp_path):
    """Labels of an MRC opened by biosam's reader carry its metadata, so biosam's writer keeps its header."""
    import mrcfile

    from biosam.napari.automatic import AutomaticWidget
    from biosam.napari.reader import get_reader
    from biosam.napari.writer import write_labels

    path = tmp_path / "blank.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.full((3, 32, 32), 7, np.float32))  # constant: no objects, and nothing to compute
        mrc.voxel_size = 12.5
    for data, kwargs, _ in get_reader(str(path))(str(path)):
        image = viewer.add_image(data, **kwargs)
    widget = AutomaticWidget(viewer)
    qtbot.addWidget(widget)
    before = len(notification_manager.records)
    finish(qtbot, widget)
    layer = widget.result_layer
    assert layer.data.shape == (3, 32, 32) and not layer.data.any()
    assert layer.metadata["biosam"]["image_meta"] is image.metadata["biosam"]["image_meta"]
    assert tuple(layer.units) == tuple(image.units)
    # A blank image is segmented, with the command's warning, shown here as a notification.
    warned = [n.message for n in notification_manager.records[before:] if "no contrast" in n.message]
    assert len(warned) == 1 and "2 more slices alike" in warned[0], warned
    out = tmp_path / "labels.mrc"
    write_labels(str(out), layer.data, {"metadata": layer.metadata, "scale": layer.scale})
    with mrcfile.open(out) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(12.5) and mrc.data.shape == (3, 32, 32)
