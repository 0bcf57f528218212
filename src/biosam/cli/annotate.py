"""``biosam annotate``: open an image in napari, in its geometry, with the Annotator docked and the model set."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import click

from biosam.cli.common import input_options
from biosam.errors import InputError
from biosam.models.precision import PRECISIONS

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "biosam[napari]"'


def import_napari() -> ModuleType:
    """napari, or a message naming the install that adds it (it is an optional extra)."""
    try:
        import napari
    except ImportError as exc:
        raise InputError(f"biosam annotate needs napari, which is not installed here ({exc}). Install biosam's "
                         f"napari extra: {INSTALL_HINT}") from exc
    return napari


def make_viewer(title: str) -> Any:
    """A napari viewer, not shown yet (tests replace this with a headless one)."""
    napari = import_napari()
    try:
        return napari.Viewer(title=title, show=False)
    except ImportError as exc:  # napari without a Qt binding
        raise InputError(f"napari cannot open a window here ({exc}). Install biosam's napari extra, which brings "
                         f"PyQt5: {INSTALL_HINT}") from exc


def _annotator_class() -> type:
    try:
        from biosam.napari.annotator import AnnotatorWidget
    except ImportError as exc:
        raise InputError(f"the napari Annotator widget cannot be loaded ({exc}); reinstall with "
                         f"{INSTALL_HINT}.") from exc
    return AnnotatorWidget


def _choose(box: Any, value: str | None, option: str) -> None:
    """Select ``value`` in one of the model selector's drop-downs; refuse a value it does not offer."""
    if value is None:
        return
    if box.findText(value) < 0:
        offered = ", ".join(box.itemText(i) for i in range(box.count()))
        raise InputError(f"{option} {value} is not available here (choices: {offered}).")
    box.setCurrentText(value)


@click.command("annotate")
@click.argument("image", type=str)
@click.option("--model", default=None,
              help="Zoo name (see `biosam models`) or checkpoint path to annotate with [default: the widget's].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda if available, else cpu.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Image encoder arithmetic [default: auto].")
@input_options(only=("axes", "level", "series"))
def annotate(image: str, model: str | None, device: str | None, precision: str | None, axes: str | None,
             level: int | None, series: str | None) -> None:
    """Open IMAGE in napari with the Annotator docked.

    IMAGE is anything biosam reads (TIFF, PNG, MRC, NIfTI, DICOM file or series folder, Zarr/OME-Zarr,
    copick://config.json?run=...); it opens with its voxel size and origin as the layer's scale and
    translation. OME-Zarr images open at full resolution (--level N: that level), read lazily. Labels
    layers saved through biosam's writer (File > Save Selected Layers) keep IMAGE's geometry.
    """
    import_napari()  # a missing install is said before anything else
    from biosam.napari.reader import read_layers

    # Bad input stops here, with biosam's message, before a window opens. One resolution level (full unless
    # --level): the Annotator segments the pixels of one level, not a pyramid.
    layers = read_layers(image, level=level, multiscale=False, axes=axes, series_uid=series)
    annotator = _annotator_class()
    viewer = make_viewer(f"biosam: {image}")
    for data, kwargs, layer_type in layers:
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    widget = annotator(viewer)
    if model is not None:
        widget.model_selector.set_model(model)
    _choose(widget.model_selector.device_box, device, "--device")
    _choose(widget.model_selector.precision_box, precision, "--precision")
    viewer.window.add_dock_widget(widget, name="Annotator", area="right")
    viewer.show()
    log.info("napari opened %s; annotate, then save the labels layer (File > Save Selected Layers)", image)
    import_napari().run()
