"""``biosam export``: a model as ONNX, TorchScript or a bioimage.io package."""

from __future__ import annotations

import json

import click

from biosam.cli.common import input_options
from biosam.export.api import FORMATS
from biosam.export.quantize import QUANTIZATIONS


@click.command("export")
@click.argument("model", type=str)
@click.option("-o", "--output", required=True, type=str,
              help="Folder to write (onnx, torchscript), or the bioimage.io package to write (bioimageio).")
@click.option("--format", "format_", type=click.Choice(FORMATS), default="onnx", show_default=True,
              help="onnx: image encoder + prompt decoder in the SAM ONNX layout; torchscript: the same as "
                   "TorchScript; bioimageio: a bioimage.io model package.")
@click.option("--decoder", default=None, type=str, help="Instance decoder checkpoint to export with the model.")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=None,
              help="ONNX only: write int8-weight files (smaller, masks differ a little from fp32; see the README).")
@click.option("--multimask", is_flag=True, help="The prompt decoder returns 3 masks per prompt instead of 1.")
@input_options(only=("as_json", "overwrite"))
def export(model, output, format_, decoder, quantize, multimask, as_json, overwrite) -> None:
    """Export MODEL (a zoo name, see `biosam models`, or a checkpoint) to OUTPUT.

    The ONNX and TorchScript files take the model input that `biosam.export.inputs.encoder_input`
    makes and give masks at image size; their inputs and outputs are listed in OUTPUT's
    biosam_export.json and in the README. Nothing is written when the request is invalid.
    """
    from biosam.export import export as run_export

    written = run_export(model, output, format=format_, decoder=decoder, quantize=quantize,
                         overwrite=overwrite, multimask=multimask)
    if as_json:
        click.echo(json.dumps({"model": model, "format": format_, "quantize": quantize,
                               "files": [str(p) for p in written]}, indent=2))
    else:
        for path in written:
            click.echo(str(path))
