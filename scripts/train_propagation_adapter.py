"""Train the propagation adapter shipped for LiteMedSAM (biosam/volume/weights/lite_medsam_propagation.pt).

Trained on the *tuning* objects of benchmarks/volume_quality.py only (every StarDist
3D nucleus; odd labels of the ISBI 2012 cells and the TotalSegmentator CT and MR
organs): the even labels stay held aside for the number reported in the README.

    python scripts/train_propagation_adapter.py [-o src/biosam/volume/weights/lite_medsam_propagation.pt]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from volume_quality import SETS, held_aside, largest_slice_prompts  # noqa: E402

import biosam  # noqa: E402
from biosam.runtime import configure_cpu  # noqa: E402
from biosam.train.propagation import AdapterSettings, LabelledVolume, train_propagation_adapter  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path,
                        default=ROOT / "src" / "biosam" / "volume" / "weights" / "lite_medsam_propagation.pt")
    parser.add_argument("--epochs", type=int, default=AdapterSettings.epochs)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_cpu()
    data = []
    for name in args.sets:
        load, min_slices, min_area = SETS[name]
        volume, labels = load()
        ids, _ = largest_slice_prompts(labels, min_slices, min_area)  # the benchmark's objects...
        ids = [i for i in ids if not held_aside(name, i)]  # ...minus the held-aside ones
        data.append(LabelledVolume(volume, labels, ids, name))
        print(f"{name}: {len(ids)} training objects", flush=True)
    start = time.perf_counter()
    metrics = train_propagation_adapter(biosam.load_model("lite_medsam"), data, args.output,
                                        AdapterSettings(epochs=args.epochs))
    print(json.dumps({**metrics, "seconds": round(time.perf_counter() - start)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
