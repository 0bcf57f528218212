"""The series annotator: labels saved per image as you go, resumed at the first image without labels,
and label files it did not write left alone."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari plugin needs napari (pip install biosam[napari])")
pytest.importorskip("pytestqt", reason="widget tests need pytest-qt")

import imageio.v3 as iio  # noqa: E402
import tifffile  # noqa: E402
from conftest import shared_file  # noqa: E402
from napari.components import ViewerModel  # noqa: E402
from napari.utils.key_bindings import KeymapHandler  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from biosam.errors import InputError  # noqa: E402
from biosam.napari.annotator import BOXES, COMMITTED  # noqa: E402
from biosam.napari.series import RECORD, SeriesAnnotatorWidget, list_images  # noqa: E402
from biosam.prompting.prompts import mask_box  # noqa: E402

WAIT_MS = 180_000


@pytest.fixture()
def folders(tmp_path):
    """Three 256 x 256 NIH3T3 crops as PNG files, the nuclei of the first as instances, and an output folder."""
    images = tmp_path / "images"
    images.mkdir()
    truths = []
    for i, number in enumerate((0, 1, 26)):
        image = iio.imread(shared_file("nuclei_nih3t3", "images", f"dna-{number}.png"))[384:640, 512:768]
        iio.imwrite(images / f"cell{i}.png", image)
        truth, _ = ndi.label(iio.imread(shared_file("nuclei_nih3t3", "labels", f"{number}.png"))[384:640, 512:768] > 0)
        truths.append(truth)
    return images, tmp_path / "labels", truths


def make_widget(qtbot, store) -> tuple[ViewerModel, SeriesAnnotatorWidget]:
    viewer = ViewerModel()
    widget = SeriesAnnotatorWidget(viewer)
    qtbot.addWidget(widget)
    widget.annotator.store_edit.setText(str(store))
    widget.model_selector.device_box.setCurrentText("cpu")
    return viewer, widget


def press(viewer, key: str) -> None:
    """A key press as napari's canvas delivers it, with the prompts layer active."""
    handler = KeymapHandler()
    handler.keymap_providers = [viewer.layers[BOXES], viewer]
    handler.press_key(key)
    handler.release_key(key)


def annotate_one(qtbot, viewer, widget, truth) -> np.ndarray:
    """Box the largest nucleus, segment and commit it; the committed labels."""
    ids, sizes = np.unique(truth[truth > 0], return_counts=True)
    x0, y0, x1, y1 = mask_box(truth == ids[np.argmax(sizes)]) - 0.5
    viewer.layers[BOXES].add_rectangles(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]))
    for action in ("segment", "commit"):
        getattr(widget.annotator, action)()
        qtbot.waitUntil(lambda: widget.annotator.idle, timeout=WAIT_MS)
    committed = viewer.layers[COMMITTED].data.copy()
    assert set(np.unique(committed)) == {0, 1}
    return committed


def test_series_saves_and_resumes(qtbot, tmp_path, folders):
    images, output, truths = folders
    viewer, widget = make_widget(qtbot, tmp_path / "store")
    widget.open_folders(images, output)
    assert widget.index == 0 and "Image 1 of 3" in widget.position.text()
    first = annotate_one(qtbot, viewer, widget, truths[0])

    press(viewer, "N")  # saves cell0, opens cell1
    assert widget.index == 1 and not viewer.layers[COMMITTED].data.any()
    np.testing.assert_array_equal(tifffile.imread(output / "cell0.tif"), first)
    assert (output / RECORD).exists()

    # a new session resumes at the first image without labels, and going back shows the saved ones
    viewer2, widget2 = make_widget(qtbot, tmp_path / "store")
    widget2.open_folders(images, output)
    assert widget2.index == 1
    press(viewer2, "Shift-N")  # saves cell1 (empty: looked at, nothing to label) and goes back
    assert widget2.index == 0
    np.testing.assert_array_equal(viewer2.layers[COMMITTED].data, first)
    assert (output / "cell1.tif").exists() and not tifffile.imread(output / "cell1.tif").any()

    # more objects on a revisited image: the file the series wrote is updated
    viewer2.layers[COMMITTED].data[:5, :5] = 7
    widget2.next()
    assert tifffile.imread(output / "cell0.tif")[0, 0] == 7


def test_series_never_replaces_the_users_files(qtbot, tmp_path, folders):
    images, output, truths = folders
    output.mkdir()
    users = np.full((256, 256), 3, dtype=np.uint16)
    tifffile.imwrite(output / "cell2.tif", users)  # the user's own labels of the last image
    viewer, widget = make_widget(qtbot, tmp_path / "store")
    widget.open_folders(images, output)
    assert widget.index == 0
    widget.next()
    widget.next()  # on cell2: the user's labels are shown
    assert widget.index == 2
    np.testing.assert_array_equal(viewer.layers[COMMITTED].data, users)
    with pytest.raises(InputError, match="not written by this series"):
        widget.save()
    viewer.layers[COMMITTED].data[0, 0] = 9
    widget.buttons["previous"].click()  # changed: refused in the UI with a message; file and image stay
    assert widget.index == 2 and "not written by this series" in widget.position.text()
    np.testing.assert_array_equal(tifffile.imread(output / "cell2.tif"), users)

    # a file the series wrote but the user changed since is the user's too
    tifffile.imwrite(output / "cell0.tif", users)
    viewer2, widget2 = make_widget(qtbot, tmp_path / "store")
    widget2.open_folders(images, output)
    assert "All 3 images have labels" in widget2.position.text()
    widget2.previous()  # cell2 unchanged: nothing to write, so leaving it is fine
    widget2.previous()
    assert widget2.index == 0
    np.testing.assert_array_equal(viewer2.layers[COMMITTED].data, users)
    with pytest.raises(InputError, match="not written by this series"):
        widget2.save()


def test_folder_problems_are_explained(tmp_path, folders):
    images, _, _ = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        list_images(tmp_path / "empty")
    (images / "cell0.tif").write_bytes(b"")
    with pytest.raises(InputError, match="share the label file cell0.tif"):
        list_images(images)
