"""Choose the stop rules of a projection on the tuning objects of volume_quality.py (never the held-aside ones).

Each setting propagates only the tuning objects (every StarDist 3D nucleus; odd labels of the ISBI 2012 cells
and the TotalSegmentator CT and MR organs) from one true box on their largest slice, and is scored by the
mean 3D Dice over all of them. Prints one row per setting, best first.

    python benchmarks/stop_rules.py [--projection learned] [--min-score 0.3 0.5 0.7] [--max-shift 1.5 inf]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import numpy as np
from fidelity import markdown
from volume_quality import SETS, dice, held_aside, largest_slice_prompts

import biosam
from biosam.runtime import configure_cpu
from biosam.volume import PropagationSettings, segment_volume
from biosam.volume.propagate import PROJECTIONS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--projection", default="learned", choices=PROJECTIONS)
    parser.add_argument("--min-score", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--min-overlap", nargs="+", type=float, default=[PropagationSettings.min_overlap])
    parser.add_argument("--max-shift", nargs="+", type=float, default=[1.5, float("inf")])
    args = parser.parse_args()
    configure_cpu()
    predictor = biosam.Predictor(biosam.load_model(args.model))
    data = []
    for name, (load, min_slices, min_area) in SETS.items():
        volume, labels = load()
        ids, prompts = largest_slice_prompts(labels, min_slices, min_area)
        keep = [k for k, i in enumerate(ids) if not held_aside(name, i)]
        data.append((name, volume, labels, [ids[k] for k in keep], [prompts[k] for k in keep]))
    rows = []
    for min_score, min_overlap, max_shift in itertools.product(args.min_score, args.min_overlap, args.max_shift):
        settings = PropagationSettings(projection=args.projection, min_score=min_score, min_overlap=min_overlap,
                                       max_shift=max_shift)
        start, scores = time.perf_counter(), {}
        for name, volume, labels, ids, prompts in data:
            result = segment_volume(predictor, volume, prompts, settings, progress=False)
            scores[name] = [dice(labels == i, result.labels == k + 1) for k, i in enumerate(ids)]
        pooled = np.mean([d for s in scores.values() for d in s])
        rows.append([f"{min_score:g}", f"{min_overlap:g}", f"{max_shift:g}", f"{pooled:.3f}",
                     *(f"{np.mean(s):.3f}" for s in scores.values()), f"{time.perf_counter() - start:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    rows.sort(key=lambda r: -float(r[3]))
    header = ["min_score", "min_overlap", "max_shift", "mean 3D Dice (tuning objects)",
              *(name.split(" (")[0] for name in SETS), "seconds"]
    print(f"Model {args.model}, projection {args.projection}, {platform.processor() or platform.machine()}\n")
    print(markdown(header, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
