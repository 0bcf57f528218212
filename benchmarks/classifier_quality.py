"""Does a trained mask classifier make `biosam tomogram` (and `biosam auto`) more precise?

Tomograms: synthetic cryo-ET volumes (biosam.tomogram.synthetic_tomogram,
(96, 256, 256) voxels of 10 Å, 12 vesicles of radius 15-40 nm, plus 6 gold
fiducials, 8 ice blobs and 4 membrane fragments, SNR 1, missing wedge ±60°)
with exact labels. A classifier (vesicle versus everything else) is trained on
the slab candidates of ``--train-seeds`` tomograms (labels: the vesicles only,
so candidates on distractors or background are background), one of them held
out for validation; then the pipeline runs on ``--test-seeds`` tomograms with
and without the classifier and the table reports detection F1 at 3D IoU 0.5
against the vesicles.

Nuclei (``--nuclei``): the fixed NIH3T3 split in ../shared/data; a classifier
(nucleus versus anything else `biosam auto --mode amg` finds: background
patches, pieces and clumps of nuclei) is trained on the amg candidates (16 x 16
points per tile) of ``--nuclei-train`` training images, and `auto --mode amg` is
scored (F1 at IoU 0.5 against the connected components of the masks) on
``--nuclei-val`` validation images with and without it. (`auto`'s default
``ais`` mode proposes only nuclei on these images: nothing for a classifier to
remove.)

    python benchmarks/classifier_quality.py [--method hough] [--train-seeds 11 12 13 14] [--test-seeds 21 22]
                                            [--nuclei] [--out table.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from fidelity import markdown
from tomogram_quality import score

import biosam
from biosam.evaluate import match_instances
from biosam.runtime import configure_cpu
from biosam.tomogram import synthetic_tomogram
from biosam.tomogram import VesicleSettings, segment_vesicles
from biosam.train.classifier import ClassifierSettings, tomogram_candidates, train_classifier

DISTRACTORS = {"n_gold": 6, "n_ice": 8, "n_membranes": 4}


def tomogram(seed: int):
    """A synthetic tomogram with distractors, and its vesicle-only instance labels."""
    truth = synthetic_tomogram((96, 256, 256), voxel_size=10.0, n_vesicles=12, radius_range_nm=(15, 40), snr=1.0,
                               missing_wedge_deg=60, seed=seed, **DISTRACTORS)
    keep = np.array([0] + [i if truth.classes.get(i) == "vesicle" else 0 for i in range(1, int(truth.labels.max()) + 1)])
    return truth, keep[truth.labels]


def f1_counts(tp: int, fp: int, fn: int) -> str:
    return f"{2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0:.3f}"


def tomogram_part(args, predictor, folder: Path) -> list[list[str]]:
    settings = VesicleSettings(method=args.method, n_slabs=args.slabs)
    sources = []
    for seed in args.train_seeds:
        truth, vesicles = tomogram(seed)
        found = tomogram_candidates(predictor, truth.volume, (10.0,) * 3, vesicles, {i: 1 for i in np.unique(vesicles) if i},
                                    f"tomogram {seed}", ClassifierSettings(), settings)
        sources.append(found)
        print(f"train tomogram {seed}: {len(found.labels)} candidates, {int((found.labels == 1).sum())} vesicles, "
              f"{int((found.labels == 0).sum())} background", flush=True)
    start = time.perf_counter()
    result = train_classifier(predictor.model, sources, ["background", "vesicle"], folder / "tomo.pt",
                              ClassifierSettings(variants=args.variants, seed=0), source_kind="tomogram",
                              cache_dir=folder / "cache", progress=False)
    train_s = time.perf_counter() - start
    print(f"classifier: validation macro-F1 {result.metrics['macro_f1']:.3f} (epoch {result.best_epoch}), "
          f"{train_s:.0f} s", flush=True)
    totals = {"without": [0, 0, 0], "with": [0, 0, 0]}
    seconds = {"without": 0.0, "with": 0.0}
    for seed in args.test_seeds:
        truth, vesicles = tomogram(seed)
        truth.labels = vesicles
        for name, classifier in (("without", None), ("with", result.classifier)):
            start = time.perf_counter()
            found = segment_vesicles(predictor, truth.volume, truth.voxel_size, settings, classifier=classifier,
                                     progress=False)
            seconds[name] += time.perf_counter() - start
            s = score(found, truth)
            totals[name] = [a + b for a, b in zip(totals[name], (s["tp"], s["fp"], s["fn"]))]
            print(f"test tomogram {seed} {name} classifier: F1 {s['f1']:.3f} (tp {s['tp']} fp {s['fp']} fn {s['fn']})",
                  flush=True)
    rows = []
    for name in ("without", "with"):
        tp, fp, fn = totals[name]
        rows.append([f"tomogram, {args.method}, {args.slabs} slabs", name, f1_counts(tp, fp, fn), f"{tp} / {fp} / {fn}",
                     f"{result.metrics['macro_f1']:.3f}" if name == "with" else "-",
                     f"{seconds[name] / len(args.test_seeds):.0f}"])
    return rows


def nuclei_part(args, predictor, folder: Path) -> list[list[str]]:
    from biosam.automatic.data import nuclei_split, read_pair
    from biosam.automatic.run import AutoSettings, amg_settings_for, segment_automatic, to_uint8
    from biosam.classify import classify_labels
    from biosam.train.classifier import image_candidates

    train_pairs, val_pairs = nuclei_split(args.data)
    val_pairs = [p for p in val_pairs if "nuclei_nih3t3" in str(p[0])][: args.nuclei_val]
    auto = AutoSettings(mode="amg", amg=amg_settings_for(predictor.model, points_per_side=16))
    sources = []
    for image_path, label_path in train_pairs[: args.nuclei_train]:
        image, truth = read_pair(image_path, label_path)
        found = image_candidates(predictor, image, truth, {i: 1 for i in np.unique(truth) if i}, image_path.name,
                                 ClassifierSettings(), auto)
        sources.append(found)
        print(f"train {image_path.name}: {len(found.labels)} candidates, {int((found.labels == 1).sum())} nuclei, "
              f"{int((found.labels == 0).sum())} background, {int((found.labels < 0).sum())} ambiguous", flush=True)
    result = train_classifier(predictor.model, sources, ["background", "nucleus"], folder / "nuclei.pt",
                              ClassifierSettings(variants=args.variants, seed=0), source_kind="image",
                              cache_dir=folder / "cache", progress=False)
    print(f"classifier: validation macro-F1 {result.metrics['macro_f1']:.3f} (epoch {result.best_epoch})", flush=True)
    totals = {"without": [0, 0, 0], "with": [0, 0, 0]}
    for image_path, label_path in val_pairs:
        image, truth = read_pair(image_path, label_path)
        labels = segment_automatic(predictor, image, auto)
        kept, _ = classify_labels(result.classifier, predictor.model, to_uint8(image), labels)
        for name, pred in (("without", labels), ("with", kept)):
            match = match_instances(pred, truth, 0.5)
            tp = len(match.pair_iou)
            totals[name] = [a + b for a, b in zip(totals[name], (tp, len(match.pred_ids) - tp, len(match.gt_ids) - tp))]
        print(f"val {image_path.name}: without {totals['without']}, with {totals['with']} (running tp/fp/fn)", flush=True)
    rows = []
    for name in ("without", "with"):
        tp, fp, fn = totals[name]
        rows.append([f"nuclei NIH3T3, auto (amg), {len(val_pairs)} images", name, f1_counts(tp, fp, fn),
                     f"{tp} / {fp} / {fn}", f"{result.metrics['macro_f1']:.3f}" if name == "with" else "-", "-"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--method", default="hough", choices=["lumen", "hough", "amg"])
    parser.add_argument("--slabs", type=int, default=3)
    parser.add_argument("--train-seeds", nargs="+", type=int, default=[11, 12, 13, 14])
    parser.add_argument("--test-seeds", nargs="+", type=int, default=[21, 22])
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--no-tomograms", action="store_true", help="Skip the tomogram part.")
    parser.add_argument("--nuclei", action="store_true", help="Also run the nuclei part (needs --data).")
    parser.add_argument("--nuclei-train", type=int, default=3, help="Training images of the nuclei part.")
    parser.add_argument("--nuclei-val", type=int, default=2, help="Validation images scored in the nuclei part.")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configure_cpu(args.threads)
    predictor = biosam.Predictor(biosam.load_model(args.model))
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_tomograms:
            rows += tomogram_part(args, predictor, Path(tmp))
        if args.nuclei:
            rows += nuclei_part(args, predictor, Path(tmp))
    header = ["task", "classifier", "F1 @ IoU 0.5", "TP / FP / FN", "classifier validation macro-F1", "seconds per tomogram"]
    text = (f"Model {args.model}; tomograms: train seeds {args.train_seeds}, test seeds {args.test_seeds}, "
            f"{args.variants} encoded variants per training candidate; {platform.processor() or platform.machine()}, "
            f"total {time.perf_counter() - start:.0f} s.\n\n" + markdown(header, rows))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
