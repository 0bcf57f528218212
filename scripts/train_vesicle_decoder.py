"""Train the vesicle decoder shipped for LiteMedSAM on slabs of realistic synthetic tomograms.

Tomograms come from :func:`biosam.tomogram.realistic_tomogram` with seeds
``TRAIN_SEEDS`` (training) and ``TUNE_SEEDS`` (early stopping and the
post-processing thresholds); each draws its voxel size (7-14 Å), polarity,
SNR (0.2-0.6) and defocus (3-5 µm) from its seed. Every tomogram is brought to
the working grid the pipeline uses (:func:`biosam.tomogram.grid.working_volume`,
polarity detected), and slabs at a few depths become 2D training pairs: the
slab (:func:`biosam.tomogram.detect.decoder_slab`) and the vesicle and endosome
cross-sections through its centre (:func:`biosam.tomogram.detect.cross_section_labels`).
The seeds of ``benchmarks/tomogram_quality.py`` (900 on) are never used here.

    python scripts/train_vesicle_decoder.py [--tomograms 24] [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "biosam" / "automatic" / "weights" / "lite_medsam_vesicle_decoder.pt"  # SHIPPED_DECODERS
TRAIN_SEEDS = range(100, 200)
TUNE_SEEDS = range(500, 600)
SLABS_PER_TOMOGRAM = 3


def scene_of(seed: int) -> dict:
    """The imaging parameters a seed stands for (shared with the benchmark's held-aside seeds)."""
    rng = np.random.default_rng(seed)
    voxel = float(rng.uniform(7.0, 14.0))
    thickness_nm = float(rng.uniform(110, 170))
    return {"shape": (round(thickness_nm * 10 / voxel), round(3200 / voxel), round(3200 / voxel)),
            "voxel_size": voxel, "polarity": str(rng.choice(["dark", "bright"])),
            "snr": float(rng.uniform(0.2, 0.6)), "defocus_um": float(rng.uniform(3.0, 5.0))}


def write_pairs(seeds, folder: Path, log: list) -> list[tuple[Path, Path]]:
    import tifffile
    from scipy import ndimage as ndi

    from biosam.tomogram import VesicleSettings, realistic_tomogram
    from biosam.tomogram.detect import cross_section_labels, decoder_slab, widest_sections
    from biosam.tomogram.grid import working_volume

    settings = VesicleSettings()
    pairs = []
    for seed in seeds:
        names = [folder / kind / f"s{seed}_{k}.tif" for k in range(SLABS_PER_TOMOGRAM) for kind in ("images", "labels")]
        if all(p.is_file() for p in names):
            pairs += list(zip(names[::2], names[1::2]))
            continue
        params = scene_of(seed)
        tomo = realistic_tomogram(**params, seed=seed)
        volume, grid = working_volume(tomo.volume, (tomo.voxel_size,) * 3)
        labels = ndi.zoom(tomo.labels, grid.zoom, order=0, mode="nearest", grid_mode=True)
        log.append({"seed": seed, **params, "detected": grid.polarity, "skew": grid.skew})
        widest = widest_sections(labels)
        rng = np.random.default_rng(seed)
        depth = volume.shape[0]
        for k, z in enumerate(rng.integers(int(0.2 * depth), int(0.8 * depth), SLABS_PER_TOMOGRAM)):
            image_path, label_path = names[2 * k], names[2 * k + 1]
            for path, data in ((image_path, decoder_slab(volume, int(z), settings.slab_thickness,
                                                         settings.background_nm)),
                               (label_path, cross_section_labels(labels, int(z), widest).astype(np.uint16))):
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, data)
            pairs.append((image_path, label_path))
    return pairs


def main() -> None:
    from biosam.zoo.download import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tomograms", type=int, default=24, help="training tomograms (tuning: a sixth of it)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--scratch", type=Path, default=cache_dir() / "vesicle-slabs")
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from biosam import load_model
    from biosam.train import TrainSettings, train_decoder
    from biosam.train.decoder import resume_path

    started = time.perf_counter()
    log: list = []
    train = write_pairs(TRAIN_SEEDS[: args.tomograms], args.scratch / "train", log)
    tune = write_pairs(TUNE_SEEDS[: max(2, args.tomograms // 6)], args.scratch / "tune", log)
    wrong = [entry for entry in log if entry["detected"] != entry["polarity"]]
    print(f"polarity detected wrongly on {len(wrong)} of {len(log)} tomograms", wrong)
    settings = TrainSettings(epochs=args.epochs, patience=args.epochs, scales=(1.0,), crops_per_image=(3,),
                             variants=1, window=32, steps_per_epoch=60, batch_size=8, lr=2e-3, seed=0,
                             intensity="none")
    model = load_model("lite_medsam", device="cpu", precision="fp32")
    result = train_decoder(model, train, tune, args.output, settings, cache_dir=args.scratch / "embeddings",
                           overwrite=True)
    resume_path(args.output).unlink(missing_ok=True)
    print(json.dumps({"output": str(args.output), "train_tomograms": args.tomograms, "pairs": len(train),
                      "tune_pairs": len(tune), "best_epoch": result.best_epoch, "validation": result.validation,
                      "postprocessing": result.postprocessing,
                      "minutes": round((time.perf_counter() - started) / 60, 1)}, default=str))


if __name__ == "__main__":
    main()
