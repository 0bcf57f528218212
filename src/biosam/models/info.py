"""What a loaded model is: its name, preprocessing and checkpoint (``model.info``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from biosam.zoo import ModelSpec


def hash_file(h: xxhash.xxh3_128, path: str | os.PathLike) -> None:
    """Feed a file's bytes to ``h`` in 16 MiB chunks (checkpoints are GBs)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)


def file_hash(path: str | os.PathLike) -> str:
    """xxh128 of a file's bytes."""
    h = xxhash.xxh3_128()
    hash_file(h, path)
    return h.hexdigest()


@dataclass
class ModelInfo:
    """Where a loaded model came from and how its inputs must be prepared.

    ``metadata``: what a checkpoint written by biosam's fine-tuning records (base
    model, preprocessing, architecture, settings, metrics); None for other files.
    """

    name: str
    preprocessing: str
    checkpoint: Path
    spec: ModelSpec | None = None
    metadata: dict | None = field(default=None, repr=False)
    _hash: str | None = field(default=None, repr=False)

    @property
    def box_only(self) -> bool:
        """Whether the model was trained with box prompts only: its zoo entry says so (``prompt: box`` in its
        defaults, e.g. LiteMedSAM, MedSAM). A model fine-tuned by biosam may have learnt points, so it is not."""
        return self.metadata is None and self.spec is not None and self.spec.defaults.get("prompt") == "box"

    @property
    def checkpoint_hash(self) -> str:
        """:func:`file_hash` of the checkpoint (computed once, on first use)."""
        if self._hash is None:
            self._hash = file_hash(self.checkpoint)
        return self._hash
