"""Image encoder runtimes on the CPU side by side: torch, ONNX Runtime and OpenVINO (fp32 and int8).

One process; each runtime (``biosam.load_model(..., runtime=...)``) is loaded in turn and timed
against torch in interleaved rounds (torch, runtime, torch, ... after a warm-up each), so a load
from other processes on the machine slows both alike and their ratio holds; medians. One runtime
at a time beside torch because ViT-B sessions take GBs each. Peak memory: of a fresh process that
loads the model in the runtime (from the exported file) and embeds one image. Agreement with
torch fp32: the largest relative error of the embeddings and the IoU of the masks for every
ground-truth box of real labelled nuclei (DSB2018 and NIH3T3 images, each runtime decoding its
own embedding through :class:`biosam.Predictor`, zoom off).

- LiteMedSAM: the real checkpoint.
- ViT-B: SAM's ViT-B with seeded random weights (a random init plus seeded noise on every
  tensor), written to a checkpoint file and loaded like any other; its masks are meaningless
  as segmentations but their IoU still measures agreement.

The rule for ``runtime="auto"``: the fastest fp32 runtime whose masks reach mean IoU >= 0.99
against torch becomes the CPU default if it embeds at least 1.3x faster than torch (int8 only
where asked for). The verdict is printed with the table.

    python benchmarks/runtimes.py [--threads 2] [--reps 5] [--vit-reps 2] [--images 5] [--vit-images 2]
                                  [--skip-vit-b] [--out table.md]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fidelity import DATA, NUCLEI, cpu_model, markdown
from speed import mask_ious, nuclei_images, rel_err

import biosam
from biosam import Predictor
from biosam.evaluate import boxes_from_labels
from biosam.export.inputs import encoder_input
from biosam.models import CONFIGS, build_sam
from biosam.runtime import configure_cpu

RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8")
TARGET_IOU = 0.99
HEADER = ["Model", "Runtime", "embed ms (torch in the same rounds)", "torch / this", "decode ms (1 box)",
          "peak memory MiB", "embedding rel. error (max)", "mean mask IoU vs torch", "min IoU", "identical masks", "boxes"]
TARGET_SPEEDUP = 1.3


def lscpu_model() -> str:
    """lscpu's "Model name" (the CPU), else /proc/cpuinfo's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return cpu_model()


def cpu_features() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split() \
        if Path("/proc/cpuinfo").is_file() else []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return ", ".join(f for f in wanted if f in flags) or "no AVX2"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def vit_b_checkpoint(folder: Path) -> Path:
    """SAM ViT-B with seeded random weights, saved as a checkpoint biosam loads (architecture from its tensors)."""
    torch.manual_seed(0)
    model = build_sam(CONFIGS["vit_b"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            # relative positions start at zero in SAM; a larger nudge makes them shape the attention
            tensor.add_(torch.randn(tensor.shape, generator=gen) * (0.3 if "rel_pos" in name else 0.05))
    path = folder / "sam_vit_b_seeded_random.pth"
    torch.save(model.state_dict(), path)
    return path


def peak_memory(source: str, runtime: str) -> float:
    """Peak resident memory (MiB) of a fresh process that loads ``source`` in ``runtime`` and embeds one image."""
    out = subprocess.run([sys.executable, __file__, "--peak-memory", runtime, source,
                          "--threads", str(torch.get_num_threads())], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("peak MiB ")]
    return float(lines[-1].split()[-1]) if lines else float("nan")


def measure_peak_memory(runtime: str, source: str) -> None:
    model = biosam.load_model(source, device="cpu", runtime=runtime)
    with torch.inference_mode():
        model.embed(torch.zeros(1, 3, model.image_size, model.image_size))
    # VmHWM, not getrusage's maxrss: on Linux that keeps the parent's size across fork and exec
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1].split()
    print(f"peak MiB {int(status[0]) / 1024:.0f}")


def interleaved(steps: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per step: a warm-up each, then ``reps`` rounds, each running every step once in a rotating order."""
    names = list(steps)
    for name in names:
        steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_runtime(source: str, runtime: str) -> tuple[torch.nn.Module, float]:
    """The model in ``runtime`` and the seconds its load took (with an export the first time)."""
    gc.collect()
    start = time.perf_counter()
    model = biosam.load_model(source, device="cpu", runtime=runtime)
    return model, time.perf_counter() - start


def rows_for(label: str, source: str, images: list, reps: int) -> tuple[list[list[str]], dict]:
    """One row per runtime: each runtime is loaded in turn and timed interleaved with torch (the ratio is what
    counts: both see the same load), then its masks are compared with torch's on every ground-truth box."""
    reference, _ = load_runtime(source, "torch")
    x = torch.from_numpy(encoder_input(images[0][1], reference.image_size, reference.info.preprocessing)[0])
    box = torch.tensor(boxes_from_labels(images[0][2])[0][:1] * (reference.image_size / max(images[0][1].shape[:2])),
                       dtype=torch.float32)
    torch_embedding = reference.embed(x)
    truth = []  # torch's embeddings and masks, the reference of every row
    for _, image, labels in images:
        boxes, _ = boxes_from_labels(labels)
        predictor = Predictor(reference)
        predictor.set_image(image)
        truth.append((boxes, predictor.embedding, torch.from_numpy(predictor.predict(box=boxes, zoom="off").masks)))
    rows, summary = [], {}
    for runtime in RUNTIMES[1:]:
        model, load_s = load_runtime(source, runtime)
        print(f"{label}: {runtime} loaded in {load_s:.1f} s, timing with torch, load average {load()}", flush=True)
        embedding = model.embed(x)
        embed_s = interleaved({"torch": lambda: reference.embed(x), runtime: lambda: model.embed(x)}, reps)
        decode_s = interleaved({"torch": lambda: reference.decode(torch_embedding, boxes=box),
                                runtime: lambda: model.decode(embedding, boxes=box)}, max(reps, 5))
        errors, ious = [], []
        for (_, image, _), (boxes, ref_embedding, ref_masks) in zip(images, truth):
            predictor = Predictor(model)
            predictor.set_image(image)
            errors.append(rel_err(predictor.embedding, ref_embedding))
            ious.append(mask_ious(torch.from_numpy(predictor.predict(box=boxes, zoom="off").masks), ref_masks))
        iou = np.concatenate(ious)
        speedup = embed_s["torch"] / embed_s[runtime]
        summary[runtime] = {"speedup": speedup, "iou": float(iou.mean())}
        if not rows:
            rows.append([label, "torch", f"{embed_s['torch'] * 1000:.0f}", "1.00", f"{decode_s['torch'] * 1000:.1f}",
                         f"{peak_memory(source, 'torch'):.0f}", "0", "1.00000", "1.0000", "1.000", str(len(iou))])
        rows.append([label, runtime, f"{embed_s[runtime] * 1000:.0f} (torch {embed_s['torch'] * 1000:.0f})",
                     f"{speedup:.2f}", f"{decode_s[runtime] * 1000:.1f}", f"{peak_memory(source, runtime):.0f}",
                     f"{max(errors):.1e}",
                     f"{iou.mean():.5f}", f"{iou.min():.4f}", f"{(iou == 1.0).mean():.3f}", str(len(iou))])
        print(markdown(HEADER, rows[-1:]), flush=True)
        del model, embedding, predictor  # the session's memory goes before the next runtime loads
    return rows, summary


def verdict(summary: dict) -> str:
    ok = [(s["speedup"], r) for r, s in summary.items()
          if r not in ("torch",) and not r.endswith("-int8") and s["iou"] >= TARGET_IOU]
    if not ok:
        return "no fp32 runtime keeps masks at mean IoU >= 0.99: auto stays torch"
    speedup, best = max(ok)
    if speedup >= TARGET_SPEEDUP:
        return f"{best} is {speedup:.2f}x faster than torch with mean IoU {summary[best]['iou']:.5f}: meets the rule"
    return f"fastest qualifying runtime {best} is only {speedup:.2f}x faster than torch: auto stays torch"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime [2]")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds, LiteMedSAM [5]")
    parser.add_argument("--vit-reps", type=int, default=2, help="timed rounds, ViT-B (1024 px) [2]")
    parser.add_argument("--images", type=int, default=5, help="labelled images for agreement, LiteMedSAM [5]")
    parser.add_argument("--vit-images", type=int, default=2, help="labelled images for agreement, ViT-B [2]")
    parser.add_argument("--skip-vit-b", action="store_true", help="LiteMedSAM only")
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    parser.add_argument("--peak-memory", nargs=2, metavar=("RUNTIME", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory:
        configure_cpu(args.threads)
        measure_peak_memory(*args.peak_memory)
        return 0
    if not (NUCLEI / "img2d.tif").is_file():
        sys.exit(f"runtimes.py: shared data not found under {DATA}")
    tuned = configure_cpu(args.threads)
    import onnxruntime
    import openvino

    cpu = lscpu_model()
    first_load = load()
    print(f"CPU: {cpu} ({cpu_features()}), load average {first_load}", flush=True)
    start = time.perf_counter()
    images = nuclei_images(max(args.images, args.vit_images))
    tables, verdicts = [], []
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        rows, summary = rows_for("LiteMedSAM (256 px)", "lite_medsam", images[:args.images], args.reps)
        tables += rows
        print(markdown(HEADER, rows), flush=True)
        verdicts.append(f"LiteMedSAM: {verdict(summary)}")
        if not args.skip_vit_b:
            rows, summary = rows_for("ViT-B (1024 px, seeded random)", str(vit_b_checkpoint(Path(tmp))),
                                     images[:args.vit_images], args.vit_reps)
            tables += rows
            verdicts.append(f"ViT-B: {verdict(summary)}")
    text = "\n\n".join([
        "# Image encoder runtimes on the CPU",
        f"CPU: {cpu} ({cpu_features()}); {torch.get_num_threads()} threads for every runtime; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}; allocator {tuned}; "
        f"Python {platform.python_version()}; load average at start {first_load}, at end {load()} "
        f"(1, 5, 15 min); medians of {args.reps} (LiteMedSAM) / {args.vit_reps} (ViT-B) interleaved rounds; "
        f"total run {time.perf_counter() - start:.0f} s",
        markdown(HEADER, tables),
        "Rule for auto (fastest fp32 runtime with mean IoU >= 0.99 and >= 1.3x faster than torch):\n\n"
        + "\n".join(f"- {v}" for v in verdicts),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
