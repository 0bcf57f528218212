"""The embedding store: each image, tile or crop is embedded once, across runs, interruptions and processes."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner

from biosam import Predictor
from biosam.cli.main import main
from biosam.errors import EmbeddingMismatchError
from biosam.io.files import temp_path
from biosam.prompting import store as store_module
from biosam.prompting.store import EmbeddingStore


@pytest.fixture(scope="module")
def crops(dsb_nuclei):
    image = dsb_nuclei[0]
    return image[:200, :200], image[-200:, -200:]


def test_predictor_reuses_stored_embeddings(tmp_path, lite_medsam, crops):
    path = tmp_path / "emb.zarr"
    predictor = Predictor(lite_medsam, store=path)
    predictor.set_image(crops[0])
    first = predictor.embedding.clone()
    predictor.set_image(crops[1])
    predictor.set_image(crops[0])  # again: from the store
    assert predictor.store.hits == 1 and predictor.store.misses == 2 and len(predictor.store) == 2
    assert torch.equal(predictor.embedding, first)

    reopened = Predictor(lite_medsam, store=path)  # a later run
    reopened.set_image(crops[1])
    assert reopened.store.hits == 1 and reopened.store.misses == 0
    with torch.inference_mode():
        fresh = Predictor(lite_medsam)
        fresh.set_image(crops[1])
    assert torch.equal(reopened.embedding, fresh.embedding)


# ----------------------------------------------------------------------------- the store itself, with small entries

_FAKE_SHAPE = (8, 4, 4)


def _fake_model() -> SimpleNamespace:
    """What EmbeddingStore needs of a model, with small embeddings (no weights: nothing is computed)."""
    return SimpleNamespace(
        info=SimpleNamespace(name="fake", checkpoint_hash="0" * 32, preprocessing="none"), image_size=16, precision="fp32",
        config=SimpleNamespace(prompt_embed_dim=_FAKE_SHAPE[0], image_embedding_size=_FAKE_SHAPE[1]))


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def _value(i: int, writer: int = 0) -> torch.Tensor:
    """The embedding ``writer`` stores under key ``i``."""
    return torch.from_numpy(np.random.default_rng([i, writer]).standard_normal((1, *_FAKE_SHAPE), np.float32))


def _temporaries(path: Path) -> list[str]:
    """Hidden names beside the store and inside it."""
    return [p.name for p in [*path.parent.iterdir(), *(path / "embeddings").iterdir()] if p.name.startswith(".")]


def _dead_pid() -> int:
    """A process id that is not running now."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_interrupted_write_is_ignored_and_cleaned(tmp_path):
    path = tmp_path / "emb.zarr"
    EmbeddingStore(path, _fake_model()).put(_key(1), _value(1))
    entries = path / "embeddings"
    # a writer killed mid-write leaves half an entry under a temporary name (here: of a gone process, 1 h old)
    buffer = io.BytesIO()
    np.save(buffer, _value(2).numpy()[0])
    name = f".{_key(2).hex()}.npy.biosam-"  # the temporary names of biosam.io.files
    abandoned = entries / f"{name}otherhost-4242-0badc0de.tmp"
    abandoned.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    os.utime(abandoned, (time.time() - 3600,) * 2)
    recent = entries / f"{name}otherhost-4243-0badc0de.tmp"  # perhaps still being written elsewhere
    recent.write_bytes(b"\x93NUMPY")
    live_here = temp_path(entries / f"{_key(2).hex()}.npy")  # of a running writer (this process)
    live_here.write_bytes(b"\x93NUMPY")
    os.utime(live_here, (time.time() - 3600,) * 2)
    dead_here = temp_path(entries / f"{_key(3).hex()}.npy")  # of a writer on this host that was killed
    dead_here = dead_here.with_name(dead_here.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    dead_here.write_bytes(b"\x93NUMPY")

    store = EmbeddingStore(path, _fake_model())
    assert len(store) == 1 and _key(2) not in store and store.get(_key(2)) is None  # temporaries do not count
    store.put(_key(2), _value(2))  # published; the first write of a store object also cleans up
    assert len(store) == 2 and torch.equal(store.get(_key(2)), _value(2))
    assert not abandoned.exists() and not dead_here.exists() and recent.exists() and live_here.exists()


def test_damaged_entry_is_recomputed(tmp_path, caplog):
    path = tmp_path / "emb.zarr"
    EmbeddingStore(path, _fake_model()).put(_key(1), _value(1))
    (entry,) = (path / "embeddings").glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:100])  # damaged from outside (e.g. a copy that stopped)
    store = EmbeddingStore(path, _fake_model())
    with caplog.at_level(logging.WARNING, logger="biosam.prompting.store"):
        assert store.get(_key(1)) is None and store.misses == 1
    assert "unreadable embedding" in caplog.text
    store.put(_key(1), _value(1))  # replaces the damaged entry
    assert torch.equal(EmbeddingStore(path, _fake_model()).get(_key(1)), _value(1))


def test_store_of_another_model_is_refused(tmp_path, lite_medsam):
    path = tmp_path / "emb.zarr"
    EmbeddingStore(path, lite_medsam)
    signature_file = path / "biosam-embeddings.json"
    content = json.loads(signature_file.read_text())
    content["biosam_embeddings"]["checkpoint_hash"] = "0" * 32
    signature_file.write_text(json.dumps(content))
    with pytest.raises(EmbeddingMismatchError, match="checkpoint_hash"):
        EmbeddingStore(path, lite_medsam)
    EmbeddingStore(tmp_path / "fake.zarr", _fake_model())
    with pytest.raises(EmbeddingMismatchError, match="input_size, model"):
        EmbeddingStore(tmp_path / "fake.zarr", lite_medsam)
    not_a_store = tmp_path / "x.zarr"
    not_a_store.write_text("hello")
    with pytest.raises(EmbeddingMismatchError, match="x.zarr"):
        EmbeddingStore(not_a_store, lite_medsam)
    someones_folder = tmp_path / "photos"
    someones_folder.mkdir()
    (someones_folder / "a.png").write_bytes(b"png")
    with pytest.raises(EmbeddingMismatchError, match="not a biosam embedding store"):
        EmbeddingStore(someones_folder, lite_medsam)
    assert [p.name for p in someones_folder.iterdir()] == ["a.png"]


def test_store_of_format_1_is_refused(tmp_path, lite_medsam):
    path = tmp_path / "old.zarr"
    group = zarr.open_group(path, mode="w")  # the layout biosam wrote before store format 2
    group.create_array("embeddings", shape=(0, 256, 64, 64), chunks=(1, 256, 64, 64), dtype="float32")
    group.create_array("keys", shape=(0, 16), chunks=(1024, 16), dtype="uint8")
    group.attrs["biosam_embeddings"] = {**store_module.model_signature(lite_medsam), "format": 1}
    with pytest.raises(EmbeddingMismatchError, match="older biosam .*delete or move this folder"):
        EmbeddingStore(path, lite_medsam)


def test_empty_folder_becomes_a_store(tmp_path):
    path = tmp_path / "made_by_user"
    path.mkdir()
    store = EmbeddingStore(path, _fake_model())
    assert len(store) == 0 and (path / "biosam-embeddings.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["made_by_user"]  # no temporary folder left


def test_unwritable_store_still_reads(tmp_path, monkeypatch, caplog):
    path = tmp_path / "emb.zarr"
    EmbeddingStore(path, _fake_model()).put(_key(1), _value(1))

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(store_module.os, "replace", read_only)
    store = EmbeddingStore(path, _fake_model())
    with caplog.at_level(logging.WARNING, logger="biosam.prompting.store"):
        store.put(_key(2), _value(2))  # not kept, and no exception: the caller uses the embedding it has
    assert "cannot write embeddings" in caplog.text
    assert torch.equal(store.get(_key(1)), _value(1)) and _key(2) not in store and not _temporaries(path)


# ----------------------------------------------------------------------------- processes sharing a store


def _write(plan: list[tuple[str, list[int]]], writer: int, barrier, results) -> None:
    """For each (store, keys): put this writer's values one by one, reading random keys in between.

    Reports how many reads returned something other than one of the writers' values for that key.
    """
    wrong = 0
    for path, keys in plan:
        store = EmbeddingStore(path, _fake_model())  # any writer may be the one creating the store
        barrier.wait()  # all start putting at the same moment
        others = np.random.default_rng(writer).integers(0, 2 * len(keys), len(keys))
        for i, j in zip(keys, others):
            store.put(_key(i), _value(i, writer))
            seen = store.get(_key(int(j)))
            if seen is not None and not any(torch.equal(seen, _value(int(j), w)) for w in (1, 2)):
                wrong += 1
    results.put((writer, wrong))


@pytest.fixture(scope="module")
def shared_stores(tmp_path_factory) -> tuple[Path, Path, int]:
    """Two processes write into two new stores at once: different keys into the first, the same keys into the second.

    Each writer stores its own values (``_value(i, writer)``), so a lost, swapped or mixed entry shows.
    """
    folder = tmp_path_factory.mktemp("shared")
    different, same, n = folder / "different.zarr", folder / "same.zarr", 150
    plans = [[(str(different), list(range(0, 2 * n, 2))), (str(same), list(range(n)))],
             [(str(different), list(range(1, 2 * n, 2))), (str(same), list(range(n))[::-1])]]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(plans)), context.Queue()
    writers = [context.Process(target=_write, args=(plan, w + 1, barrier, results)) for w, plan in enumerate(plans)]
    for process in writers:
        process.start()
    try:
        reports = dict(results.get(timeout=120) for _ in writers)
    finally:
        for process in writers:
            process.join(timeout=10)
    assert reports == {1: 0, 2: 0}  # no read ever returned another key's value or a partial one
    return different, same, n


def test_processes_writing_different_keys_keep_every_embedding(shared_stores):
    path, _, n = shared_stores
    store = EmbeddingStore(path, _fake_model())
    assert len(store) == 2 * n
    for i in range(2 * n):
        assert torch.equal(store.get(_key(i)), _value(i, 1 + i % 2)), i  # its own writer's value, always
    assert not _temporaries(path)


def test_processes_writing_the_same_keys_keep_one_whole_copy(shared_stores):
    _, path, n = shared_stores
    store = EmbeddingStore(path, _fake_model())
    assert len(store) == n
    for i in range(n):
        got = store.get(_key(i))
        assert torch.equal(got, _value(i, 1)) or torch.equal(got, _value(i, 2)), i
    assert not _temporaries(path)


def test_cli_auto_fills_and_reuses_the_store(tmp_path, crops, lite_medsam):
    image = tmp_path / "nuclei.tif"
    tifffile.imwrite(image, crops[0])
    store = tmp_path / "emb.zarr"
    runner = CliRunner()
    first = runner.invoke(main, ["auto", str(image), "-o", str(tmp_path / "a.tif"), "--embeddings", str(store)])
    assert first.exit_code == 0, first.output
    count = len(EmbeddingStore(store, lite_medsam))
    assert count >= 1
    second = runner.invoke(main, ["auto", str(image), "-o", str(tmp_path / "b.tif"), "--embeddings", str(store)])
    assert second.exit_code == 0, second.output
    assert len(EmbeddingStore(store, lite_medsam)) == count  # nothing new to embed
    assert np.array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))
