"""Peak memory and speed of 3D propagation: does memory stay flat as the volume gets deeper?

A generated volume (1024 x 1024 slices: a slowly drifting disk on a noisy
background, made slice by slice on demand so the input costs no memory) is
propagated from one box on slice 0 through every slice, writing the labels into
a memory-mapped file. Each depth runs in its own process; the peak private
memory (RssAnon) of runs with few and many slices is compared.

Models: ``lite_medsam`` (SAM v1: projection from slice to slice) and
``medsam2-random`` (SAM 2 memory tracker, MedSAM2's architecture at 512 px with
seeded random weights, since SAM 2 weights cannot be downloaded here; the
compute and memory are those of the real model).

    python benchmarks/volume_memory.py [--model lite_medsam] [--slices 128 512] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from _memory import run_measured
from fidelity import markdown

SIDE = 1024


class DriftingDisk:
    """A lazy (depth, 1024, 1024) uint8 volume: a disk of radius 150 px circling slowly (under 1 px per slice), plus noise."""

    def __init__(self, depth: int) -> None:
        self.shape = (depth, SIDE, SIDE)
        self.dtype = np.dtype(np.uint8)
        self._yy, self._xx = np.mgrid[:SIDE, :SIDE]

    def center(self, z: int) -> tuple[float, float]:
        # A smooth path: the object never jumps, so it can be followed through every slice.
        angle = 2 * np.pi * z / 600
        return 500.0 + 80 * np.sin(angle), 500.0 + 80 * (1 - np.cos(angle))

    def __getitem__(self, z: int) -> np.ndarray:
        cy, cx = self.center(int(z))
        disk = (self._yy - cy) ** 2 + (self._xx - cx) ** 2 < 150**2
        noise = np.random.default_rng(int(z)).normal(0, 20, self.shape[1:])
        return np.clip(80 + 100 * disk + noise, 0, 255).astype(np.uint8)


def model_path(name: str, folder: Path) -> str:
    if name != "medsam2-random":
        return name
    import torch

    from biosam.models.sam2 import SAM2_CONFIGS, build_sam2

    torch.manual_seed(0)
    path = folder / "MedSAM2_latest.pt"  # the file name selects MedSAM2's 512 px input
    torch.save({"model": build_sam2(SAM2_CONFIGS["medsam2"]).state_dict()}, path)
    return str(path)


def child(model: str, depth: int, folder: Path) -> None:
    """One propagation run (in its own process); prints a JSON line."""
    import time

    import biosam
    from biosam.runtime import configure_cpu
    from biosam.volume import segment_volume

    configure_cpu()
    volume = DriftingDisk(depth)
    cy, cx = volume.center(0)
    prompt = biosam.Prompt(box=np.array([cx - 152, cy - 152, cx + 152, cy + 152]), z=0)
    predictor = biosam.Predictor(biosam.load_model(model))
    out = np.lib.format.open_memmap(folder / f"labels_{depth}.npy", mode="w+", dtype=np.uint16, shape=volume.shape)
    start = time.perf_counter()
    result = segment_volume(predictor, volume, [prompt], progress=False, out=out)
    seconds = time.perf_counter() - start
    print(json.dumps({"slices": depth, "seconds": seconds, "found": int(result.z_range[0, 1] + 1),
                      "precision": predictor.model.precision}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam", help="zoo name, checkpoint, or medsam2-random")
    parser.add_argument("--slices", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = model_path(args.model, Path(tmp))
        for depth in args.slices:
            code, stdout, wall, peaks = run_measured([sys.executable, __file__, "--child", model, str(depth), tmp])
            if code != 0:
                raise SystemExit(f"run with {depth} slices failed ({code})")
            report = json.loads(stdout.strip().splitlines()[-1])
            rows.append({**report, "peak_mib": peaks["RssAnon"] / 2**20})
            print(rows[-1], flush=True)
    base = rows[0]["peak_mib"]
    header = ["slices", "object found on", "seconds", "slices/s", "peak private memory MiB", "vs first"]
    table = markdown(header, [[str(r["slices"]), str(r["found"]), f"{r['seconds']:.0f}",
                               f"{r['slices'] / r['seconds']:.2f}", f"{r['peak_mib']:.0f}",
                               f"{r['peak_mib'] / base:.3f}"] for r in rows])
    text = (f"Model {args.model} ({rows[0]['precision']}), {platform.processor() or platform.machine()}, "
            f"one object through 1024 x 1024 slices.\n\n{table}")
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
