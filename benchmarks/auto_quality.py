"""Automatic instance segmentation on light-microscopy sets the decoder never saw (leave one set out).

For every labelled set (:data:`biosam.automatic.data.LM_SETS`) the decoder trained on the *other* sets
(``scripts/train_default_decoder.py --held SET``, same recipe as the shipped one) segments the held set
with `biosam auto`'s defaults: no ``--object-size`` (the size is estimated), intensity ``auto``.
Each image is scored as stored three ways, its grey values rescaled to:

- ``dim8``: 8-bit, brightest pixel 50 (a dim camera image: most of the 256 levels unused);
- ``bright8``: 8-bit, full range;
- ``u16``: 16-bit, brightest pixel 4000 (a 12-bit camera in a 16-bit file).

BBBC007 (Drosophila Kc167 DNA, labels on 6-9 nuclei per image) is in no training set, so the shipped
decoder is scored on it; with sparse labels only predictions touching a labelled nucleus are counted.

Baseline: intensities clipped to their 0.5-99.5 percentiles, Otsu threshold, holes filled, distance
transform peaks at least a quarter diameter apart as seeds, watershed; it is *given* each set's median
nucleus diameter (the decoder is not). Scores: F1, precision, recall at IoU 0.5 and mSA (IoU
0.5:0.05:0.95), pooled over the images of a set; the estimated object size (median over images) beside
the labelled median diameter.

    python benchmarks/auto_quality.py [--folds DIR] [--sets nih3t3,dsb2018,stardist3d,bbbc007] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects
from skimage.segmentation import watershed

import biosam
from biosam.automatic.ais import load_decoder
from biosam.automatic.labels import object_diameters
from biosam.automatic.data import LM_SETS, bbbc007_pairs, light_microscopy_sets, read_pair
from biosam.automatic.run import AutoSettings, segment_automatic
from biosam.evaluate import aggregate, instance_counts
from biosam.evaluate.instances import MSA_THRESHOLDS
from biosam.runtime import configure_cpu
from biosam.train.augment import store_as
from biosam.zoo.download import cache_dir

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORAGES = {"dim8": (np.uint8, 50), "bright8": (np.uint8, 255), "u16": (np.uint16, 4000)}


def otsu_watershed(image: np.ndarray, object_size: float) -> np.ndarray:
    """Otsu foreground, split touching objects at the peaks of the distance transform."""
    min_distance, min_size = max(2, round(object_size / 4)), round((object_size / 4) ** 2)
    gray = image.astype(np.float32) if image.ndim == 2 else image.mean(axis=-1)
    gray = np.clip(gray, *np.percentile(gray, (0.5, 99.5)))  # saturated debris would pull the threshold up
    foreground = remove_small_objects(ndimage.binary_fill_holes(gray > threshold_otsu(gray)), min_size)
    distance = ndimage.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=ndimage.label(foreground)[0], exclude_border=False)
    markers = np.zeros(gray.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=foreground)


def sparse_view(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Only the predicted objects that touch a labelled object (the rest of a sparse image is unknown)."""
    touching = np.unique(pred[truth > 0])
    return np.where(np.isin(pred, touching[touching > 0]), pred, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=Path, default=cache_dir() / "decoder-folds")
    parser.add_argument("--sets", default=",".join((*LM_SETS, "bbbc007")))
    parser.add_argument("--storages", default=",".join(STORAGES))
    parser.add_argument("--no-otsu", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()

    configure_cpu(args.threads)  # as the biosam command does
    sets = light_microscopy_sets(DATA, cache_dir() / "lm-sets")
    sets["bbbc007"] = bbbc007_pairs(DATA)
    predictor = biosam.Predictor(biosam.load_model("lite_medsam"))
    rows = []
    for name in args.sets.split(","):
        pairs = sets[name]
        path = None if name == "bbbc007" else args.folds / f"without_{name}.pt"
        decoder = load_decoder(path, predictor.model)
        truths = [read_pair(*p) for p in pairs]
        diameter = float(np.median(np.concatenate([object_diameters(t) for _, t in truths])))
        methods = [(s, "ais") for s in args.storages.split(",")] + ([] if args.no_otsu else [("u16", "otsu")])
        for storage, method in methods:
            counts, seconds, sizes = [], [], []
            for (image_path, _), (image, truth) in zip(pairs, truths):
                pixels = store_as(image, *STORAGES[storage])
                start = time.perf_counter()
                if method == "otsu":
                    pred = otsu_watershed(pixels, diameter)
                else:
                    info: dict = {}
                    pred = segment_automatic(predictor, pixels, AutoSettings(decoder=decoder), info=info)
                    sizes.append(info.get("object_size") or np.nan)
                seconds.append(time.perf_counter() - start)
                if name == "bbbc007":
                    pred = sparse_view(pred, truth)
                counts.append(instance_counts(pred, truth, MSA_THRESHOLDS))
                print(f"{name} {storage} {method} {Path(image_path).name}: {int(pred.max())} objects, "
                      f"size {sizes[-1] if sizes else '-'} in {seconds[-1]:.1f} s", flush=True)
            summary = aggregate(counts, MSA_THRESHOLDS)
            at = next(r for r in summary["per_threshold"] if abs(r["threshold"] - 0.5) < 1e-9)
            rows.append({"set": name, "images": len(pairs), "objects": summary["n_gt"], "storage": storage,
                         "method": method, "decoder": "shipped (all sets)" if path is None else f"without {name}",
                         "f1": at["f1"], "precision": at["precision"], "recall": at["recall"], "msa": summary["msa"],
                         "diameter": diameter, "estimated": float(np.nanmedian(sizes)) if sizes else None,
                         "seconds_per_image": float(np.mean(seconds))})

    lines = [
        f"Model `lite_medsam`, `biosam auto` defaults (size estimated). Machine: "
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}.",
        "",
        "| held-out set | decoder trained on | stored as | method | F1@0.5 | precision | recall | mSA | "
        "diameter: labels / estimated (px) | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        estimated = f"{r['estimated']:.1f}" if r["estimated"] is not None else "given"
        lines.append(f"| {r['set']} ({r['images']} images, {r['objects']} nuclei) | {r['decoder']} | {r['storage']} | "
                     f"{'Otsu + watershed' if r['method'] == 'otsu' else 'ais'} | {r['f1']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['msa']:.3f} | {r['diameter']:.1f} / {estimated} | "
                     f"{r['seconds_per_image']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
