"""A folder of image embeddings, so slices, frames and tiles are embedded once, by any number of processes.

Layout (store format 2)::

    STORE/biosam-embeddings.json        the model the embeddings belong to (see model_signature)
    STORE/embeddings/<32 hex>.npy       one float32 (C, h, w) embedding per key (embedding_key)

Entries are keyed by what the embedding depends on (the model input pixels and
their frame), so a store is filled in any order, by any command, and a run that
was interrupted picks up where it stopped.

Every file appears by an atomic rename within its folder: an entry is written
under a hidden temporary name (biosam's usual one, see :mod:`biosam.io.files`) and then
renamed, and a new store is built in a hidden folder beside ``STORE`` and
renamed into place with its signature. Readers therefore see a complete entry
or none, and there is no index to go stale: every lookup asks the file system,
so processes (and workers on a shared file system) read and write one store at
once. A key written twice keeps the copy published first (both hold the same
embedding); the later writer discards its own. Temporary names left by a killed
writer are ignored by readers and removed by a later writer
(:func:`biosam.io.files.remove_stale_temps`): at once when their process on this
host is gone, after :data:`STALE_SECONDS` when written on another host.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import xxhash

from biosam.errors import EmbeddingMismatchError, InputError
from biosam.io.files import remove_stale_temps, remove_stale_temps_in, temp_path

logger = logging.getLogger(__name__)

STORE_FORMAT = 2
SIGNATURE_FILE = "biosam-embeddings.json"
ENTRIES = "embeddings"
STALE_SECONDS = 15 * 60
"""Age after which a temporary entry written on another host counts as abandoned (a put takes milliseconds)."""

_ENTRY = re.compile(r"[0-9a-f]{32}\.npy")


def model_signature(model: torch.nn.Module) -> dict:
    """What every embedding of ``model`` depends on besides the pixels."""
    info = model.info
    return {"format": STORE_FORMAT, "model": info.name, "checkpoint_hash": info.checkpoint_hash,
            "preprocessing": info.preprocessing, "input_size": model.image_size,
            "precision": model.precision}


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


# ----------------------------------------------------------------------------- the store


class EmbeddingStore:
    """Embeddings of ``model`` in the folder ``path`` (created when missing), shared safely between processes.

    ``get(key)`` returns a stored embedding or None; ``put(key, embedding)`` adds one.
    A :class:`biosam.Predictor` given ``store=`` looks up every image, tile and crop
    it embeds here first. ``hits`` and ``misses`` count this object's lookups.
    """

    def __init__(self, path: str | os.PathLike, model: torch.nn.Module) -> None:
        self.path = Path(path)
        self.signature = model_signature(model)
        c, s = model.config.prompt_embed_dim, model.config.image_embedding_size
        self.shape = (c, s, s)
        self.hits = self.misses = 0
        self._entries = self.path / ENTRIES
        self._broken: set[bytes] = set()  # unreadable entries seen by get(): put() replaces them
        self._next_cleaning = 0.0
        self._warned = False
        if not self.path.exists() or _is_empty_dir(self.path):
            self._create()
        self._check()

    # ------------------------------------------------------------------ opening
    def _create(self) -> None:
        """Build the store beside its place and rename it there; if another process was first, use theirs."""
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path, foreign_age=STALE_SECONDS)
            if _is_empty_dir(self.path):
                try:
                    self.path.rmdir()  # an empty folder given as the store: replaced by a complete one
                except OSError:
                    pass  # already gone or filled by another process; the rename below sorts it out
            tmp = temp_path(self.path)
            os.mkdir(tmp)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot create the embedding store ({exc}); "
                             "give a path in a writable folder.") from exc
        try:
            os.mkdir(tmp / ENTRIES)
            content = {"biosam_embeddings": self.signature, "entry_shape": list(self.shape), "dtype": "float32"}
            (tmp / SIGNATURE_FILE).write_text(json.dumps(content, indent=1) + "\n")
            os.rename(tmp, self.path)  # fails if another process put a store (or anything else) there first
        except OSError as exc:
            if not self.path.exists():
                raise InputError(f"{self.path}: cannot create the embedding store ({exc}); "
                                 "give a path in a writable folder.") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _check(self) -> None:
        """Refuse anything but a store of this model."""
        file = self.path / SIGNATURE_FILE
        try:
            saved = json.loads(file.read_text()).get("biosam_embeddings")
        except FileNotFoundError:
            raise EmbeddingMismatchError(self._not_a_store()) from None
        except (OSError, ValueError, AttributeError) as exc:
            raise EmbeddingMismatchError(
                f"{self.path}: not a biosam embedding store ({file.name} unreadable: {exc}); "
                "give a new path or remove it.") from exc
        saved = dict(saved or {})
        expected = json.loads(json.dumps(self.signature))  # as it reads back from JSON
        if saved != expected:
            differing = sorted(k for k in expected if saved.get(k) != expected.get(k))
            raise EmbeddingMismatchError(
                f"{self.path}: embeddings of another model or setting ({', '.join(differing) or 'not a store'} "
                f"differ: stored {[saved.get(k) for k in differing]}, now "
                f"{[expected[k] for k in differing]}); use another path for this model."
            )
        if not self._entries.is_dir():
            raise EmbeddingMismatchError(f"{self.path}: damaged embedding store ({ENTRIES}/ missing); "
                                         "remove the folder and run again.")

    def _not_a_store(self) -> str:
        if self.path.is_file():
            return f"{self.path}: not a biosam embedding store (a file); give a new path or remove it."
        if _old_store(self.path):
            return (f"{self.path}: an embedding store of an older biosam (store format 1), which processes "
                    "running at once could corrupt; delete or move this folder (its embeddings are computed "
                    "again as needed).")
        return f"{self.path}: not a biosam embedding store (no {SIGNATURE_FILE}); give a new path or remove it."

    # ------------------------------------------------------------------ entries
    def _entry(self, key: bytes) -> Path:
        return self._entries / f"{bytes(key).hex()}.npy"

    def __len__(self) -> int:
        """Number of complete entries on disk now (written by any process)."""
        with os.scandir(self._entries) as entries:
            return sum(1 for e in entries if _ENTRY.fullmatch(e.name))

    def __contains__(self, key: bytes) -> bool:
        return self._entry(key).is_file()

    def get(self, key: bytes) -> torch.Tensor | None:
        """The stored embedding ``(1, C, h, w)`` float32 for ``key``, or None."""
        file = self._entry(key)
        try:
            array = np.load(file, allow_pickle=False)
            if array.shape != self.shape or array.dtype != np.float32:
                raise ValueError(f"holds {array.dtype} {array.shape}, expected float32 {self.shape}")
        except FileNotFoundError:
            self.misses += 1
            logger.debug("embedding store %s: miss %s", self.path, file.stem)
            return None
        except (OSError, ValueError) as exc:
            # published entries are complete, so this is damage from outside (disk, a copy); compute it again
            logger.warning("%s: unreadable embedding (%s); computing it again", file, exc)
            self._broken.add(key)
            self.misses += 1
            return None
        self.hits += 1
        logger.debug("embedding store %s: hit %s", self.path, file.stem)
        return torch.from_numpy(array)[None]

    def put(self, key: bytes, embedding: torch.Tensor) -> None:
        """Store ``embedding`` ``(1, C, h, w)`` under ``key`` (no-op if present).

        A store that cannot be written (read-only, disk full) only logs a warning:
        the embedding is still used, it is just not kept.
        """
        file = self._entry(key)
        replace = key in self._broken
        if not replace and file.exists():
            return
        array = np.ascontiguousarray(embedding.detach().float().cpu().numpy().reshape(self.shape))
        self._clean_now_and_then()
        tmp = temp_path(file)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as fh:
                np.lib.format.write_array(fh, array, allow_pickle=False)
            if replace or not file.exists():  # else another writer published it meanwhile: keep theirs
                os.replace(tmp, file)
            self._broken.discard(key)
        except OSError as exc:
            if not (file.exists() and not replace):  # (Windows refuses to replace a file being read)
                self._warn(exc)
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass  # published
            except OSError as exc:
                logger.debug("could not remove %s: %s", tmp, exc)

    def _clean_now_and_then(self) -> None:
        """Remove abandoned temporaries at the first write and every few minutes after."""
        now = time.monotonic()
        if now >= self._next_cleaning:
            self._next_cleaning = now + STALE_SECONDS / 3
            remove_stale_temps_in(self._entries, foreign_age=STALE_SECONDS)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("%s: cannot write embeddings (%s); they are computed but not kept", self.path, exc)


def _is_empty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _old_store(path: Path) -> bool:
    """Whether ``path`` is a zarr group written by the format-1 store."""
    for meta, attrs in (("zarr.json", "attributes"), (".zattrs", None)):
        try:
            data = json.loads((path / meta).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "biosam_embeddings" in (data.get(attrs, {}) if attrs else data):
            return True
    return False
