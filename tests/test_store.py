"""The zarr embedding store: each image, tile or crop is embedded once, across runs and interruptions."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner

from biosam import Predictor
from biosam.cli.main import main
from biosam.errors import EmbeddingMismatchError
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


def test_interrupted_write_is_redone(tmp_path, lite_medsam, crops):
    path = tmp_path / "emb.zarr"
    Predictor(lite_medsam, store=path).set_image(crops[0])
    # an interruption between writing an embedding and its key leaves a row with an all-zero key
    group = zarr.open_group(path, mode="r+")
    n = group["keys"].shape[0]
    group["embeddings"].resize((n + 1, *group["embeddings"].shape[1:]))
    group["keys"].resize((n + 1, group["keys"].shape[1]))
    group["embeddings"][n] = np.full(group["embeddings"].shape[1:], 7.0, dtype=np.float32)
    store = EmbeddingStore(path, lite_medsam)
    assert len(store) == 1  # the unfinished row does not count
    predictor = Predictor(lite_medsam, store=store)
    predictor.set_image(crops[1])
    assert store.misses == 1 and group["keys"].shape[0] == n + 1  # recomputed into the unfinished row
    assert not torch.any(predictor.embedding == 7.0)


def test_store_of_another_model_is_refused(tmp_path, lite_medsam, crops):
    path = tmp_path / "emb.zarr"
    Predictor(lite_medsam, store=path).set_image(crops[0])
    group = zarr.open_group(path, mode="r+")
    group.attrs["biosam_embeddings"] = {**group.attrs["biosam_embeddings"], "checkpoint_hash": "0" * 32}
    with pytest.raises(EmbeddingMismatchError, match="checkpoint_hash"):
        EmbeddingStore(path, lite_medsam)
    not_a_store = tmp_path / "x.zarr"
    not_a_store.write_text("hello")
    with pytest.raises(EmbeddingMismatchError, match="x.zarr"):
        EmbeddingStore(not_a_store, lite_medsam)


def test_cli_auto_fills_and_reuses_the_store(tmp_path, crops):
    image = tmp_path / "nuclei.tif"
    tifffile.imwrite(image, crops[0])
    store = tmp_path / "emb.zarr"
    runner = CliRunner()
    first = runner.invoke(main, ["auto", str(image), "-o", str(tmp_path / "a.tif"), "--embeddings", str(store)])
    assert first.exit_code == 0, first.output
    count = zarr.open_group(store, mode="r")["keys"].shape[0]
    assert count >= 1
    second = runner.invoke(main, ["auto", str(image), "-o", str(tmp_path / "b.tif"), "--embeddings", str(store)])
    assert second.exit_code == 0, second.output
    assert zarr.open_group(store, mode="r")["keys"].shape[0] == count  # nothing new to embed
    assert np.array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))
