"""Vesicle finding (`biosam tomogram`'s pipeline) on synthetic tomograms with exact ground truth.

Two generators (biosam.tomogram.synthetic):

* ``realistic``: crowded synapse-like scenes imaged as a tilt series (CTF at
  the seed's defocus, dose-dependent noise, weighted back-projection, missing
  wedge), vesicles 30-60 nm in clusters 2-10 nm apart plus endosomes, at each
  voxel size and polarity asked for, per-voxel SNR ``--snr``; a 320 x 320 nm
  field, 128 nm thick. Seeds 900 on: never used to train or tune anything
  (the vesicle decoder trains on seeds 100-199 and tunes on 500-599).
* ``simple``: the fast Fourier-filtered generator the pipeline was first
  tuned on ((96, 256, 256) at 10 Å, 20 vesicles of radius 15-40 nm, wedge 60°).

Per configuration: detection F1 at 3D IoU 0.5 and 0.3 (one-to-one matching),
precision and recall at 0.5, the mean IoU of matched objects, the median
absolute % error of the volume-equivalent diameter against the true diameter,
the median ratio of found to true z-extent, and seconds per tomogram.

    python benchmarks/tomogram_quality.py [--methods decoder lumen] [--voxel 7 10 14] [--polarity dark bright]
        [--snr 0.3] [--seeds 900 901] [--simple-seeds 1 3] [--throughput] [--threads 2] [--out table.md]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from fidelity import markdown

import biosam
from biosam.evaluate import match_instances
from biosam.runtime import configure_cpu
from biosam.tomogram import VesicleSettings, realistic_tomogram, segment_vesicles, synthetic_tomogram
from biosam.tomogram.measure import measure_vesicles
from biosam.tomogram.vesicles import CANDIDATE_METHODS


def z_extents(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Number of slices each of ``ids`` spans."""
    from scipy import ndimage as ndi

    boxes = ndi.find_objects(labels)
    return np.array([boxes[i - 1][0].stop - boxes[i - 1][0].start for i in ids], np.float64)


def score(labels: np.ndarray, truth) -> dict:
    """Detection counts at IoU 0.5 and 0.3, matched IoU, diameter and z-extent errors."""
    match = match_instances(labels, truth.labels, 0.5)
    loose = match_instances(labels, truth.labels, 0.3)
    tp, n_pred, n_gt = len(match.pair_iou), len(match.pred_ids), len(match.gt_ids)
    pred_ids, gt_ids = match.pred_ids[match.pred_index], match.gt_ids[match.gt_index]
    table = measure_vesicles(labels, truth.voxel_size)
    row_of = {int(label): i for i, label in enumerate(table["label"])}
    true_d = 2 * truth.radii_nm[gt_ids - 1]
    found_d = table["equivalent_diameter_nm"][[row_of[int(p)] for p in pred_ids]]
    return {"tp": tp, "n_pred": n_pred, "n_gt": n_gt, "tp3": len(loose.pair_iou),
            "iou": list(match.pair_iou), "d_err": list(np.abs(found_d - true_d) / true_d * 100),
            "z_ratio": list(z_extents(labels, pred_ids) / z_extents(truth.labels, gt_ids)) if tp else []}


def summarise(runs: list[dict]) -> list[str]:
    tp, n_pred, n_gt, tp3 = (sum(r[k] for r in runs) for k in ("tp", "n_pred", "n_gt", "tp3"))
    f1 = 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0
    f1_3 = 2 * tp3 / (n_pred + n_gt) if n_pred + n_gt else 1.0

    def median(key):
        values = [v for r in runs for v in r[key]]
        return f"{np.median(values):.2f}" if values else "-"

    return [f"{f1:.3f}", f"{f1_3:.3f}", f"{tp / n_pred if n_pred else 0:.3f}", f"{tp / n_gt if n_gt else 0:.3f}",
            f"{tp} / {n_pred - tp} / {n_gt - tp}", median("iou"), median("d_err"), median("z_ratio"),
            f"{np.mean([r['seconds'] for r in runs]):.0f}"]


def run_one(predictor, truth, method: str) -> dict:
    start = time.perf_counter()
    result = segment_vesicles(predictor, truth.volume, truth.voxel_size, VesicleSettings(method=method),
                              progress=False)
    s = score(result.labels, truth)
    s["seconds"] = time.perf_counter() - start
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--methods", nargs="+", default=["decoder", "lumen"], choices=CANDIDATE_METHODS)
    parser.add_argument("--voxel", nargs="+", type=float, default=[7.0, 10.0, 14.0])
    parser.add_argument("--polarity", nargs="+", default=["dark", "bright"], choices=["dark", "bright"])
    parser.add_argument("--snr", nargs="+", type=float, default=[0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[900, 901])
    parser.add_argument("--simple-seeds", nargs="*", type=int, default=[1, 3])
    parser.add_argument("--throughput", action="store_true", help="also time one 200 x 512 x 512 tomogram")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=str)
    args = parser.parse_args()
    if any(s < 900 for s in args.seeds):
        parser.error("--seeds: seeds below 900 are the vesicle decoder's training and tuning seeds")
    configure_cpu(threads=args.threads)
    predictor = biosam.Predictor(biosam.load_model(args.model))
    started = time.perf_counter()
    results: dict[tuple, list] = {}
    for voxel in args.voxel:
        for polarity in args.polarity:
            for snr in args.snr:
                for seed in args.seeds:
                    shape = (round(1280 / voxel), round(3200 / voxel), round(3200 / voxel))
                    truth = realistic_tomogram(shape, voxel_size=voxel, polarity=polarity, snr=snr, seed=seed)
                    for method in args.methods:
                        s = run_one(predictor, truth, method)
                        results.setdefault(("realistic", f"{voxel:g}", polarity, f"{snr:g}", method), []).append(s)
                        print(f"realistic {voxel:g} Å {polarity} snr {snr:g} seed {seed} {method}: tp {s['tp']} "
                              f"pred {s['n_pred']} truth {s['n_gt']}, {s['seconds']:.0f} s", flush=True)
    for seed in args.simple_seeds:
        truth = synthetic_tomogram((96, 256, 256), voxel_size=10.0, n_vesicles=20, radius_range_nm=(15, 40), snr=0.5,
                                   missing_wedge_deg=60, seed=seed)
        for method in args.methods:
            s = run_one(predictor, truth, method)
            results.setdefault(("simple", "10", "dark", "0.5", method), []).append(s)
            print(f"simple seed {seed} {method}: tp {s['tp']} pred {s['n_pred']} truth {s['n_gt']}", flush=True)
    header = ["generator", "voxel Å", "polarity", "SNR", "method", "F1 @ IoU 0.5", "F1 @ 0.3", "precision",
              "recall", "TP / FP / FN", "matched IoU", "diameter error, median %", "z-extent found / true",
              "s per tomogram"]
    rows = [list(key) + summarise(runs) for key, runs in results.items()]
    for method in args.methods:
        pooled = [r for key, runs in results.items() if key[0] == "realistic" and key[4] == method for r in runs]
        if pooled:
            rows.append(["realistic, all", "", "", "", method] + summarise(pooled))
    text = (f"Model {args.model}; realistic seeds {args.seeds}, simple seeds {args.simple_seeds}; "
            f"{platform.processor() or platform.machine()}, total {time.perf_counter() - started:.0f} s.\n\n"
            + markdown(header, rows))
    if args.throughput:
        truth = realistic_tomogram((200, 512, 512), voxel_size=10.0, snr=0.3, seed=args.seeds[0])
        s = run_one(predictor, truth, args.methods[0])
        text += (f"\n\nThroughput ({args.methods[0]}): one 200 x 512 x 512 tomogram in {s['seconds']:.0f} s = "
                 f"{3600 / s['seconds']:.0f} tomograms per hour (F1 {2 * s['tp'] / (s['n_pred'] + s['n_gt']):.3f}).")
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
