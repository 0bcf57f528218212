"""Box-prompt quality on the labelled sets in ../shared/data: whole image (zoom off) vs crop-and-zoom (auto).

For every ground-truth object, its tight box (x_min, y_min, x_max, y_max) is the
prompt; the score is the IoU between the predicted and the true mask, averaged
over objects. Objects under 16 pixels (fragments of the connected-component
labels) are left out.

    python benchmarks/box_quality.py [--model lite_medsam] [--max-images 3] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
import torch
from skimage.measure import label as connected_components

import biosam
from biosam.evaluate import boxes_from_labels, mask_iou

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIN_AREA = 16


def _instances(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels).astype(np.int64)


def dsb2018(limit: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    d = DATA / "stardist_dsb2018_nuclei_2d"
    yield "img2d", tifffile.imread(d / "img2d.tif"), _instances(tifffile.imread(d / "mask2d.tif"))


def nih3t3(limit: int):
    d = DATA / "nuclei_nih3t3"
    for lab in sorted((d / "labels").glob("*.png"), key=lambda p: int(p.stem))[:limit]:
        yield lab.stem, iio.imread(d / "images" / f"dna-{lab.name}"), connected_components(iio.imread(lab) > 0)


def bbbc007(limit: int):
    d = DATA / "bbbc007_sparse_instances"
    for lab in sorted((d / "sparse_labels").glob("*.tif"))[:limit]:
        yield lab.stem, tifffile.imread(d / "images" / lab.name), _instances(tifffile.imread(lab))


def sammed2d_ct(limit: int):
    d = DATA / "sammed2d_ct_demo"
    for img in sorted((d / "images").glob("*.png"))[:limit]:
        masks = sorted((d / "masks").glob(f"{img.stem}_*.png"))
        labels = np.zeros(iio.imread(img).shape[:2], dtype=np.int64)
        for k, m in enumerate(masks, start=1):
            labels[iio.imread(m) > 0] = k  # organ masks do not overlap
        yield img.stem, iio.imread(img), labels


def isbi2012(limit: int):
    d = DATA / "isbi2012_em_membranes"
    for i in range(limit):
        interior = iio.imread(d / "labels" / f"{i}.png") > 127
        yield str(i), iio.imread(d / "images" / f"{i}.png"), connected_components(interior, connectivity=1)


DATASETS = {
    "DSB2018 nuclei (fluorescence)": dsb2018,
    "NIH3T3 nuclei (Hoechst)": nih3t3,
    "BBBC007 nuclei (sparse labels)": bbbc007,
    "SAM-Med2D CT organs": sammed2d_ct,
    "ISBI2012 EM cells": isbi2012,
}


def evaluate(predictor: biosam.Predictor, images, zooms: tuple[str, ...]) -> dict:
    ious: dict[str, list[float]] = {z: [] for z in zooms}
    seconds = {z: 0.0 for z in zooms}
    sizes: list[float] = []
    zoomed = 0
    for _, image, labels in images:
        boxes, ids = boxes_from_labels(labels)
        keep = np.array([(labels == i).sum() >= MIN_AREA for i in ids], dtype=bool)
        boxes, ids = boxes[keep], ids[keep]
        if not len(ids):
            continue
        sizes += list(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) + 1)
        t0 = time.perf_counter()
        predictor.set_image(image)
        embed_time = time.perf_counter() - t0
        for z in zooms:
            t0 = time.perf_counter()
            result = predictor.predict(box=boxes, zoom=z)
            seconds[z] += embed_time + time.perf_counter() - t0
            ious[z] += [mask_iou(m, labels == i) for m, i in zip(result.masks, ids)]
            if z == "auto":
                zoomed += int(result.zoomed.sum())
    return {
        "objects": len(sizes),
        "median_size": float(np.median(sizes)) if sizes else 0.0,
        "zoomed": zoomed,
        **{f"iou_{z}": float(np.mean(ious[z])) for z in zooms},
        **{f"seconds_{z}": seconds[z] for z in zooms},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--max-images", type=int, default=3, help="images per dataset (ISBI2012: slices)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs the labelled data in {DATA}")

    model = biosam.load_model(args.model, device=args.device)
    predictor = biosam.Predictor(model)
    rows, raw = [], {}
    for name, loader in DATASETS.items():
        r = evaluate(predictor, loader(args.max_images), ("off", "auto"))
        raw[name] = r
        rows.append(
            f"| {name} | {r['objects']} | {r['median_size']:.0f} | {r['iou_off']:.3f} | {r['iou_auto']:.3f} "
            f"| {r['zoomed']} | {r['seconds_off']:.1f} | {r['seconds_auto']:.1f} |"
        )
        print(rows[-1], flush=True)
    device = next(model.parameters()).device
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}, torch {torch.__version__}"
    table = "\n".join(
        [
            f"Model `{args.model}`, up to {args.max_images} images per set; {machine}.",
            "",
            "| data set | objects | median size (px) | mean IoU, zoom off | mean IoU, zoom auto | zoomed | s (off) | s (auto) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print()
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
