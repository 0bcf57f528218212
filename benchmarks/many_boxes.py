"""`biosam segment` with thousands of box prompts in one prompts file: time per box and peak memory.

Boxes are sized like the real NIH3T3 nuclei in ``../shared/data`` (sizes drawn from the ground-truth
objects) and placed at random over the image (seeded), so that neighbouring boxes overlap as in a dense
field of detections. The command runs in a child process while its memory is sampled from /proc.

    python benchmarks/many_boxes.py [--boxes 2000 10000] [--image dna-0] [--zoom auto] [--out many_boxes.md]

To measure another checkout (e.g. the code before a change), run it with ``PYTHONPATH=that/src``: the child
process inherits the environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from _memory import run_measured  # benchmarks/ is on sys.path when a script here runs
from fidelity import markdown
from scipy import ndimage

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nuclei_nih3t3"


def nucleus_boxes(image: str, count: int, seed: int = 0) -> tuple[Path, list[list[float]]]:
    """The image's path and ``count`` boxes (x0, y0, x1, y1) sized like its nuclei, placed at random inside it."""
    path = DATA / "images" / f"{image}.png"
    truth = iio.imread(DATA / "labels" / f"{image.removeprefix('dna-')}.png")
    objects = ndimage.find_objects(ndimage.label(truth > 0)[0])
    sizes = np.array([[s[1].stop - s[1].start, s[0].stop - s[0].start] for s in objects], dtype=float)
    h, w = truth.shape
    rng = np.random.default_rng(seed)
    size = sizes[rng.integers(0, len(sizes), count)]
    x0 = rng.uniform(0, w - size[:, 0])
    y0 = rng.uniform(0, h - size[:, 1])
    boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1).round(1)
    return path, boxes.tolist()


def cpu_name() -> str:
    """The CPU model as lscpu names it (platform's answer where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--image", default="dna-0", help="an NIH3T3 image name in ../shared/data/nuclei_nih3t3/images")
    parser.add_argument("--zoom", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"the real images in {DATA} are needed (the project's ../shared/data folder)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="biosam-many-boxes-") as tmp:
        for count in args.boxes:
            image, boxes = nucleus_boxes(args.image, count)
            prompts = Path(tmp) / f"boxes{count}.json"
            prompts.write_text(json.dumps([{"box": b} for b in boxes]))
            out = Path(tmp) / f"labels{count}.tif"
            cmd = [sys.executable, "-m", "biosam", "segment", str(image), "--prompts", str(prompts), "-o", str(out),
                   "--zoom", args.zoom, "--model", args.model, "--device", "cpu", "--overwrite", "--json"]
            code, stdout, seconds, peaks = run_measured(cmd)
            if code != 0:
                sys.exit(f"biosam segment failed with exit code {code} for {count} boxes")
            objects = json.loads(stdout)["objects"]
            zoomed = sum(o["zoomed"] for o in objects)
            rows.append([str(count), f"{seconds:.1f}", f"{seconds / count:.3f}", str(zoomed),
                         f"{peaks.get('VmRSS', 0) / 1e6:.0f}", f"{peaks.get('RssAnon', 0) / 1e6:.0f}"])
            print(f"{count} boxes: {seconds:.1f} s, peak RSS {rows[-1][-2]} MB", file=sys.stderr, flush=True)
    table = markdown(["boxes", "seconds", "s per box", "zoomed", "peak RSS (MB)", "peak anon (MB)"], rows)
    measured = Path(importlib.util.find_spec("biosam").origin).parents[1]  # the checkout measured (PYTHONPATH decides)
    text = (f"{table}\n\n`biosam segment {args.image}.png --prompts boxes.json --zoom {args.zoom}` ({args.model}, "
            f"CPU, {measured}); {cpu_name()} ({os.cpu_count()} cores), "
            f"Python {platform.python_version()}")
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
