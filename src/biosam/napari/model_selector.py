"""The model selector shared by the napari widgets: domain, size, model or checkpoint, device, precision."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QWidget,
)

from biosam.errors import InputError
from biosam.models.precision import PRECISIONS
from biosam.zoo import REGISTRY
from biosam.zoo.choice import DEFAULT_MODEL, DOMAINS, SIZES, domains_of, models_for, size_of

logger = logging.getLogger(__name__)

_AUTO = "auto"


class ModelSelector(QWidget):
    """Pick a zoo model by domain and size (or a checkpoint file), the device and the precision.

    ``changed`` fires whenever what :meth:`load` would return changes.
    """

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._cache: dict[tuple[str, str | None, str], torch.nn.Module] = {}
        self._lock = threading.Lock()  # widgets load from their background workers
        self._quiet = False  # set while several dropdowns change together: one `changed` for all

        self.domain_box = QComboBox()
        self.domain_box.addItems(DOMAINS)
        self.size_box = QComboBox()
        self.size_box.addItems(SIZES)
        self.model_box = QComboBox()
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("or a checkpoint file (overrides the zoo model)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.device_box = QComboBox()
        self.device_box.addItems([_AUTO, "cpu"] + (["cuda"] if torch.cuda.is_available() else []))
        self.precision_box = QComboBox()
        self.precision_box.addItems(PRECISIONS)

        checkpoint_row = QHBoxLayout()
        checkpoint_row.addWidget(self.checkpoint_edit)
        checkpoint_row.addWidget(browse)
        form = QFormLayout(self)
        form.addRow("Domain", self.domain_box)
        form.addRow("Size", self.size_box)
        form.addRow("Model", self.model_box)
        form.addRow("Checkpoint", checkpoint_row)
        form.addRow("Device", self.device_box)
        form.addRow("Precision", self.precision_box)

        self.set_model(DEFAULT_MODEL)
        self.domain_box.currentTextChanged.connect(self._refill_models)
        self.size_box.currentTextChanged.connect(self._refill_models)
        self.model_box.currentTextChanged.connect(self._model_chosen)
        self.checkpoint_edit.editingFinished.connect(self._emit)
        self.device_box.currentTextChanged.connect(self._emit)
        self.precision_box.currentTextChanged.connect(self._emit)

    # -- public API -----------------------------------------------------------------------------

    def model_name(self) -> str:
        """The checkpoint path when one is given, else the chosen zoo name ('' when the size has none)."""
        return self.checkpoint_edit.text().strip() or self.model_box.currentText()

    def device(self) -> str | None:
        """``cpu`` or ``cuda``; None for automatic (CUDA when available)."""
        text = self.device_box.currentText()
        return None if text == _AUTO else text

    def precision(self) -> str:
        """One of :data:`biosam.models.precision.PRECISIONS`."""
        return self.precision_box.currentText()

    def set_model(self, name: str) -> None:
        """Select a zoo model (its domain and size follow) or a checkpoint file."""
        name = str(name)
        self._quiet = True
        try:
            if name in REGISTRY:
                spec = REGISTRY[name]
                domains = domains_of(spec)
                if not spec.supported or not domains:
                    raise InputError(f"model '{name}' cannot be used for annotation; choose one from the list.")
                self.checkpoint_edit.clear()
                self.domain_box.setCurrentText(domains[0])
                self.size_box.setCurrentText(size_of(spec))
                self._refill_models()
                self.model_box.setCurrentText(name)
            elif Path(name).expanduser().is_file():
                self.checkpoint_edit.setText(name)
            else:
                raise InputError(f"model '{name}' is neither a zoo name (`biosam models` lists them) "
                                 "nor an existing checkpoint file; check the spelling or the path.")
        finally:
            self._quiet = False
        self._emit()

    def load(self) -> torch.nn.Module:
        """The selected model via :func:`biosam.load_model`, loaded once per (name, device, precision)."""
        return self.load_model(self.model_name(), self.device(), self.precision())

    def load_model(self, name: str, device: str | None, precision: str) -> torch.nn.Module:
        """Like :meth:`load` for given choices; touches no widget, so a background worker may call it."""
        from biosam import load_model  # here, not at import: keeps opening napari's plugin menu fast

        if not name:
            raise InputError("no model of this domain and size; choose another size or give a checkpoint file.")
        key = (name, device, precision)
        with self._lock:
            if key not in self._cache:
                self._cache.clear()  # one model at a time: large checkpoints would pile up in memory
                self._cache[key] = load_model(name, device=device, precision=precision)
            return self._cache[key]

    # -- slots ----------------------------------------------------------------------------------

    def _refill_models(self) -> None:
        names = models_for(self.domain_box.currentText(), self.size_box.currentText())
        was_quiet, self._quiet = self._quiet, True
        self.model_box.clear()
        self.model_box.addItems(names)
        self._quiet = was_quiet
        self._model_chosen()

    def _model_chosen(self) -> None:
        if not self._quiet:
            self.checkpoint_edit.clear()  # picking from the zoo replaces a previously given file
        self._emit()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint file", "",
                                              "Checkpoints (*.pt *.pth *.safetensors);;All files (*)")
        if path:
            self.checkpoint_edit.setText(path)
            self._emit()

    def _emit(self, *_: object) -> None:
        if not self._quiet:
            self.changed.emit()
