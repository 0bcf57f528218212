"""Mask classifier: network, features, labelling candidates, training, and use by `tomogram` and `auto`.

Real-weight tests use the embedded LiteMedSAM on a generated tomogram with
distractors (exact labels) and on the NIH3T3 nuclei in ../shared/data.
"""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import mrcfile
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import shared_file

import biosam
from biosam.classify import ClassifierMismatchError, CropSettings, MaskClassifier, load_classifier, masked_features
from biosam.classify.features import crops
from biosam.cli.main import main
from biosam.errors import InputError
from biosam.tomogram import VesicleSettings, segment_vesicles, synthetic_tomogram
from biosam.train.classifier import (
    ClassifierSettings,
    LabelledCandidates,
    classification_metrics,
    instance_classes,
    match_classes,
    tomogram_candidates,
    train_classifier,
)

VOXEL = 10.0
HOUGH = VesicleSettings(method="hough", n_slabs=2)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_network_has_the_published_size():
    head = MaskClassifier(2)
    assert sum(p.numel() for p in head.parameters()) == 1_026_246  # "about 1.03 M parameters for 2 classes"
    assert head(torch.randn(3, 512, 32, 32)).shape == (3, 2)
    assert MaskClassifier(5)(torch.randn(2, 512, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError):
        MaskClassifier(1)


def test_features_see_the_mask_in_and_out(lite_medsam):
    image = iio.imread(shared_file("nuclei_nih3t3", "images", "dna-0.png"))
    view = np.repeat(image[..., None] if image.ndim == 2 else image[..., :1], 3, axis=-1).astype(np.float32)
    mask = np.zeros(image.shape[:2], bool)
    mask[100:140, 200:260] = True
    crop, cut = crops(view, mask, CropSettings())
    assert crop.shape == (120, 120, 3) and cut.sum() == 40 * 60  # 2 x the longer side, mask centred
    features = masked_features(lite_medsam, [(crop, cut), (crop, np.zeros_like(cut))], CropSettings())
    assert features.shape == (2, 512, 32, 32)
    inside, outside = features[0, :256], features[0, 256:]
    # Masked in: nothing outside the mask's rows/columns of the grid; masked out: the rest of the crop.
    assert inside[:, :8].abs().max() == 0 and inside[:, 16].abs().max() > 0
    assert outside[:, :8].abs().max() > 0
    assert features[1, :256].abs().max() == 0
    torch.testing.assert_close(features[0, :256] + features[0, 256:], features[1, 256:], atol=1e-4, rtol=1e-4)


def test_candidates_take_the_class_of_what_they_overlap():
    truth = np.zeros((40, 40), np.int64)
    truth[5:15, 5:15] = 1
    truth[20:30, 20:30] = 2
    exact = truth == 1
    partial = np.zeros_like(exact)
    partial[20:30, 20:24] = True  # IoU 0.4 with object 2
    nothing = np.zeros_like(exact)
    nothing[32:38, 0:6] = True
    assert match_classes([exact, partial, nothing], truth, {1: 1, 2: 3}, 0.5, 0.2).tolist() == [1, -1, 0]


def test_label_images_are_checked(tmp_path):
    with pytest.raises(InputError, match="single value 0"):
        instance_classes(np.zeros((8, 8), np.uint8), "instances", 2, "empty.tif")
    with pytest.raises(InputError, match="single value 7"):
        instance_classes(np.full((8, 8), 7), "instances", 2, "full.tif")
    classes = np.zeros((8, 8), np.uint8)
    classes[1:3, 1:3], classes[5:7, 5:7], classes[1:3, 5:7] = 1, 1, 3
    with pytest.raises(InputError, match="class value 3"):
        instance_classes(classes, "classes", 3, "c.tif")
    instances, of = instance_classes(classes, "classes", 4, "c.tif")
    assert sorted(of.values()) == [1, 1, 3] and len(np.unique(instances)) == 4
    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["background", "a", "b"])
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["f1"] == 0
    assert m["macro_f1"] == pytest.approx(0.4)  # (0.8 + 0) / 2, background left out


def _tomogram(seed: int):
    truth = synthetic_tomogram((40, 128, 128), voxel_size=VOXEL, n_vesicles=5, radius_range_nm=(14, 19), snr=1.0,
                               missing_wedge_deg=60, seed=seed, n_ice=4, n_gold=2, n_membranes=1)
    keep = np.array([0] + [i if truth.classes.get(i) == "vesicle" else 0 for i in range(1, int(truth.labels.max()) + 1)])
    return truth, keep[truth.labels]


@pytest.fixture(scope="module")
def trained(lite_medsam, tmp_path_factory):
    """A vesicle classifier trained on the hough candidates of two generated tomograms (no validation split)."""
    folder = tmp_path_factory.mktemp("classifier")
    predictor = biosam.Predictor(lite_medsam)
    sources = []
    for seed in (1, 2):
        truth, vesicles = _tomogram(seed)
        sources.append(tomogram_candidates(predictor, truth.volume, (VOXEL,) * 3, vesicles,
                                           {i: 1 for i in np.unique(vesicles) if i}, f"t{seed}",
                                           ClassifierSettings(), HOUGH))
    settings = ClassifierSettings(epochs=25, patience=25, variants=1, val_fraction=0)
    result = train_classifier(lite_medsam, sources, ["background", "vesicle"], folder / "c.pt", settings,
                              source_kind="tomogram", cache_dir=folder / "cache", progress=False)
    return result, sources, folder


def test_training_learns_the_candidates_and_writes_its_record(trained, lite_medsam):
    result, sources, folder = trained
    labels = np.concatenate([s.usable().labels for s in sources])
    assert (labels == 1).sum() >= 3 and (labels == 0).sum() >= 3  # hough finds vesicles and distractors
    assert result.output.stat().st_size == pytest.approx(4.1e6, rel=0.05)
    loaded = load_classifier(result.output, lite_medsam, source="tomogram")
    assert loaded.classes == ["background", "vesicle"] and loaded.source == "tomogram"
    assert loaded.info["training"]["train_candidates"] == {"background": int((labels == 0).sum()),
                                                          "vesicle": int((labels == 1).sum())}
    # Inference recomputes the features from the crops: it must agree with what training saw, and the
    # training candidates must have been learnt (always answering the commoner class scores 0.67 on them).
    predicted = np.concatenate([_predict_pairs(loaded, lite_medsam, s.usable()) for s in sources])
    assert np.mean(predicted == labels) >= 0.9
    assert np.mean(predicted == labels) >= _majority(labels) + 0.25
    metrics = json.loads(result.metrics_path.read_text())
    assert np.sum(metrics["confusion"]) == len(labels) and metrics["best_epoch"] == result.best_epoch
    assert len(metrics["history"]) == result.epochs_run
    curves = iio.imread(result.curves_path)
    assert curves.shape[0] > 200 and curves.std() > 0
    # The feature cache makes a second training skip the encoder.
    assert len(list((folder / "cache").glob("features-*.pt"))) == 2


def _predict_pairs(classifier, model, source: LabelledCandidates) -> np.ndarray:
    features = masked_features(model, source.pairs, classifier.crop)
    with torch.inference_mode():
        return classifier.head(features).argmax(1).numpy()


def _majority(labels: np.ndarray) -> float:
    """The accuracy of always answering the commonest class."""
    return float(np.bincount(labels).max() / len(labels))


def test_the_classifier_sorts_candidates_of_tomograms_it_never_saw(trained, lite_medsam):
    """Candidates of three other generated tomograms: vesicles kept, a share of the distractors rejected."""
    result, _, _ = trained
    predictor = biosam.Predictor(lite_medsam)
    truths, predicted = [], []
    for seed in (5, 6, 7):  # seeds 3 and 4 cannot place their objects in this volume
        truth, vesicles = _tomogram(seed)
        source = tomogram_candidates(predictor, truth.volume, (VOXEL,) * 3, vesicles,
                                     {i: 1 for i in np.unique(vesicles) if i}, f"t{seed}", ClassifierSettings(),
                                     HOUGH).usable()
        truths.append(source.labels)
        predicted.append(_predict_pairs(result.classifier, lite_medsam, source))
    truth, predicted = np.concatenate(truths), np.concatenate(predicted)
    assert (truth == 1).sum() >= 8 and (truth == 0).sum() >= 8
    # measured: accuracy 0.71 against 0.52 for always answering "vesicle"; every vesicle kept, 4 of 10 distractors out
    assert np.mean(predicted == truth) >= _majority(truth) + 0.15
    assert np.mean(predicted[truth == 1] == 1) >= 0.9 and np.mean(predicted[truth == 0] == 0) >= 0.3


def test_pipeline_with_the_classifier_drops_what_it_rejects(trained, lite_medsam):
    result, _, _ = trained
    truth, vesicles = _tomogram(1)
    predictor = biosam.Predictor(lite_medsam)
    quick = VesicleSettings(method="hough", z_step=4)
    plain = segment_vesicles(predictor, truth.volume, VOXEL, quick, progress=False)
    judged = segment_vesicles(predictor, truth.volume, VOXEL, quick, classifier=result.classifier, progress=False)
    assert sum(judged.candidates) < sum(plain.candidates)
    # What the classifier dropped was not a vesicle: no vesicle found without it is lost.
    from biosam.evaluate import match_instances

    found = [len(match_instances(r.labels, vesicles, 0.5).pair_iou) for r in (plain, judged)]
    assert found[1] >= found[0] - 1


def test_a_classifier_fits_only_its_encoder_and_input_kind(trained, tmp_path, lite_medsam):
    result, _, _ = trained
    with pytest.raises(ClassifierMismatchError, match="tomogram candidates"):
        load_classifier(result.output, lite_medsam, source="image")
    state = {k: v.clone() for k, v in lite_medsam.state_dict().items()}
    state["mask_decoder.iou_prediction_head.layers.0.bias"] += 1
    torch.save(state, tmp_path / "other.pth")
    other = biosam.load_model(tmp_path / "other.pth", device="cpu")
    with pytest.raises(ClassifierMismatchError, match="--model lite_medsam"):
        load_classifier(result.output, other)
    with pytest.raises(InputError, match="unknown class"):
        result.classifier.keep_ids(["ice"])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt"):
        load_classifier(tmp_path / "bad.pt")


def _mrc(path: Path, volume: np.ndarray) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = VOXEL
    return path


def test_cli_trains_and_tomogram_uses_it(trained, tmp_path):
    result, _, folder = trained
    truth, vesicles = _tomogram(1)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    _mrc(tmp_path / "img" / "t1.mrc", truth.volume.astype(np.float32))
    _mrc(tmp_path / "lab" / "t1.mrc", vesicles.astype(np.int16))
    out = tmp_path / "c.pt"
    args = ["train", "classifier", "--images", tmp_path / "img", "--labels", tmp_path / "lab", "-o", out,
            "--classes", "background,vesicle", "--method", "hough", "--multi-slab", "2", "--epochs", "2",
            "--variants", "1", "--json"]
    res = run(*args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["epochs_run"] == 2 and set(report["per_class"]) == {"background", "vesicle"}
    assert out.is_file() and out.with_suffix(".metrics.json").is_file() and out.with_suffix(".curves.png").is_file()
    res = run(*args)
    assert res.exit_code != 0 and "already exists" in res.output and "--overwrite" in res.output
    res = run("tomogram", tmp_path / "img" / "t1.mrc", "-o", tmp_path / "v.mrc", "--method", "hough", "--z-step", "4",
              "--classifier", result.output, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["classifier"] == str(result.output)
    res = run("auto", tmp_path / "img" / "t1.mrc", "-o", tmp_path / "a.tif", "--classifier", result.output)
    assert res.exit_code != 0 and "tomogram candidates" in res.output
    assert not (tmp_path / "a.tif").exists()
    res = run("tomogram", tmp_path / "img" / "t1.mrc", "-o", tmp_path / "w.mrc", "--classifier", result.output,
              "--keep-classes", "gold")
    assert res.exit_code != 0 and "unknown class" in res.output and not (tmp_path / "w.mrc").exists()


def test_cli_refuses_bad_training_data(tmp_path):
    image = iio.imread(shared_file("nuclei_nih3t3", "images", "dna-0.png"))
    iio.imwrite(tmp_path / "img.png", image[:64, :64])
    iio.imwrite(tmp_path / "small.png", np.zeros((32, 32), np.uint8) + 255 * (np.arange(32) > 10)[None].astype(np.uint8))
    iio.imwrite(tmp_path / "empty.png", np.zeros((64, 64), np.uint8))
    res = run("train", "classifier", "--images", tmp_path / "img.png", "--labels", tmp_path / "small.png",
              "-o", tmp_path / "c.pt")
    assert res.exit_code != 0 and "small.png" in res.output and "does not match" in res.output
    res = run("train", "classifier", "--images", tmp_path / "img.png", "--labels", tmp_path / "empty.png",
              "-o", tmp_path / "c.pt")
    assert res.exit_code != 0 and "empty.png" in res.output and "single value 0" in res.output
    entries = [{"image": "img.png", "masks": "small.png", "mask_id": 255, "class": "nucleus"}]
    (tmp_path / "l.json").write_text(json.dumps(entries))
    res = run("train", "classifier", "--labelled", tmp_path / "l.json", "-o", tmp_path / "c.pt")
    assert res.exit_code != 0 and "background" in res.output
    assert not list(tmp_path.glob("c.*"))


def test_labelled_json_trains_an_image_classifier_for_auto(tmp_path, lite_medsam):
    """Nuclei versus the rest on a real NIH3T3 crop: candidates labelled by hand in JSON, then `auto --classifier`."""
    from skimage.measure import label

    image = iio.imread(shared_file("nuclei_nih3t3", "images", "dna-1.png"))[256:768, 256:768]
    truth = label(iio.imread(shared_file("nuclei_nih3t3", "labels", "1.png"))[256:768, 256:768] > 0)
    iio.imwrite(tmp_path / "img.png", image)
    # The user's candidates: the true nuclei, plus squares of background labelled as such.
    masks = truth.astype(np.uint16)
    ids = [i for i in np.unique(truth) if i][:6]
    entries = [{"image": "img.png", "masks": "m.tif", "mask_id": int(i), "class": "nucleus"} for i in ids]
    free = np.argwhere(truth == 0)
    for k, (y, x) in enumerate(free[:: len(free) // 5][:5]):
        y, x = min(y, 500), min(x, 500)
        if not truth[y : y + 12, x : x + 12].any():
            masks[y : y + 12, x : x + 12] = 1000 + k
            entries.append({"image": "img.png", "masks": "m.tif", "mask_id": 1000 + k, "class": "background"})
    import tifffile

    tifffile.imwrite(tmp_path / "m.tif", masks)
    (tmp_path / "labelled.json").write_text(json.dumps(entries))
    out = tmp_path / "nuclei.pt"
    res = run("train", "classifier", "--labelled", tmp_path / "labelled.json", "-o", out, "--epochs", "20",
              "--variants", "1", "--val-fraction", "0")
    assert res.exit_code == 0, res.output
    loaded = load_classifier(out, lite_medsam, source="image")
    assert loaded.classes == ["background", "nucleus"]
    res = run("auto", tmp_path / "img.png", "-o", tmp_path / "plain.tif")
    assert res.exit_code == 0, res.output
    res = run("auto", tmp_path / "img.png", "-o", tmp_path / "a.tif", "--classifier", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    plain, kept = tifffile.imread(tmp_path / "plain.tif"), tifffile.imread(tmp_path / "a.tif")
    assert report["objects"] == kept.max() and report["objects"] + report["rejected_by_classifier"] == plain.max()
    from biosam.evaluate import match_instances

    found = [len(match_instances(labels, truth, 0.5).pair_iou) for labels in (plain, kept)]
    assert found[0] >= 5 and found[1] >= found[0] // 2  # nuclei that auto found are mostly kept
