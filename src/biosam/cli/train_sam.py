"""``biosam train sam``: fine-tune a SAM model (in full or with LoRA adapters) on labelled images."""

from __future__ import annotations

import json
from pathlib import Path

import click

from biosam.prompting.intensity import INTENSITY_PRESETS

_MODULES = ("image_encoder", "prompt_encoder", "mask_decoder")


def _freeze(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in _MODULES]
    if unknown:
        raise click.BadParameter(f"'{unknown[0]}' is not a module; use a comma list of {', '.join(_MODULES)}.")
    return names


@click.command("sam")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Folder of training images.")
@click.option("--labels", required=True, type=click.Path(path_type=Path),
              help="Folder of instance label images (or binary masks) with the same file names (stems) as the images.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Fine-tuned model to write (.pt); load it anywhere with --model OUTPUT.")
@click.option("--model", default="lite_medsam", show_default=True, help="Zoo name or checkpoint to start from.")
@click.option("--lora", "lora_rank", default=0, show_default=True, type=click.IntRange(0),
              help="Rank of LoRA adapters on the image encoder's attention; 0 fine-tunes the whole model.")
@click.option("--lora-alpha", default=None, type=click.FloatRange(min=0, min_open=True),
              help="LoRA scale numerator (update scaled by alpha / rank) [default: the rank].")
@click.option("--lora-separate", is_flag=True,
              help="Write only the adapters (and fully trained modules) plus the base model's name, not the merged model.")
@click.option("--freeze", default=None, metavar="MODULES",
              help="Comma list of modules to keep fixed: image_encoder, prompt_encoder, mask_decoder "
                   "[default: none; prompt_encoder with --recipe medsam].")
@click.option("--recipe", type=click.Choice(["sam", "medsam"]), default="sam", show_default=True,
              help="sam: boxes or points, then corrective points and the previous mask (Dice + focal); "
                   "medsam: jittered boxes only, frozen prompt encoder (Dice + BCE).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1), help="Most epochs to train.")
@click.option("--minutes", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Time budget: stop after the epoch that reaches it.")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of the image pairs held out for validation (chosen with --seed); 0 trains on all.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Objects prompted per training step (one image per step).")
@click.option("--iterations", default=3, show_default=True, type=click.IntRange(1, 32),
              help="Prompting rounds per step (sam recipe): the first prompt, then corrective points.")
@click.option("--max-zoom", default=1.0, show_default=True, type=click.FloatRange(1),
              help="Also train on random parts of the images enlarged up to this factor (1 = whole images only).")
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Learning rate (AdamW).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the split, the views and the prompts.")
@click.option("--intensity", type=click.Choice(INTENSITY_PRESETS), default="auto", show_default=True,
              help="Intensity normalisation of the images (recorded with the model).")
@click.option("--resume", is_flag=True, help="Continue the run that was writing OUTPUT from its last finished epoch.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda if available, else cpu.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sam(images, labels, output, model, lora_rank, lora_alpha, lora_separate, freeze, recipe, epochs, minutes,
        val_fraction, batch_size, iterations, max_zoom, lr, seed, intensity, resume, device, overwrite,
        as_json) -> None:
    """Fine-tune a SAM model on labelled images with iterative box and point prompts.

    Images in --images and label images in --labels are paired by file name
    without extension. Each epoch ends with a validation on the held-out images
    (mean IoU per object from its box and from one point); the best epoch is
    written to OUTPUT, which loads wherever a zoo name does (--model OUTPUT).
    """
    import numpy as np

    from biosam import load_model
    from biosam.automatic.data import pair_by_stem
    from biosam.errors import InputError
    from biosam.train.finetune import FinetuneSettings, finetune_sam

    if output.exists() and not (overwrite or resume):
        raise InputError(f"{output}: already exists. Choose another name or pass --overwrite to replace it.")
    settings = FinetuneSettings(
        recipe=recipe, epochs=epochs, minutes=minutes, batch_size=batch_size, prompt_iterations=iterations, lr=lr,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_separate=lora_separate, freeze=_freeze(freeze),
        max_zoom=max_zoom, intensity=intensity, seed=seed,
    )
    pairs = pair_by_stem(images, labels)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = 0
    if val_fraction > 0 and len(pairs) > 1:
        n_val = min(max(int(round(val_fraction * len(pairs))), 1), len(pairs) - 1)
    val_pairs = [pairs[i] for i in sorted(order[:n_val])]
    train_pairs = [pairs[i] for i in sorted(order[n_val:])]
    result = finetune_sam(load_model(model, device=device), train_pairs, val_pairs, output, settings,
                          resume=resume, overwrite=overwrite)
    summary = {"output": str(result.output), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "stopped_by_time": result.stopped_by_time, "train_images": len(train_pairs),
               "val_images": len(val_pairs), "before": _ious(result.baseline), "validation": _ious(result.validation),
               "trainable_parameters": result.trainable_parameters, "seconds": round(result.seconds, 1)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote {result.output} (epoch {result.best_epoch} of {result.epochs_run}, "
               f"{len(train_pairs)} training / {len(val_pairs)} validation images)")
    if result.validation is not None and result.baseline is not None:
        b, v = result.baseline, result.validation
        click.echo(f"validation mean IoU: box {b['box_iou']:.3f} -> {v['box_iou']:.3f}, "
                   f"point {b['point_iou']:.3f} -> {v['point_iou']:.3f}")


def _ious(scores: dict | None) -> dict | None:
    return None if scores is None else {k: round(scores[k], 4) for k in ("box_iou", "point_iou")}
