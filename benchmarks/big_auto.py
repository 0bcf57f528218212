"""`biosam auto` on an 8192 x 8192 image: time, peak memory, and quality against the truth.

Builds a mosaic of the real NIH3T3 nuclei images in ``../shared/data`` (each
placed copy rotated or flipped; instance truth from their masks, ids kept
unique), runs the `biosam auto` command on it in a child process while sampling
its memory from /proc, then scores the labels with `biosam.evaluate` and checks
that no object was cut along the tile grid (every label is one connected piece).

    python benchmarks/big_auto.py [--side 8192] [--object-size 85] [--workdir /tmp/biosam_big_auto] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from _memory import run_measured  # benchmarks/ is on sys.path when a script here runs
from scipy import ndimage

from biosam.automatic.data import nuclei_split, read_pair
from biosam.evaluate import evaluate_instances

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def mosaic(side: int) -> tuple[np.ndarray, np.ndarray]:
    """An image and its instance labels, ``side`` pixels square, tiled from the NIH3T3 images."""
    train, val = nuclei_split(DATA)
    pairs = [p for p in train + val if "nih3t3" in str(p[0])]
    image = np.zeros((side, side), np.uint8)
    labels = np.zeros((side, side), np.uint32)
    y, k, offset = 0, 0, 0
    while y < side:
        x, height = 0, 0
        while x < side:
            img, truth = read_pair(*pairs[k % len(pairs)])
            turns = k % 4
            img, truth = np.rot90(img, turns), np.rot90(truth, turns)
            h, w = min(img.shape[0], side - y), min(img.shape[1], side - x)
            image[y : y + h, x : x + w] = img[:h, :w]
            part = truth[:h, :w].astype(np.uint32)
            labels[y : y + h, x : x + w] = np.where(part > 0, part + offset, 0)
            offset += int(truth.max())
            x, height, k = x + w, max(height, h), k + 1
        y += height
    return image, labels


def pieces_per_label(labels: np.ndarray) -> int:
    """How many labels consist of more than one connected piece (a seam would split objects)."""
    split = 0
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None and ndimage.label(labels[box] == index)[1] > 1:
            split += 1
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--object-size", type=float, default=85.0, help="passed to biosam auto (0: not given)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/biosam_big_auto"))
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    image_path, out = args.workdir / "mosaic.tif", args.workdir / "labels.tif"
    t0 = time.perf_counter()
    image, truth = mosaic(args.side)
    tifffile.imwrite(image_path, image)
    print(f"{image_path}: {args.side} x {args.side}, {int(truth.max())} nuclei, ready in {time.perf_counter() - t0:.0f} s",
          flush=True)
    del image

    cmd = [sys.executable, "-m", "biosam", "auto", str(image_path), "-o", str(out), "--device", "cpu",
           "--overwrite", "--json"]
    if args.object_size:
        cmd += ["--object-size", str(args.object_size)]
    returncode, stdout, seconds, peaks = run_measured(cmd)
    if returncode != 0:
        sys.exit(f"biosam auto failed with exit code {returncode}")
    report = json.loads(stdout)
    labels = tifffile.imread(out)
    scores = evaluate_instances(labels, truth)
    at = next(r for r in scores["per_threshold"] if abs(r["threshold"] - 0.5) < 1e-9)
    rows = [
        ("image", f"{args.side} x {args.side} uint8 mosaic of NIH3T3 nuclei images, {int(truth.max())} nuclei"),
        ("command", " ".join(["biosam", *cmd[3:]]).replace(str(args.workdir) + "/", "")),
        ("object size (px; estimated unless given)", f"{report['object_size']}"),
        ("scale applied", f"{report['scale']:.3f}"),
        ("objects found", f"{report['objects']}"),
        ("wall time", f"{seconds:.0f} s"),
        ("peak private memory (RssAnon)", f"{peaks.get('RssAnon', 0) / 2**30:.2f} GiB"),
        ("peak resident memory (VmRSS)", f"{peaks.get('VmRSS', 0) / 2**30:.2f} GiB"),
        ("F1@0.5 / mSA vs truth", f"{at['f1']:.3f} / {scores['msa']:.3f}"),
        ("labels in more than one piece", f"{pieces_per_label(labels)}"),
        ("machine", f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"),
    ]
    print("\n| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
