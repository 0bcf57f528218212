"""bioimage.io model packages (format 0.5) of our models: ``biosam export MODEL -o OUT.zip --format bioimageio``.

A package is one ``.zip`` (the packed form bioimage.io uploads and every consumer reads; unzip it for a
folder) holding ``rdf.yaml``, TorchScript and ONNX weights of one network, a test input and output
(``.npy``), a cover image, the documentation page and, with a decoder, its post-processing parameters.

The network:

* without a decoder: image ``(1, 3, S, S)`` -> SAM image embedding ``(1, 256, S/16, S/16)``;
* with an instance decoder: image -> image encoder -> decoder -> maps ``(1, 3, S, S)`` (foreground,
  centre distance, boundary distance), turned into objects by biosam's watershed (documented; it has
  no bioimage.io step).

S is the model's input size. The preprocessing is written as the spec's own steps (see
:func:`biosam.export.bioimageio_rdf.preprocessing_steps`); resizing and padding have no step, so the
input shape is fixed and the documentation says how to prepare or tile images.

Before the package is put in place it is validated by ``bioimageio.spec`` and tested by
``bioimageio.core`` (both weight formats must reproduce the test output from the test input, the
spec's preprocessing included). Everything runs offline: the description holds no web address that
validation would check (addresses are in the documentation text only), and every file is local.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from biosam.errors import BiosamError, InputError
from biosam.export.bioimageio_rdf import (
    PackageFacts,
    documentation,
    network_minmax,
    package_name,
    preprocessing_steps,
    weights_source,
)
from biosam.prompting.preprocess import _minmax

logger = logging.getLogger(__name__)

INPUT_ID = "image"
EMBEDDING_ID = "embedding"
MAPS_ID = "maps"
MAP_NAMES = ("foreground", "center_distance", "boundary_distance")
ONNX_OPSET = 17
_FIX = "pip install 'biosam[bioimageio]'"


class PackageTestError(BiosamError):
    """A package that bioimage.io's own validation or test refused (nothing was written)."""


def require_bioimageio():
    """``(bioimageio.spec, bioimageio.core)``, or :class:`InputError` naming the extra to install."""
    try:
        import bioimageio.core as core
        import bioimageio.spec as spec
        import onnxruntime  # noqa: F401  (bioimageio.core runs the ONNX weights with it)
    except ImportError:
        raise InputError(f"bioimage.io packages need bioimageio.core, onnx and onnxruntime: {_FIX}.") from None
    return spec, core


class _Network(nn.Module):
    """Model input -> image embedding, or -> instance decoder maps when a decoder is given."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None, minmax: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.minmax = minmax  # see biosam.export.bioimageio_rdf.network_minmax

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.minmax:
            image = _minmax(image)
        embedding = self.encoder(image)
        return embedding if self.decoder is None else self.decoder(embedding)


def _cpu_fp32(module: nn.Module) -> nn.Module:
    """``module`` itself when it already computes in fp32 on the CPU, else a CPU fp32 copy (the caller's stays)."""
    params = list(module.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return module
    return copy.deepcopy(module).cpu().float()


def _check_model(model) -> None:
    from biosam.models.sam import Sam

    if not isinstance(model, Sam):
        kind = "a SAM 2 model" if type(model).__name__ == "Sam2" else f"a {type(model).__name__}"
        raise InputError(
            f"cannot write {kind} as a bioimage.io package: packages are made of SAM v1 family models (SAM, "
            "micro-sam, MobileSAM, MedSAM, LiteMedSAM) loaded with biosam.load_model. SAM 2's image features only "
            "serve its own prompt decoder; export it with --format onnx or torchscript."
        )
    if model.info is None:
        raise InputError("the model has no model.info (name, preprocessing, checkpoint): load it with "
                         "biosam.load_model.")


def _check_license(license: str) -> None:
    """Refuse a licence that is not an SPDX identifier bioimage.io accepts, before any work."""
    import pydantic
    from bioimageio.spec.model.v0_5 import LicenseId

    try:
        LicenseId(license)
    except (pydantic.ValidationError, ValueError):
        raise InputError(f"'{license}' is not an SPDX licence identifier bioimage.io accepts (such as Apache-2.0, "
                         "MIT, CC-BY-4.0; see https://spdx.org/licenses).") from None


def _load_decoder(decoder, model):
    """A loaded :class:`InstanceDecoder` for ``model`` (checked against its encoder), or None."""
    if decoder is None:
        return None
    from biosam.automatic.ais import load_decoder
    from biosam.automatic.decoder import InstanceDecoder

    if isinstance(decoder, InstanceDecoder):
        from biosam.automatic.ais import check_compatible

        check_compatible(decoder, model)
        return decoder.eval()
    path = Path(decoder)
    if not path.is_file():
        raise InputError(f"{path}: decoder checkpoint not found.")
    return load_decoder(path, model=model)


# ----------------------------------------------------------------------------- sample, test tensors, cover


def _sample_image(sample) -> tuple[np.ndarray, str]:
    """The sample image (2D gray or RGB) and a phrase naming it; scikit-image's bundled ``cell`` by default."""
    if sample is None:
        import skimage.data

        return skimage.data.cell(), "scikit-image's bundled phase-contrast image `cell.png` (CC0)"
    if isinstance(sample, (str, os.PathLike)):
        from biosam.io import read_image

        return np.asarray(read_image(sample)[0]), f"the image {Path(sample).name}"
    return np.asarray(sample), "the sample image given at export"


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """The central square of a 2D or RGB image, resized to ``size`` px (integer pixels stay integer)."""
    from biosam.automatic.resample import resize_image

    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise InputError(f"the sample image must be 2D grayscale or RGB, got shape {image.shape}.")
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_image(np.ascontiguousarray(image[top:top + side, left:left + side]), (size, size))


def package_input(image: np.ndarray) -> np.ndarray:
    """The package input ``(1, 3, S, S)`` float32 of a 2D (gray: repeated to three channels) or RGB image."""
    image = np.asarray(image, dtype=np.float32)
    channels = np.repeat(image[None], 3, axis=0) if image.ndim == 2 else np.moveaxis(image, -1, 0)
    return np.ascontiguousarray(channels[None])


def biosam_input(image: np.ndarray, model, intensity: str) -> torch.Tensor:
    """biosam's own model input for an image at the model's input size (intensity preset + model preprocessing)."""
    from biosam.prompting.intensity import normalize_intensity
    from biosam.prompting import preprocess

    rgb = normalize_intensity(image, intensity)
    frame = preprocess.Frame.create(rgb.shape[:2], model.image_size, model.info.preprocessing)
    return preprocess.model_input(rgb, frame, model.info.preprocessing)


def _cover(path: Path, image: np.ndarray, output: np.ndarray, decoder) -> None:
    """A 2:1 PNG: the test image, and beside it the objects found (decoder) or the embedding's main components."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = image if image.ndim == 2 else image[..., :3]
    lo, hi = np.percentile(shown, (1, 99.8))
    shown = np.clip((shown.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.add_axes((0, 0, 0.5, 1)), fig.add_axes((0.5, 0, 0.5, 1))
    left.imshow(shown, cmap="gray")
    if decoder is not None:
        from skimage.color import label2rgb

        from biosam.automatic.ais import decoder_postprocessing
        from biosam.automatic.instances import maps_to_instances

        labels = maps_to_instances(output[0], decoder_postprocessing(decoder))
        gray = shown if shown.ndim == 2 else shown.mean(axis=-1)
        right.imshow(label2rgb(labels, image=gray, alpha=0.4, bg_label=0))
    else:
        right.imshow(_embedding_rgb(output[0]), interpolation="nearest")
    for ax in (left, right):
        ax.set_axis_off()
    fig.savefig(path, format="png")


def _write_samples(sample_input: Path, sample_output: Path, image: np.ndarray, output: np.ndarray) -> None:
    """The sample tensors (for people browsing the package): input and output without the batch axis, TIFF."""
    import tifffile

    channels = np.repeat(image[None], 3, axis=0) if image.ndim == 2 else np.moveaxis(image, -1, 0)
    tifffile.imwrite(sample_input, np.ascontiguousarray(channels), photometric="minisblack")
    tifffile.imwrite(sample_output, np.ascontiguousarray(output[0]), photometric="minisblack")


def _embedding_rgb(embedding: np.ndarray) -> np.ndarray:
    """The three main components of a ``(C, h, w)`` embedding as an RGB image in [0, 1]."""
    c = embedding.shape[0]
    flat = embedding.reshape(c, -1).T.astype(np.float64)
    flat -= flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    rgb = flat @ vt[:3].T
    rgb = (rgb - rgb.min(axis=0)) / np.maximum(rgb.max(axis=0) - rgb.min(axis=0), 1e-12)
    return rgb.reshape(*embedding.shape[1:], 3)


# ----------------------------------------------------------------------------- description


def _axes(v, s: int, output: np.ndarray | None, decoder) -> tuple[list, list]:
    inputs = [v.BatchAxis(size=1), v.ChannelAxis(channel_names=[v.Identifier(c) for c in ("red", "green", "blue")]),
              v.SpaceInputAxis(id=v.AxisId("y"), size=s), v.SpaceInputAxis(id=v.AxisId("x"), size=s)]
    g = output.shape[-1]
    names = MAP_NAMES if decoder is not None else [f"c{i}" for i in range(output.shape[1])]
    outputs = [v.BatchAxis(size=1), v.ChannelAxis(channel_names=[v.Identifier(c) for c in names]),
               v.SpaceOutputAxis(id=v.AxisId("y"), size=output.shape[-2], scale=s / g),
               v.SpaceOutputAxis(id=v.AxisId("x"), size=g, scale=s / g)]
    return inputs, outputs


def _describe(v, work: Path, facts: PackageFacts, output: np.ndarray, decoder, files: dict) -> object:
    """The model description (``bioimageio.spec.model.v0_5.ModelDescr``) of the files in ``work``."""
    s, source = facts.input_size, facts.source
    in_axes, out_axes = _axes(v, s, output, decoder)
    out_id = facts.output_id
    with_decoder = decoder is not None
    authors = [v.Author(name=name) for name in source.authors]
    if with_decoder and not authors:
        authors = [v.Author(name="biosam")]
    what = "instance segmentation maps (foreground, centre and boundary distance)" if with_decoder \
        else "SAM image embeddings"
    out_data = v.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)) if with_decoder \
        else v.IntervalOrRatioDataDescr(type="float32")
    config = {"biosam": {
        "version": facts.biosam_version, "model": facts.model_name, "checkpoint_xxh128": facts.checkpoint_hash,
        "preprocessing": facts.preprocessing, "intensity": facts.intensity, "input_size": s,
        "decoder": facts.decoder,
    }}
    return v.ModelDescr(
        name=package_name(facts.model_name, with_decoder),
        description=f"{source.what}: image ({s} x {s} px) to {what}. Exported by biosam {facts.biosam_version}."[:1024],
        authors=authors,
        packaged_by=[v.Author(name=f"biosam {facts.biosam_version}")],
        cite=[v.CiteEntry(text=c.text, doi=v.Doi(c.doi)) for c in source.cite],
        license=v.LicenseId(source.license),
        documentation=v.FileDescr(source=work / files["documentation"]),
        covers=[v.FileDescr(source=work / files["cover"])],
        attachments=[v.FileDescr(source=work / name) for name in files.get("attachments", ())],
        tags=["segment-anything", "biosam", "2d", facts.preprocessing.replace("_", "-"),
              "instance-segmentation" if with_decoder else "image-embedding", "pytorch", "onnx"],
        inputs=[v.InputTensorDescr(
            id=v.TensorId(INPUT_ID), axes=in_axes, test_tensor=v.FileDescr(source=work / files["test_input"]),
            sample_tensor=v.FileDescr(source=work / files["sample_input"]),
            description="image at the model's input size (grayscale: the same plane in all three channels)",
            data=v.IntervalOrRatioDataDescr(type="float32"), preprocessing=facts.steps)],
        outputs=[v.OutputTensorDescr(
            id=v.TensorId(out_id), axes=out_axes, test_tensor=v.FileDescr(source=work / files["test_output"]),
            sample_tensor=v.FileDescr(source=work / files["sample_output"]),
            description=what, data=out_data)],
        weights=v.WeightsDescr(
            torchscript=v.TorchscriptWeightsDescr(
                source=work / files["torchscript"], pytorch_version=v.Version(torch.__version__),
                comment=f"traced by biosam {facts.biosam_version} from its PyTorch model"),
            onnx=v.OnnxWeightsDescr(
                source=work / files["onnx"], opset_version=ONNX_OPSET, parent="torchscript",
                comment="exported by biosam from the same PyTorch model as the TorchScript weights",
                **({"external_data": v.FileDescr(source=work / files["onnx_data"])} if "onnx_data" in files else {})),
        ),
        config=config,
    )


def _test(core, package: Path) -> None:
    """bioimage.io's test of the package (every weight format reproduces the test output); PackageTestError if not."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch")  # jit's deprecation notes
        summary = core.test_model(package, devices=["cpu"])
    if summary.status != "passed":
        failed = [f"{d.name}: {'; '.join(e.msg for e in d.errors)}" for d in summary.details if d.status == "failed"]
        raise PackageTestError("bioimage.io's test of the package failed, so it was not written: "
                               + " | ".join(failed)[:4000])
    logger.info("bioimage.io test passed: %s", "; ".join(d.name for d in summary.details))


# ----------------------------------------------------------------------------- entry point


def build_package(model, out: str | os.PathLike, *, decoder=None, overwrite: bool = False, sample=None,
                  license: str | None = None, cite: list[dict] | None = None, check: bool = True) -> Path:
    """Write a bioimage.io package (format 0.5, ``.zip``) of ``model``; returns its path.

    ``model``: a SAM v1 family model from :func:`biosam.load_model`, or a zoo name or checkpoint path to
    load (on the CPU). ``decoder``: an instance-decoder
    checkpoint (or loaded :class:`biosam.automatic.decoder.InstanceDecoder`) trained on this model's
    encoder; then the package computes the decoder's maps, else the image embedding. ``sample``: the
    image for the test tensors and the cover (array or path; default scikit-image's bundled ``cell``),
    centre-cropped and resized to the input size. ``license`` / ``cite``: the licence (SPDX id) and
    citations of weights biosam does not know (see :func:`biosam.export.bioimageio_rdf.weights_source`).

    Everything is checked before any work (output path, model, decoder, licence). The description is
    validated by bioimageio.spec and, with ``check``, the package is tested by bioimageio.core before
    it replaces ``out`` (:class:`PackageTestError` if that fails); a failure leaves nothing behind.
    """
    from biosam.io.files import atomic_path, check_output_path, temp_path

    out = check_output_path(out, (".zip",), overwrite)
    spec, core = require_bioimageio()
    from biosam.export.onnx import require_onnx

    require_onnx()
    if isinstance(model, (str, os.PathLike)):
        from biosam.load import load_model

        model = load_model(model, device="cpu", precision="fp32")
    _check_model(model)
    loaded = _load_decoder(decoder, model)
    source = weights_source(model.info, license, cite)
    _check_license(source.license)
    image, sample_name = _sample_image(sample)
    image = _square(image, model.image_size)

    work = temp_path(out, ".d")
    work.mkdir()
    try:
        descr = _write_files(work, model, loaded, source, image, sample_name)
        with atomic_path(out) as tmp:
            spec.save_bioimageio_package(descr, output_path=tmp)
            if check:
                _test(core, tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote the bioimage.io package %s", out)
    return out


def _write_files(work: Path, model, decoder, source, image: np.ndarray, sample_name: str):
    """Compute the test output, write every file of the package into ``work``; returns the description."""
    from biosam import __version__
    from biosam.export.onnx import to_onnx
    from biosam.export.torchscript import to_torchscript

    info = model.info
    intensity = (decoder.info or {}).get("intensity", "auto") if decoder is not None else "auto"
    # The image encoder alone is Sam.embed in fp32 (exported files compute in fp32 whatever model.precision says).
    minmax = network_minmax(info.preprocessing, intensity)
    network = _Network(_cpu_fp32(model.image_encoder), _cpu_fp32(decoder) if decoder is not None else None,
                       minmax).eval()
    x = biosam_input(image, model, intensity).cpu()
    with torch.inference_mode():
        output = network(x).numpy()  # with minmax, a second stretch of the stretched input changes nothing
    out_id = MAPS_ID if decoder is not None else EMBEDDING_ID
    facts = PackageFacts(model_name=info.name, checkpoint_hash=info.checkpoint_hash, preprocessing=info.preprocessing,
                         intensity=intensity, input_size=model.image_size, output_id=out_id,
                         output_shape=tuple(output.shape), steps=preprocessing_steps(info.preprocessing, intensity),
                         source=source, biosam_version=__version__, decoder=_decoder_record(decoder),
                         sample=sample_name, minmax_in_network=minmax)
    files = {"test_input": "test_input.npy", "test_output": "test_output.npy", "cover": "cover.png",
             "sample_input": "sample_input.tif", "sample_output": "sample_output.tif",
             "documentation": "README.md", "torchscript": "weights_torchscript.pt", "onnx": "weights.onnx"}
    np.save(work / files["test_input"], package_input(image))
    np.save(work / files["test_output"], output)
    _write_samples(work / files["sample_input"], work / files["sample_output"], image, output)
    _cover(work / files["cover"], image, output, decoder)
    (work / files["documentation"]).write_text(documentation(facts), encoding="utf-8")
    if facts.decoder is not None:
        files["attachments"] = ("postprocessing.json",)
        (work / "postprocessing.json").write_text(json.dumps(facts.decoder["postprocessing"], indent=2) + "\n")
    # Traced on another input than the test input, so that bioimage.io's test (test input -> test output)
    # also shows the files compute the model, not constants of the one traced input.
    example = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch")  # jit's deprecation notes
        to_torchscript(network, (example,), work / files["torchscript"])
        to_onnx(network, (example,), work / files["onnx"], input_names=[INPUT_ID], output_names=[out_id],
                opset=ONNX_OPSET)
    if (work / "weights.onnx.data").exists():  # over 2 GB: the weights sit beside the graph
        files["onnx_data"] = "weights.onnx.data"
    from bioimageio.spec.model import v0_5

    return _describe(v0_5, work, facts, output, decoder, files)


def _decoder_record(decoder) -> dict | None:
    """What the package records about the decoder (config, training tile, object size, post-processing)."""
    if decoder is None:
        return None
    from biosam.automatic.ais import decoder_postprocessing

    record = decoder.info or {}
    return {"source": Path(str(record.get("source", "instance decoder"))).name, "config": decoder.config.to_dict(),
            "tile": record.get("tile"), "halo": record.get("halo"), "object_size": record.get("object_size"),
            "postprocessing": decoder_postprocessing(decoder).to_dict(),
            "validation": (record.get("training") or {}).get("validation")}
