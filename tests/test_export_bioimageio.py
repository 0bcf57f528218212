"""bioimage.io packages (``biosam export --format bioimageio``): validated by bioimageio.spec, run by bioimageio.core.

The real LiteMedSAM, without and with the shipped nuclei decoder. The decoder package's maps on a real
DSB2018 nuclei image (../shared/data) are compared with biosam's own PyTorch model; the spec's
preprocessing steps, run by bioimageio.core, are compared with biosam's preprocessing on real images.
"""

from __future__ import annotations

import json
import types
import zipfile

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from biosam.automatic.ais import (
    DecoderMismatchError,
    encoder_info,
    load_decoder,
    predict_maps,
    save_decoder,
    shipped_decoder_path,
)
from biosam.automatic.decoder import InstanceDecoder
from biosam.errors import InputError
from biosam.export import bioimageio as bio
from biosam.export.bioimageio_rdf import network_minmax, preprocessing_steps, weights_source, zoo_source
from biosam.models.info import ModelInfo
from biosam.prompting import preprocess
from biosam.prompting.intensity import normalize_intensity

from conftest import shared_file

MEDSAM_DOI = "10.1038/s41467-024-44824-z"


@pytest.fixture(scope="module")
def model():
    import biosam

    return biosam.load_model("lite_medsam", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def encoder_package(tmp_path_factory):
    """The image-encoder package of the zoo name, written without biosam's own bioimage.io test (the test runs it)."""
    return bio.build_package("lite_medsam", tmp_path_factory.mktemp("encoder") / "lite_medsam.zip", check=False)


@pytest.fixture(scope="module")
def decoder_package(model, tmp_path_factory):
    """The instance-segmentation package (shipped nuclei decoder); its outputs are checked by the test itself."""
    return bio.build_package(model, tmp_path_factory.mktemp("decoder") / "nuclei.zip",
                             decoder=shipped_decoder_path("lite_medsam", "nuclei"), check=False)


def _load(path):
    from bioimageio.spec import load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    descr = load_description(path)
    assert isinstance(descr, ModelDescr), descr.validation_summary.format()
    return descr


def test_encoder_package_validates_and_passes_bioimageio_test(encoder_package, model):
    import bioimageio.core

    descr = _load(encoder_package)
    assert descr.format_version.startswith("0.5")
    assert descr.license == "Apache-2.0"
    assert MEDSAM_DOI in [str(c.doi) for c in descr.cite]
    assert descr.weights.torchscript is not None and descr.weights.onnx is not None
    steps = [p.id for p in descr.inputs[0].preprocessing]
    assert steps == ["ensure_dtype", "scale_range", "clip", "ensure_dtype"]
    assert descr.inputs[0].axes[2].size == descr.inputs[0].axes[3].size == 256

    summary = bioimageio.core.test_model(encoder_package, devices=["cpu"])
    assert summary.status == "passed", summary.format()
    names = {d.name for d in summary.details if d.status == "passed"}
    for weights in ("onnx", "torchscript"):
        assert f"Reproduce test outputs from test inputs ({weights})" in names

    with zipfile.ZipFile(encoder_package) as z:
        test_input = np.load(z.open("test_input.npy"))
        test_output = np.load(z.open("test_output.npy"))
        readme = z.read("README.md").decode()
        cover = iio.imread(z.read("cover.png"), extension=".png")
    # The test output is biosam's embedding of the test image (gray cell.png, the same plane in each channel).
    assert test_input.shape == (1, 3, 256, 256) and (test_input[0, 0] == test_input[0, 2]).all()
    import biosam

    predictor = biosam.Predictor(model)
    predictor.set_image(test_input[0, 0], intensity="auto")
    expected = predictor.embedding.numpy()
    assert test_output.shape == expected.shape == (1, 256, 64, 64)
    assert np.abs(test_output - expected).max() <= 1e-4 * np.abs(expected).max()
    assert cover.shape[:2] == (400, 800)
    assert "Apache-2.0" in readme and MEDSAM_DOI in readme and "## Validation" in readme
    assert "256 x 256" in readme


def test_decoder_package_maps_equal_biosams_on_a_real_image(decoder_package, model, dsb_nuclei):
    import bioimageio.core
    from bioimageio.core.digest_spec import create_sample_for_model

    import biosam

    path = decoder_package
    descr = _load(path)
    assert [str(n) for n in descr.outputs[0].axes[1].channel_names] == list(bio.MAP_NAMES)
    decoder = load_decoder(shipped_decoder_path("lite_medsam", "nuclei"), model=model)
    with zipfile.ZipFile(path) as z:
        assert json.loads(z.read("postprocessing.json")) == decoder.info["postprocessing"]

    image = dsb_nuclei[0][128:384, 128:384]  # uint16, 256 x 256 px: the model's input size
    expected = predict_maps(biosam.Predictor(model), decoder, image, intensity="auto")
    x = np.repeat(image[None].astype(np.float32), 3, axis=0)[None]
    for weights in ("torchscript", "onnx"):
        with bioimageio.core.create_prediction_pipeline(descr, weight_format=weights, devices=["cpu"]) as pipeline:
            sample = create_sample_for_model(model=descr, inputs={bio.INPUT_ID: x})
            maps = pipeline.predict_sample_without_blocking(sample).members[bio.MAPS_ID].data.values
        assert maps.shape == (1, 3, 256, 256)
        assert np.abs(maps[0] - expected).max() <= 1e-4 * np.abs(expected).max(), weights
    assert (expected[0] > 0.5).mean() > 0.1  # a real image with nuclei, not an empty one


# ----------------------------------------------------------------------------- the spec's preprocessing steps


def _spec_preprocessing(x: np.ndarray, steps: list[dict]) -> np.ndarray:
    """``x`` (1, 3, H, W) through the steps as bioimageio.core runs them."""
    from bioimageio.core import Sample, Tensor
    from bioimageio.core.proc_setup import setup_pre_and_postprocessing
    from bioimageio.spec.model import v0_5 as v

    h, w = x.shape[-2:]
    axes = [v.BatchAxis(size=1), v.ChannelAxis(channel_names=[v.Identifier(c) for c in ("red", "green", "blue")]),
            v.SpaceInputAxis(id=v.AxisId("y"), size=h), v.SpaceInputAxis(id=v.AxisId("x"), size=w)]
    descr = v.InputTensorDescr(id=v.TensorId(bio.INPUT_ID), axes=axes, preprocessing=steps)
    sample = Sample(members={bio.INPUT_ID: Tensor.from_numpy(x, dims=("batch", "channel", "y", "x"))}, stat={},
                    id="sample")
    setup = setup_pre_and_postprocessing(types.SimpleNamespace(inputs=[descr], outputs=[]),
                                         dataset_for_initial_statistics=[sample])
    for op in setup.pre:
        op(sample)
    return sample.members[bio.INPUT_ID].data.values


@pytest.mark.parametrize("preprocessing", preprocess.PREPROCESSINGS)
def test_spec_steps_compute_biosams_model_input(preprocessing):
    gray = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))[128:384, 128:384]
    rgb = iio.imread(shared_file("skimage_bundled", "ihc.png"))[128:384, 128:384, :3]
    ct = gray.astype(np.float32) * 8 - 1000  # Hounsfield-like values, reaching both ends of the soft-tissue window
    for image in (gray, rgb, ct):
        x = bio.package_input(image)
        for intensity in ("auto", "minmax", "none", "ct-soft-tissue"):
            got = torch.from_numpy(_spec_preprocessing(x, preprocessing_steps(preprocessing, intensity)))
            if network_minmax(preprocessing, intensity):
                got = preprocess._minmax(got)
            rgb_n = normalize_intensity(image, intensity)
            frame = preprocess.Frame.create(rgb_n.shape[:2], 256, preprocessing)
            expected = preprocess.model_input(rgb_n, frame, preprocessing)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max())), intensity


def test_min_max_inside_the_network_is_exported(tmp_path):
    """MedSAM-style min-max after a fixed window is part of the network (see network_minmax); the files keep it."""
    import onnxruntime

    from biosam.export.onnx import to_onnx
    from biosam.export.torchscript import to_torchscript

    encoder = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    network = bio._Network(encoder, None, minmax=True).eval()
    example = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    to_onnx(network, (example,), tmp_path / "n.onnx", input_names=["image"], output_names=["out"])
    to_torchscript(network, (example,), tmp_path / "n.pt")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.5  # spans 0.5-0.8 only
    with torch.no_grad():
        expected = encoder(preprocess._minmax(x)).numpy()
        traced = torch.jit.load(str(tmp_path / "n.pt"))(x).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "n.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"image": x.numpy()})[0]
    assert np.abs(traced - expected).max() < 1e-6 and np.abs(exported - expected).max() < 1e-5
    assert np.abs(encoder(x).detach().numpy() - expected).max() > 0.1  # the stretch matters on this input


# ----------------------------------------------------------------------------- refusals, before any work


def test_refuses_to_overwrite_an_existing_package(model, tmp_path):
    out = tmp_path / "package.zip"
    out.write_bytes(b"earlier package")
    with pytest.raises(InputError, match="already exists"):
        bio.build_package(model, out)
    assert out.read_bytes() == b"earlier package"
    with pytest.raises(InputError, match="unsupported output type"):
        bio.build_package(model, tmp_path / "package.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["package.zip"]


def _other_encoder_decoder(model, path):
    info = {**encoder_info(model), "checkpoint_hash": "0" * 32, "name": "another_model"}
    return save_decoder(path, InstanceDecoder(), {"encoder": info})


@pytest.mark.parametrize("kind", ["garbage", "not_a_decoder", "other_encoder", "missing"])
def test_bad_decoder_fails_before_writing_anything(model, tmp_path, kind):
    decoder = tmp_path / "decoder.pt"
    if kind == "garbage":
        decoder.write_bytes(b"\x00not a checkpoint" * 10)
    elif kind == "not_a_decoder":
        torch.save({"weights": torch.zeros(3)}, decoder)
    elif kind == "other_encoder":
        _other_encoder_decoder(model, decoder)
    error = DecoderMismatchError if kind == "other_encoder" else InputError
    with pytest.raises(error, match="decoder" if kind != "garbage" else str(decoder.name)):
        bio.build_package(model, tmp_path / "package.zip", decoder=decoder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["decoder.pt"])


def test_failure_while_writing_leaves_nothing(model, tmp_path, monkeypatch):
    import biosam.export.torchscript

    def fail(*args, **kwargs):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(biosam.export.torchscript, "to_torchscript", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        bio.build_package(model, tmp_path / "package.zip")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_bioimageio_test_is_an_error(monkeypatch, tmp_path):
    import bioimageio.core

    detail = types.SimpleNamespace(name="Reproduce test outputs from test inputs (onnx)", status="failed",
                                   errors=[types.SimpleNamespace(msg="output differs")])
    monkeypatch.setattr(bioimageio.core, "test_model",
                        lambda *a, **k: types.SimpleNamespace(status="failed", details=[detail]))
    with pytest.raises(bio.PackageTestError, match="output differs"):
        bio._test(bioimageio.core, tmp_path / "package.zip")


def test_weights_of_unknown_licence_are_refused_before_any_work(model, tmp_path):
    import copy

    mine = copy.copy(model)  # the same network, as if loaded from a checkpoint outside the zoo
    mine.info = ModelInfo(str(tmp_path / "mine.pt"), "lite_medsam", tmp_path / "mine.pt")
    with pytest.raises(InputError, match="licence"):
        bio.build_package(mine, tmp_path / "package.zip")
    with pytest.raises(InputError, match="SPDX"):
        bio.build_package(mine, tmp_path / "package.zip", license="Banana-1.0")
    assert list(tmp_path.iterdir()) == []


def test_refuses_what_is_not_a_sam_v1_model(tmp_path):
    with pytest.raises(InputError, match="cannot write"):
        bio.build_package(torch.nn.Linear(2, 2), tmp_path / "package.zip")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- licence and citation


def test_licence_and_citation_of_the_source_weights(tmp_path):
    from biosam.zoo import list_specs

    v1 = [s for s in list_specs() if s.family in ("sam", "medsam", "lite_medsam")]
    for spec in v1:
        source = zoo_source(getattr(spec, "base_name", spec.name), spec.family)
        assert source is not None, spec.name
        assert source.license in ("Apache-2.0", "CC-BY-4.0") and source.cite and source.authors
    lite = next(s for s in v1 if s.name == "lite_medsam")
    lite_info = ModelInfo("lite_medsam", "lite_medsam", tmp_path / "x.pth", spec=lite)
    assert weights_source(lite_info).license == "Apache-2.0"

    unknown = ModelInfo(str(tmp_path / "mine.pt"), "sam", tmp_path / "mine.pt")
    with pytest.raises(InputError, match="licence"):
        weights_source(unknown)
    given = weights_source(unknown, license="MIT", cite=[{"text": "Me et al.", "doi": "10.1234/abc"}])
    assert given.license == "MIT" and given.cite[0].doi == "10.1234/abc"
    with pytest.raises(InputError, match="doi"):
        weights_source(unknown, license="MIT", cite=[{"text": "no doi"}])

    tuned = ModelInfo(str(tmp_path / "tuned.pt"), "lite_medsam", tmp_path / "tuned.pt",
                      metadata={"base_model": "lite_medsam"})
    assert weights_source(tuned).license == "Apache-2.0"
    assert MEDSAM_DOI in [c.doi for c in weights_source(tuned).cite]
