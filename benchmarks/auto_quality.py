"""Automatic instance segmentation quality on the project's fixed nuclei validation split.

Methods, side by side on the same images (whole images, tiled as `biosam auto` does):

- ``ais``: the trained instance decoder shipped for the model, image as it is;
- ``ais-size``: the same with the typical nucleus diameter given (``--object-size``), so the
  image is resized to the object size the decoder records;
- ``amg``: grid-prompted mask generation (the model's default settings, or ``--amg-points``);
- ``otsu``: a classical baseline: intensities clipped to their 0.5-99.5 percentiles, Otsu threshold, holes filled, distance transform, peaks at least a quarter
  of the nucleus diameter apart as seeds, watershed.

The nucleus diameter given per set is what a user would measure on a few nuclei: the median
equivalent diameter of the labelled nuclei, rounded (NIH3T3 85 px, DSB2018 24 px).

Scores: F1, precision and recall at IoU 0.5 and mean segmentation accuracy (mSA over IoU
0.5:0.05:0.95), pooled over the images of each set, plus seconds per image.

    python benchmarks/auto_quality.py [--model lite_medsam] [--methods ais,ais-size,amg,otsu] [--amg-points 16] [--out table.md]
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
from biosam.automatic.amg import AmgSettings
from biosam.automatic.data import nuclei_split, read_pair
from biosam.automatic.run import AutoSettings, amg_settings_for, segment_automatic
from biosam.evaluate import aggregate, instance_counts
from biosam.evaluate.instances import MSA_THRESHOLDS
from biosam.runtime import configure_cpu

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def otsu_watershed(image: np.ndarray, object_size: float) -> np.ndarray:
    """Otsu foreground, split touching objects at the peaks of the distance transform."""
    min_distance, min_size = max(2, round(object_size / 4)), round((object_size / 4) ** 2)
    gray = image if image.ndim == 2 else image.mean(axis=-1)
    gray = np.clip(gray, *np.percentile(gray, (0.5, 99.5)))  # saturated debris would pull the threshold up
    foreground = remove_small_objects(ndimage.binary_fill_holes(gray > threshold_otsu(gray)), min_size)
    distance = ndimage.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=ndimage.label(foreground)[0], exclude_border=False)
    markers = np.zeros(gray.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=foreground)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--methods", default="ais,ais-size,amg,otsu")
    parser.add_argument("--amg-points", type=int, default=None, help="grid points per side for amg (default: the model's)")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N validation images (quick look)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()

    configure_cpu(args.threads)  # as the biosam command does
    _, val = nuclei_split(DATA)
    val = val[: args.max_images] if args.max_images else val
    sets = {"NIH3T3 val (4 images)": ([p for p in val if "nih3t3" in str(p[0])], 85.0),
            "DSB2018 (1 image)": ([p for p in val if "dsb2018" in str(p[0])], 24.0)}
    predictor = biosam.Predictor(biosam.load_model(args.model, device=args.device))
    amg = amg_settings_for(predictor.model)
    if args.amg_points:
        amg = AmgSettings(**{**amg.__dict__, "points_per_side": args.amg_points})
    methods = {
        "ais": lambda image, size: segment_automatic(predictor, image, AutoSettings(mode="ais"), progress=True),
        "ais-size": lambda image, size: segment_automatic(
            predictor, image, AutoSettings(mode="ais", object_size=size), progress=True),
        "amg": lambda image, size: segment_automatic(predictor, image, AutoSettings(mode="amg", amg=amg), progress=True),
        "otsu": otsu_watershed,
    }
    chosen = [m.strip() for m in args.methods.split(",")]
    results: dict[str, dict[str, dict]] = {}
    for set_name, (pairs, object_size) in sets.items():
        for method in chosen:
            counts, seconds = [], []
            for image_path, label_path in pairs:
                image, truth = read_pair(image_path, label_path)
                start = time.perf_counter()
                pred = methods[method](image, object_size)
                seconds.append(time.perf_counter() - start)
                counts.append(instance_counts(pred, truth, MSA_THRESHOLDS))
                print(f"{set_name} {method} {image_path.name}: {int(pred.max())} objects in {seconds[-1]:.1f} s", flush=True)
            if counts:
                summary = aggregate(counts, MSA_THRESHOLDS)
                summary["seconds_per_image"] = float(np.mean(seconds))
                results.setdefault(set_name, {})[method] = summary

    lines = [
        f"Model `{args.model}`; amg: {amg.points_per_side}x{amg.points_per_side} points per tile, predicted IoU > "
        f"{amg.pred_iou_thresh}, stability > {amg.stability_score_thresh}. Machine: "
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}.",
        "",
        "| images | method | F1@0.5 | precision@0.5 | recall@0.5 | mSA | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for set_name, by_method in results.items():
        for method, r in by_method.items():
            at = next(row for row in r["per_threshold"] if abs(row["threshold"] - 0.5) < 1e-9)
            lines.append(f"| {set_name} | {method} | {at['f1']:.3f} | {at['precision']:.3f} | {at['recall']:.3f} | "
                         f"{r['msa']:.3f} | {r['seconds_per_image']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
