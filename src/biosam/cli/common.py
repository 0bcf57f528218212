"""Options and steps shared by the commands that read an image and write labels."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import click

from biosam.export.runtime import RUNTIMES
from biosam.io.tiff import COMPRESSIONS, DEFAULT_COMPRESSION
from biosam.models.precision import PRECISIONS
from biosam.prompting.intensity import INTENSITY_PRESETS

_INPUT_OPTIONS = {
    "intensity": click.option("--intensity", type=click.Choice(INTENSITY_PRESETS), default="auto", show_default=True,
                 help="Intensity normalisation: auto = uint8 as is, else percentile 1-99.8; ct-* are HU windows."),
    "t": click.option("--t", type=int, default=None, help="Time point of a time series."),
    "channel": click.option("--channel", type=int, default=None,
                 help="Segment this channel alone (default: RGB, or a composite of all channels)."),
    "axes": click.option("--axes", default=None, help="Axis letters of a TIFF or Zarr array when its metadata do not say (e.g. ZYX, YXC)."),
    "level": click.option("--level", type=int, default=None, help="Resolution level of an OME-Zarr image (0 = full resolution)."),
    "series": click.option("--series", default=None, metavar="UID", help="SeriesInstanceUID to read from a DICOM folder holding several."),
    "model": click.option("--model", default="lite_medsam", show_default=True, help="Zoo name (see `biosam models`) or checkpoint path."),
    "device": click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda if available, else cpu."),
    "precision": click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                 help="Image encoder arithmetic; auto = fp32 (bf16 is faster where native but misses our agreement targets)."),
    "runtime": click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                 help="Image encoder runtime on the CPU; auto = torch. onnxruntime / openvino run an ONNX export "
                      "(made once, cached); -int8: int8 weights, masks differ (see the README's CPU runtimes)."),
    "embeddings": click.option("--embeddings", "embeddings", type=click.Path(path_type=Path), default=None,
                 help="Folder of image embeddings: reused when present, added when new (resumes interrupted runs); "
                      "several processes may share one."),
    "overlay": click.option("--overlay", type=click.Path(path_type=Path), help="Also write a picture of the result (.png)."),
    "as_json": click.option("--json", "as_json", is_flag=True, help="Print a JSON report of the result."),
    "overwrite": click.option("--overwrite", is_flag=True, help="Replace existing output files."),
    "compression": click.option("--compression", type=click.Choice(COMPRESSIONS), default=DEFAULT_COMPRESSION,
                 show_default=True, help="Lossless compression of TIFF labels (none: uncompressed); TIFF outputs only."),
}


def input_options(command: Callable | None = None, *, only: tuple[str, ...] | None = None) -> Callable:
    """The options every image-to-labels command takes (reading, model, outputs), or ``only`` the named ones.

    Use as ``@input_options`` or ``@input_options(only=("model", "device"))``.
    """
    unknown = set(only or ()) - set(_INPUT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown shared options {sorted(unknown)}")
    chosen = [option for name, option in _INPUT_OPTIONS.items() if only is None or name in only]

    def apply(cmd: Callable) -> Callable:
        for option in reversed(chosen):
            cmd = option(cmd)
        return cmd

    return apply if command is None else apply(command)


def check_image_fits(meta, model: str, preprocessing: str | None = None) -> None:
    """Refuse, before the model loads, an image too elongated for zoo model ``model`` (see
    :func:`biosam.prompting.preprocess.check_proportions`); a checkpoint file is checked once loaded."""
    from biosam.errors import InputError
    from biosam.prompting.preprocess import check_proportions
    from biosam.zoo.registry import REGISTRY

    spec = REGISTRY.get(model)
    if spec is None or spec.family == "sam2":
        return
    from biosam.io.planes import plane_shape
    from biosam.models.config import CONFIGS

    config = CONFIGS.get(spec.architecture)
    if config is None:
        return
    try:
        check_proportions(plane_shape(meta), config.image_size, preprocessing or spec.preprocessing, model)
    except InputError as exc:
        raise InputError(f"{meta.path}: {exc}") from None


def check_overlay(overlay: Path | None, output: str, overwrite: bool, image: str | None = None) -> None:
    """Refuse a bad ``--overlay`` before any work (type, existing file, unwritable folder, the input ``image``)."""
    from biosam.io.files import check_output_path

    if overlay is not None:
        if overlay.resolve() == Path(output).resolve():
            raise click.UsageError("--overlay and -o must be different files.")
        check_output_path(overlay, (".png",), overwrite, source=image)


def write_overlay(overlay: Path, picture, output: str, overwrite: bool) -> None:
    """Write the overlay; if that fails, take the labels away too (all outputs or none)."""
    from biosam.io import write_image

    try:
        write_image(overlay, picture, overwrite=overwrite)
    except BaseException:
        if not str(output).startswith("copick://"):
            path = Path(output)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        raise
