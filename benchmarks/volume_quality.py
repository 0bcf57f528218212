"""3D propagation quality on the labelled volumes in ../shared/data.

For every ground-truth object, one box on its middle slice is the only prompt;
all objects of a volume are propagated together (as a user would) and each
object's 3D Dice against its true voxels is averaged.

- StarDist synthetic 3D nuclei (stardist 0.9.2 test data; 31 x 61 x 57, 51 nuclei).
- ISBI 2012 serial-section EM (Cardona et al. 2010; 30 x 512 x 512, 50 nm sections):
  the labels are 2D cell interiors, whose 3D connected components fuse into one
  object because sections are thick; true 3D cells are the 2D components linked
  across sections by one-to-one overlap (IoU >= 0.5, biosam.volume.link_slices).
  Cells that span at least 5 sections and 200 px on their middle section are used.

    python benchmarks/volume_quality.py [--model lite_medsam] [--projection box ...] [--out table.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
from fidelity import markdown
from scipy import ndimage as ndi
from skimage.measure import label as connected_components

import biosam
from biosam.runtime import configure_cpu
from biosam.volume import PropagationSettings, link_slices, segment_volume
from biosam.volume.propagate import PROJECTIONS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def stardist_3d() -> tuple[np.ndarray, np.ndarray]:
    d = DATA / "stardist_synthetic_nuclei_3d"
    return tifffile.imread(d / "img3d.tif"), tifffile.imread(d / "mask3d.tif").astype(np.int64)


def isbi2012() -> tuple[np.ndarray, np.ndarray]:
    d = DATA / "isbi2012_em_membranes"
    image = np.stack([iio.imread(d / "images" / f"{z}.png") for z in range(30)])
    cells = np.stack([connected_components(iio.imread(d / "labels" / f"{z}.png") > 127) for z in range(30)])
    return image, link_slices(cells, min_iou=0.5).astype(np.int64)


def middle_slice_prompts(labels: np.ndarray, min_slices: int, min_area: int) -> tuple[list[int], list[biosam.Prompt]]:
    ids, prompts = [], []
    for i, region in enumerate(ndi.find_objects(labels), start=1):
        if region is None or region[0].stop - region[0].start < min_slices:
            continue
        zs = np.nonzero((labels[region] == i).any(axis=(1, 2)))[0] + region[0].start
        z = int(zs[len(zs) // 2])
        ys, xs = np.nonzero(labels[z] == i)
        if ys.size < min_area:
            continue
        ids.append(i)
        prompts.append(biosam.Prompt(box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float), z=z))
    return ids, prompts


def dice_3d(labels: np.ndarray, ids: list[int], predicted: np.ndarray) -> np.ndarray:
    out = []
    for k, i in enumerate(ids):
        a, b = labels == i, predicted == k + 1
        out.append(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return np.asarray(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--projection", nargs="+", default=["box", "box+mask", "points"], choices=PROJECTIONS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    configure_cpu()
    predictor = biosam.Predictor(biosam.load_model(args.model))
    rows = []
    sets = {"StarDist 3D nuclei (synthetic)": (stardist_3d, 3, 20), "ISBI 2012 EM cells": (isbi2012, 5, 200)}
    for name, (load, min_slices, min_area) in sets.items():
        volume, labels = load()
        ids, prompts = middle_slice_prompts(labels, min_slices, min_area)
        for projection in args.projection:
            start = time.perf_counter()
            result = segment_volume(predictor, volume, prompts, PropagationSettings(projection=projection),
                                    progress=False)
            seconds = time.perf_counter() - start
            dice = dice_3d(labels, ids, result.labels)
            rows.append([name, f"{volume.shape}", str(len(ids)), projection, f"{dice.mean():.3f}",
                         f"{np.median(dice):.3f}", f"{seconds:.0f}", f"{2 * volume.shape[0] / seconds:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["volume", "shape (z, y, x)", "objects", "projection", "mean 3D Dice", "median", "seconds",
              "slices/s (2 sweeps)"]
    text = (f"Model {args.model} on {platform.processor() or platform.machine()}, one box per object on its middle "
            f"slice.\n\n{markdown(header, rows)}")
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
