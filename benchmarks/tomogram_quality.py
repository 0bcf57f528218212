"""Vesicle finding in synthetic cryo-ET tomograms (`biosam tomogram`'s pipeline) against exact ground truth.

Tomograms come from biosam.tomogram.synthetic_tomogram: (96, 256, 256) voxels
of 10 Å, 20 vesicles of radius 15-40 nm, missing wedge +-60 degrees, the
default band-pass, at SNR 0.5 and 1, seeds 1 and 3 (among the first seeds, those
for which 20 such vesicles can be placed). For each candidate method and number
of slabs the pipeline runs with its defaults otherwise, and the table reports
detection F1 at 3D IoU 0.5 (one-to-one matching, biosam.evaluate.match_instances),
the mean IoU of matched vesicles, the median absolute % error of the fitted and
the volume-equivalent diameter against the true 2 * radius for matched
vesicles, and the run time.

Slice embeddings are cached in one store per tomogram, so only the first
configuration run on a tomogram pays for them; times are reported per run
(the first includes the embeddings).

    python benchmarks/tomogram_quality.py [--configs lumen:1 lumen:5 hough:1 amg:1] [--seeds 1 3] [--snr 0.5 1]
                                          [--threads 2] [--out table.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from fidelity import markdown

import biosam
from biosam.evaluate import match_instances
from biosam.prompting.store import EmbeddingStore
from biosam.runtime import configure_cpu
from biosam.tomogram import synthetic_tomogram
from biosam.tomogram.measure import measure_vesicles
from biosam.tomogram.pipeline import CANDIDATE_METHODS, VesicleSettings, segment_vesicles


def score(result, truth) -> dict:
    """F1 at 3D IoU 0.5 and diameter errors of matched vesicles."""
    match = match_instances(result.labels, truth.labels, 0.5)
    tp, n_pred, n_gt = len(match.pair_iou), len(match.pred_ids), len(match.gt_ids)
    table = measure_vesicles(result.labels, truth.voxel_size, result.scores)
    row_of = {int(label): i for i, label in enumerate(table["label"])}
    true_d = 2 * truth.radii_nm[match.gt_ids[match.gt_index] - 1]
    rows = [row_of[int(p)] for p in match.pred_ids[match.pred_index]]
    fitted = table["fitted_diameter_nm"][rows]
    equivalent = table["equivalent_diameter_nm"][rows]
    return {
        "tp": tp, "fp": n_pred - tp, "fn": n_gt - tp,
        "f1": 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0,
        "iou": float(match.pair_iou.mean()) if tp else float("nan"),
        "fit_err": np.abs(fitted - true_d) / true_d * 100,
        "eq_err": np.abs(equivalent - true_d) / true_d * 100,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam")
    # amg:1 is left out by default to keep the run near 10 minutes on 2 cores (add it with --configs).
    parser.add_argument("--configs", nargs="+", default=["lumen:1", "lumen:5", "hough:1"],
                        help="candidate method and number of slabs, METHOD:N (methods: "
                             f"{', '.join(CANDIDATE_METHODS)}; N = 1: the middle slab)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--snr", nargs="+", type=float, default=[0.5, 1.0])
    parser.add_argument("--shape", nargs=3, type=int, default=[96, 256, 256])
    parser.add_argument("--z-step", type=int, default=None, help="override the pipeline's z_step")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    configs = []
    for text in args.configs:
        method, _, n = text.partition(":")
        if method not in CANDIDATE_METHODS or not n.isdigit() or int(n) < 1:
            parser.error(f"--configs: '{text}' is not METHOD:N with METHOD one of {', '.join(CANDIDATE_METHODS)}")
        configs.append((method, int(n)))
    configure_cpu(threads=args.threads)
    predictor = biosam.Predictor(biosam.load_model(args.model))
    results: dict[tuple, list] = {}
    start_all = time.perf_counter()
    for snr in args.snr:
        for seed in args.seeds:
            truth = synthetic_tomogram(tuple(args.shape), voxel_size=10.0, n_vesicles=20, radius_range_nm=(15, 40),
                                       snr=snr, missing_wedge_deg=60, seed=seed)
            with tempfile.TemporaryDirectory() as folder:
                predictor.store = EmbeddingStore(Path(folder) / "store.zarr", predictor.model)
                for method, n_slabs in configs:
                    extra = {} if args.z_step is None else {"z_step": args.z_step}
                    settings = VesicleSettings(method=method, n_slabs=n_slabs, **extra)
                    start = time.perf_counter()
                    result = segment_vesicles(predictor, truth.volume, truth.voxel_size, settings, progress=False)
                    seconds = time.perf_counter() - start
                    s = score(result, truth)
                    s["seconds"] = seconds
                    results.setdefault((method, n_slabs, snr), []).append(s)
                    print(f"snr {snr} seed {seed} {method} slabs {n_slabs}: F1 {s['f1']:.3f} (tp {s['tp']} fp "
                          f"{s['fp']} fn {s['fn']}), IoU {s['iou']:.3f}, fitted diameter error median "
                          f"{np.median(s['fit_err']) if s['tp'] else float('nan'):.1f}%, {seconds:.0f} s", flush=True)
                predictor.store = None
    header = ["method", "slabs", "SNR", "F1 @ 3D IoU 0.5", "TP / FP / FN", "mean IoU (matched)",
              "fitted diameter error, median %", "equivalent diameter error, median %", "seconds per run"]
    rows = []
    for (method, n_slabs, snr), runs in results.items():
        tp, fp, fn = (sum(r[k] for r in runs) for k in ("tp", "fp", "fn"))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        fit = np.concatenate([r["fit_err"] for r in runs])
        eq = np.concatenate([r["eq_err"] for r in runs])
        iou = np.nanmean([r["iou"] for r in runs])
        rows.append([method, str(n_slabs), f"{snr:g}", f"{f1:.3f}", f"{tp} / {fp} / {fn}", f"{iou:.3f}",
                     f"{np.median(fit) if fit.size else float('nan'):.1f}",
                     f"{np.median(eq) if eq.size else float('nan'):.1f}",
                     f"{np.mean([r['seconds'] for r in runs]):.0f}"])
    text = (f"Model {args.model}; {len(args.seeds)} tomograms per SNR (seeds {', '.join(map(str, args.seeds))}), "
            f"shape {tuple(args.shape)} at 10 Å, 20 vesicles of radius 15-40 nm, missing wedge 60°; "
            f"{platform.processor() or platform.machine()}, total {time.perf_counter() - start_all:.0f} s.\n\n"
            + markdown(header, rows))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
