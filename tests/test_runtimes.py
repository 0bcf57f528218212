"""CPU runtimes for the image encoder (``load_model(runtime=...)``): ONNX Runtime and OpenVINO against torch.

Real LiteMedSAM on the DSB2018 nuclei: fp32 runtimes give embeddings within 1e-4 relative of torch
and the same masks on every ground-truth box; the exported file is made once and then reused.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import biosam
from biosam import Predictor
from biosam.errors import InputError
from biosam.evaluate import boxes_from_labels
from biosam.export.inputs import encoder_input
from biosam.export.runtime import RUNTIMES, resolve_runtime

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnx")

FP32_RUNTIMES = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh model cache for this module (``BIOSAM_CACHE_DIR``): the first load exports into it."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIOSAM_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def runtime_models(cache):
    return {name: biosam.load_model("lite_medsam", device="cpu", runtime=name) for name in FP32_RUNTIMES}


@pytest.fixture(scope="module")
def nuclei(dsb_nuclei):
    image, labels = dsb_nuclei
    boxes, _ = boxes_from_labels(labels)
    return image, boxes


def _masks(model, image, boxes) -> np.ndarray:
    predictor = Predictor(model)
    predictor.set_image(image)
    return predictor.predict(box=boxes, zoom="off").masks


def _ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def test_bad_runtime_is_refused_before_loading():
    # a model that does not exist: the runtime is checked first
    with pytest.raises(InputError, match="runtime must be one of"):
        biosam.load_model("no_such_model", device="cpu", runtime="tensorrt")
    with pytest.raises(InputError, match="precision 'bf16'.*onnxruntime"):
        biosam.load_model("no_such_model", device="cpu", precision="bf16", runtime="onnxruntime")
    with pytest.raises(InputError, match="CPU only"):
        resolve_runtime("openvino", "cuda")
    assert resolve_runtime("auto", "cpu") == resolve_runtime("torch", "cuda") == "torch"
    assert set(RUNTIMES) >= {"auto", "torch", *FP32_RUNTIMES, "onnxruntime-int8", "openvino-int8"}


@pytest.mark.parametrize("runtime", FP32_RUNTIMES)
def test_embeddings_match_torch(runtime, runtime_models, lite_medsam, nuclei):
    model = runtime_models[runtime]
    assert model.runtime == runtime and model.precision == "fp32"
    assert type(model.image_encoder).__name__ == "RuntimeEncoder"
    x, _ = encoder_input(nuclei[0], model.image_size, model.info.preprocessing)
    x = torch.from_numpy(x)
    flipped = x.flip(-1)
    with torch.inference_mode():
        ref = lite_medsam.embed(torch.cat([x, flipped]))
        ours = model.embed(torch.cat([x, flipped]))  # a batch of two: the file takes one image at a time
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    for k in range(2):
        rel = float((ours[k] - ref[k]).norm() / ref[k].norm())
        assert rel < 1e-4, f"{runtime}: embedding {k} differs from torch's by {rel:.2e} relative"


@pytest.mark.parametrize("runtime", FP32_RUNTIMES)
def test_masks_on_ground_truth_boxes_equal_torch(runtime, runtime_models, lite_medsam, nuclei):
    image, boxes = nuclei
    ref = _masks(lite_medsam, image, boxes)
    ours = _masks(runtime_models[runtime], image, boxes)
    assert len(boxes) > 100 and ref.any()
    differing = int((ours != ref).any(axis=(1, 2)).sum())
    assert differing == 0, f"{runtime}: {differing} of {len(boxes)} masks differ from torch's"


def test_second_load_reuses_the_exported_file(runtime_models, cache, caplog):
    files = sorted((cache / "runtimes").glob("*.onnx"))
    assert len(files) == 1, files  # one export served both runtimes
    stamp = files[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="biosam.export.runtime"):
        again = biosam.load_model("lite_medsam", device="cpu", runtime="onnxruntime")
    assert again.runtime == "onnxruntime"
    assert "using the cached encoder" in caplog.text and "exporting" not in caplog.text
    assert sorted((cache / "runtimes").glob("*.onnx")) == files and files[0].stat().st_mtime_ns == stamp


def test_runtime_threads_follow_torch(runtime_models, nuclei):
    model = runtime_models["openvino"]
    x = torch.from_numpy(encoder_input(nuclei[0], model.image_size, model.info.preprocessing)[0])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            model.embed(x)
        assert model.image_encoder.session._threads == 1
    finally:
        torch.set_num_threads(before)


def test_int8_is_close_to_fp32_and_marked(runtime_models, cache, nuclei):
    image, boxes = nuclei
    int8 = biosam.load_model("lite_medsam", device="cpu", runtime="onnxruntime-int8")
    # its own precision: embedding stores and caches keep int8 embeddings apart from fp32 ones
    assert int8.runtime == "onnxruntime-int8" and int8.precision == "int8"
    assert Predictor(int8).model.precision == "int8"
    ious = _ious(_masks(int8, image, boxes), _masks(runtime_models["onnxruntime"], image, boxes))
    assert 0.9 <= ious.mean() < 1.0  # close, but int8 weights do change masks


def test_cli_runtime_option(tmp_path, cache, nuclei, monkeypatch):
    import tifffile
    from click.testing import CliRunner

    from biosam.cli.main import main as cli
    from conftest import shared_file

    monkeypatch.setenv("BIOSAM_CACHE_DIR", str(cache))
    image = shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif")
    box = ",".join(str(int(v)) for v in nuclei[1][0])
    outputs = {}
    for runtime in ("torch", "openvino"):
        out = tmp_path / f"{runtime}.tif"
        result = CliRunner().invoke(cli, ["segment", str(image), "-o", str(out), "--box", box, "--runtime", runtime])
        assert result.exit_code == 0, result.output
        outputs[runtime] = tifffile.imread(out)
    assert outputs["torch"].any() and np.array_equal(outputs["torch"], outputs["openvino"])
    result = CliRunner().invoke(cli, ["segment", str(image), "-o", str(tmp_path / "x.tif"), "--box", box,
                                      "--runtime", "tensorrt"])
    assert result.exit_code != 0 and "tensorrt" in result.output and not (tmp_path / "x.tif").exists()


def test_sam2_features_match_torch(tmp_path):
    """SAM 2 (seeded random Hiera-tiny at 256 px): the file's decoder inputs stand in for the torch image features."""
    import dataclasses

    from biosam.export.runtime import use_runtime
    from biosam.models.sam2.config import SAM2_CONFIGS
    from biosam.models.sam2.model import Sam2

    config = dataclasses.replace(SAM2_CONFIGS["sam2.1_hiera_tiny"], image_size=256)
    torch.manual_seed(0)
    ref = Sam2(config).eval()
    model = Sam2(config).eval()
    model.load_state_dict(ref.state_dict())
    use_runtime(model, "onnxruntime", cache=tmp_path)
    assert model.runtime == "onnxruntime" and len(list(tmp_path.glob("sam2-*.onnx"))) == 1
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = ref.image_features(x), model.image_features(x)
        for name, u, v in zip(("embedding", "high_res 0", "high_res 1"), (a.embedding, *a.high_res),
                              (b.embedding, *b.high_res)):
            assert u.shape == v.shape and float((u - v).norm() / u.norm()) < 1e-4, name
        boxes = torch.tensor([[30.0, 40.0, 120.0, 150.0], [100.0, 20.0, 250.0, 90.0]])
        ours, theirs = model.decode(model.embed(x[:1]), boxes=boxes)[0], ref.decode(ref.embed(x[:1]), boxes=boxes)[0]
    assert torch.equal(ours > 0, theirs > 0)
