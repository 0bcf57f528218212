"""LoRA fine-tuning of LiteMedSAM on NIH3T3 nuclei for a fixed time: box and point IoU before and after.

The project's nuclei split (``biosam.automatic.data.nuclei_split``) gives 14 NIH3T3
training images and 4 held-back ones. Two of the training images (the last two of
the split) are set aside as the validation that picks the best epoch, so the
held-back images are only ever used for the numbers below. Every labelled
nucleus of the held-back images (connected components of at least 16 px) is
prompted once with its tight box and once with one point, its pixel furthest
from its boundary, through the normal ``Predictor`` on the whole image
(``zoom="off"``); a single point gets three masks and the best-scored one counts.
The DSB2018 image (another data set, never trained on) is scored the same way to
show what fine-tuning does outside its training data.

    python benchmarks/finetune_quality.py [--minutes 20] [--lora 4] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import biosam
from biosam.automatic.data import nuclei_split
from biosam.train.finetune import FinetuneSettings, evaluate_prompts, finetune_sam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import markdown  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
N_SELECT = 2  # training images set aside to choose the best epoch

logger = logging.getLogger("finetune_quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument("--lora", type=int, default=4, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--lr", type=float, default=FinetuneSettings.lr)
    parser.add_argument("--batch-size", type=int, default=FinetuneSettings.batch_size)
    parser.add_argument("--iterations", type=int, default=FinetuneSettings.prompt_iterations)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--save", type=Path, help="keep the fine-tuned model here (default: a temporary file)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if not DATA.is_dir():
        raise SystemExit(f"needs the labelled data in {DATA}")

    train, held_back = nuclei_split(DATA)
    nih_test = [p for p in held_back if p[0].parent.parent.name == "nuclei_nih3t3"]
    other = [p for p in held_back if p not in nih_test]
    train, select = train[:-N_SELECT], train[-N_SELECT:]
    sets = {"NIH3T3 held-back images": nih_test, "DSB2018 (not trained on)": other}

    model = biosam.load_model(args.model, device=args.device)
    before = {name: evaluate_prompts(model, pairs) for name, pairs in sets.items() if pairs}
    for name, r in before.items():
        logger.info("before, %s: box IoU %.4f, point IoU %.4f (%d objects)", name, r["box_iou"], r["point_iou"],
                    r["objects"])

    settings = FinetuneSettings(epochs=1000, minutes=args.minutes, lora_rank=args.lora, lr=args.lr,
                                batch_size=args.batch_size, prompt_iterations=args.iterations, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        output = args.save or Path(tmp) / "finetuned.pt"
        started = time.perf_counter()
        result = finetune_sam(model, train, select, output, settings, overwrite=True)
        train_minutes = (time.perf_counter() - started) / 60
        tuned = biosam.load_model(output, device=args.device)  # the written file, as a user would load it
    after = {name: evaluate_prompts(tuned, sets[name]) for name in before}

    rows = []
    for name in before:
        for prompt in ("box", "point"):
            b, a = before[name][f"{prompt}_iou"], after[name][f"{prompt}_iou"]
            rows.append([name, prompt, str(before[name]["objects"]), f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}"])
    device = next(tuned.parameters()).device
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}, torch {torch.__version__}"
    how = f"LoRA rank {args.lora}" if args.lora else "full fine-tuning"
    table = "\n".join([
        f"Model `{args.model}`, {how}, budget {args.minutes:g} min: {result.epochs_run} "
        f"epoch{'' if result.epochs_run == 1 else 's'} "
        f"({len(train)} training images, best epoch {result.best_epoch} chosen on {len(select)} others), "
        f"{train_minutes:.1f} min in all; {machine}.",
        "",
        markdown(["images", "prompt", "objects", "mean IoU before", "mean IoU after", "change"], rows),
    ])
    print()
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"before": before, "after": after, "history": result.history,
                                         "best_epoch": result.best_epoch, "minutes": train_minutes}, indent=2))


if __name__ == "__main__":
    main()
