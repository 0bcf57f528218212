"""A zarr store of image embeddings, so slices, frames and tiles are embedded once.

One chunk per embedding. Entries are keyed by what the embedding depends on
(the model input pixels and their frame), so a store is filled in any order,
by any command, and a run that was interrupted picks up where it stopped: an
entry counts only once its key is written, after its embedding.

The store records the model it belongs to (name, checkpoint hash,
preprocessing, input size, precision); opening it with another model is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import xxhash

from biosam.errors import EmbeddingMismatchError

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
_KEY_BYTES = 16


def model_signature(model: torch.nn.Module) -> dict:
    """What every embedding of ``model`` depends on besides the pixels."""
    info = model.info
    return {"format": STORE_FORMAT, "model": info.name, "checkpoint_hash": info.checkpoint_hash,
            "preprocessing": info.preprocessing, "input_size": model.image_size,
            "precision": getattr(model, "precision", "fp32")}


def image_hash(image: np.ndarray) -> str:
    """Content hash of an image array (values, shape and dtype)."""
    image = np.ascontiguousarray(image)
    h = xxhash.xxh3_128()
    h.update(f"{image.dtype.str}{image.shape}".encode())
    h.update(memoryview(image).cast("B"))
    return h.hexdigest()


def embedding_key(rgb: np.ndarray, frame) -> bytes:
    """128-bit key of one model input: the normalised pixels and how they are placed in the input square."""
    h = xxhash.xxh3_128()
    h.update(f"{frame.image_shape}|{frame.input_size}|{frame.resized}|".encode())
    h.update(image_hash(np.asarray(rgb, dtype=np.float32)).encode())
    return h.digest()


class EmbeddingStore:
    """Embeddings of ``model`` in the zarr group at ``path`` (created when missing).

    ``get(key)`` returns a stored embedding or None; ``put(key, embedding)`` adds one.
    A :class:`biosam.Predictor` given ``store=`` looks up every image, tile and crop
    it embeds here first.
    """

    def __init__(self, path: str | os.PathLike, model: torch.nn.Module) -> None:
        import zarr

        self.path = Path(path)
        self.signature = model_signature(model)
        c, s = model.config.prompt_embed_dim, model.config.image_embedding_size
        self.shape = (c, s, s)
        if self.path.exists():
            try:
                group = zarr.open_group(self.path, mode="r+")
            except Exception as exc:  # noqa: BLE001 - zarr raises several types for "not a group"
                raise EmbeddingMismatchError(
                    f"{self.path}: not a biosam embedding store ({exc}); give a new path or remove it."
                ) from exc
            saved = dict(group.attrs.get("biosam_embeddings") or {})
            if saved != self.signature:
                differing = sorted(k for k in self.signature if saved.get(k) != self.signature.get(k))
                raise EmbeddingMismatchError(
                    f"{self.path}: embeddings of another model or setting ({', '.join(differing) or 'not a store'} "
                    f"differ: stored {[saved.get(k) for k in differing]}, now "
                    f"{[self.signature[k] for k in differing]}); use another path for this model."
                )
        else:
            group = zarr.open_group(self.path, mode="w")
            group.create_array("embeddings", shape=(0, *self.shape), chunks=(1, *self.shape), dtype="float32")
            group.create_array("keys", shape=(0, _KEY_BYTES), chunks=(1024, _KEY_BYTES), dtype="uint8")
            group.attrs["biosam_embeddings"] = self.signature
        self._group = group
        self._embeddings = group["embeddings"]
        self._keys = group["keys"]
        keys = self._keys[:]
        # Rows whose key is all zero were reserved but never finished (interrupted); they are reused.
        self._index = {bytes(row): i for i, row in enumerate(keys) if row.any()}
        self._free = [i for i, row in enumerate(keys) if not row.any()]
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def get(self, key: bytes) -> torch.Tensor | None:
        """The stored embedding ``(1, C, h, w)`` float32 for ``key``, or None."""
        i = self._index.get(key)
        if i is None:
            self.misses += 1
            return None
        self.hits += 1
        return torch.from_numpy(np.asarray(self._embeddings[i]))[None]

    def put(self, key: bytes, embedding: torch.Tensor) -> None:
        """Store ``embedding`` ``(1, C, h, w)`` under ``key`` (no-op if present)."""
        if key in self._index:
            return
        array = embedding.detach().float().cpu().numpy().reshape(self.shape)
        if self._free:
            i = self._free.pop(0)
        else:
            i = self._embeddings.shape[0]
            self._embeddings.resize((i + 1, *self.shape))
            self._keys.resize((i + 1, _KEY_BYTES))
        self._embeddings[i] = array
        self._keys[i] = np.frombuffer(key, dtype=np.uint8)  # last: an interrupted write leaves no key
        self._index[key] = i
