"""napari widget: every object of an image layer, no prompts (``biosam auto`` in the viewer).

The widget reads its fields on the GUI thread, builds :class:`~biosam.automatic.run.AutoSettings`
(so the library validates them, before any work) and runs :func:`segment_planes`, which calls
:func:`~biosam.automatic.run.segment_automatic` plane by plane as ``biosam auto`` does, in a
background worker. The labels come back as a Labels layer in the image layer's geometry.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Generator, Sequence

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from biosam.automatic.amg import AmgSettings
from biosam.automatic.run import MODES, AutoSettings
from biosam.errors import BiosamError, InputError
from biosam.napari.model_selector import ModelSelector
from biosam.prompting.intensity import INTENSITY_PRESETS

logger = logging.getLogger(__name__)

__all__ = ["AutomaticWidget", "ImageLayerBox", "in_field_names", "labels_geometry", "number_field", "segment_planes",
           "show_failure"]

# The AMG fields, their AmgSettings names and number types.
_AMG_FIELDS = {"points_per_side": ("Points per side", int), "pred_iou_thresh": ("IoU threshold", float),
               "stability_score_thresh": ("Stability threshold", float)}


def number_field(edit: QLineEdit, label: str, kind: type = float) -> float | int | None:
    """The number typed in ``edit`` (None when blank); text that is not a ``kind`` is an InputError."""
    text = edit.text().strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        raise InputError(f"{label}: '{text}' is not {expected}.") from None


def in_field_names(exc: InputError, names: dict[str, str]) -> InputError:
    """The library's message about its settings, naming the widget's fields instead (``names``: setting -> label)."""
    message = str(exc)
    for name, label in names.items():
        message = message.replace(name, f"'{label}'")
    return InputError(message)


def show_failure(what: str, exc: BaseException) -> None:
    """A notification for an error of a run: the message for biosam's own errors, the type too otherwise."""
    from napari.utils.notifications import show_error

    if isinstance(exc, BiosamError):
        show_error(f"{what}: {exc}")
    else:  # a bug, not the user's input: keep the traceback in the log
        logger.error("%s failed", what, exc_info=exc)
        show_error(f"{what} failed: {type(exc).__name__}: {exc}")


def _disconnect(viewer, callback, *_: object) -> None:
    """Take ``callback`` off the viewer's layer-list events and its layers' name events."""
    for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved,
                  *(layer.events.name for layer in viewer.layers)):
        event.disconnect(callback)


class ImageLayerBox(QComboBox):
    """A dropdown of the viewer's image layers, kept up to date as layers come and go."""

    def __init__(self, viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._viewer = viewer
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            event.connect(self.refresh)
        self.refresh()
        # The viewer outlives a closed widget: stop calling into the deleted Qt object.
        self.destroyed.connect(functools.partial(_disconnect, viewer, self.refresh))

    def refresh(self, *_: object) -> None:
        """Refill the list, keeping the current choice when it still exists."""
        from napari.layers import Image

        current = self.currentText()
        images = [layer for layer in self._viewer.layers if isinstance(layer, Image)]
        for layer in images:  # a renamed layer keeps its place in the list (connecting twice is a no-op)
            layer.events.name.connect(self.refresh)
        names = [layer.name for layer in images]
        if names == [self.itemText(i) for i in range(self.count())]:
            return
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)

    def layer(self):
        """The chosen image layer; InputError when there is none."""
        name = self.currentText()
        if not name or name not in self._viewer.layers:
            raise InputError("no image layer chosen; open an image first.")
        return self._viewer.layers[name]


def layer_pixels(layer):
    """The full-resolution data of an image layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


def labels_geometry(layer) -> dict:
    """``add_labels`` keywords that put labels over an image layer and let biosam's writer save them in its geometry.

    The image's ``scale``, ``translate`` and (newer napari) ``units``, and a copy of its ``metadata["biosam"]``
    (where the image came from, see :mod:`biosam.napari.reader`).
    """
    from biosam.napari.reader import METADATA_KEY

    kwargs = {"scale": layer.scale, "translate": layer.translate}
    if getattr(layer, "units", None) is not None:
        kwargs["units"] = layer.units
    info = (layer.metadata or {}).get(METADATA_KEY)
    if info:
        kwargs["metadata"] = {METADATA_KEY: dict(info)}
    return kwargs


def segment_planes(predictor, data, planes: Sequence[int | None], settings: AutoSettings,
                   amg_overrides: dict | None = None, link_iou: float = 0.3,
                   name: str = "image") -> Generator[tuple[int, int], None, tuple[np.ndarray, list[str]]]:
    """Segment a 2D image (``planes == [None]``) or the given slices of a volume, as ``biosam auto`` does.

    Yields ``(done, total)`` after each plane; returns ``(labels, warnings)``, labels in the data's
    spatial shape (a volume keeps its shape, with labels on the segmented slices only). Objects of
    neighbouring slices overlapping by ``link_iou`` become one 3D object (0: slices kept apart).
    """
    from biosam.automatic.planes import PlaneSegmenter
    from biosam.labels import label_dtype

    volume = planes[0] is not None
    segmenter = PlaneSegmenter(predictor, settings, volume=volume and len(planes) > 1, amg_overrides=amg_overrides,
                               link_iou=link_iou)
    out = np.zeros(data.shape[:3] if volume else (0, 0), dtype=np.int64)
    warnings: list[str] = []
    for done, z in enumerate(planes, start=1):
        result = segmenter.add(np.asarray(data if z is None else data[z]), z, name)
        warnings += filter(None, [result.warning])
        if z is None:
            out = result.labels
        else:
            out[z] = result.labels
        yield done, len(planes)
    return out.astype(label_dtype(int(out.max()))), warnings


class _Passed(Exception):
    """A RuntimeError from inside a generator worker, carried out as its cause (see :func:`_passed_on`)."""


def _passed_on(function):
    """``function`` for a worker. superqt's generator workers take a RuntimeError for a deleted Qt object and
    drop it, with neither "errored" nor "finished" (the widget would stay busy for good); torch reports its
    failures (out of memory, among others) as RuntimeError, so they go out wrapped in :class:`_Passed`."""
    if not inspect.isgeneratorfunction(function):
        return function

    @functools.wraps(function)
    def passed(*args, **kwargs):
        try:
            return (yield from function(*args, **kwargs))
        except RuntimeError as exc:
            raise _Passed(str(exc)) from exc

    return passed


class RunPanel(QWidget):
    """Base of the widgets that run one library call at a time in a background worker: subclasses set
    :attr:`task`, make ``run_button``, ``progress`` and ``status``, and say in :meth:`_running` what the button
    does while a run goes on."""

    task = "run"  # names the work in failure messages

    def _running(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)

    def _start(self, function, *args, returned, steps: int, status: str, **signals):
        """Run ``function(*args)`` in a worker: ``returned`` gets its result; ``steps`` for the progress bar (0:
        busy); ``signals``: more handlers by signal name (``yielded``, ``aborted``)."""
        from napari.qt.threading import create_worker

        # An "errored" handler of our own, or napari would re-raise the error on the GUI thread.
        worker = create_worker(_passed_on(function), *args, _start_thread=False,
                               _connect={"errored": self._failed, "finished": self._finished, "returned": returned,
                                         **signals})
        self.worker = worker
        self._running(True)
        self.progress.setRange(0, steps)
        self.status.setText(status)
        worker.start()
        return worker

    def _failed(self, exc: BaseException) -> None:
        exc = exc.__cause__ if isinstance(exc, _Passed) else exc
        show_failure(self.task, exc)
        self.status.setText(f"failed: {exc}")

    def _finished(self) -> None:
        self.worker = None
        self._running(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)


class AutomaticWidget(RunPanel):
    """Automatic segmentation of an image layer: ``ais`` (instance decoder) or ``amg`` (prompt grid)."""

    task = "automatic segmentation"

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None  # the running worker, None when idle
        self.result_layer = None  # the last Labels layer added

        self.image_box = ImageLayerBox(napari_viewer)
        self.model_selector = ModelSelector()
        self.mode_box = QComboBox()
        self.mode_box.addItems(MODES)
        self.tile_edit, self.halo_edit = QLineEdit(), QLineEdit()
        self.tile_edit.setPlaceholderText("decoder's tile (ais), 1024 (amg)")
        self.halo_edit.setPlaceholderText("tile / 8")
        self.intensity_box = QComboBox()
        self.intensity_box.addItems(INTENSITY_PRESETS)
        self.object_size_edit = QLineEdit()
        self.object_size_edit.setPlaceholderText("estimated from the image")
        self.amg_edits = {name: QLineEdit() for name in _AMG_FIELDS}
        self.current_slice_box = QCheckBox("Only the current slice (volumes)")
        self.link_spin = QDoubleSpinBox()
        self.link_spin.setRange(0.0, 1.0)
        self.link_spin.setSingleStep(0.05)
        self.link_spin.setValue(0.3)
        self.link_spin.setToolTip("Objects of neighbouring slices overlapping by this IoU become one 3D object; "
                                  "0 keeps slices apart.")
        self.run_button = QPushButton("Segment")
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        common = QFormLayout()
        common.addRow("Image", self.image_box)
        common.addRow("Mode", self.mode_box)
        common.addRow("Tile (px)", self.tile_edit)
        common.addRow("Halo (px)", self.halo_edit)
        common.addRow("Intensity", self.intensity_box)
        self.ais_group = QGroupBox("ais: instance decoder")
        QFormLayout(self.ais_group).addRow("Object size (px)", self.object_size_edit)
        self.amg_group = QGroupBox("amg: grid of prompts")
        amg_form = QFormLayout(self.amg_group)
        for name, (label, _) in _AMG_FIELDS.items():
            amg_form.addRow(label, self.amg_edits[name])
        volume = QFormLayout()
        volume.addRow(self.current_slice_box)
        volume.addRow("Link slices (IoU)", self.link_spin)
        layout = QVBoxLayout(self)
        layout.addWidget(self.model_selector)
        layout.addLayout(common)
        layout.addWidget(self.ais_group)
        layout.addWidget(self.amg_group)
        layout.addLayout(volume)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch()

        self.mode_box.currentTextChanged.connect(self._mode_changed)
        self.model_selector.changed.connect(self._show_amg_defaults)
        self.run_button.clicked.connect(self._clicked)
        self._mode_changed(self.mode_box.currentText())
        self._show_amg_defaults()

    # -- reading the fields -----------------------------------------------------------------------

    def settings(self) -> tuple[AutoSettings, dict]:
        """The settings of the fields, checked by the library: ``(AutoSettings, AMG overrides)``."""
        mode = self.mode_box.currentText()
        tile = number_field(self.tile_edit, "Tile", int)
        halo = number_field(self.halo_edit, "Halo", int)
        object_size = number_field(self.object_size_edit, "Object size", float) if mode == "ais" else None
        overrides = {}
        if mode == "amg":
            overrides = {name: number_field(self.amg_edits[name], label, kind)
                         for name, (label, kind) in _AMG_FIELDS.items()}
        try:
            settings = AutoSettings(mode=mode, tile=tile, halo=halo, intensity=self.intensity_box.currentText(),
                                    object_size=object_size)
            AmgSettings(**{k: v for k, v in overrides.items() if v is not None})  # refused before any work
        except InputError as exc:
            names = {"object_size (a diameter in pixels)": "Object size"} | {k: v[0] for k, v in _AMG_FIELDS.items()}
            raise in_field_names(exc, names) from exc
        return settings, overrides

    def planes(self, layer) -> list[int | None]:
        """What to segment: ``[None]`` for a 2D image, the slices of a volume (or its current one)."""
        if layer.ndim == 2:
            return [None]
        if layer.ndim != 3:
            raise InputError(f"{layer.name}: has {layer.ndim} dimensions; choose a 2D image or a 3D volume "
                             "(Z, Y, X).")
        depth = layer_pixels(layer).shape[0]
        if not self.current_slice_box.isChecked():
            return list(range(depth))
        z = int(round(float(layer.world_to_data(self.viewer.dims.point)[0])))
        return [min(max(z, 0), depth - 1)]

    # -- running ----------------------------------------------------------------------------------

    def run(self):
        """Start a run on the chosen layer; returns its worker, or None when the input was refused."""
        from biosam import Predictor

        if self.worker is not None:
            return None
        try:
            layer = self.image_box.layer()
            settings, overrides = self.settings()
            planes = self.planes(layer)
            # loaded before the worker starts, so a model that cannot load is refused here, with the settings
            predictor = Predictor(self.model_selector.load())
        except BiosamError as exc:
            show_failure(self.task, exc)
            return None
        return self._start(segment_planes, predictor, layer_pixels(layer), planes, settings, overrides,
                           self.link_spin.value(), layer.name, returned=lambda result: self._add_labels(layer, result),
                           steps=0 if len(planes) == 1 else len(planes),  # busy bar for one plane
                           status=f"segmenting {layer.name} ({len(planes)} plane{'s' if len(planes) > 1 else ''})…",
                           yielded=self._progressed,
                           aborted=lambda: self.status.setText("stopped; no labels added"))

    def stop(self) -> None:
        """Ask the running worker to stop after the plane it is on; no layer is added."""
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("stopping after this plane…")

    def _clicked(self) -> None:
        """The button starts a run, or stops the one running (it reads *Stop* meanwhile)."""
        if self.worker is not None:
            self.stop()
        else:
            self.run()

    def _progressed(self, step: tuple[int, int]) -> None:
        done, total = step
        if total > 1:
            self.progress.setValue(done)

    def _add_labels(self, layer, result: tuple[np.ndarray, list[str]]) -> None:
        from napari.utils.notifications import show_warning

        labels, warnings = result
        if warnings:  # one notification, not one per blank slice of a volume
            show_warning(warnings[0] + (f" ({len(warnings) - 1} more slices alike)" if len(warnings) > 1 else ""))
        self.result_layer = self.viewer.add_labels(labels, name=f"{layer.name} objects", **labels_geometry(layer))
        self.status.setText(f"{int(labels.max())} objects in {layer.name}")

    def _running(self, busy: bool) -> None:
        self.run_button.setText("Stop" if busy else "Segment")  # the button stops a run (see _clicked)

    # -- field hints ------------------------------------------------------------------------------

    def _mode_changed(self, mode: str) -> None:
        self.ais_group.setVisible(mode == "ais")
        self.amg_group.setVisible(mode == "amg")

    def _show_amg_defaults(self) -> None:
        """Blank AMG fields take the chosen model's defaults (as the command does): show them as hints."""
        from biosam.zoo import REGISTRY

        spec = REGISTRY.get(self.model_selector.model_name())
        values = {f.name: f.default for f in dataclasses.fields(AmgSettings)}
        values.update(spec.defaults.get("amg", {}) if spec is not None else {})
        for name, edit in self.amg_edits.items():
            edit.setPlaceholderText(f"{values[name]:g} (model default)")
