"""Reading SAM v1 checkpoints, recognising their architecture and loading them strictly.

Handles the layouts in circulation: plain state dicts (Meta SAM, MedSAM, LiteMedSAM),
dicts wrapping one under ``model`` / ``state_dict``, torch_em training files (micro-sam)
with ``model_state`` and a ``sam.`` key prefix, and MobileSAM files that still carry the
TinyViT classifier head. Anything that does not match exactly is an error, never a partial load.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from biosam.errors import BiosamError

from .build import build_sam
from .config import SamConfig, config_name
from .sam import Sam

__all__ = [
    "CheckpointError", "METADATA_KEY", "infer_config", "load_sam_checkpoint", "read_checkpoint", "read_state_dict",
]

logger = logging.getLogger(__name__)

# checked in this order; the first one holding a mapping is unwrapped
_WRAPPER_KEYS = ("model_state", "model", "state_dict")
# the plain dict of facts biosam's fine-tuning writes next to the weights
METADATA_KEY = "biosam"
# MobileSAM keeps TinyViT's ImageNet classifier, which SAM never uses
_UNUSED_PREFIXES = ("image_encoder.head.", "image_encoder.norm_head.")
_MAX_LISTED = 10
_VIT_WINDOW = 14
_VIT_PATCH = 16
# TinyViT patch-embed kernel size -> (patch stride, input size giving a 64 x 64 embedding)
_TINY_PATCH_KERNELS = {1: (1, 256), 3: (4, 1024)}


class CheckpointError(BiosamError):
    """A checkpoint that cannot be read or does not fit a SAM v1 architecture."""


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, unwrapped and with SAM v1 key names.

    Only tensors and plain containers are unpickled (``weights_only=True``); other
    Python objects make the file unreadable here rather than executing code from it.
    """
    state, metadata = read_checkpoint(path)
    if metadata is not None and metadata.get("kind") == "lora_adapters":
        raise CheckpointError(
            f"{path}: holds LoRA adapters for the base model '{metadata.get('base_model')}', not a whole model; "
            "load it with biosam.load_model (or --model), which applies them to that base model"
        )
    return state


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """Tensors of a checkpoint file (as :func:`read_state_dict`) and its biosam metadata, if any.

    Files written by biosam's fine-tuning carry a plain ``"biosam"`` dict next to the
    weights (base model, preprocessing, architecture, training settings). An adapter
    file (metadata ``kind`` ``"lora_adapters"``) gives its adapter tensors, which
    only make sense on its base model (see :func:`biosam.load_model`).
    """
    path = Path(path)
    obj = _read_object(path)
    metadata = obj.get(METADATA_KEY) if isinstance(obj, Mapping) else None
    metadata = dict(metadata) if isinstance(metadata, Mapping) else None
    if metadata is not None and metadata.get("kind") == "lora_adapters":
        adapters = obj.get("adapters")
        _check_tensor_mapping(path, adapters)
        return dict(adapters), metadata
    return _unwrap(path, obj), metadata


def _read_object(path: Path) -> object:
    """The unpickled file (weights only), with readable errors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = _load_weights_only(path)
    except Exception as exc:  # torch.load raises many types for foreign files (zip, EOF, key, runtime)
        raise CheckpointError(_unreadable(path, exc, "SAM v1")) from exc
    return obj


def _unwrap(path: Path, obj: object) -> dict[str, Tensor]:
    """The SAM v1 state dict inside a read checkpoint object."""
    state = obj
    if isinstance(state, Mapping):
        for wrapper in _WRAPPER_KEYS:
            inner = state.get(wrapper)
            if isinstance(inner, Mapping):
                state = inner
                if wrapper == "model_state":
                    # torch_em trains a wrapper module whose SAM sits in attribute ``sam``
                    state = {_strip(key, "sam."): value for key, value in state.items()}
                break
    _check_tensor_mapping(path, state)
    state = dict(state)
    if state and all(key.startswith("module.") for key in state):
        # saved from a DataParallel / DistributedDataParallel wrapper
        state = {key[len("module.") :]: value for key, value in state.items()}
    dropped = [key for key in state if key.startswith(_UNUSED_PREFIXES)]
    for key in dropped:
        del state[key]
    if dropped:
        logger.debug("%s: ignoring unused classifier-head tensors %s", path, dropped)
    return state


_MAX_OPAQUE_GLOBALS = 200


def read_plain_checkpoint(path: str | os.PathLike, what: str) -> object:
    """The unpickled contents (tensors and plain containers only) of a biosam ``what`` checkpoint
    (e.g. ``"decoder"``), with an :class:`~biosam.errors.InputError` naming the file when it is
    missing or unreadable."""
    from biosam.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} checkpoint not found.")
    try:
        return _load_weights_only(path)
    except Exception as exc:  # torch.load raises many types for foreign files
        raise InputError(_unreadable(path, exc, what)) from exc


# What a pickle may not call: a checkpoint that names one of these wants to run code, not to hold weights.
_DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "runpy", "importlib", "pty", "ctypes",
    "multiprocessing", "webbrowser", "code", "codeop", "pickle", "_pickle", "marshal", "types", "commands",
})
_DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "compile", "getattr", "setattr", "delattr", "__import__", "open", "globals", "locals", "vars",
    "breakpoint", "input", "apply", "execfile", "exit", "quit", "help",
})


class _UnsafeGlobal(pickle.UnpicklingError):
    """A pickled Python global (class or function) that biosam does not load; ``dangerous`` if it could run code."""

    def __init__(self, name: str, dangerous: bool) -> None:
        super().__init__(name)
        self.name = name
        self.dangerous = dangerous


def _is_dangerous(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    if module in ("", "builtins", "__builtin__"):
        return attribute in _DANGEROUS_BUILTINS
    return module.split(".")[0] in _DANGEROUS_MODULES


def _unreadable(path: Path, exc: BaseException, what: str) -> str:
    """Why ``path`` cannot be read as a ``what`` checkpoint, and what to do: one message for every loader.

    Never passes on PyTorch's advice to load with ``weights_only=False`` (which
    would run whatever code the file holds).
    """
    if isinstance(exc, _UnsafeGlobal) and exc.dangerous:
        return (f"{path}: refused: the file asks to call {exc.name}, which a checkpoint has no reason to do and which "
                "could run commands on this computer. Do not load this file; get the checkpoint from its publisher.")
    if isinstance(exc, _UnsafeGlobal):
        return (f"{path}: not a {what} checkpoint biosam can read: besides tensors it holds a pickled Python object "
                f"({exc.name}) that biosam does not load, for safety (it reads tensors, numbers, strings and "
                "containers only). If you wrote the file, save the weights alone (torch.save(model.state_dict(), "
                "path)); otherwise get the checkpoint from its publisher.")
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    from biosam.io.magic import empty_message, sniff

    if size == 0:
        return empty_message(path)

    kind = sniff(path)
    if kind is not None and "zip" not in kind.name:  # PyTorch files are zip archives
        return f"{path}: not a {what} checkpoint: by its first bytes it is {kind.name}; give the model's .pt/.pth file."
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        head = b""
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):  # neither a zip archive nor a (legacy) pickle
        return (f"{path}: not a {what} checkpoint: not a PyTorch file at all (it starts with {head!r}). Check "
                "that this is the file you meant, or get a fresh copy from its publisher.")
    return (f"{path}: not a {what} checkpoint: PyTorch cannot read it ({type(exc).__name__}: {_torch_reason(exc)}). "
            "The file may be truncated or of another kind; get a fresh copy from its publisher.")


def _torch_reason(exc: BaseException) -> str:
    """The substance of a ``torch.load`` error, without its advice (``weights_only=False``, allow-listing globals)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    lines = [found.group(1)] if found else [line for line in text.splitlines() if line.strip()]
    reason = lines[0].strip() if lines else type(exc).__name__
    reason = re.split(r"\s+Please use |\s+Check the documentation |\. ", reason)[0]
    if "weights_only" in reason or "Weights only load failed" in reason:
        reason = "it holds more than tensors and plain containers"
    return reason.rstrip(" .")


def _opaque_class(full_name: str) -> type:
    """A stand-in for a pickled Python class or function that must not be imported.

    Training files (torch_em / micro-sam) pickle data loaders, transforms and configs next to
    the weights. The stand-in absorbs whatever the pickle passes to it, so the file loads
    without importing or running any of that code; only the tensors are used.
    """
    module, _, name = full_name.rpartition(".")

    def _absorb(self, *args, **kwargs) -> None:
        self.pickled_args = (args, kwargs)

    def _new(cls, *args, **kwargs):
        return object.__new__(cls)

    def _setstate(self, state) -> None:
        self.pickled_state = state

    return type(
        name,
        (),
        {"__module__": module, "__qualname__": name, "__new__": _new, "__init__": _absorb,
         "__setstate__": _setstate, "__call__": _absorb},
    )


def _load_weights_only(path: Path) -> object:
    """``torch.load(weights_only=True)``, with unknown pickled globals replaced by inert stand-ins."""
    opaque: list[type] = []
    while True:
        try:
            with torch.serialization.safe_globals(opaque):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", str(exc))
            if blocked is not None:  # PyTorch's own list of modules that run commands
                raise _UnsafeGlobal(blocked.group(1), dangerous=True) from exc
            unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            if unsupported is None:
                raise
            name = unsupported.group(1)
            if _is_dangerous(name):
                raise _UnsafeGlobal(name, dangerous=True) from exc
            if ("." not in name or len(opaque) >= _MAX_OPAQUE_GLOBALS
                    or any(f"{c.__module__}.{c.__qualname__}" == name for c in opaque)):
                # a builtin, or a stand-in cannot satisfy how the file uses this global
                raise _UnsafeGlobal(name, dangerous=False) from exc
            logger.debug("%s: not unpickling %s (kept as an inert placeholder)", path, name)
            opaque.append(_opaque_class(name))


def infer_config(state_dict: Mapping[str, Tensor]) -> SamConfig:
    """Architecture of a SAM v1 state dict, read from tensor shapes alone."""
    if "image_encoder.patch_embed.proj.weight" in state_dict:
        infer = _infer_vit
    elif "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        infer = _infer_tiny_vit
    elif any(key.startswith(("image_encoder.trunk.", "sam_mask_decoder.")) for key in state_dict):
        raise CheckpointError(
            "this looks like a SAM 2 checkpoint (image_encoder.trunk.* / sam_mask_decoder.* keys), "
            "not a SAM v1 state dict; load it with biosam.load_model or biosam.models.sam2.checkpoint.load_sam2_checkpoint"
        )
    else:
        raise CheckpointError(
            "not a SAM v1 checkpoint: expected an image encoder key 'image_encoder.patch_embed.proj.weight' "
            f"(ViT) or 'image_encoder.patch_embed.seq.0.c.weight' (TinyViT); found keys {_listing(list(state_dict))}"
        )
    for key in ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "mask_decoder.iou_token.weight"):
        if key not in state_dict:
            raise CheckpointError(
                f"not a complete SAM v1 checkpoint: it has an image encoder but no '{key}' "
                "(prompt encoder and mask decoder weights are needed too)"
            )
    try:
        return infer(state_dict)
    except (IndexError, ValueError, TypeError) as exc:  # a tensor with too few dimensions, a zero size, ...
        raise CheckpointError(
            f"the tensor shapes do not describe a SAM v1 architecture ({type(exc).__name__}: {exc}); the file is "
            "damaged or not a SAM checkpoint: get a fresh copy from its publisher"
        ) from None


def load_sam_checkpoint(
    path: str | os.PathLike, config: SamConfig | None = None, state: dict[str, Tensor] | None = None
) -> Sam:
    """Build the model for a checkpoint and load every tensor (eval mode, CPU).

    ``config`` defaults to the architecture inferred from the file. Missing, unexpected or
    mis-shaped tensors raise :class:`CheckpointError` listing them. ``state``: the file's
    tensors when the caller has already read them with :func:`read_state_dict`.
    """
    path = Path(path)
    state = read_state_dict(path) if state is None else state
    if config is None:
        try:
            config = infer_config(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    try:
        model = build_sam(config)
    except ValueError as exc:  # e.g. attention heads that do not divide a width read from a damaged tensor
        raise CheckpointError(
            f"{path}: the tensor shapes describe a {_describe(config)} model that cannot be built ({exc}); the file "
            "is damaged or not a SAM checkpoint: get a fresh copy from its publisher"
        ) from None
    expected = model.state_dict()
    for key in expected:
        # BatchNorm's update counter is not a weight; files exported without it are fine
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    problems = _compare(expected, state)
    if problems:
        try:
            actual = infer_config(state)
        except CheckpointError:
            actual = None
        raise mismatch_error(str(path), _describe(config), problems,
                             None if actual is None else _describe(actual), same=actual == config)
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s as %s", path, _describe(config))
    return model.eval()


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def _check_tensor_mapping(path: Path, state: object) -> None:
    expected = "expected a state dict mapping parameter names to tensors"
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: not a SAM v1 checkpoint: {expected}, found {type(state).__name__}")
    if not state:
        raise CheckpointError(f"{path}: not a SAM v1 checkpoint: {expected}, found an empty mapping")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{path}: not a SAM v1 checkpoint: {expected}, found entry {key!r} of type {type(value).__name__} "
                f"(top-level keys: {_listing([str(k) for k in state])})"
            )


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not a SAM v1 checkpoint: tensor '{key}' is missing")
    return tuple(state[key].shape)


def _indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of keys ``prefix{i}.``; must be 0..n-1."""
    found = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    indices = sorted(found)
    if indices != list(range(len(indices))):
        raise CheckpointError(f"not a SAM v1 checkpoint: '{prefix}*' indices are not contiguous: {indices}")
    return indices


# Tensors whose last dimension is the prompt embedding width (256 in every released SAM v1 model).
_EMBED_DIM_KEYS = (
    "mask_decoder.iou_token.weight",
    "mask_decoder.mask_tokens.weight",
    "prompt_encoder.no_mask_embed.weight",
    "prompt_encoder.not_a_point_embed.weight",
    "prompt_encoder.point_embeddings.0.weight",
)


def _prompt_embed_dim(state: Mapping[str, Tensor]) -> int:
    """The prompt embedding width, as most of the tensors that carry it say.

    A vote, so that one damaged tensor is reported as a shape mismatch against
    the architecture of the rest, instead of deciding the architecture.
    """
    widths = [state[key].shape[-1] for key in _EMBED_DIM_KEYS if key in state and state[key].ndim >= 1]
    neck = state.get("image_encoder.neck.0.weight")  # the image encoder's output conv: (width, C, 1, 1)
    if neck is not None and neck.ndim >= 1:
        widths.append(neck.shape[0])
    if not widths:
        return _shape(state, "mask_decoder.iou_token.weight")[-1]
    return Counter(widths).most_common(1)[0][0]


def _infer_vit(state: Mapping[str, Tensor]) -> SamConfig:
    patch = _shape(state, "image_encoder.patch_embed.proj.weight")  # (D, 3, 16, 16)
    if len(patch) != 4 or patch[2:] != (_VIT_PATCH, _VIT_PATCH):
        raise CheckpointError(f"unsupported ViT patch embedding of shape {patch}: expected (D, 3, 16, 16)")
    embed_dim = patch[0]
    grid = _shape(state, "image_encoder.pos_embed")[1]  # (1, grid, grid, D)
    blocks = _indices(state, "image_encoder.blocks.")
    if not blocks:
        raise CheckpointError("not a SAM v1 checkpoint: no 'image_encoder.blocks.*' tensors")
    head_dim = _shape(state, "image_encoder.blocks.0.attn.rel_pos_h")[1]  # (2 * extent - 1, head_dim)
    if embed_dim % head_dim:
        raise CheckpointError(f"ViT width {embed_dim} is not a multiple of the head width {head_dim} (from rel_pos_h)")
    global_blocks = []
    for i in blocks:
        length = _shape(state, f"image_encoder.blocks.{i}.attn.rel_pos_h")[0]
        if length == 2 * grid - 1:
            global_blocks.append(i)
        elif length != 2 * _VIT_WINDOW - 1:
            raise CheckpointError(
                f"image_encoder.blocks.{i}.attn.rel_pos_h has {length} rows: expected {2 * _VIT_WINDOW - 1} "
                f"({_VIT_WINDOW}x{_VIT_WINDOW} windows) or {2 * grid - 1} (global attention on the {grid}x{grid} grid)"
            )
    return SamConfig(
        encoder="vit",
        image_size=grid * _VIT_PATCH,
        embed_dim=embed_dim,
        depth=len(blocks),
        num_heads=embed_dim // head_dim,
        global_attn_indexes=tuple(global_blocks),
        prompt_embed_dim=_prompt_embed_dim(state),
    )


def _infer_tiny_vit(state: Mapping[str, Tensor]) -> SamConfig:
    kernel = _shape(state, "image_encoder.patch_embed.seq.0.c.weight")[-1]
    if kernel not in _TINY_PATCH_KERNELS:
        raise CheckpointError(
            f"unsupported TinyViT patch embedding kernel {kernel}: expected 1 (LiteMedSAM) or 3 (MobileSAM)"
        )
    patch_stride, image_size = _TINY_PATCH_KERNELS[kernel]
    layers = _indices(state, "image_encoder.layers.")
    if len(layers) < 2:
        raise CheckpointError(f"TinyViT needs at least 2 stages, found {len(layers)}")
    dims = [_shape(state, "image_encoder.patch_embed.seq.2.c.weight")[0]]
    depths = [len(_indices(state, "image_encoder.layers.0.blocks."))]
    heads = [0]
    windows = [0]
    for i in layers[1:]:
        prefix = f"image_encoder.layers.{i}.blocks."
        depths.append(len(_indices(state, prefix)))
        dims.append(_shape(state, prefix + "0.attn.norm.weight")[0])
        num_heads, offsets = _shape(state, prefix + "0.attn.attention_biases")  # (heads, window ** 2)
        window = math.isqrt(offsets)
        if window * window != offsets:
            raise CheckpointError(f"{prefix}0.attn.attention_biases has {offsets} columns, not a square window")
        heads.append(num_heads)
        windows.append(window)
    # the convolutional first stage has no attention; fill its entries the way the published
    # TinyViT configs do (same head width as stage 1, same window as stage 1)
    heads[0] = max(1, dims[0] // (dims[1] // heads[1]))
    windows[0] = windows[1]
    return SamConfig(
        encoder="tiny_vit",
        image_size=image_size,
        embed_dims=tuple(dims),
        depths=tuple(depths),
        tiny_num_heads=tuple(heads),
        window_sizes=tuple(windows),
        patch_stride=patch_stride,
        prompt_embed_dim=_prompt_embed_dim(state),
    )


def _compare(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> list[str]:
    """Human-readable differences in keys and shapes (empty when they match)."""
    mismatched = [
        f"  {key}: expected shape {tuple(tensor.shape)}, found {tuple(found[key].shape)}"
        for key, tensor in expected.items()
        if key in found and found[key].shape != tensor.shape
    ]
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    lines = []
    if mismatched:
        lines.append(f"  {len(mismatched)} tensor(s) with a different shape:")
        lines.extend(mismatched[:_MAX_LISTED])
        if len(mismatched) > _MAX_LISTED:
            lines.append(f"  ... and {len(mismatched) - _MAX_LISTED} more")
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    return lines


def mismatch_error(source: str, architecture: str, problems: list[str], actual: str | None,
                   same: bool = False) -> CheckpointError:
    """The error for tensors that do not fit an architecture (SAM v1 and SAM 2 loaders both raise it).

    ``problems`` are :func:`_compare`'s lines (key, expected and found shape);
    ``actual`` describes the architecture the file's tensors themselves suggest
    (None when they suggest none), ``same`` says it is ``architecture``. The
    last line says what to do.
    """
    lines = [f"{source}: checkpoint does not match the {architecture} architecture:", *problems]
    if actual is not None and not same:
        lines.append(
            f"  the file looks like a {actual} checkpoint: give its path as --model (biosam.load_model(path)) so "
            "that its architecture is read from the file, or choose the zoo model of that architecture "
            "(`biosam models` lists them)"
        )
    elif same:
        lines.append(
            "  every other tensor fits this architecture, so the file is damaged or was changed after saving: "
            "get a fresh copy from its publisher"
        )
    else:
        lines.append("  the file is damaged or not a checkpoint of this architecture: get a fresh copy from its "
                     "publisher, or choose the model it was published for")
    return CheckpointError("\n".join(lines))


def _describe(config: SamConfig) -> str:
    name = config_name(config)
    if config.encoder == "vit":
        shape = f"ViT {config.embed_dim}x{config.depth}, {config.image_size} px"
    else:
        shape = f"TinyViT {config.embed_dims}, patch stride {config.patch_stride}, {config.image_size} px"
    return f"'{name}' ({shape})" if name else f"custom ({shape})"


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")
