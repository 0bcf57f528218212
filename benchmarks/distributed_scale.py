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
  by slice in blocks and linked into 3D objects; wall time and peak memory per worker;
  ``--content N`` fills only the middle N slices (the rest blank, skipped), so a deep
  volume's memory bound can be measured without hours of model time;
- tomograms: ``biosam batch tomogram`` on generated realistic tomograms (MRC, 10 Å), tomograms
  per hour with 1 and 2 workers;
- quality: 3D F1 at IoU 0.5 of blockwise ``auto`` and of plain ``biosam auto`` (one process, whole
  volume) against the true 3D labels, on the StarDist 3D nuclei and on a volume of the DSB2018
  nuclei image shifted 3 px per slice (its labels shifted alike); neither set trained the decoder;
- projection: the measured seconds per block and per tomogram, and the bytes a block moves,
  scaled to a 64-worker cluster for a 100k x 100k slide, a 2000^3 volume and 1000 tomograms.

Run: ``python benchmarks/distributed_scale.py [--images 6] [--sizes 4096,8192] [--skip-throughput]
[--volume 8x2048 --volume-block 1024 --content N] [--only-volume] [--tomograms 4] [--quality]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DATA = SHARED / "nuclei_nih3t3" / "images"


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
    return {"workers": workers, "images": len(images), "wall_s": wall, "load": os.getloadavg()[0],
            "per_min": 60 * len(images) / wall,
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


def timed_blockwise(image: Path, output: Path, block: int) -> tuple[dict, float, dict]:
    """``segment_blockwise`` on 2 workers: its report, the wall seconds and each worker's peak memory (bytes)."""
    from biosam.distributed import open_client, segment_blockwise

    with open_client(workers=2) as client:
        start = time.perf_counter()
        report = segment_blockwise(str(image), output, block=block, client=client, progress=False)
        wall = time.perf_counter() - start
        return report, wall, client.run(peak_memory)


def volume_blockwise(depth: int, size: int, folder: Path, block: int, content: int | None = None) -> dict:
    """A ``depth`` x ``size`` x ``size`` volume in ``block`` px blocks on 2 workers, slices linked into 3D objects.

    ``content``: only that many middle slices hold the mosaic; the others stay blank (skipped blocks).
    """
    import zarr

    mosaic(size, folder / "plane.zarr", empty_from=size)  # whole NIH3T3 images: the right edge stays empty
    plane = np.asarray(zarr.open_array(str(folder / "plane.zarr"), mode="r"))
    volume = zarr.create_array(str(folder / "vol.zarr"), shape=(depth, size, size), chunks=(1, 1024, 1024),
                               dtype=np.uint8, fill_value=0)
    first = 0 if content is None else (depth - content) // 2
    for z in range(first, depth if content is None else first + content):
        volume[z] = np.roll(plane, 3 * z, axis=1)
    del plane
    report, wall, peaks = timed_blockwise(folder / "vol.zarr", folder / "labels.zarr", block)
    filled = "" if content is None else f" ({content} slices filled)"
    return {"size": f"{depth} x {size} x {size}{filled}", "image_mb": depth * size * size / 2**20,
            "labels_mb": depth * size * size * 2 / 2**20, "wall_s": wall,
            "peak_mb": [v / 2**20 for v in peaks.values()], **report}


def blockwise(size: int, folder: Path, block: int = 2048) -> dict:
    nbytes = mosaic(size, folder / "big.zarr", empty_from=size - block - block // 8)  # last block row empty
    report, wall, peaks = timed_blockwise(folder / "big.zarr", folder / "labels.zarr", block)
    return {"size": f"{size} x {size}", "side": size, "image_mb": nbytes / 2**20,
            "labels_mb": size * size * 2 / 2**20, "wall_s": wall,
            "peak_mb": [v / 2**20 for v in peaks.values()], **report}


def tomogram_throughput(count: int, workers: int, folder: Path) -> dict:
    """``biosam batch tomogram`` on ``count`` generated realistic tomograms with ``workers`` workers."""
    import mrcfile

    from biosam.distributed import open_client, run_batch
    from biosam.tomogram import realistic_tomogram

    inputs = folder / "tomograms"
    if not inputs.exists():
        inputs.mkdir()
        for seed in range(count):
            tomo = realistic_tomogram((96, 320, 320), voxel_size=10.0, snr=0.3, seed=1000 + seed)
            with mrcfile.new(inputs / f"tomo{seed}.mrc") as mrc:
                mrc.set_data(tomo.volume)
                mrc.voxel_size = 10.0
    start = time.perf_counter()
    with open_client(workers=workers) as client:
        rows = run_batch("tomogram", [str(inputs)], folder / f"tomo_w{workers}", [], suffix=".mrc", client=client,
                         progress=False)
    wall = time.perf_counter() - start
    done = [r for r in rows if r.status == "done"]
    assert len(done) == count, [r.error for r in rows if r.status != "done"]
    return {"workers": workers, "tomograms": count, "wall_s": wall, "load": os.getloadavg()[0],
            "per_hour": 3600 * count / wall,
            "task_s": float(np.mean([r.seconds for r in done])), "vesicles": sum(r.objects or 0 for r in done)}


def _f1(pred: np.ndarray, truth: np.ndarray) -> str:
    from biosam.evaluate.instances import evaluate_instances

    scores = evaluate_instances(pred, truth, thresholds=[0.5])
    return f"{scores['per_threshold'][0]['f1']:.3f} ({scores['n_pred']} objects)"


def quality(folder: Path, block: int) -> list[dict]:
    """3D F1 @ IoU 0.5 of blockwise auto vs plain ``biosam auto`` on two labelled volumes."""
    import tifffile

    from biosam.distributed import open_client, segment_blockwise
    from biosam.io import read_image

    stardist = SHARED / "stardist_synthetic_nuclei_3d"
    cases = [("StarDist 3D nuclei (31 x 61 x 57)", tifffile.imread(stardist / "img3d.tif"),
              tifffile.imread(stardist / "mask3d.tif"), 32, 8)]
    dsb = SHARED / "stardist_dsb2018_nuclei_2d"  # held out: the shipped decoder was trained on NIH3T3 only
    image, truth = tifffile.imread(dsb / "img2d.tif"), tifffile.imread(dsb / "mask2d.tif")
    shifts = range(0, 3 * 6, 3)
    cases.append(("DSB2018 nuclei shifted 3 px per slice (6 x 512 x 512)",
                  np.stack([np.roll(image, s, axis=1) for s in shifts]),
                  np.stack([np.roll(truth, s, axis=1) for s in shifts]), block, block // 8))
    rows = []
    with open_client(workers=2) as client:
        for name, volume, labels, size, halo in cases:
            path = folder / "quality.tif"
            tifffile.imwrite(path, volume)
            plain = folder / "plain.tif"
            subprocess.run(["biosam", "auto", str(path), "-o", str(plain), "--overwrite"], check=True,
                           capture_output=True)
            out = folder / "blocks.zarr"
            segment_blockwise(volume, out, block=size, halo=halo, axes="ZYX", client=client, overwrite=True,
                              progress=False)
            rows.append({"volume": name, "block": f"{size} + {halo}", "plain": _f1(tifffile.imread(plain), labels),
                         "blockwise": _f1(np.asarray(read_image(out)[0]), labels),
                         "objects": int(len(np.unique(labels)) - 1)})
    return rows


def projection(bigs: list[dict], tomos: list[dict]) -> list[str]:
    """Scale measured per-task seconds to 64 workers (tasks spread evenly, start-up and link step left out)."""
    lines = []
    for big in bigs:
        busy = big["blocks"] - big["skipped_blocks"]
        if busy and "side" in big:
            per_block = big["wall_s"] * 2 / busy  # 2 workers
            window = (big["block"] + 2 * big["halo"]) ** 2
            for name, blocks in (("100k x 100k slide", math.ceil(100_000 / big["block"]) ** 2),
                                 ("2000^3 volume (2000 slices)", 2000 * math.ceil(2000 / big["block"]) ** 2)):
                lines.append(f"| {name} | {blocks} blocks of {big['block']} px | {per_block:.0f} s / block | "
                             f"{blocks * per_block / 64 / 3600:.2f} h | reads {blocks * window / 1e9:.1f} GB, "
                             f"writes {blocks * window * 4 / 1e9:.0f} GB scratch (uncompressed) |")
            break
    if tomos:
        per_tomo = tomos[0]["task_s"]
        lines.append(f"| 1000 tomograms (96 x 320 x 320) | 1000 tasks | {per_tomo:.0f} s / tomogram | "
                     f"{1000 * per_tomo / 64 / 3600:.1f} h | each reads its own file |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--sizes", default="4096,8192", help="image sizes of the blockwise runs")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--volume", default="8x2048", help="DEPTHxSIZE of the volume run ('' for none)")
    parser.add_argument("--volume-block", type=int, default=1024)
    parser.add_argument("--only-volume", action="store_true", help="only the volume run")
    parser.add_argument("--content", type=int, default=None, help="fill only this many middle slices of the volume")
    parser.add_argument("--tomograms", type=int, default=0, help="tomograms for the tomogram throughput (0: none)")
    parser.add_argument("--quality", action="store_true", help="3D F1 of blockwise vs plain biosam auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    images = [str(p) for p in sorted(DATA.glob("*.png"))[: args.images]]
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.1f}",
          flush=True)
    bigs: list[dict] = []
    tomos: list[dict] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        if not (args.skip_throughput or args.only_volume):
            rates = [throughput(images, n, folder) for n in (1, 2)]
            show(["workers", "images", "wall (s)", "images / min", "s per image (in task)", "load average"],
                 [[r["workers"], r["images"], f"{r['wall_s']:.1f}", f"{r['per_min']:.1f}", f"{r['task_s']:.1f}",
                   f"{r['load']:.1f}"] for r in rates])
            print(f"speed-up 2 vs 1 worker: {rates[1]['per_min'] / rates[0]['per_min']:.2f}x")
        if args.tomograms:
            tomos = [tomogram_throughput(args.tomograms, n, folder) for n in (1, 2)]
            show(["workers", "tomograms", "wall (s)", "tomograms / hour", "s per tomogram (in task)", "vesicles",
                  "load average"],
                 [[r["workers"], r["tomograms"], f"{r['wall_s']:.0f}", f"{r['per_hour']:.0f}", f"{r['task_s']:.0f}",
                   r["vesicles"], f"{r['load']:.1f}"] for r in tomos])
        if args.quality:
            show(["volume", "true objects", "blocks", "plain biosam auto F1", "blockwise F1"],
                 [[r["volume"], r["objects"], f"{r['block']} px", r["plain"], r["blockwise"]]
                  for r in quality(folder, 256)])
        for size in ([] if args.only_volume else (int(v) for v in args.sizes.split(",") if v)):
            sub = folder / str(size)
            sub.mkdir()
            bigs.append(blockwise(size, sub))
        if args.volume:
            depth, size = (int(v) for v in args.volume.split("x"))
            sub = folder / "volume"
            sub.mkdir()
            bigs.append(volume_blockwise(depth, size, sub, args.volume_block, args.content))
    if bigs:
        show(["image", "image (MB)", "labels (MB)", "blocks (skipped)", "objects", "wall (s)",
              "peak RSS per worker (MB)"],
             [[f"{big['size']} uint8, blocks {big['block']} + halo {big['halo']}", f"{big['image_mb']:.0f}",
               f"{big['labels_mb']:.0f}", f"{big['blocks']} ({big['skipped_blocks']})", big["objects"],
               f"{big['wall_s']:.0f}" + (f" (link {big['link_seconds']:.0f})" if "link_seconds" in big else ""),
               ", ".join(f"{m:.0f}" for m in big["peak_mb"])] for big in bigs])
    rows = projection(bigs, tomos)
    if rows:
        print("| 64 workers | tasks | measured here (1 thread) | projected wall | data moved |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))


def show(header: list[str], rows: list[list]) -> None:
    """Print a Markdown table now (a later step may take long)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
    print(flush=True)


if __name__ == "__main__":
    main()
