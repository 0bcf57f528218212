"""napari widget: membrane-bound vesicles of a tomogram layer, segmented and measured (``biosam tomogram``).

Settings are built as :class:`~biosam.tomogram.VesicleSettings` on the GUI thread (the library checks
them before any work); :func:`segment_tomogram` runs :func:`~biosam.tomogram.segment_vesicles` and
:func:`~biosam.tomogram.measure_vesicles` in a background worker. The labels come back as a Labels
layer whose ``features`` hold one row per vesicle (the columns of the command's CSV, plus napari's
``index``: the label each row describes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from biosam.errors import BiosamError, InputError
from biosam.io.voxel_size import VoxelSize
from biosam.napari.automatic import (ImageLayerBox, RunPanel, in_field_names, labels_geometry, layer_pixels,
                                     show_failure)
from biosam.napari.model_selector import ModelSelector
from biosam.tomogram.grid import POLARITY_CHOICES
from biosam.tomogram.vesicles import CANDIDATE_METHODS, VesicleSettings

logger = logging.getLogger(__name__)

__all__ = ["TomogramWidget", "measurement_features", "segment_tomogram", "voxel_size_of_layer"]

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(VesicleSettings)}
# The fields behind VesicleSettings names, for the library's messages.
_FIELD_NAMES = {"min_diameter_nm": "Min diameter (nm)", "max_diameter_nm": "Max diameter (nm)", "n_slabs": "Slabs",
                "slab_thickness": "Slab thickness", "slab_step": "Slab step (nm)"}


def voxel_size_of_layer(layer) -> VoxelSize | None:
    """The layer's voxel size in Å, or None when it does not say.

    In order: the file's own geometry, which biosam's reader keeps in ``metadata["biosam"]["image_meta"]``;
    the layer's scale in the unit ``metadata["biosam"]["unit"]`` names (sample data); the layer's scale in
    napari's ``units`` when they are lengths.
    """
    from biosam.io.meta import ImageMeta, unit_factor
    from biosam.io.voxel_size import voxel_size_of
    from biosam.napari.reader import METADATA_KEY

    info = (layer.metadata or {}).get(METADATA_KEY) or {}
    meta = info.get("image_meta")
    if isinstance(meta, ImageMeta):
        try:
            return voxel_size_of(meta, None, layer.name)
        except InputError:  # the file records none: the user types it
            return None
    factor = unit_factor(info.get("unit"), "angstrom")
    try:
        if factor is not None:
            return VoxelSize.of([float(s) * factor for s in layer.scale])
        units = getattr(layer, "units", None)  # napari >= 0.5: pint units per axis
        if units is not None and len(units) == len(layer.scale) == 3:
            return VoxelSize.of([float((s * u).to("angstrom").magnitude) for s, u in zip(layer.scale, units)])
    except Exception:  # noqa: BLE001 - pixels or other non-length units (pint's errors vary): no voxel size
        return None
    return None


def parse_voxel_size(text: str) -> VoxelSize:
    """One size in Å (cubic voxels) or ``z, y, x`` in Å, as typed."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise InputError("the voxel size is unknown (the layer does not record it): type it in Å, e.g. 10.")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"voxel size: '{text}' is not one number or three (z, y, x) in Å.") from None
    return VoxelSize.of(values[0] if len(values) == 1 else values)


def measurement_features(table: dict[str, np.ndarray]):
    """The measurements as a napari features table: one row per vesicle, ``index`` naming its label."""
    import pandas as pd

    frame = pd.DataFrame({name: np.asarray(values) for name, values in table.items()})
    frame.insert(0, "index", frame["label"].to_numpy())  # napari maps rows to label values by this column
    return frame


def segment_tomogram(predictor, volume, voxel: VoxelSize, settings: VesicleSettings, classifier=None,
                     keep: list[str] | None = None):
    """Vesicles of ``volume`` ``(Z, Y, X)`` and their measurements: ``(VesicleSegmentation, table)``."""
    from biosam.tomogram import measure_vesicles, segment_vesicles

    result = segment_vesicles(predictor, np.asarray(volume), voxel, settings, classifier=classifier, keep=keep,
                              progress=False)
    return result, measure_vesicles(result.labels, voxel, result.scores)


def _spin(kind, low, high, value, step=1):
    box = QSpinBox() if kind is int else QDoubleSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setSingleStep(step)
    return box


def _file_row(edit: QLineEdit, browse) -> QHBoxLayout:
    button = QPushButton("Browse…")
    button.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(edit)
    row.addWidget(button)
    return row


class TomogramWidget(RunPanel):
    """Find, segment and measure vesicles in a tomogram layer."""

    task = "vesicle segmentation"

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None  # the running worker, None when idle
        self.result_layer = None  # the last Labels layer added

        self.image_box = ImageLayerBox(napari_viewer)
        self.model_selector = ModelSelector()
        self.voxel_edit = QLineEdit()
        self.voxel_edit.setPlaceholderText("Å, or z, y, x in Å")
        self.method_box = QComboBox()
        self.method_box.addItems(CANDIDATE_METHODS)
        self.method_box.setCurrentText(_DEFAULTS["method"])
        self.polarity_box = QComboBox()
        self.polarity_box.addItems(POLARITY_CHOICES)
        self.polarity_box.setCurrentText(_DEFAULTS["polarity"])
        self.slab_thickness_spin = _spin(int, 1, 1000, _DEFAULTS["slab_thickness"])
        self.slab_thickness_spin.setToolTip("Slices averaged into a slab (decoder method: nm).")
        self.slabs_spin = _spin(int, 1, 1000, _DEFAULTS["n_slabs"])
        self.slabs_spin.setToolTip("lumen, hough, amg: slabs at evenly spaced depths (duplicates merged).")
        self.slab_step_spin = _spin(int, 1, 1000, _DEFAULTS["slab_step"])
        self.slab_step_spin.setToolTip("decoder: nm between the centres of successive slabs.")
        self.min_diameter_spin = _spin(float, 0.0, 10000.0, _DEFAULTS["min_diameter_nm"])
        self.max_diameter_spin = _spin(float, 0.0, 10000.0, _DEFAULTS["max_diameter_nm"])
        self.classifier_edit = QLineEdit()
        self.classifier_edit.setPlaceholderText("optional: a mask classifier (.pt)")
        self.keep_edit = QLineEdit()
        self.keep_edit.setPlaceholderText("classes to keep (default: all but background)")
        self.csv_edit = QLineEdit()
        self.csv_edit.setPlaceholderText("optional: save the measurements (.csv)")
        self.overwrite_box = QCheckBox("Replace an existing CSV")
        self.run_button = QPushButton("Find vesicles")
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Tomogram", self.image_box)
        form.addRow("Voxel size (Å)", self.voxel_edit)
        form.addRow("Method", self.method_box)
        form.addRow("Polarity", self.polarity_box)
        form.addRow("Slab thickness", self.slab_thickness_spin)
        form.addRow("Slabs", self.slabs_spin)
        form.addRow("Slab step (nm)", self.slab_step_spin)
        form.addRow("Min diameter (nm)", self.min_diameter_spin)
        form.addRow("Max diameter (nm)", self.max_diameter_spin)
        form.addRow("Classifier", _file_row(self.classifier_edit, self._browse_classifier))
        form.addRow("Keep classes", self.keep_edit)
        form.addRow("Measurements", _file_row(self.csv_edit, self._browse_csv))
        form.addRow(self.overwrite_box)
        layout = QVBoxLayout(self)
        layout.addWidget(self.model_selector)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch()

        self.image_box.currentTextChanged.connect(self._fill_voxel_size)
        self.run_button.clicked.connect(self.run)
        self._fill_voxel_size()

    # -- reading the fields -----------------------------------------------------------------------

    def settings(self) -> VesicleSettings:
        """The settings of the fields, checked by the library."""
        try:
            return VesicleSettings(method=self.method_box.currentText(), polarity=self.polarity_box.currentText(),
                                   slab_thickness=self.slab_thickness_spin.value(), n_slabs=self.slabs_spin.value(),
                                   slab_step=self.slab_step_spin.value(),
                                   min_diameter_nm=self.min_diameter_spin.value(),
                                   max_diameter_nm=self.max_diameter_spin.value())
        except InputError as exc:
            raise in_field_names(exc, _FIELD_NAMES) from exc

    def voxel_size(self) -> VoxelSize:
        """The voxel size in the field (filled from the layer when it records one)."""
        return parse_voxel_size(self.voxel_edit.text())

    def csv_path(self) -> Path | None:
        """Where to save the measurements, checked before any work; None: not saved."""
        from biosam.io.files import check_output_path

        text = self.csv_edit.text().strip()
        return check_output_path(text, (".csv",), self.overwrite_box.isChecked()) if text else None

    # -- running ----------------------------------------------------------------------------------

    def run(self):
        """Start a run on the chosen layer; returns its worker, or None when the input was refused."""
        from biosam import Predictor

        if self.worker is not None:
            return None
        try:
            layer = self.image_box.layer()
            if layer.ndim != 3 or layer.rgb:
                raise InputError(f"{layer.name}: a tomogram is a 3D volume (Z, Y, X); this layer has "
                                 f"{layer.ndim} dimensions{' (RGB)' if layer.rgb else ''}.")
            voxel, settings, csv_path = self.voxel_size(), self.settings(), self.csv_path()
            keep = [k.strip() for k in self.keep_edit.text().split(",") if k.strip()] or None
            # loaded before the worker starts, so a model that cannot load is refused here, with the settings
            predictor = Predictor(self.model_selector.load())
            classifier = self._classifier(predictor.model, keep)
        except BiosamError as exc:
            show_failure(self.task, exc)
            return None
        return self._start(segment_tomogram, predictor, layer_pixels(layer), voxel, settings, classifier, keep,
                           returned=lambda result: self._add_labels(layer, result, csv_path),
                           steps=0,  # the pipeline reports no steps: a busy bar
                           status=f"finding vesicles in {layer.name}…")

    def _classifier(self, model, keep: list[str] | None):
        """The classifier of the field (None when blank), refused now if it does not fit the model."""
        path = self.classifier_edit.text().strip()
        if not path:
            if keep:
                raise InputError("keep classes need a classifier.")
            return None
        from biosam.classify import load_classifier

        judge = load_classifier(path, model, source="tomogram")
        judge.keep_ids(keep)  # unknown class names are refused before any work
        return judge

    def _add_labels(self, layer, result, csv_path: Path | None) -> None:
        segmentation, table = result
        features = measurement_features(table)
        self.result_layer = self.viewer.add_labels(segmentation.labels, name=f"{layer.name} vesicles",
                                                   features=features, **labels_geometry(layer))
        message = f"{len(features)} vesicles in {layer.name} (polarity {segmentation.polarity})"
        if csv_path is not None:
            from biosam.tomogram import write_measurements

            try:
                write_measurements(csv_path, table, overwrite=self.overwrite_box.isChecked())
                message += f"; measurements saved to {csv_path}"
            except (BiosamError, OSError) as exc:  # the layer stays: only the file failed
                show_failure("saving the measurements", exc)
        self.status.setText(message)

    # -- field helpers ----------------------------------------------------------------------------

    def _fill_voxel_size(self, *_: object) -> None:
        """Take the chosen layer's voxel size when it records one; otherwise keep what was typed."""
        try:
            layer = self.image_box.layer()
        except InputError:
            return
        voxel = voxel_size_of_layer(layer)
        if voxel is None:
            return
        z, y, x = voxel.angstrom
        same = math.isclose(z, y) and math.isclose(y, x)
        self.voxel_edit.setText(f"{x:g}" if same else f"{z:g}, {y:g}, {x:g}")

    def _browse_classifier(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Mask classifier", "", "Classifiers (*.pt *.pth);;All files (*)")
        if path:
            self.classifier_edit.setText(path)

    def _browse_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Measurements", "", "CSV (*.csv)")
        if path:
            self.csv_edit.setText(path)
