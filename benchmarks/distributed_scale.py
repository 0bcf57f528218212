"""Scale-out on Dask on this machine: batch throughput with 1 and 2 workers, and a blockwise run's memory.

- throughput: ``biosam batch auto`` (via :func:`biosam.distributed.run_batch`) on the
  NIH3T3 nuclei images of ../shared/data, images per minute with 1 and 2
  single-threaded workers (wall time including the cluster's start and each
  worker's model load, and the mean seconds per image inside the tasks);
- blockwise: generated ``SIZE x SIZE`` uint8 Zarr images (a mosaic of the
  NIH3T3 images, its last row of blocks left empty so those blocks are skipped)
  segmented with :func:`biosam.distributed.segment_blockwise` in 2048 px blocks on
  2 workers; the peak resident memory (VmHWM) of each worker process against the
  size of the image and of its labels, for each size (it should not grow with the image);
- volume blockwise: a generated ``DEPTH x SIZE x SIZE`` uint8 Zarr volume (the
  mosaic, shifted 3 px per slice so objects continue through it) segmented slice
  by slice in blocks and linked into 3D objects; wall time and peak memory per worker.

Run: ``python benchmarks/distributed_scale.py [--images 6] [--sizes 4096,8192] [--skip-throughput]
[--volume 8x2048 --volume-block 1024] [--only-volume]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nuclei_nih3t3" / "images"


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def peak_memory() -> int:
    """VmHWM (peak resident bytes) of the calling process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def throughput(images: list[str], workers: int, folder: Path) -> dict:
    from biosam.distributed import open_client, run_batch

    start = time.perf_counter()
    with open_client(workers=workers) as client:
        rows = run_batch("auto", images, folder / f"w{workers}", [], client=client, progress=False)
    wall = time.perf_counter() - start
    done = [r for r in rows if r.status == "done"]
    assert len(done) == len(images), [r.error for r in rows if r.status != "done"]
    return {"workers": workers, "images": len(images), "wall_s": wall, "per_min": 60 * len(images) / wall,
            "task_s": float(np.mean([r.seconds for r in done]))}


def mosaic(size: int, path: Path, empty_from: int) -> int:
    """Write a ``size`` x ``size`` uint8 Zarr image of NIH3T3 tiles (rows from ``empty_from`` on empty); its bytes."""
    import zarr

    from biosam.io import read_image

    tiles = [np.asarray(read_image(p)[0]) for p in sorted(DATA.glob("*.png"))]
    out = zarr.create_array(str(path), shape=(size, size), chunks=(1024, 1024), dtype=np.uint8, fill_value=0)
    h, w = tiles[0].shape[:2]
    k = 0
    for y in range(0, empty_from - h + 1, h):
        for x in range(0, size - w + 1, w):
            out[y:y + h, x:x + w] = tiles[k % len(tiles)][:h, :w]
            k += 1
    return size * size


def volume_blockwise(depth: int, size: int, folder: Path, block: int) -> dict:
    """A ``depth`` x ``size`` x ``size`` volume in ``block`` px blocks on 2 workers, slices linked into 3D objects."""
    import zarr

    from biosam.distributed import open_client, segment_blockwise

    mosaic(size, folder / "plane.zarr", empty_from=size)  # whole NIH3T3 images: the right edge stays empty
    plane = np.asarray(zarr.open_array(str(folder / "plane.zarr"), mode="r"))
    volume = zarr.create_array(str(folder / "vol.zarr"), shape=(depth, size, size), chunks=(1, 1024, 1024),
                               dtype=np.uint8, fill_value=0)
    for z in range(depth):
        volume[z] = np.roll(plane, 3 * z, axis=1)
    del plane
    with open_client(workers=2) as client:
        start = time.perf_counter()
        report = segment_blockwise(str(folder / "vol.zarr"), folder / "labels.zarr", block=block, client=client,
                                   progress=False)
        wall = time.perf_counter() - start
        peaks = client.run(peak_memory)
    return {"size": f"{depth} x {size} x {size}", "image_mb": depth * size * size / 2**20,
            "labels_mb": depth * size * size * 2 / 2**20, "wall_s": wall,
            "peak_mb": [v / 2**20 for v in peaks.values()], **report}


def blockwise(size: int, folder: Path, block: int = 2048) -> dict:
    from biosam.distributed import open_client, segment_blockwise

    nbytes = mosaic(size, folder / "big.zarr", empty_from=size - block - block // 8)  # last block row empty
    with open_client(workers=2) as client:
        start = time.perf_counter()
        report = segment_blockwise(str(folder / "big.zarr"), folder / "labels.zarr", block=block, client=client,
                                   progress=False)
        wall = time.perf_counter() - start
        peaks = client.run(peak_memory)
    return {"size": size, "image_mb": nbytes / 2**20, "labels_mb": size * size * 2 / 2**20, "wall_s": wall,
            "peak_mb": [v / 2**20 for v in peaks.values()], **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--sizes", default="4096,8192", help="image sizes of the blockwise runs")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--volume", default="8x2048", help="DEPTHxSIZE of the volume run ('' for none)")
    parser.add_argument("--volume-block", type=int, default=1024)
    parser.add_argument("--only-volume", action="store_true", help="only the volume run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    images = [str(p) for p in sorted(DATA.glob("*.png"))[: args.images]]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        rates = [] if args.skip_throughput or args.only_volume else [throughput(images, n, folder) for n in (1, 2)]
        bigs = []
        for size in ([] if args.only_volume else (int(v) for v in args.sizes.split(",") if v)):
            sub = folder / str(size)
            sub.mkdir()
            bigs.append(blockwise(size, sub))
        if args.volume:
            depth, size = (int(v) for v in args.volume.split("x"))
            sub = folder / "volume"
            sub.mkdir()
            bigs.append(volume_blockwise(depth, size, sub, args.volume_block))
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs")
    if rates:
        print("| workers | images | wall (s) | images / min | s per image (in task) |")
        print("|---|---|---|---|---|")
        for r in rates:
            print(f"| {r['workers']} | {r['images']} | {r['wall_s']:.1f} | {r['per_min']:.1f} | {r['task_s']:.1f} |")
        print(f"speed-up 2 vs 1 worker: {rates[1]['per_min'] / rates[0]['per_min']:.2f}x")
    print("| image | image (MB) | labels (MB) | blocks (skipped) | objects | wall (s) | peak RSS per worker (MB) |")
    print("|---|---|---|---|---|---|---|")
    for big in bigs:
        name = big["size"] if isinstance(big["size"], str) else f"{big['size']} x {big['size']}"
        print(f"| {name} uint8, blocks {big['block']} + halo {big['halo']} | "
              f"{big['image_mb']:.0f} | {big['labels_mb']:.0f} | {big['blocks']} ({big['skipped_blocks']}) | "
              f"{big['objects']} | {big['wall_s']:.0f} | {', '.join(f'{m:.0f}' for m in big['peak_mb'])} |")


if __name__ == "__main__":
    main()
