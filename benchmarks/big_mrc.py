"""Peak memory of segmenting a large MRC tomogram slice by slice with `biosam segment`.

Generates a float32 MRC (default 128 x 2048 x 2048 = 2 GiB) of noisy vesicles
(bright rings around a dark lumen, known centres and radii), writes one box
prompt per vesicle and slice, runs the `biosam` command on it in a child
process, and samples the child's memory every 50 ms from /proc:

- RssAnon: private memory the process allocated (what has to fit in RAM);
- VmRSS: RssAnon plus pages of the memory-mapped input and output files that
  happen to be resident (the kernel drops those under pressure).

Also prints the mean IoU of the segmented vesicles against the generated truth.

    python benchmarks/big_mrc.py [--slices 128] [--side 2048] [--workdir /tmp/biosam_big_mrc]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
from _memory import run_measured  # benchmarks/ is on sys.path when a script here runs

VOXEL_SIZE = 7.84  # Å, a typical binned tomogram


def vesicles(n_slices: int, side: int, seed: int = 0) -> list[tuple[float, float, float, float]]:
    """Spheres (z, y, x, radius) in voxels, well inside the volume and apart from each other."""
    rng = np.random.default_rng(seed)
    out: list[tuple[float, float, float, float]] = []
    while len(out) < 6:
        r = rng.uniform(0.06, 0.1) * side
        c = (rng.uniform(0.3, 0.7) * n_slices, rng.uniform(r + 20, side - r - 20), rng.uniform(r + 20, side - r - 20))
        if all(np.hypot(c[1] - o[1], c[2] - o[2]) > r + o[3] + 30 for o in out):
            out.append((*c, r))
    return out


def section(z: int, side: int, spheres, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One noisy slice and the (sphere index, mask) of each vesicle cut by it."""
    yy, xx = np.ogrid[:side, :side]
    image = rng.normal(0.0, 1.0, (side, side)).astype(np.float32)
    truth = []
    for k, (cz, cy, cx, r) in enumerate(spheres):
        rz2 = r * r - (z - cz) ** 2
        if rz2 < (0.3 * r) ** 2:
            continue
        rz = np.sqrt(rz2)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        image += 3.0 * np.exp(-(((d - rz) / 4.0) ** 2))  # membrane
        image -= 0.8 * (d < rz - 6)  # lumen
        truth.append((k, d <= rz + 3))
    return image, truth


def generate(path: Path, n_slices: int, side: int, spheres) -> list[dict]:
    """Write the MRC slice by slice (never holding the volume) and return the prompts."""
    rng = np.random.default_rng(1)
    prompts = []
    with mrcfile.new_mmap(path, shape=(n_slices, side, side), mrc_mode=2, overwrite=True) as mrc:
        mrc.voxel_size = VOXEL_SIZE
        for z in range(n_slices):
            image, truth = section(z, side, spheres, rng)
            mrc.data[z] = image
            for _, mask in truth:
                ys, xs = np.nonzero(mask)
                prompts.append({"box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], "z": z})
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/biosam_big_mrc"))
    parser.add_argument("--every", type=int, default=1, help="prompt every N-th slice only (memory does not depend on it)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (and reuse them next time)")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    tomo, prompts_path, out = args.workdir / "tomo.mrc", args.workdir / "prompts.json", args.workdir / "labels.mrc"
    spheres = vesicles(args.slices, args.side)
    t0 = time.perf_counter()
    expected = 1024 + 4 * args.slices * args.side * args.side
    if args.keep and tomo.exists() and tomo.stat().st_size == expected and prompts_path.exists():
        prompts = json.loads(prompts_path.read_text())
    else:
        prompts = generate(tomo, args.slices, args.side, spheres)
        prompts_path.write_text(json.dumps(prompts))
    print(f"{tomo} ({tomo.stat().st_size / 2**30:.2f} GiB, {len(prompts)} objects) ready in {time.perf_counter() - t0:.0f} s",
          flush=True)
    chosen = [p for p in prompts if p["z"] % args.every == 0]
    chosen_path = args.workdir / "chosen.json"
    chosen_path.write_text(json.dumps(chosen))
    segmented = len({p["z"] for p in chosen})

    cmd = [sys.executable, "-m", "biosam", "segment", str(tomo), "--prompts", str(chosen_path), "-o", str(out),
           "--device", "cpu", "--overwrite", "--json"]
    returncode, stdout, seconds, peaks = run_measured(cmd)
    if returncode != 0:
        sys.exit(f"biosam segment failed with exit code {returncode}")

    # Score slice by slice against the generated truth (regenerated, same seed).
    rng = np.random.default_rng(1)
    ious = []
    with mrcfile.mmap(out, mode="r") as labels:
        assert labels.voxel_size.x == np.float32(VOXEL_SIZE)
        label = 0
        for z in range(args.slices):
            if z % args.every:
                continue
            _, truth = section(z, args.side, spheres, rng)
            for _, mask in truth:
                label += 1
                pred = np.asarray(labels.data[z]) == label
                ious.append((pred & mask).sum() / max((pred | mask).sum(), 1))
    size = tomo.stat().st_size
    rows = [
        ("tomogram", f"{args.slices} x {args.side} x {args.side} float32, {size / 2**30:.2f} GiB"),
        ("objects (box prompts, one per vesicle and segmented slice)", f"{len(chosen)} on {segmented} slices"),
        ("wall time", f"{seconds:.0f} s ({seconds / segmented:.2f} s per segmented slice)"),
        ("peak private memory (RssAnon)", f"{peaks.get('RssAnon', 0) / 2**30:.2f} GiB ({peaks.get('RssAnon', 0) / size:.0%} of the file)"),
        ("peak resident memory incl. mapped file pages (VmRSS)", f"{peaks.get('VmRSS', 0) / 2**30:.2f} GiB"),
        ("mean IoU vs generated truth", f"{np.mean(ious):.3f}"),
        ("machine", f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"),
    ]
    print("\n| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    json.loads(stdout)  # the command's JSON report is valid
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
