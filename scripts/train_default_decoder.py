"""Train the instance decoder shipped for LiteMedSAM (``biosam/automatic/weights/lite_medsam_nuclei_decoder.pt``).

Data: the project's nuclei split (:func:`biosam.automatic.data.nuclei_split`):
14 NIH3T3 Hoechst images for training; 4 NIH3T3 images choose the best epoch,
and the DSB2018 image is only scored at the end (unseen microscope). Training tiles are cut at three scales (native, 1/2, 1/4)
so that the decoder also sees nuclei as small as DSB2018's (about 24 px across;
NIH3T3 nuclei are about 95 px). Run from the repository root:

    python scripts/train_default_decoder.py --data ../shared/data

Embeddings are cached (``--cache-dir``), so a second run, or ``--resume`` after
an interruption, skips the encoder. The scores per validation set are printed
as JSON at the end and stored in the checkpoint (``training.validation``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "biosam" / "automatic" / "weights" / "lite_medsam_nuclei_decoder.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder with nuclei_nih3t3/")
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache [default: <biosam cache>/decoder-embeddings]")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a machine shared with other jobs)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from biosam import load_model
    from biosam.automatic.ais import load_decoder
    from biosam.automatic.data import nuclei_split
    from biosam.train import TrainSettings, train_decoder
    from biosam.train.decoder import EmbeddingCache, evaluate_decoder, resume_path, validation_images
    from biosam.zoo.download import cache_dir

    started = time.perf_counter()
    train, val = nuclei_split(args.data)
    model = load_model("lite_medsam", device="cpu")
    settings = TrainSettings(
        epochs=args.epochs,
        patience=8,
        scales=(1.0, 0.5, 0.25),
        crops_per_image=(12, 6, 2),
        variants=1,
        window=32,
        steps_per_epoch=60,
        batch_size=8,
        lr=2e-3,
        seed=0,
    )
    cache = args.cache_dir or cache_dir() / "decoder-embeddings"
    # The best epoch is chosen on the NIH3T3 validation images (the microscope the decoder is for);
    # DSB2018 stays unseen and is only scored at the end.
    nih3t3_val = [p for p in val if "nuclei_nih3t3" in str(p[0])]
    result = train_decoder(model, train, nih3t3_val, args.output, settings, cache_dir=cache, resume=args.resume)
    resume_path(args.output).unlink(missing_ok=True)  # keep the package folder free of training state

    # Scores per validation set: NIH3T3 (same microscope as training) and DSB2018 (unseen data).
    decoder = load_decoder(args.output, model)
    params = decoder.info["postprocessing"]
    from biosam.automatic.instances import PostProcessing

    report = {"seconds": round(time.perf_counter() - started, 1), "best_epoch": result.best_epoch,
              "epochs_run": result.epochs_run, "parameters": result.parameters, "postprocessing": params,
              "history": result.history, "validation_all": result.validation}
    embeddings = EmbeddingCache(model, cache)
    sets = (("nih3t3_val", [p for p in val if "nuclei_nih3t3" in str(p[0])], 1.0),
            ("dsb2018", [p for p in val if "dsb2018" in str(p[0])], 1.0),
            # DSB2018 nuclei are about 25 px across, a quarter of NIH3T3's: the same decoder on the image at 2x
            ("dsb2018_upscaled_2x", [p for p in val if "dsb2018" in str(p[0])], 2.0))
    for name, pairs, scale in sets:
        items = validation_images(model, pairs, decoder.info["tile"], decoder.info["halo"],
                                  decoder.info["intensity"], embeddings, scale=scale)
        scores, per_image = evaluate_decoder(decoder, items, PostProcessing.from_dict(params))
        report[name] = scores | {"per_image": per_image}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
