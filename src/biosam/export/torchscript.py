"""TorchScript files of our models: the same graphs, inputs and outputs as the ONNX files
(:mod:`biosam.export.onnx`), loadable with ``torch.jit.load`` without biosam."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from biosam.automatic.decoder import InstanceDecoder
from biosam.export.graphs import Graph, decoder_graph, encoder_graph, fp32, instance_decoder_graph
from biosam.io.files import atomic_path


def to_torchscript(module: torch.nn.Module, args: tuple, path: str | os.PathLike) -> Path:
    """Trace ``module`` on ``args`` and save it to ``path`` (written atomically)."""
    path = Path(path)
    # autograd on: the models' plain formulation, as for ONNX (see biosam.export.onnx.to_onnx)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notes
        # check_trace would re-run the model to compare; the exported files are checked by their tests instead
        traced = torch.jit.trace(module.eval(), tuple(args), check_trace=False)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, str(tmp))
    return path


def _export(graph: Graph, path: str | os.PathLike) -> Path:
    return to_torchscript(graph.module, graph.args, path)


def export_image_encoder(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """The image encoder as TorchScript (fp32), as :func:`biosam.export.onnx.export_image_encoder`."""
    with fp32(model):
        return _export(encoder_graph(model), path)


def export_mask_decoder(model: torch.nn.Module, path: str | os.PathLike, *, multimask: bool = False) -> Path:
    """Prompt encoder + mask decoder as TorchScript, as :func:`biosam.export.onnx.export_mask_decoder`."""
    return _export(decoder_graph(model, multimask), path)


def export_instance_decoder(decoder: InstanceDecoder, path: str | os.PathLike, *, embedding_size: int = 64) -> Path:
    """An instance decoder as TorchScript, as :func:`biosam.export.onnx.export_instance_decoder`."""
    return _export(instance_decoder_graph(decoder, embedding_size), path)
