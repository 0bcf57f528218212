"""``biosam train sam``: fine-tune a SAM model (in full or with LoRA adapters) on labelled images."""

from __future__ import annotations

import json

import click

from biosam.cli.train_options import train_options, training_pairs
from biosam.train.finetune_settings import MODULES, RECIPES, FinetuneSettings


@click.command("sam")
@train_options(FinetuneSettings, help={
    "labels": "Folder of instance label images (or binary masks) with the same file names (stems) as the images.",
    "output": "Fine-tuned model to write (.pt); load it anywhere with --model OUTPUT.",
    "batch_size": "Objects prompted per training step (one image per step).",
    "seed": "Seed for the split, the views and the prompts.",
})
@click.option("--lora", "lora_rank", default=FinetuneSettings.lora_rank, show_default=True, type=int,
              help="Rank of LoRA adapters on the image encoder's attention; 0 fine-tunes the whole model.")
@click.option("--lora-alpha", default=None, type=float,
              help="LoRA scale numerator (update scaled by alpha / rank) [default: the rank].")
@click.option("--lora-separate", is_flag=True,
              help="Write only the adapters (and fully trained modules) plus the base model's name, not the merged model.")
@click.option("--freeze", default=None, metavar="MODULES",
              help=f"Comma list of modules to keep fixed: {', '.join(MODULES)} "
                   "[default: none; prompt_encoder with --recipe medsam].")
@click.option("--recipe", type=click.Choice(RECIPES), default=FinetuneSettings.recipe, show_default=True,
              help="sam: boxes or points, then corrective points and the previous mask (Dice + focal); "
                   "medsam: jittered boxes only, frozen prompt encoder (Dice + BCE).")
@click.option("--minutes", default=None, type=float, help="Time budget: stop after the epoch that reaches it.")
@click.option("--iterations", default=FinetuneSettings.prompt_iterations, show_default=True, type=int,
              help="Prompting rounds per step (sam recipe), 1 to 32: the first prompt, then corrective points.")
@click.option("--max-zoom", default=FinetuneSettings.max_zoom, show_default=True, type=float,
              help="Also train on random parts of the images enlarged up to this factor (1 = whole images only).")
def sam(images, labels, output, model, lora_rank, lora_alpha, lora_separate, freeze, recipe, epochs, minutes,
        val_fraction, batch_size, iterations, max_zoom, lr, seed, intensity, resume, device, overwrite,
        as_json) -> None:
    """Fine-tune a SAM model on labelled images with iterative box and point prompts.

    Images in --images and label images in --labels are paired by file name
    without extension. Each epoch ends with a validation on the held-out images
    (mean IoU per object from its box and from one point); the best epoch is
    written to OUTPUT, which loads wherever a zoo name does (--model OUTPUT).
    """
    from biosam import load_model
    from biosam.train.finetune import finetune_sam
    from biosam.train.harness import check_output

    check_output(output, overwrite or resume)
    settings = FinetuneSettings(
        recipe=recipe, epochs=epochs, minutes=minutes, batch_size=batch_size, prompt_iterations=iterations, lr=lr,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_separate=lora_separate, freeze=freeze,
        max_zoom=max_zoom, intensity=intensity, seed=seed,
    )
    train_pairs, val_pairs = training_pairs(images, labels, val_fraction, seed)
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
