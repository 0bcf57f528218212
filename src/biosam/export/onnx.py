"""ONNX files of our models, in the layout the common SAM ONNX tools read.

Two files per model (plus an optional instance decoder):

* image encoder: ``image`` float32 (1, 3, S, S), the normalised, padded model input exactly as
  :meth:`biosam.models.Sam.embed` takes it (:func:`biosam.export.inputs.encoder_input` makes it)
  -> ``image_embeddings`` (1, 256, h, w); for SAM 2 -> ``image_embed`` (the no-memory embedding
  added), ``high_res_feats_0`` (1, 32, 4h, 4w), ``high_res_feats_1`` (1, 64, 2h, 2w).
* prompt encoder + mask decoder: those embeddings, ``point_coords`` (1, N, 2) float (x, y) in
  model-input pixels, ``point_labels`` (1, N) float (1 object, 0 background, 2 / 3 box corners,
  -1 padding), ``mask_input`` (1, 1, 4h, 4w) low-res logits of an earlier call,
  ``has_mask_input`` (1,) 1 or 0, ``orig_im_size`` (2,) float (H, W) -> ``masks`` (1, K, H, W)
  logits at image size (object where > 0), ``iou_predictions`` (1, K), ``low_res_masks``
  (1, K, 4h, 4w). N is dynamic. K is 1 (the mask :class:`biosam.Predictor` gives by default:
  SAM's single-mask output; for SAM 2 with its fallback to the best multimask output when the
  single mask is unstable), or 3 for a decoder exported with ``multimask=True``.
  :func:`biosam.export.inputs.decoder_inputs` builds the prompt inputs (the padding point
  and the token order differ between SAM and SAM 2).

:func:`to_onnx` is the one place that calls ``torch.onnx.export``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from biosam.automatic.decoder import InstanceDecoder
from biosam.errors import InputError
from biosam.export.graphs import Graph, decoder_graph, encoder_graph, fp32, instance_decoder_graph
from biosam.io.files import atomic_path, temp_path

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# protobuf's limit for one file; larger models (ViT-H) keep their weights in NAME.data beside the .onnx.
_PROTO_LIMIT = 2**31 - 2**20


def require_onnx():
    """The ``onnx`` module, or :class:`InputError` naming the extra to install."""
    try:
        import onnx
    except ImportError:
        raise InputError("exporting to ONNX needs the onnx package: pip install 'biosam[export]'.") from None
    return onnx


def to_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: str | os.PathLike,
    *,
    input_names: list[str] | tuple[str, ...],
    output_names: list[str] | tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
    output_shapes: dict[str, tuple[int | str, ...]] | None = None,
) -> Path:
    """Trace ``module`` on ``args`` into the ONNX file ``path`` (checked with ``onnx.checker``), written atomically.

    Uses the TorchScript-based exporter (``dynamo=False``), which traces SAM's shape arithmetic
    into the graph. A model over 2 GB gets its weights in ``path.data`` beside it.
    ``output_shapes`` (sizes, or names of dynamic axes) are declared where the exporter cannot
    infer them, so that tools reading the file see e.g. ``masks`` as (1, 1, height, width).
    """
    onnx = require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = temp_path(path, ".export")  # the exporter may write external weight files: give it a folder
    work.mkdir()
    try:
        traced = work / "model.onnx"
        # Traced with autograd on: our models then take their plain formulation rather than the
        # memory-saving inference paths (strips, chunks, in-place writes), which trace into larger graphs.
        with torch.enable_grad(), warnings.catch_warnings(), _symbolics(opset):
            # shape arithmetic becomes graph ops; the tracer's notes on it (and the exporter's deprecation) are noise
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(module.eval(), tuple(args), str(traced), dynamo=False, input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes or {},
                              opset_version=opset, do_constant_folding=True)
        proto = onnx.load(str(traced))
        _declare_shapes(proto, output_shapes or {})
        _save(onnx, proto, path, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


@contextlib.contextmanager
def _symbolics(opset: int) -> Iterator[None]:
    """Conversions of ops that the stock TorchScript-based exporter gets wrong for our models, while active.

    * ``layer_norm`` with a traced ``normalized_shape`` (our models pass ``(x.shape[-1],)``): the
      stock conversion wants constants; ONNX's LayerNormalization (opset 17) only needs how many
      trailing axes are normalised, which the traced list still tells.
    * ``floor_divide`` of traced sizes: the stock conversion truncates, so ``-(-h // w)`` (a
      ceiling, as in Hiera's window count) comes out one too small; here it floors, as torch does.
    * ``instance_norm`` without affine weights on a traced channel count (the instance decoder
      slices its skip maps by ``x.shape[1]``): the stock conversion wants the count as a constant.
    """
    from torch.onnx import symbolic_helper

    if opset < 17:
        raise InputError(f"ONNX opset {opset} is too old: biosam exports need opset 17 or newer (LayerNormalization).")

    @symbolic_helper.parse_args("v", "v", "v", "v", "f", "none")
    def layer_norm(g, x, normalized_shape, weight, bias, eps, cudnn_enable):
        node = normalized_shape.node()
        if node.kind() == "prim::ListConstruct":
            axes = len(list(node.inputs()))
        else:
            axes = len(symbolic_helper._maybe_get_const(normalized_shape, "is"))
        if symbolic_helper._is_none(weight):
            raise RuntimeError("layer_norm without a weight cannot be exported by biosam")
        inputs = [x, weight] if symbolic_helper._is_none(bias) else [x, weight, bias]
        return g.op("LayerNormalization", *inputs, epsilon_f=eps, axis_i=-axes)

    def floor_divide(g, a, b):
        if symbolic_helper._is_fp(a) or symbolic_helper._is_fp(b):
            return g.op("Floor", g.op("Div", a, b))
        double, int64 = 11, 7  # onnx.TensorProto.DOUBLE, INT64: sizes are exact in float64
        quotient = g.op("Div", g.op("Cast", a, to_i=double), g.op("Cast", b, to_i=double))
        return g.op("Cast", g.op("Floor", quotient), to_i=int64)

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "b", "f", "f", "b")
    def instance_norm(g, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn):
        if not use_input_stats:
            raise RuntimeError("instance_norm with running statistics cannot be exported by biosam")
        channels = g.op("Gather", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([1])))
        if symbolic_helper._is_none(weight):
            weight = g.op("ConstantOfShape", channels, value_t=torch.tensor([1.0]))
        if symbolic_helper._is_none(bias):
            bias = g.op("ConstantOfShape", channels, value_t=torch.tensor([0.0]))
        return g.op("InstanceNormalization", x, weight, bias, epsilon_f=eps)

    overrides = {"aten::layer_norm": layer_norm, "aten::floor_divide": floor_divide,
                 "aten::instance_norm": instance_norm}
    for name, fn in overrides.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in overrides:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def _declare_shapes(proto, shapes: dict[str, tuple[int | str, ...]]) -> None:
    for output in proto.graph.output:
        if output.name in shapes:
            dims = output.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[output.name]:
                dim = dims.add()
                if isinstance(size, str):
                    dim.dim_param = size
                else:
                    dim.dim_value = size


def _save(onnx, proto, path: Path, work: Path) -> None:
    """Write ``proto`` to ``path`` (and ``path.data`` when too large for one file) after checking it."""
    if proto.ByteSize() < _PROTO_LIMIT:
        onnx.checker.check_model(proto)
        with atomic_path(path) as tmp:
            onnx.save_model(proto, str(tmp))
        return
    data = path.with_name(path.name + ".data")
    staged = work / path.name
    onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name)
    onnx.checker.check_model(str(staged))
    with atomic_path(data) as tmp:
        os.replace(work / data.name, tmp)
    with atomic_path(path) as tmp:
        os.replace(staged, tmp)


def _export(graph: Graph, path: str | os.PathLike, opset: int) -> Path:
    return to_onnx(graph.module, graph.args, path, input_names=graph.input_names, output_names=graph.output_names,
                   dynamic_axes=graph.dynamic_axes, opset=opset, output_shapes=graph.output_shapes)


def export_image_encoder(model: torch.nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> Path:
    """The image encoder of a SAM v1 family or SAM 2 model as ONNX (fp32; see the module docstring)."""
    with fp32(model):
        return _export(encoder_graph(model), path, opset)


def export_mask_decoder(
    model: torch.nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, multimask: bool = False
) -> Path:
    """Prompt encoder + mask decoder as ONNX (see the module docstring); ``multimask``: K = 3 masks, else 1."""
    return _export(decoder_graph(model, multimask), path, opset)


def export_instance_decoder(
    decoder: InstanceDecoder, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, embedding_size: int = 64
) -> Path:
    """An instance decoder as ONNX: ``image_embeddings`` (B, 256, h, w) -> ``maps`` (B, 3, S, S), B dynamic."""
    return _export(instance_decoder_graph(decoder, embedding_size), path, opset)
