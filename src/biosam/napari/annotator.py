"""The interactive annotator: prompt layers in, segmented and committed objects out, for 2D images and volumes.

All model work (loading, embedding, decoding, propagation) runs in one background
worker at a time; requests made meanwhile wait in a queue, so the UI never blocks
and the session is never touched by two threads at once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from biosam.errors import BiosamError, InputError
from biosam.napari.automatic import labels_geometry
from biosam.napari.model_selector import ModelSelector
from biosam.napari.session import AnnotationSession
from biosam.prompting.zoom import ZOOM_MODES

logger = logging.getLogger(__name__)

POINTS, BOXES, CURRENT, COMMITTED = "point_prompts", "prompts", "current_object", "committed_objects"
POSITIVE, NEGATIVE = "positive", "negative"
# key -> (action name, button text); the same actions are the widget's buttons and public methods
SHORTCUTS = {
    "S": ("segment", "Segment [S]"),
    "Shift-S": ("segment_volume", "Segment all slices [Shift+S]"),
    "T": ("toggle_label", "Positive/negative [T]"),
    "C": ("commit", "Commit [C]"),
    "Shift-C": ("clear", "Clear [Shift+C]"),
    "Control-Z": ("undo", "Undo commit [Ctrl+Z]"),
}


def default_store_folder() -> Path:
    """Where embeddings are kept unless the user picks a folder: beside biosam's model cache."""
    from biosam.zoo import cache_dir

    return cache_dir() / "embeddings"


def napari_to_box(vertices: np.ndarray) -> np.ndarray:
    """biosam box ``(x0, y0, x1, y1)`` around napari ``(..., y, x)`` vertices.

    napari puts pixel ``i``'s centre at ``i``, biosam at ``i + 0.5``.
    """
    yx = np.asarray(vertices, dtype=np.float64)[:, -2:] + 0.5
    return np.array([yx[:, 1].min(), yx[:, 0].min(), yx[:, 1].max(), yx[:, 0].max()])


def napari_to_points(coords: np.ndarray) -> np.ndarray:
    """biosam ``(x, y)`` points from napari ``(..., y, x)`` coordinates."""
    return np.asarray(coords, dtype=np.float64)[:, [-1, -2]] + 0.5


def bind_keys(target, actions: dict[str, Callable[[], Any]], owner: QWidget) -> None:
    """Bind ``actions`` (key -> callable) on ``target`` (the viewer or a layer); they are unbound when
    ``owner`` is deleted (a closed dock widget must not leave keys that call into it)."""
    from napari.utils.key_bindings import coerce_keybinding

    bound = {}
    for key, action in actions.items():
        bound[key] = lambda _target, a=action: a()
        target.bind_key(key, bound[key], overwrite=True)

    def unbind(*_: Any) -> None:
        for key, func in bound.items():
            if target.keymap.get(coerce_keybinding(key)) is func:  # not a later widget's binding
                target.bind_key(key, None)

    owner.destroyed.connect(unbind)


@dataclass
class _Job:
    """One queued request: ``work(session, args)`` runs in the worker (None: nothing to run there),
    ``done(result)`` on the UI thread; ``prepare()`` reads the layers on the UI thread when the job starts."""

    name: str
    work: Callable[[AnnotationSession, Any], Any] | None
    done: Callable[[Any], None]
    prepare: Callable[[], Any] = lambda: None


class AnnotatorWidget(QWidget):
    """Segment objects one at a time in the selected image layer and commit them into ``committed_objects``."""

    idle_changed = Signal(bool)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model_selector = ModelSelector(self)
        self.session: AnnotationSession | None = None
        self._session_key: tuple | None = None
        self._layer_for = None  # the image layer the annotation layers were made for
        self._queue: deque[_Job] = deque()
        self._worker = None
        self._positive = True

        self.image_box = QComboBox()
        self.zoom_box = QComboBox()
        self.zoom_box.addItems(ZOOM_MODES)
        self.store_edit = QLineEdit(str(default_store_folder()))
        self.store_edit.setToolTip("Embeddings are kept here (one subfolder per model) and reused next time.")
        self.mode_label = QLabel()
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)  # busy indicator: the steps report no fraction done
        self.progress.hide()

        form = QFormLayout()
        form.addRow("Image", self.image_box)
        form.addRow("Small-object zoom", self.zoom_box)
        form.addRow("Embeddings folder", self.store_edit)
        buttons = QGridLayout()
        self.buttons: dict[str, QPushButton] = {}
        for i, (action, text) in enumerate(SHORTCUTS.values()):
            button = QPushButton(text)
            button.clicked.connect(lambda _=False, a=action: getattr(self, a)())
            buttons.addWidget(button, i // 2, i % 2)
            self.buttons[action] = button
        embed = QPushButton("Compute embedding")
        embed.clicked.connect(self.compute_embedding)
        buttons.addWidget(embed, len(SHORTCUTS) // 2, 0)
        layout = QVBoxLayout(self)
        layout.addWidget(self.model_selector)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.mode_label)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch()
        self._show_mode()

        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        self.viewer.layers.selection.events.active.connect(self._follow_active)
        self._refresh_images()
        # looked up by name at each press, so the keys always call what the buttons call
        bind_keys(self.viewer, {key: (lambda a=action: getattr(self, a)()) for key, (action, _) in SHORTCUTS.items()},
                  self)
        self.image_box.currentTextChanged.connect(self._image_chosen)
        self._image_chosen()

    # -- public actions (buttons, keys, tests) ----------------------------------------------------

    @property
    def idle(self) -> bool:
        """No model work running or waiting."""
        return self._worker is None and not self._queue

    def compute_embedding(self) -> None:
        """Embed the image, or the slice shown (cached in the embeddings folder)."""
        def work(session: AnnotationSession, z: int | None) -> None:
            session.set_slice(z)
            session.embed()

        def shown_slice() -> int | None:
            return self._slider_z() if self.viewer.layers[COMMITTED].ndim == 3 else None

        self._request(_Job("Computing the embedding", work, lambda _: self._say("Embedding ready."), shown_slice))

    def segment(self) -> None:
        """Segment the current object from its prompts on its slice."""
        def work(session: AnnotationSession, prompts: dict) -> None:
            session.set_slice(prompts.pop("z"))
            session.set_prompts(**prompts)
            session.embed()
            session.segment()

        self._request(_Job("Segmenting", work, self._show_current, self._read_prompts))

    def segment_volume(self) -> None:
        """Follow the current object from its prompted slice through the volume."""
        def work(session: AnnotationSession, prompts: dict) -> None:
            session.set_slice(prompts.pop("z"))
            session.set_prompts(**prompts)
            session.segment_volume()

        self._request(_Job("Segmenting through all slices", work, self._show_current, self._read_prompts))

    def commit(self) -> None:
        """Write the current object into ``committed_objects`` with the next free id."""
        def done(_: Any) -> None:
            label = self.session.commit() if self.session is not None else 0
            if not label:
                self._say("Nothing to commit: segment an object first.")
                return
            self._clear_prompt_layers()
            self._refresh(CURRENT, COMMITTED)
            self._say(f"Committed object {label}.")

        self._request(_Job("Committing", None, done))

    def clear(self) -> None:
        """Drop the current object's prompts and mask."""
        def done(_: Any) -> None:
            if self.session is not None:
                self.session.clear()
            self._clear_prompt_layers()
            self._refresh(CURRENT)
            self._say("Cleared.")

        self._request(_Job("Clearing", None, done))

    def undo(self) -> None:
        """Take the last commit back."""
        def done(_: Any) -> None:
            label = self.session.undo() if self.session is not None else None
            self._refresh(COMMITTED)
            self._say("Nothing to undo." if label is None else f"Removed object {label}.")

        self._request(_Job("Undoing", None, done))

    def toggle_label(self) -> None:
        """Switch new points between positive and negative; selected points switch too."""
        self._positive = not self._positive
        label = POSITIVE if self._positive else NEGATIVE
        if POINTS in self.viewer.layers:
            layer = self.viewer.layers[POINTS]
            layer.feature_defaults["label"] = label
            selected = list(layer.selected_data)
            if selected:
                values = layer.features["label"].copy()
                values.iloc[selected] = [NEGATIVE if v == POSITIVE else POSITIVE for v in values.iloc[selected]]
                layer.features = layer.features.assign(label=values)
                layer.refresh_colors()
        self._show_mode()

    # -- layers -----------------------------------------------------------------------------------

    def image_layer(self):
        """The image layer being annotated: the one chosen in the widget."""
        from napari.layers import Image

        name = self.image_box.currentText()
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Image):
            return self.viewer.layers[name]
        raise InputError("no image to annotate: open an image (File > Open) and choose it in the annotator.")

    def _refresh_images(self, *_: Any) -> None:
        from napari.layers import Image

        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        current = self.image_box.currentText()
        self.image_box.blockSignals(True)
        self.image_box.clear()
        self.image_box.addItems(names)
        active = self.viewer.layers.selection.active
        chosen = current if current in names else (active.name if active is not None and active.name in names
                                                   else (names[-1] if names else ""))
        self.image_box.setCurrentText(chosen)
        self.image_box.blockSignals(False)

    def _follow_active(self, event: Any) -> None:
        from napari.layers import Image

        # only before annotation starts: later, clicking another image must not switch away from the work
        if isinstance(event.value, Image) and self._layer_for is None:
            self.image_box.setCurrentText(event.value.name)

    def _image_chosen(self, *_: Any) -> None:
        if self.image_box.currentText():
            try:
                self._ensure_layers(self.image_layer())
            except BiosamError as exc:
                self._notify(str(exc))

    def start_image(self, image, labels: np.ndarray | None = None) -> None:
        """Annotate the image layer ``image`` from scratch (the previous annotation layers are dropped),
        optionally continuing the label image ``labels``; for the series annotator."""
        self._layer_for = None  # the same layer may come back with new data
        self.image_box.setCurrentText(image.name)
        self._ensure_layers(image, keep=False)
        if labels is not None:
            self.viewer.layers[COMMITTED].data[...] = labels
            self._refresh(COMMITTED)

    def _ensure_layers(self, image, keep: bool = True) -> None:
        """Create (or remake for a new image) the prompt and result layers, aligned with ``image``.

        With ``keep``, committed objects of the previous image stay, in a layer renamed after that image.
        """
        if self._layer_for is image and all(name in self.viewer.layers for name in (POINTS, BOXES, CURRENT, COMMITTED)):
            return
        if image.multiscale:
            raise InputError(f"'{image.name}' is a multiscale image; open one resolution level to annotate it.")
        shape = tuple(image.data.shape[:-1] if image.rgb else image.data.shape)
        ndim = len(shape)
        if keep and COMMITTED in self.viewer.layers and self.viewer.layers[COMMITTED].data.any():
            old = self._layer_for.name if self._layer_for is not None else "previous image"
            self.viewer.layers[COMMITTED].name = f"{COMMITTED} ({old})"
        for name in (POINTS, BOXES, CURRENT, COMMITTED):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        # the committed labels carry the image's biosam metadata, so biosam's writer saves them in its geometry
        geometry = labels_geometry(image)
        where = {k: v for k, v in geometry.items() if k != "metadata"}
        self.viewer.add_labels(np.zeros(shape, dtype=np.uint32), name=COMMITTED, **geometry)
        self.viewer.add_labels(np.zeros(shape, dtype=np.uint8), name=CURRENT, opacity=0.6, **where)
        self.viewer.add_shapes(name=BOXES, ndim=ndim, face_color="transparent", edge_color="yellow",
                               edge_width=max(1.0, min(shape[-2:]) / 400), **where)
        points = self.viewer.add_points(
            np.zeros((0, ndim)), name=POINTS, size=max(4.0, min(shape[-2:]) / 60), **where,
            features={"label": np.array([], dtype=object)},
            # a mapping, not a list: each label keeps its colour whatever order the labels are first used in
            face_color="label", face_color_cycle={POSITIVE: "limegreen", NEGATIVE: "red"},
        )
        points.feature_defaults["label"] = POSITIVE if self._positive else NEGATIVE
        for layer in (points, self.viewer.layers[BOXES]):  # their own S (select mode) would shadow the viewer's
            bind_keys(layer, {key: (lambda a=action: getattr(self, a)()) for key, (action, _) in SHORTCUTS.items()},
                      self)
        self.viewer.layers[BOXES].mode = "add_rectangle"
        self.viewer.layers.selection.active = self.viewer.layers[BOXES]
        self._layer_for = image
        self.session = None
        self._session_key = None

    def _read_prompts(self) -> dict:
        """The current object's prompts from the layers (UI thread): the last shape's box, the points on its slice."""
        boxes, points = self.viewer.layers[BOXES], self.viewer.layers[POINTS]
        volume = self.viewer.layers[COMMITTED].ndim == 3
        box = z = None
        if len(boxes.data):
            vertices = np.asarray(boxes.data[-1])
            box = napari_to_box(vertices)
            if volume:
                z = int(round(float(vertices[:, 0].mean())))
        coords = np.asarray(points.data)
        labels = np.asarray(points.features["label"]) if len(coords) else np.zeros(0)
        if volume and len(coords):
            if z is None:
                z = int(round(float(coords[-1, 0])))  # a point-only object lives on the last point's slice
            keep = np.round(coords[:, 0]).astype(int) == z
            coords, labels = coords[keep], labels[keep]
        if volume and z is None:
            z = self._slider_z()
        if box is None and not len(coords):
            raise InputError(f"no prompt for the object: draw a box in the '{BOXES}' layer or add points to "
                             f"'{POINTS}', then segment.")
        return {"box": box, "points": napari_to_points(coords) if len(coords) else None,
                "point_labels": (labels == POSITIVE).astype(np.int64) if len(coords) else None, "z": z}

    def _clear_prompt_layers(self) -> None:
        if BOXES in self.viewer.layers:
            self.viewer.layers[BOXES].data = []
        if POINTS in self.viewer.layers:
            self.viewer.layers[POINTS].data = np.zeros((0, self.viewer.layers[POINTS].ndim))

    def _refresh(self, *names: str) -> None:
        for name in names:
            if name in self.viewer.layers:
                self.viewer.layers[name].refresh()

    def _slider_z(self) -> int:
        image = self.image_layer()
        point = self.viewer.dims.point[self.viewer.dims.ndim - image.ndim:]
        return int(round(float(image.world_to_data(point)[0])))

    def _show_current(self, _: Any) -> None:
        session = self.session
        self._refresh(CURRENT)
        if session.is_volume and session.z != self._slider_z():
            image = self.image_layer()
            axis = self.viewer.dims.ndim - image.ndim  # the image's z axis among the viewer's
            # the slider follows the object to its slice
            self.viewer.dims.set_point(axis, session.z * image.scale[0] + image.translate[0])
        for message in session.warnings:
            self._notify(message, warning=True)
        reach = f", {session.reach}" if session.reach else ""
        self._say(f"Segmented ({int(session.current.sum())} px{reach}); press C to commit.")

    def _show_mode(self) -> None:
        self.mode_label.setText(f"New points are {POSITIVE if self._positive else NEGATIVE} (T switches).")

    # -- the job queue ----------------------------------------------------------------------------

    def _request(self, job: _Job) -> None:
        if self._queue and self._queue[-1].name == job.name:
            return  # a repeated key press while busy: once is enough
        self._queue.append(job)
        self._next()

    def _next(self) -> None:
        while self._queue and self._worker is None:
            job = self._queue.popleft()
            try:
                self._start(job)
            except BiosamError as exc:
                self._notify(str(exc))
        if self.idle:
            self.progress.hide()
            self.idle_changed.emit(True)

    def _key(self, image) -> tuple:
        store = self.store_edit.text().strip()
        return (id(image), self.model_selector.model_name(), self.model_selector.device(),
                self.model_selector.precision(), store, self.zoom_box.currentText())

    def _start(self, job: _Job) -> None:
        from napari.qt.threading import create_worker

        image = self.image_layer()
        self._ensure_layers(image)
        if job.work is None:
            job.done(None)
            return
        args = job.prepare()
        key = self._key(image)
        session = self.session if key == self._session_key else None
        build = None if session is not None else self._session_builder(image, key)

        def run() -> tuple[AnnotationSession | None, Any]:
            current = session
            try:
                current = current or build()
                return current, job.work(current, args)
            except BiosamError as exc:  # the user's to fix: a message, not a traceback
                return current, exc

        # napari shows unexpected errors (with their traceback) itself; they must not be raised again here
        self._worker = create_worker(run, _start_thread=False, _ignore_errors=True)
        self._worker.returned.connect(lambda result: self._finished(job, key, result))
        self._worker.errored.connect(self._failed)
        self._worker.finished.connect(self._worker_done)
        self.progress.show()
        self._say(f"{job.name}…" if session is not None else f"Loading the model; {job.name.lower()}…")
        self.idle_changed.emit(False)
        self._worker.start()

    def _session_builder(self, image, key: tuple) -> Callable[[], AnnotationSession]:
        """A function (for the worker) making the session; everything it needs is read here, on the UI thread."""
        name, device, precision, store, zoom = key[1:]
        data, rgb = image.data, image.rgb
        committed = self.viewer.layers[COMMITTED].data
        selector = self.model_selector

        def build() -> AnnotationSession:
            from biosam import Predictor
            from biosam.prompting.store import EmbeddingStore
            from biosam.runtime import configure_cpu

            model = selector.load_model(name, device, precision)
            if next(model.parameters()).device.type == "cpu":
                configure_cpu()  # keeps freed activation memory for reuse: up to 2x faster CPU inference
            folder = Path(store).expanduser() / _store_name(model) if store else None
            predictor = Predictor(model, store=EmbeddingStore(folder, model) if folder else None)
            return AnnotationSession(predictor, data, rgb=rgb, zoom=zoom, labels=committed)

        return build

    def _finished(self, job: _Job, key: tuple, result: tuple[AnnotationSession, Any]) -> None:
        session, value = result
        if session is not None and session is not self.session:
            self.session, self._session_key = session, key
            self.viewer.layers[CURRENT].data = session.current  # the layer shows the session's array itself
        if isinstance(value, BiosamError):
            self._notify(str(value))
        else:
            job.done(value)

    def _failed(self, exc: Exception) -> None:
        logger.error("annotator step failed", exc_info=exc)
        self._say(f"Failed: {type(exc).__name__}: {exc}")  # napari's own notification carries the details

    def _worker_done(self) -> None:
        self._worker = None
        self._next()

    # -- messages ---------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.status.setText(text)
        logger.info(text)

    def _notify(self, text: str, warning: bool = False) -> None:
        from napari.utils.notifications import show_error, show_warning

        self._say(text)
        (show_warning if warning else show_error)(text)


def _store_name(model) -> str:
    """One embeddings subfolder per model file and precision (a store belongs to exactly one model)."""
    info = model.info
    stem = Path(info.name).stem if ("/" in info.name or "\\" in info.name) else info.name
    return f"{stem}-{info.checkpoint_hash[:12]}-{model.precision}"
