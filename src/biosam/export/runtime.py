"""CPU runtimes for the image encoder: ONNX Runtime or OpenVINO in place of torch (``load_model(runtime=...)``).

Only the image encoder changes. Its ONNX file (:func:`biosam.export.onnx.export_image_encoder`, fp32,
optionally with int8 weights from :func:`biosam.export.quantize.quantize_int8`) is written once per
model into ``<cache_dir>/runtimes/`` (the zoo's cache folder, ``$BIOSAM_CACHE_DIR``), named by a
hash of the model's tensors, its input size and the opset, so a later load reuses it. The runtime
session then stands where the torch encoder stood: it takes the same normalised (B, 3, S, S) tensor
and gives the same fp32 tensors, so :class:`biosam.Predictor`, automatic segmentation and volumes
run unchanged. SAM 2 keeps its torch position encoding (it depends on the grid size only).

Runtimes: ``torch``; ``onnxruntime`` and ``openvino`` (fp32, embeddings within 1e-4 relative of
torch); ``onnxruntime-int8`` and ``openvino-int8`` (int8 matrix-product weights: smaller and
different masks, see the README; only when asked for). Both other runtimes use as many threads
as torch (``torch.get_num_threads()`` when the encoder runs), so a process that limits torch's
threads (a Dask worker) limits them too. ``auto`` is torch: the measurements in the README's
"CPU runtimes" section decide whether it changes.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from biosam.errors import InputError

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8")
# Bump when the exported encoder graph changes, so older cached files are not used.
_CACHE_FORMAT = 1
_CACHE_FOLDER = "runtimes"
# The pip extra that brings each runtime (and onnx, which the export needs).
_EXTRAS = {"onnxruntime": "export", "openvino": "openvino"}


def resolve_runtime(runtime: str, device: torch.device | str, precision: str = "auto") -> str:
    """The runtime ``runtime`` means on ``device`` (``auto``: torch), or :class:`InputError` for a bad request.

    Checked before any model loads: the name, a CPU device (the other runtimes run on the CPU) and
    the precision (they compute in fp32 or int8 themselves; an explicit ``bf16`` is refused).
    """
    if runtime not in RUNTIMES:
        raise InputError(f"runtime must be one of {', '.join(RUNTIMES)}, not '{runtime}'.")
    if runtime in ("auto", "torch"):
        return "torch"
    if torch.device(device).type != "cpu":
        raise InputError(f"runtime '{runtime}' runs on the CPU only; use --device cpu, or runtime 'torch' on "
                         f"the {torch.device(device).type} device.")
    if precision == "bf16":
        raise InputError(f"precision 'bf16' is torch's; runtime '{runtime}' computes in "
                         f"{runtime_precision(runtime)}. Use precision 'fp32' or 'auto' with it, or runtime 'torch'.")
    return runtime


def runtime_precision(runtime: str) -> str:
    """The encoder arithmetic of a non-torch runtime: ``int8`` or ``fp32`` (what ``model.precision`` says)."""
    return "int8" if runtime.endswith("-int8") else "fp32"


def use_runtime(model: nn.Module, runtime: str, cache: str | os.PathLike | None = None) -> nn.Module:
    """Run ``model``'s image encoder in ``runtime`` (see the module docstring); ``model`` is changed and returned.

    ``cache``: the folder for the ONNX files (default ``<cache_dir>/runtimes``). Sets
    ``model.runtime`` and ``model.precision`` (``fp32`` or ``int8``).
    """
    from biosam.export.graphs import check_model
    from biosam.models.sam2.model import Sam2

    runtime = resolve_runtime(runtime, model.device, getattr(model, "precision", "fp32"))
    if runtime == "torch":
        model.runtime = "torch"
        return model
    if getattr(model, "runtime", "torch") != "torch":
        raise InputError(f"the model's image encoder already runs in {model.runtime}; load the model again.")
    check_model(model)
    engine, _, quantize = runtime.partition("-")
    _require(runtime)
    path = encoder_file(model, cache, int8=quantize == "int8")
    session = OnnxRuntimeSession(path) if engine == "onnxruntime" else OpenVinoSession(path)
    session.prepare()  # a file the runtime cannot read is reported now, not on the first image
    if isinstance(model, Sam2):
        encoder = _Sam2RuntimeFeatures(model, session)
        model.add_module("runtime_encoder", encoder)
        # Sam2.image_features (prompting and tracking) calls this; the torch trunk stays for unpack_features.
        model._image_features = encoder.forward
    else:
        model.image_encoder = RuntimeEncoder(session)
    model.runtime = runtime
    model.precision = runtime_precision(runtime)
    logger.info("image encoder of %s runs in %s (%s)", _name(model), runtime, path.name)
    return model


def _require(runtime: str) -> None:
    """:class:`InputError` naming the extra to install when a package ``runtime`` needs is missing."""
    engine = runtime.partition("-")[0]
    # the export needs onnx; int8 files are made with onnxruntime's quantization, also for OpenVINO
    needed = {engine: _EXTRAS[engine], "onnx": _EXTRAS[engine]}
    if runtime.endswith("-int8"):
        needed["onnxruntime"] = "export"
    for module, extra in needed.items():
        try:
            __import__(module)
        except ImportError:
            raise InputError(f"runtime '{runtime}' needs the {module} package: pip install "
                             f"'biosam[{extra}]'.") from None


def _name(model: nn.Module) -> str:
    info = getattr(model, "info", None)
    return info.name if info is not None else type(model).__name__


# ----------------------------------------------------------------------------- the cached files
def model_digest(model: nn.Module) -> str:
    """xxh128 of the model's class, input size and tensors: what its exported encoder depends on.

    The tensors, not the checkpoint file: a model changed in memory (adapters merged, fine-tuned)
    gets its own file.
    """
    import xxhash

    h = xxhash.xxh3_128()
    h.update(f"{type(model).__name__}|{model.image_size}|".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def encoder_file(model: nn.Module, cache: str | os.PathLike | None = None, *, int8: bool = False,
                 opset: int | None = None) -> Path:
    """The model's image encoder as an ONNX file in ``cache``: exported (and quantized) once, then reused."""
    from biosam.export.onnx import DEFAULT_OPSET, export_image_encoder

    opset = DEFAULT_OPSET if opset is None else opset
    folder = Path(cache) if cache is not None else _default_cache()
    stem = f"{type(model).__name__.lower()}-{model_digest(model)}-{model.image_size}px-opset{opset}-v{_CACHE_FORMAT}"
    fp32 = folder / f"{stem}.onnx"
    target = folder / f"{stem}.int8.onnx" if int8 else fp32
    if target.is_file():
        logger.info("using the cached encoder %s", target)
        return target
    try:
        if not fp32.is_file():
            logger.info("exporting the image encoder of %s to %s (once per model)", _name(model), fp32)
            export_image_encoder(model, fp32, opset=opset)
        if int8:
            from biosam.export.quantize import quantize_int8

            quantize_int8(fp32, target)
    except OSError as exc:
        raise InputError(f"{folder}: cannot write the exported image encoder there ({exc}); set "
                         "BIOSAM_CACHE_DIR to a writable folder.") from exc
    return target


def _default_cache() -> Path:
    from biosam.zoo import cache_dir

    return cache_dir() / _CACHE_FOLDER


# ----------------------------------------------------------------------------- sessions
class _Session:
    """One ONNX file in a runtime; ``run`` maps a float32 (1, 3, S, S) array to the file's outputs, in order.

    The runtime is set up on first use and again when torch's thread count has changed since, so that
    it always uses the threads torch would.
    """

    engine = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._threads = 0
        self._lock = threading.Lock()
        self._compiled = None

    def prepare(self):
        """The runtime's session for torch's current thread count (set up now if it is not yet)."""
        threads = torch.get_num_threads()
        with self._lock:
            if self._compiled is None or threads != self._threads:
                try:
                    self._compiled = self._open(threads)
                except Exception as exc:  # the runtimes raise their own types for unreadable files
                    raise InputError(f"{self.path}: {self.engine} cannot read this file ({exc}); delete it "
                                     "and load the model again to export the encoder anew.") from exc
                self._threads = threads
            return self._compiled

    def run(self, image: np.ndarray) -> list[np.ndarray]:
        compiled = self.prepare()
        with self._lock:  # one inference at a time: an OpenVINO compiled model's call is not thread-safe
            return self._infer(compiled, image)

    def _open(self, threads: int):
        raise NotImplementedError

    def _infer(self, compiled, image: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError


class OnnxRuntimeSession(_Session):
    """An ONNX Runtime CPU session."""

    engine = "ONNX Runtime"

    def _open(self, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _infer(self, session, image: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {"image": image})


class OpenVinoSession(_Session):
    """An OpenVINO CPU compiled model, reading the ONNX file directly."""

    engine = "OpenVINO"

    def _open(self, threads: int):
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            # the CPU plugin otherwise computes in bf16 where the CPU has it (AMX, AVX512-BF16)
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            # threads not pinned to cores: other processes (Dask workers) share them
            "ENABLE_CPU_PINNING": False,
        }
        return core.compile_model(core.read_model(str(self.path)), "CPU", config)

    def _infer(self, compiled, image: np.ndarray) -> list[np.ndarray]:
        outputs = compiled(image, share_outputs=False)  # own copies: the request's buffers are reused
        return [outputs[i] for i in range(len(compiled.outputs))]


def _run(session: _Session, images: torch.Tensor) -> list[torch.Tensor]:
    """The session on each image of the batch (the files take one at a time), outputs concatenated."""
    x = images.detach().to("cpu", torch.float32).contiguous().numpy()
    parts = [session.run(x[i : i + 1]) for i in range(x.shape[0])]
    return [torch.cat([torch.from_numpy(np.asarray(p[k])) for p in parts]).to(images.device)
            for k in range(len(parts[0]))]


class RuntimeEncoder(nn.Module):
    """Stands in for a SAM v1 image encoder: (B, 3, S, S) -> (B, 256, h, w) fp32, computed by ``session``."""

    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session = session

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _run(self.session, images)[0]


class _Sam2RuntimeFeatures(nn.Module):
    """Stands in for ``Sam2._image_features``: (B, 3, S, S) -> :class:`Sam2ImageFeatures` from ``session``."""

    def __init__(self, model: nn.Module, session: _Session) -> None:
        super().__init__()
        self.session = session
        self._model = [model]  # not a submodule: the model owns this one
        # the file gives the top level with the no-memory embedding added (the decoder's input); taken off here
        self._no_mem = model.config.directly_add_no_mem_embed

    def forward(self, images: torch.Tensor):
        from biosam.models.sam2.model import Sam2ImageFeatures

        model = self._model[0]
        embed, s0, s1 = _run(self.session, images)
        if self._no_mem:
            embed = embed - model.no_mem_embed.detach().view(1, -1, 1, 1).to(embed)
        return Sam2ImageFeatures(embed, (s0, s1), model.image_encoder.neck.position_encoding(embed))
