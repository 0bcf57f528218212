"""``biosam.export.export``: a model (and an instance decoder) to ONNX, TorchScript or a bioimage.io package.

Every request is checked (format, quantization, decoder file, outputs) before anything is written.
ONNX and TorchScript exports write a folder: the image encoder, the prompt decoder, the instance
decoder when one is given, and ``biosam_export.json`` describing them (model, preprocessing, sizes,
input and output names). The files are made in a temporary folder beside the outputs and moved into
place at the end, so a failure leaves the output folder as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from biosam.errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "bioimageio")
MANIFEST = "biosam_export.json"
_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


def output_names(format: str, decoder: bool, quantize: str | None = None) -> dict[str, str]:
    """File names an ONNX / TorchScript export writes into its folder, by part."""
    tag = f".{quantize}" if quantize else ""
    parts = ["encoder", "decoder"] + (["instance_decoder"] if decoder else [])
    names = {part: f"{part}{tag}{_SUFFIX[format]}" for part in parts}
    names["manifest"] = MANIFEST
    return names


def check_request(format: str, quantize: str | None, decoder: str | os.PathLike | None) -> None:
    """Refuse an unknown format, a quantization other than int8 for ONNX, an unreadable decoder file, or a
    missing optional dependency, with :class:`InputError`."""
    from biosam.export.quantize import QUANTIZATIONS

    if format not in FORMATS:
        raise InputError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}.")
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise InputError(f"unknown quantization '{quantize}'; only {', '.join(QUANTIZATIONS)} is supported.")
        if format != "onnx":
            raise InputError(f"--quantize {quantize} works for ONNX exports only, not '{format}'; "
                             "use --format onnx or leave out --quantize.")
    if decoder is not None:
        path = Path(decoder)
        if not path.is_file():
            raise InputError(f"{path}: instance decoder checkpoint not found.")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: cannot read the instance decoder checkpoint (permission denied).")
    if format == "onnx":
        from biosam.export.onnx import require_onnx

        require_onnx()
        if quantize is not None:
            from biosam.export.quantize import require_quantization

            require_quantization()


def _check_outputs(out: Path, names: dict[str, str], overwrite: bool) -> None:
    from biosam.io.files import check_output_path

    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; an export writes a folder of files. Choose a folder name.")
    for name in names.values():
        check_output_path(out / name, None, overwrite)


def _load(model: str | os.PathLike | torch.nn.Module) -> torch.nn.Module:
    from biosam.export.graphs import check_model

    if isinstance(model, torch.nn.Module):
        return check_model(model)
    import biosam

    return check_model(biosam.load_model(model, device="cpu", precision="fp32"))


def _manifest(model, decoder, names: dict[str, str], format: str, quantize: str | None, multimask: bool) -> dict:
    from biosam.export import graphs
    from biosam.models.sam2.model import Sam2

    sam2 = isinstance(model, Sam2)
    info = model.info
    low_res = model.config.low_res_size if sam2 else 4 * model.config.image_embedding_size
    return {
        "format": format,
        "model": info.name if info else None,
        "checkpoint_hash": info.checkpoint_hash if info else None,
        "family": "sam2" if sam2 else "sam",
        "preprocessing": graphs.preprocessing_of(model),
        "image_size": model.image_size,
        "low_res_size": low_res,
        "mask_outputs": 3 if multimask else 1,
        "quantize": quantize,
        "files": {part: name for part, name in names.items() if part != "manifest"},
        "encoder": {"inputs": ["image"],
                    "outputs": list(graphs.SAM2_ENCODER_OUTPUTS if sam2 else graphs.SAM_ENCODER_OUTPUTS)},
        "decoder": {"inputs": list((graphs.SAM2_ENCODER_OUTPUTS if sam2 else graphs.SAM_ENCODER_OUTPUTS)
                                   + graphs.PROMPT_INPUTS), "outputs": list(graphs.DECODER_OUTPUTS)},
        "instance_decoder": None if decoder is None else {
            "inputs": list(graphs.INSTANCE_INPUTS), "outputs": list(graphs.INSTANCE_OUTPUTS),
            "source": (decoder.info or {}).get("source")},
    }


def _write(model, decoder, stage: Path, names: dict[str, str], format: str, quantize: str | None,
           multimask: bool) -> None:
    """Every file of the export into the folder ``stage``."""
    if format == "onnx":
        from biosam.export import onnx as writer
    else:
        from biosam.export import torchscript as writer
    raw = {part: stage / (f"fp32.{name}" if quantize else name) for part, name in names.items() if part != "manifest"}
    writer.export_image_encoder(model, raw["encoder"])
    writer.export_mask_decoder(model, raw["decoder"], multimask=multimask)
    if decoder is not None:
        writer.export_instance_decoder(decoder, raw["instance_decoder"],
                                       embedding_size=model.config.image_embedding_size)
    if quantize:
        from biosam.export.quantize import quantize_int8

        for part, path in raw.items():
            quantize_int8(path, stage / names[part])
            path.unlink()
    manifest = _manifest(model, decoder, names, format, quantize, multimask)
    (stage / names["manifest"]).write_text(json.dumps(manifest, indent=2) + "\n")


def export(
    model: str | os.PathLike | torch.nn.Module = "lite_medsam",
    out: str | os.PathLike = "export",
    format: str = "onnx",
    decoder: str | os.PathLike | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    *,
    multimask: bool = False,
) -> list[Path]:
    """Export ``model`` (zoo name, checkpoint path or loaded model) and return the files written.

    ``format``: ``"onnx"`` or ``"torchscript"`` write the folder ``out`` (see the module docstring
    and :mod:`biosam.export.onnx` for the inputs and outputs); ``"bioimageio"`` writes a bioimage.io
    package ``out``. ``decoder``: an instance decoder checkpoint to export too. ``quantize="int8"``
    (ONNX only) writes int8-weight files (``*.int8.onnx``) instead of fp32 ones. ``multimask``: the
    prompt decoder gives 3 masks per prompt instead of 1. Existing outputs are replaced only with
    ``overwrite``. Raises :class:`InputError` before writing anything for a bad request.
    """
    check_request(format, quantize, decoder)
    out = Path(out)
    if format == "bioimageio":
        if multimask:
            raise InputError("multimask applies to ONNX and TorchScript exports, not to bioimage.io packages.")
        from biosam.export.bioimageio import build_package

        package = build_package(model, out, decoder=decoder, overwrite=overwrite)
        return [Path(package)] if isinstance(package, (str, os.PathLike)) else [Path(p) for p in package]
    names = output_names(format, decoder is not None, quantize)
    _check_outputs(out, names, overwrite)
    loaded = _load(model)
    instance = None
    if decoder is not None:
        from biosam.automatic.ais import load_decoder

        instance = load_decoder(decoder, model=loaded, device="cpu")
    from biosam.io.files import temp_path

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = temp_path(out / "export")
    stage.mkdir()
    try:
        _write(loaded, instance, stage, names, format, quantize, multimask)
        written = []
        for name in names.values():
            os.replace(stage / name, out / name)
            written.append(out / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # the folder this run made, unless something else was put there
        raise
    shutil.rmtree(stage, ignore_errors=True)
    log.info("exported %s to %s: %s", loaded.info.name if loaded.info else "the model", out,
             ", ".join(p.name for p in written))
    return written
