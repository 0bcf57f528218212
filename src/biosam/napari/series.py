"""Annotating a folder of images one after the other, labels saved per image as you go.

Labels of ``IMAGES/name.ext`` go to ``OUTPUT/name.tif``. The output folder keeps a
small record (``biosam-series.json``) of the files the series wrote, with their size
and modification time, so a label file is replaced only when the series wrote it and
nobody changed it since; any other file in the way is left alone and reported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from biosam.errors import BiosamError, InputError
from biosam.io.files import atomic_path, suffix_of
from biosam.io.formats import READ_SUFFIXES
from biosam.napari.annotator import COMMITTED, AnnotatorWidget, bind_keys

logger = logging.getLogger(__name__)

RECORD = "biosam-series.json"
IMAGE_LAYER = "series_image"
# single DICOM files are slices of a series, not images of their own
_SERIES_SUFFIXES = tuple(s for s in READ_SUFFIXES if s not in (".dcm", ".dicom"))


def list_images(folder: str | Path) -> list[Path]:
    """The image files in ``folder``, sorted by name; InputError when there are none or two share a label file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; choose the folder that holds the images.")
    images = sorted(p for p in folder.iterdir() if p.is_file() and suffix_of(p) in _SERIES_SUFFIXES
                    and not p.name.startswith("."))
    if not images:
        raise InputError(f"{folder}: no images ({', '.join(_SERIES_SUFFIXES)}) in this folder.")
    stems: dict[str, Path] = {}
    for path in images:
        stem = label_name(path)
        if stem in stems:
            raise InputError(f"{stems[stem].name} and {path.name} would share the label file {stem}; rename one.")
        stems[stem] = path
    return images


def label_name(image: Path) -> str:
    """The label file name of ``image``: its name with the extension replaced by ``.tif``."""
    return image.name[: len(image.name) - len(suffix_of(image))] + ".tif"


class SeriesRecord:
    """The label files the series wrote in ``folder``, each with its size and modification time then."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RECORD
        try:
            self.written: dict[str, list[int]] = json.loads(self.path.read_text())["written"]
        except FileNotFoundError:
            self.written = {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{self.path}: unreadable ({exc}); delete it, and files already written there are "
                             "treated as the user's (never replaced).") from exc

    def ours(self, path: Path) -> bool:
        """Whether ``path`` is a file this series wrote and nobody changed since."""
        stat = path.stat()
        return self.written.get(path.name) == [stat.st_mtime_ns, stat.st_size]

    def add(self, path: Path) -> None:
        stat = path.stat()
        self.written[path.name] = [stat.st_mtime_ns, stat.st_size]
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"written": self.written}, indent=1))


class SeriesAnnotatorWidget(QWidget):
    """Choose an image folder and an output folder, then annotate image after image (N next, Shift+N previous)."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.annotator = AnnotatorWidget(napari_viewer)
        self.model_selector = self.annotator.model_selector
        self.images: list[Path] = []
        self.index = -1
        self.output: Path | None = None
        self._record: SeriesRecord | None = None
        self._meta = None
        self._loaded: np.ndarray | None = None  # the labels read from the current image's label file

        self.images_edit, self.output_edit = QLineEdit(), QLineEdit()
        form = QFormLayout()
        for text, edit in (("Images", self.images_edit), ("Labels to", self.output_edit)):
            row = QHBoxLayout()
            row.addWidget(edit)
            browse = QPushButton("Browse…")
            browse.clicked.connect(lambda _=False, e=edit: self._browse(e))
            row.addWidget(browse)
            form.addRow(text, row)
        start = QPushButton("Start (resume)")
        start.clicked.connect(self._start_clicked)
        self.position = QLabel("No folder chosen.")
        navigation = QHBoxLayout()
        self.buttons: dict[str, QPushButton] = {}
        for text, slot in (("Previous [Shift+N]", self.previous), ("Save", self.save), ("Next [N]", self.next)):
            button = QPushButton(text)
            button.clicked.connect(lambda _=False, s=slot: self._guarded(s))
            navigation.addWidget(button)
            self.buttons[slot.__name__] = button
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(start)
        layout.addWidget(self.position)
        layout.addLayout(navigation)
        layout.addWidget(self.annotator)
        bind_keys(self.viewer, {"N": lambda: self._guarded(self.next),
                                "Shift-N": lambda: self._guarded(self.previous)}, self)

    # -- public API ---------------------------------------------------------------------------------

    def open_folders(self, images: str | Path, output: str | Path) -> None:
        """Annotate the images in ``images``, labels into ``output``; opens the first image without labels."""
        listed = list_images(images)
        output = Path(output).expanduser()
        if output.resolve() == Path(images).expanduser().resolve():
            raise InputError("the labels folder is the image folder; choose another one, so that label files "
                             "never mix with (or replace) the images.")
        output.mkdir(parents=True, exist_ok=True)
        self.images, self.output, self._record = listed, output, SeriesRecord(output)
        self.images_edit.setText(str(images))
        self.output_edit.setText(str(output))
        done = [self.label_path(i).exists() for i in range(len(listed))]
        self.index = -1
        self._show(done.index(False) if False in done else len(listed) - 1)
        if all(done):
            self._say(f"All {len(listed)} images have labels; showing the last one.")

    def label_path(self, index: int | None = None) -> Path:
        """Where the labels of image ``index`` (default: the current one) are saved."""
        return self.output / label_name(self.images[self.index if index is None else index])

    def save(self) -> Path | None:
        """Write the committed objects of the current image; None when no image is open."""
        if self.index < 0 or COMMITTED not in self.viewer.layers:
            return None
        path = self.label_path()
        if path.exists() and not self._record.ours(path):
            raise InputError(f"{path}: exists and was not written by this series (or was changed since); it is "
                             "left alone. Move it away or choose another labels folder.")
        from biosam.io import write_labels

        labels = np.asarray(self.viewer.layers[COMMITTED].data)
        write_labels(path, labels, like=self._meta, overwrite=path.exists())
        self._record.add(path)
        logger.info("saved %s (%d objects)", path, len(np.unique(labels)) - 1)
        return path

    def next(self) -> None:
        """Save, then open the next image."""
        self._step(1)

    def previous(self) -> None:
        """Save, then open the previous image."""
        self._step(-1)

    # -- internals ----------------------------------------------------------------------------------

    def _step(self, step: int) -> None:
        if not self.images:
            raise InputError("choose an image folder and a labels folder first, then press Start.")
        target = self.index + step
        if not 0 <= target < len(self.images):
            self._say("This is the " + ("last" if step > 0 else "first") + " image.")
            return
        if not self.annotator.idle:
            raise InputError("the annotator is still working; wait for it, then go on.")
        labels = self.viewer.layers[COMMITTED].data if COMMITTED in self.viewer.layers else None
        # an unchanged label file needs no writing (and a user's own file may then be left as it is)
        if self._loaded is None or labels is None or not np.array_equal(labels, self._loaded):
            self.save()
        self._show(target)

    def _show(self, index: int) -> None:
        from biosam.io import read_image

        data, meta = read_image(self.images[index])
        labels = None
        path = self.label_path(index)
        if path.exists():
            saved, _ = read_image(path)
            labels = np.asarray(saved)
            spatial = tuple(data.shape[:-1]) if _is_rgb(data) else tuple(data.shape)
            if labels.shape != spatial:
                self._notify(f"{path}: labels of shape {labels.shape} do not fit the image {spatial}; not loaded.")
                labels = None
        if IMAGE_LAYER in self.viewer.layers:
            self.viewer.layers.remove(IMAGE_LAYER)
        layer = self.viewer.add_image(data, name=IMAGE_LAYER, rgb=_is_rgb(data))
        self.viewer.layers.move(self.viewer.layers.index(layer), 0)  # under the annotation layers
        self.annotator.start_image(layer, labels)
        self.index, self._meta, self._loaded = index, meta, labels
        state = "labels loaded" if labels is not None else "no labels yet"
        self._say(f"Image {index + 1} of {len(self.images)}: {self.images[index].name} ({state}).")

    def _start_clicked(self) -> None:
        self._guarded(lambda: self.open_folders(self.images_edit.text().strip(), self.output_edit.text().strip()))

    def _browse(self, edit: QLineEdit) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text())
        if folder:
            edit.setText(folder)

    def _guarded(self, action) -> Any:
        try:
            return action()
        except BiosamError as exc:
            self._notify(str(exc))
            return None

    def _say(self, text: str) -> None:
        self.position.setText(text)
        logger.info(text)

    def _notify(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self._say(text)
        show_error(text)


def _is_rgb(data) -> bool:
    """RGB(A) as read: 8-bit with 3 or 4 channels last (napari's own rule for 2D images)."""
    return len(data.shape) == 3 and data.shape[-1] in (3, 4) and np.dtype(data.dtype) == np.uint8
