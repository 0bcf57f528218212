"""biosam export: ONNX and TorchScript files agree with our torch models on real images.

LiteMedSAM (real weights) on the DSB2018 nuclei image, cropped to a non-square 512 x 389 px so
that the padding is cut off inside the exported decoder: embeddings within 1e-4 relative error,
masks of every ground-truth nucleus box identical to :class:`biosam.Predictor`'s (pixels may
differ only where the torch logit is within 1e-4 of the threshold), likewise with points and
mask prompts. Seeded random small ViT SAM and SAM 2 models check the other architectures.
int8 files are compared with fp32 ones by mask IoU. The CLI refuses bad requests before writing.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from biosam.errors import InputError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from biosam.export import export  # noqa: E402
from biosam.export.graphs import image_logits, is_square  # noqa: E402
from biosam.export.inputs import decoder_inputs, encoder_input  # noqa: E402
from biosam.prompting.preprocess import Frame, logits_to_image, model_input  # noqa: E402

# Width of the crop of the 512 x 512 nuclei image: not square, so LiteMedSAM's input is padded.
CROP_WIDTH = 389
# A pixel may change sides only where the torch logit is this close to 0 (float rounding).
NEAR_ZERO = 1e-4
EMBEDDING_TOL = 1e-4


def _session(path):
    options = ort.SessionOptions()
    # no busy-waiting worker threads: the torch side runs in between, and CI machines are shared
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_same_masks(got_logits: np.ndarray, torch_logits: np.ndarray) -> int:
    """Masks (logits > 0) must agree except where the torch logit is within NEAR_ZERO of 0; returns how
    many pixels differ (all of them near zero)."""
    got, ref = np.asarray(got_logits) > 0, np.asarray(torch_logits) > 0
    assert got.shape == ref.shape
    differ = got != ref
    assert np.all(np.abs(np.asarray(torch_logits)[differ]) < NEAR_ZERO), (
        f"{differ.sum()} pixels differ, some with |logit| >= {NEAR_ZERO}")
    return int(differ.sum())


def _boxes(labels: np.ndarray) -> list[np.ndarray]:
    from skimage.measure import regionprops

    return [np.array([p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]], dtype=np.float64) for p in regionprops(labels)]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lite():
    import biosam

    return biosam.load_model("lite_medsam", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def nuclei(dsb_nuclei):
    image, labels = dsb_nuclei
    return np.ascontiguousarray(image[:, :CROP_WIDTH]), np.ascontiguousarray(labels[:, :CROP_WIDTH])


@pytest.fixture(scope="module")
def predictor(lite, nuclei):
    from biosam import Predictor

    pred = Predictor(lite)
    pred.set_image(nuclei[0])
    return pred


@pytest.fixture(scope="module")
def onnx_files(lite, tmp_path_factory):
    from biosam.automatic.ais import shipped_decoder_path

    out = tmp_path_factory.mktemp("onnx") / "lite_medsam"
    files = export(lite, out, format="onnx", decoder=shipped_decoder_path("lite_medsam", "nuclei"))
    return {p.name: p for p in files}


@pytest.fixture(scope="module")
def onnx_run(onnx_files, nuclei):
    """Encoder input, frame, embedding and decoder session of the ONNX export on the nuclei crop."""
    x, frame = encoder_input(nuclei[0], 256, "lite_medsam")
    embedding = _session(onnx_files["encoder.onnx"]).run(None, {"image": x})[0]
    return x, frame, embedding, _session(onnx_files["decoder.onnx"])


def _torch_logits(predictor, low_res_logits: np.ndarray) -> np.ndarray:
    """Image-size logits of a zoom-off prediction, from its low-res logits (the Predictor's own step)."""
    low = torch.from_numpy(np.asarray(low_res_logits, dtype=np.float32)).reshape(1, 1, 256, 256)
    return logits_to_image(low, predictor.frame, "lite_medsam")[0, 0].numpy()


# ----------------------------------------------------------------- LiteMedSAM, ONNX
def test_manifest_describes_the_files(onnx_files):
    manifest = json.loads(onnx_files["biosam_export.json"].read_text())
    assert manifest["model"] == "lite_medsam" and manifest["preprocessing"] == "lite_medsam"
    assert manifest["image_size"] == 256 and manifest["low_res_size"] == 256 and manifest["family"] == "sam"
    assert manifest["files"] == {"encoder": "encoder.onnx", "decoder": "decoder.onnx",
                                 "instance_decoder": "instance_decoder.onnx"}
    decoder = _session(onnx_files["decoder.onnx"])
    assert [i.name for i in decoder.get_inputs()] == manifest["decoder"]["inputs"]
    assert [(o.name, o.shape) for o in decoder.get_outputs()] == [
        ("masks", [1, 1, "height", "width"]), ("iou_predictions", [1, 1]), ("low_res_masks", [1, 1, 256, 256])]
    assert not [p for p in onnx_files["encoder.onnx"].parent.iterdir() if p.name not in onnx_files]


def test_encoder_input_and_embeddings_match_torch(onnx_run, predictor):
    x, frame, embedding, _ = onnx_run
    assert frame == predictor.frame and frame.resized == (256, 195)  # padded on the right
    np.testing.assert_array_equal(x, model_input(predictor.image_rgb, predictor.frame, "lite_medsam").numpy())
    rel = _rel(embedding, predictor.embedding.numpy())
    print(f"LiteMedSAM ONNX embedding: max abs diff / max abs = {rel:.2e}")
    assert rel <= EMBEDDING_TOL


def test_decoder_masks_identical_on_ground_truth_boxes(onnx_run, predictor, nuclei):
    _, frame, embedding, decoder = onnx_run
    boxes = _boxes(nuclei[1])
    assert len(boxes) > 100
    identical = near_zero = 0
    refs = predictor.predict(box=np.stack(boxes), zoom="off")  # one batched call: (N, H, W) masks
    for k, box in enumerate(boxes):
        masks, iou, low = decoder.run(None, {"image_embeddings": embedding, **decoder_inputs(frame, box=box)})
        assert masks.shape == (1, 1, *nuclei[0].shape)
        differ = _check_same_masks(masks[0, 0], _torch_logits(predictor, refs.low_res_logits[k]))
        identical += differ == 0 and np.array_equal(masks[0, 0] > 0, refs.masks[k])
        near_zero += differ
        assert abs(iou[0, 0] - refs.scores[k]) < 1e-4
        assert np.abs(low[0] - refs.low_res_logits[k]).max() < 1e-3
    print(f"LiteMedSAM ONNX masks on {len(boxes)} ground-truth boxes: {identical} identical, "
          f"{near_zero} pixel(s) differing in all, each with |torch logit| < {NEAR_ZERO}")
    assert identical >= len(boxes) - 2


def test_decoder_with_points_and_mask_input(onnx_run, predictor, nuclei):
    from skimage.measure import regionprops

    _, frame, embedding, decoder = onnx_run
    for prop in regionprops(nuclei[1])[::40]:
        cy, cx = prop.centroid
        y0, x0, y1, x1 = prop.bbox
        box, inside = np.array([x0, y0, x1, y1], float), np.array([[cx, cy]])
        outside = np.array([[cx, cy], [min(x1 + 3, CROP_WIDTH - 1), cy]])
        cases = [dict(points=inside, point_labels=[1]), dict(points=outside, point_labels=[1, 0]),
                 dict(box=box, points=inside, point_labels=[1])]
        first = predictor.predict(box=box, zoom="off")
        cases.append(dict(box=box, mask=first.low_res_logits))
        cases.append(dict(mask=first.low_res_logits))  # no sparse prompt at all: zero points
        for prompt in cases:
            ref = predictor.predict(**{k: np.asarray(v) for k, v in prompt.items()}, zoom="off")
            feed = decoder_inputs(frame, **prompt)
            masks, iou, _ = decoder.run(None, {"image_embeddings": embedding, **feed})
            _check_same_masks(masks[0, 0], _torch_logits(predictor, ref.low_res_logits))
            assert abs(iou[0, 0] - ref.scores[0]) < 1e-4, list(prompt)


def test_graph_postprocessing_is_the_predictors(lite):
    """image_logits (sizes as tensors, in the exported graph) equals logits_to_image for every kind of shape."""
    low = torch.randn(1, 2, 256, 256, generator=torch.Generator().manual_seed(0))
    shapes = [(512, 389), (389, 512), (2, 500), (900, 4), (256, 256), (255, 257), (1000, 999), (37, 41), (3, 2)]
    for preprocessing, size in (("lite_medsam", 256), ("sam", 1024), ("medsam", 1024), ("sam2", 1024)):
        for shape in shapes:
            frame = Frame.create(shape, size, preprocessing)
            ours = image_logits(low, torch.tensor(shape, dtype=torch.float32), size, is_square(preprocessing, size))
            torch.testing.assert_close(ours, logits_to_image(low, frame, preprocessing), rtol=0, atol=0)


def test_decoder_file_serves_any_image_size(onnx_files, lite, dsb_nuclei):
    """One decoder file, another image shape (taller than wide): same masks as the Predictor there."""
    from biosam import Predictor

    image, labels = dsb_nuclei[0][:300, 100:], dsb_nuclei[1][:300, 100:]
    pred = Predictor(lite)
    pred.set_image(image)
    x, frame = encoder_input(image, 256, "lite_medsam")
    embedding = _session(onnx_files["encoder.onnx"]).run(None, {"image": x})[0]
    decoder = _session(onnx_files["decoder.onnx"])
    boxes = _boxes(labels)[::10]
    refs = pred.predict(box=np.stack(boxes), zoom="off")
    for box, ref in zip(boxes, refs.low_res_logits, strict=True):
        masks = decoder.run(None, {"image_embeddings": embedding, **decoder_inputs(frame, box=box)})[0]
        low = torch.from_numpy(ref).reshape(1, 1, 256, 256)
        _check_same_masks(masks[0, 0], logits_to_image(low, pred.frame, "lite_medsam")[0, 0].numpy())


def test_instance_decoder_maps_match_torch(onnx_files, predictor):
    from biosam.automatic.ais import load_decoder, shipped_decoder_path

    decoder = load_decoder(shipped_decoder_path("lite_medsam", "nuclei"))
    session = _session(onnx_files["instance_decoder.onnx"])
    embeddings = torch.cat([predictor.embedding, predictor.embedding.flip(-1)])  # batch 2: a dynamic axis
    with torch.inference_mode():
        ref = decoder(embeddings).numpy()
    maps = session.run(None, {"image_embeddings": embeddings.numpy()})[0]
    assert maps.shape == (2, 3, 256, 256)
    assert np.abs(maps - ref).max() < 1e-4


# ----------------------------------------------------------------- TorchScript
def test_torchscript_matches_torch(lite, predictor, nuclei, tmp_path):
    out = tmp_path / "ts"
    out.mkdir()
    (out / "encoder.pt").write_text("old")
    with pytest.raises(InputError, match="already exists"):
        export(lite, out, format="torchscript")
    assert (out / "encoder.pt").read_text() == "old"
    files = {p.name: p for p in export(lite, out, format="torchscript", overwrite=True)}
    assert set(files) == {"encoder.pt", "decoder.pt", "biosam_export.json"}
    encoder, decoder = torch.jit.load(files["encoder.pt"]), torch.jit.load(files["decoder.pt"])
    x, frame = encoder_input(nuclei[0], 256, "lite_medsam")
    with torch.inference_mode():
        embedding = encoder(torch.from_numpy(x))
        print(f"LiteMedSAM TorchScript embedding: rel diff {_rel(embedding, predictor.embedding):.2e}")
        assert _rel(embedding, predictor.embedding) <= EMBEDDING_TOL
        boxes = _boxes(nuclei[1])[::6]
        refs = predictor.predict(box=np.stack(boxes), zoom="off")
        for box, ref in zip(boxes, refs.low_res_logits, strict=True):
            feed = [torch.from_numpy(v) for v in decoder_inputs(frame, box=box).values()]
            masks, iou, _ = decoder(embedding, *feed)
            _check_same_masks(masks[0, 0].numpy(), _torch_logits(predictor, ref))


# ----------------------------------------------------------------- other architectures (random weights)
@functools.lru_cache(maxsize=1)
def _small_models():
    from biosam.models import SamConfig, build_sam
    from biosam.models.sam2.config import Sam2Config
    from biosam.models.sam2.model import Sam2

    torch.manual_seed(0)
    vit = build_sam(SamConfig(encoder="vit", image_size=256, embed_dim=64, depth=2, num_heads=2,
                              global_attn_indexes=(1,))).eval()
    # Hiera-tiny at 256 px: a 16 px grid, windows padded at the edges, 64 px native low-res logits
    sam2 = Sam2(Sam2Config.release("tiny", True, image_size=256)).eval()
    return {"vit": (vit, "sam", "sam"), "sam2": (sam2, "sam2", "sam2")}


@pytest.mark.parametrize("name", ["vit", "sam2"])
def test_small_vit_and_sam2_agree_with_torch(name, dsb_nuclei, tmp_path):
    from biosam.export import onnx as export_onnx

    model, family, preprocessing = _small_models()[name]
    export_onnx.export_image_encoder(model, tmp_path / "encoder.onnx")
    export_onnx.export_mask_decoder(model, tmp_path / "decoder.onnx")
    image = dsb_nuclei[0][:, :CROP_WIDTH]
    x, frame = encoder_input(image, 256, preprocessing)
    outputs = _session(tmp_path / "encoder.onnx").run(None, {"image": x})
    with torch.inference_mode():
        embedding = model.embed(torch.from_numpy(x))
        if family == "sam2":
            feats = model.unpack_features(embedding)
            expected = [feats.embedding + model.no_mem_embed.view(1, -1, 1, 1), *feats.high_res]
        else:
            expected = [embedding]
    for got, ref in zip(outputs, expected, strict=True):
        print(f"{name} ONNX encoder output {got.shape}: rel diff {_rel(got, ref):.2e}")
        assert _rel(got, ref) <= EMBEDDING_TOL
    decoder = _session(tmp_path / "decoder.onnx")
    feeds = dict(zip([i.name for i in decoder.get_inputs()], outputs))
    low_res = model.config.low_res_size if family == "sam2" else 64
    box, pts = np.array([60.0, 80.0, 250.0, 300.0]), np.array([[120.0, 150.0], [200.0, 90.0]])
    mask = None
    for prompt in (dict(box=box), dict(points=pts, point_labels=[1, 0]), dict(box=box, points=pts[:1]), "mask"):
        if prompt == "mask":
            prompt = dict(box=box, mask=mask)
        got = decoder.run(None, {**feeds, **decoder_inputs(frame, family, **prompt, low_res_size=low_res)})
        kwargs = {}
        if "box" in prompt:
            kwargs["boxes"] = torch.tensor(frame.to_model(prompt["box"])[None], dtype=torch.float32)
        if "points" in prompt:
            kwargs["point_coords"] = torch.tensor(frame.to_model(prompt["points"])[None], dtype=torch.float32)
            kwargs["point_labels"] = torch.tensor(np.asarray(prompt.get("point_labels", [1]))[None])
        if "mask" in prompt:
            kwargs["mask_inputs"] = torch.from_numpy(prompt["mask"]).reshape(1, 1, low_res, low_res)
        with torch.inference_mode():
            logits, iou = model.decode(embedding, **kwargs)
        _check_same_masks(got[0][0, 0], logits_to_image(logits, frame, preprocessing)[0, 0].numpy())
        assert np.abs(got[1] - iou.numpy()).max() < 1e-4
        mask = got[2][0, 0]
    assert got[2].shape == (1, 1, low_res, low_res)


def test_large_models_keep_weights_beside_the_file(monkeypatch, tmp_path):
    """Over protobuf's 2 GB limit (ViT-H) the weights go to NAME.data; shown with a lowered limit."""
    from biosam.export import onnx as export_onnx

    model = _small_models()["vit"][0]
    monkeypatch.setattr(export_onnx, "_PROTO_LIMIT", 1000)
    path = export_onnx.export_mask_decoder(model, tmp_path / "decoder.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    assert path.stat().st_size < 1_000_000 < (tmp_path / "decoder.onnx.data").stat().st_size
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]


def test_failed_export_leaves_nothing(monkeypatch, tmp_path):
    from biosam.export import onnx as export_onnx

    model = _small_models()["vit"][0]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(export_onnx, "export_mask_decoder", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "encoder.onnx").write_text("old")
    with pytest.raises(RuntimeError, match="simulated"):
        export(model, kept, overwrite=True)
    assert [p.name for p in kept.iterdir()] == ["encoder.onnx"] and (kept / "encoder.onnx").read_text() == "old"


# ----------------------------------------------------------------- int8 and the command
def _run(*args):
    from biosam.cli.main import main

    return CliRunner().invoke(main, ["export", *[str(a) for a in args]])


def test_cli_int8_export_is_smaller_and_close_to_fp32(onnx_files, onnx_run, nuclei, tmp_path):
    out = tmp_path / "int8"
    result = _run("lite_medsam", "-o", out, "--quantize", "int8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert sorted(os.path.basename(f) for f in report["files"]) == [
        "biosam_export.json", "decoder.int8.onnx", "encoder.int8.onnx"]
    sizes = {part: (onnx_files[f"{part}.onnx"].stat().st_size, (out / f"{part}.int8.onnx").stat().st_size)
             for part in ("encoder", "decoder")}
    for fp32_size, int8_size in sizes.values():
        assert int8_size < 0.5 * fp32_size
    x, frame, embedding, decoder = onnx_run
    embedding8 = _session(out / "encoder.int8.onnx").run(None, {"image": x})[0]
    decoder8 = _session(out / "decoder.int8.onnx")
    ious = []
    for box in _boxes(nuclei[1])[::3]:
        feed = decoder_inputs(frame, box=box)
        fp32 = decoder.run(None, {"image_embeddings": embedding, **feed})[0][0, 0] > 0
        int8 = decoder8.run(None, {"image_embeddings": embedding8, **feed})[0][0, 0] > 0
        ious.append((fp32 & int8).sum() / max(1, (fp32 | int8).sum()))
    ious = np.array(ious)
    print(f"int8 vs fp32 on {len(ious)} ground-truth boxes: mean mask IoU {ious.mean():.4f}, median "
          f"{np.median(ious):.4f}, {np.mean(ious >= 0.9):.0%} at >= 0.9; embedding rel diff "
          f"{_rel(embedding8, embedding):.3f}; sizes MB (fp32, int8) " +
          ", ".join(f"{k} {a / 1e6:.1f} -> {b / 1e6:.1f}" for k, (a, b) in sizes.items()))
    assert ious.mean() >= 0.9 and np.median(ious) >= 0.95


def test_cli_refuses_bad_requests_before_writing(onnx_files, tmp_path):
    existing = onnx_files["encoder.onnx"]
    before = (existing.stat().st_mtime_ns, existing.read_bytes()[:4096])
    result = _run("lite_medsam", "-o", existing.parent)
    assert result.exit_code != 0 and "already exists" in result.output and "--overwrite" in result.output
    assert (existing.stat().st_mtime_ns, existing.read_bytes()[:4096]) == before
    target = tmp_path / "out"
    for args, message in (
        (["--format", "tensorflow"], "tensorflow"),
        (["--format", "torchscript", "--quantize", "int8"], "ONNX exports only"),
        (["--quantize", "int4"], "int4"),
        (["--decoder", tmp_path / "missing.pt"], "not found"),
    ):
        result = _run("lite_medsam", "-o", target, *args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert not target.exists(), args
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    result = _run("lite_medsam", "-o", file_out)
    assert result.exit_code != 0 and "is a file" in result.output and file_out.read_text() == "x"


def test_api_refuses_bad_requests(tmp_path):
    from biosam.automatic.ais import shipped_decoder_path

    with pytest.raises(InputError, match="unknown export format"):
        export("lite_medsam", tmp_path / "a", format="tiff")
    with pytest.raises(InputError, match="only int8"):
        export("lite_medsam", tmp_path / "a", quantize="fp16")
    with pytest.raises(InputError, match="cannot export a Linear"):
        export(torch.nn.Linear(2, 2), tmp_path / "a")
    sam2 = _small_models()["sam2"][0]
    with pytest.raises(InputError, match="SAM 2 model"):
        export(sam2, tmp_path / "a", decoder=shipped_decoder_path("lite_medsam", "nuclei"))
    assert not (tmp_path / "a").exists()


def test_vit_global_attention_in_row_chunks_exports(dsb_nuclei, tmp_path, monkeypatch):
    """At 1024 px a ViT's global attention builds its position bias in row chunks sharing one buffer; the
    export must trace the chunked path too (here forced at 256 px by a small chunk limit)."""
    from biosam.export import onnx as export_onnx
    from biosam.models import vit as vit_module

    monkeypatch.setattr(vit_module, "_MAX_BIAS_ELEMENTS", 1 << 14)  # 2 heads x 256 queries x 16 x 16 > this
    model = copy.deepcopy(_small_models()["vit"][0]).requires_grad_(False)  # frozen, as load_model gives it
    export_onnx.export_image_encoder(model, tmp_path / "encoder.onnx")
    x, _ = encoder_input(dsb_nuclei[0][:, :CROP_WIDTH], 256, "sam")
    (got,) = _session(tmp_path / "encoder.onnx").run(None, {"image": x})
    with torch.inference_mode():
        expected = model.embed(torch.from_numpy(x))
    assert _rel(got, expected) <= EMBEDDING_TOL
