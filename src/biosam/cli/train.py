"""``biosam train``: train models on top of a frozen image encoder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from biosam.prompting.intensity import INTENSITY_PRESETS


@click.group("train")
def train() -> None:
    """Train models on top of a frozen SAM image encoder."""


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of {what}.") from None


@train.command("decoder")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Folder of training images.")
@click.option("--labels", required=True, type=click.Path(path_type=Path),
              help="Folder of label images (or binary masks) with the same file names (stems) as the images.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Decoder checkpoint to write (.pt).")
@click.option("--model", default="lite_medsam", show_default=True,
              help="Zoo name or checkpoint of the frozen SAM model.")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of the image pairs held out for validation (chosen with --seed); 0 trains on all.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1), help="Most epochs to train.")
@click.option("--patience", default=5, show_default=True, type=click.IntRange(1),
              help="Stop after this many epochs without a better validation score.")
@click.option("--tile", default=None, type=click.IntRange(32),
              help="Tile side in pixels, at native resolution [default: the model input size].")
@click.option("--halo", default=32, show_default=True, type=click.IntRange(0), help="Tile overlap when validating.")
@click.option("--scales", default="1", show_default=True, metavar="S1,S2,...",
              help="Image scales to cut training tiles at (0.5 = half size, for objects smaller than in the images).")
@click.option("--crops-per-image", default="8", show_default=True, metavar="N1,N2,...",
              help="Random tiles per image at each scale (one number for all scales, or one per scale).")
@click.option("--object-size", default=None, type=click.FloatRange(min=4),
              help="Resize every image so its median object is this many pixels across (then --scales vary it); "
                   "`biosam auto` then estimates each image's object size and resizes it to match.")
@click.option("--augment", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of tiles re-exposed before normalisation (gamma, offset, blur, noise, dim 8-bit or 16-bit).")
@click.option("--variants", default=1, show_default=True, type=click.IntRange(1, 8),
              help="Rotated/flipped copies of each tile (each is embedded once and cached).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Learning rate.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--intensity", type=click.Choice(INTENSITY_PRESETS), default="auto", show_default=True,
              help="Intensity normalisation of the images (recorded with the decoder).")
@click.option("--cache-dir", default=None, type=click.Path(path_type=Path),
              help="Where to cache tile embeddings [default: OUTPUT's name + _embeddings next to it].")
@click.option("--resume", is_flag=True, help="Continue the run that was writing OUTPUT from its last finished epoch.")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def decoder(images, labels, output, model, val_fraction, epochs, patience, tile, halo, scales, crops_per_image,
            object_size, augment, variants, batch_size, lr, seed, intensity, cache_dir, resume, device, as_json) -> None:
    """Train an instance decoder (foreground and distance maps) on labelled images.

    Images in --images and label images in --labels are paired by file name
    without extension. The image encoder stays frozen: tile embeddings are
    computed once and cached, so later epochs and --resume are fast. The best
    epoch by validation F1 (IoU 0.5) plus mSA is written to OUTPUT with the
    post-processing tuned on the training tiles.
    """
    import numpy as np

    from biosam import load_model
    from biosam.automatic.data import pair_by_stem
    from biosam.train import TrainSettings, train_decoder

    scale_list = _floats(scales, "scales")
    crops = tuple(int(c) for c in _floats(crops_per_image, "counts"))
    if len(crops) == 1:
        crops = crops * len(scale_list)
    pairs = pair_by_stem(images, labels)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = int(round(val_fraction * len(pairs)))
    if val_fraction > 0 and len(pairs) > 1:
        n_val = min(max(n_val, 1), len(pairs) - 1)
    else:
        n_val = 0
    val_pairs = [pairs[i] for i in sorted(order[:n_val])]
    train_pairs = [pairs[i] for i in sorted(order[n_val:])]
    settings = TrainSettings(epochs=epochs, patience=patience, tile=tile, halo=halo, scales=scale_list,
                             crops_per_image=crops, variants=variants, batch_size=batch_size, lr=lr, seed=seed,
                             intensity=intensity, object_size=object_size, augment=augment)
    result = train_decoder(load_model(model, device=device), train_pairs, val_pairs, output, settings,
                           cache_dir=cache_dir, resume=resume)
    summary = {"output": str(result.output), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "train_images": len(train_pairs), "val_images": len(val_pairs), "validation": result.validation,
               "postprocessing": result.postprocessing, "parameters": result.parameters,
               "seconds": round(result.seconds, 1)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote {result.output} (epoch {result.best_epoch} of {result.epochs_run}, "
               f"{len(train_pairs)} training / {len(val_pairs)} validation images)")
    if result.validation is not None:
        v = result.validation
        click.echo(f"validation: F1@0.5 {v['f1']:.3f}, mSA {v['msa']:.3f} "
                   f"({v['n_pred']} objects found, {v['n_gt']} true)")


# The subcommands in their own modules, registered once the group exists.
from biosam.cli.train_classifier import classifier as _classifier  # noqa: E402
from biosam.cli.train_sam import sam as _sam  # noqa: E402

train.add_command(_classifier)
train.add_command(_sam)
