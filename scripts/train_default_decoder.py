"""Train the instance decoder shipped for LiteMedSAM, and its leave-one-set-out twins.

Data: every light-microscopy set under ``--data`` with dense instance labels
(:data:`biosam.automatic.data.LM_SETS`: NIH3T3, DSB2018, StarDist's synthetic 3D
nuclei as 2D slices). Every image is resized so that its median nucleus is
``OBJECT_SIZE`` px across, then cut into tiles at scales around that (scale
augmentation), most of them re-exposed (gamma, offset, blur, noise, dim 8-bit
or 16-bit storage). Images without objects (camera noise; nucleus-free NIH3T3
regions, left out when NIH3T3 is held out) teach it to find nothing there. Small
sets are repeated so that each set gives a similar number of tiles. One recipe
for all runs:

- ``--held SET``: train on the other sets only and write ``<folds>/without_SET.pt``;
  ``benchmarks/auto_quality.py`` scores it on SET, which it never saw.
- default: train on all sets and write the shipped decoder.

    python scripts/train_default_decoder.py --data ../shared/data [--held nih3t3]

Embeddings are cached (``--cache-dir``), so the runs share the encoder's work.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "biosam" / "automatic" / "weights" / "lite_medsam_nuclei_decoder.pt"
OBJECT_SIZE = 32.0
TILES_PER_SET = 12  # images per set after repetition


def recipe(epochs: int):
    from biosam.train import TrainSettings

    return TrainSettings(epochs=epochs, patience=epochs, object_size=OBJECT_SIZE, scales=(0.7, 1.0, 1.4),
                         crops_per_image=(4, 4, 4), augment=0.7, variants=1, window=32, steps_per_epoch=60,
                         batch_size=8, lr=2e-3, seed=0, intensity="auto")


def main() -> None:
    from biosam.automatic.data import LM_SETS, background_pairs, light_microscopy_sets
    from biosam.zoo.download import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--held", choices=LM_SETS, default=None, help="leave this set out (a fold decoder)")
    parser.add_argument("--folds", type=Path, default=cache_dir() / "decoder-folds",
                        help="where fold decoders go [default: <biosam cache>/decoder-folds]")
    parser.add_argument("--cache-dir", type=Path, default=cache_dir() / "decoder-embeddings")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from biosam import load_model
    from biosam.train import train_decoder
    from biosam.train.decoder import resume_path

    started = time.perf_counter()
    scratch = args.cache_dir.parent / "lm-sets"
    sets = light_microscopy_sets(args.data, scratch)
    sets["background"] = background_pairs(args.data, scratch / "background", real=args.held != "nih3t3")
    train = []
    for name, pairs in sets.items():
        if name != args.held:
            train += pairs * max(1, math.ceil(TILES_PER_SET / len(pairs)))
    output = WEIGHTS if args.held is None else args.folds / f"without_{args.held}.pt"
    model = load_model("lite_medsam", device="cpu", precision="fp32")
    result = train_decoder(model, train, [], output, recipe(args.epochs), cache_dir=args.cache_dir, overwrite=True)
    resume_path(output).unlink(missing_ok=True)  # keep the package folder free of training state
    print(json.dumps({"output": str(output), "held": args.held, "sets": [s for s in sets if s != args.held],
                      "seconds": round(time.perf_counter() - started, 1), "best_epoch": result.best_epoch,
                      "postprocessing": result.postprocessing, "history": result.history}, indent=2))


if __name__ == "__main__":
    main()
