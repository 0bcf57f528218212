"""``biosam train``: train models on top of a frozen image encoder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from biosam.cli.train_options import train_options, training_pairs
from biosam.train.decoder import TrainSettings


@click.group("train")
def train() -> None:
    """Train models on top of a frozen SAM image encoder."""


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of {what}.") from None


@train.command("decoder")
@train_options(TrainSettings, help={"output": "Decoder checkpoint to write (.pt)."})
@click.option("--tile", default=None, type=int,
              help="Tile side in pixels, at native resolution [default: the model input size].")
@click.option("--halo", default=TrainSettings.halo, show_default=True, type=int, help="Tile overlap when validating.")
@click.option("--scales", default="1", show_default=True, metavar="S1,S2,...",
              help="Image scales to cut training tiles at (0.5 = half size, for objects smaller than in the images).")
@click.option("--crops-per-image", default="8", show_default=True, metavar="N1,N2,...",
              help="Random tiles per image at each scale (one number for all scales, or one per scale).")
@click.option("--object-size", default=None, type=float,
              help="Resize every image so its median object is this many pixels across (then --scales vary it); "
                   "`biosam auto` then estimates each image's object size and resizes it to match.")
@click.option("--augment", default=TrainSettings.augment, show_default=True, type=float,
              help="Fraction of tiles re-exposed before normalisation (gamma, offset, blur, noise, dim 8-bit or 16-bit).")
@click.option("--variants", default=TrainSettings.variants, show_default=True, type=int,
              help="Rotated/flipped copies of each tile, 1 to 8 (each is embedded once and cached).")
@click.option("--cache-dir", default=None, type=click.Path(path_type=Path),
              help="Where to cache tile embeddings [default: OUTPUT's name + _embeddings next to it].")
def decoder(images, labels, output, model, val_fraction, epochs, patience, tile, halo, scales, crops_per_image,
            object_size, augment, variants, batch_size, lr, seed, intensity, cache_dir, resume, device, overwrite,
            as_json) -> None:
    """Train an instance decoder (foreground and distance maps) on labelled images.

    Images in --images and label images in --labels are paired by file name
    without extension. The image encoder stays frozen: tile embeddings are
    computed once and cached, so later epochs and --resume are fast. The best
    epoch by validation F1 (IoU 0.5) plus mSA is written to OUTPUT with the
    post-processing tuned on the training tiles.
    """
    from biosam import load_model
    from biosam.train import train_decoder
    from biosam.train.harness import check_output

    check_output(output, overwrite or resume)
    scale_list = _floats(scales, "scales")
    crops = tuple(int(c) for c in _floats(crops_per_image, "counts"))
    if len(crops) == 1:
        crops = crops * len(scale_list)
    settings = TrainSettings(epochs=epochs, patience=patience, tile=tile, halo=halo, scales=scale_list,
                             crops_per_image=crops, variants=variants, batch_size=batch_size, lr=lr, seed=seed,
                             intensity=intensity, object_size=object_size, augment=augment)
    train_pairs, val_pairs = training_pairs(images, labels, val_fraction, seed)
    result = train_decoder(load_model(model, device=device), train_pairs, val_pairs, output, settings,
                           cache_dir=cache_dir, resume=resume, overwrite=overwrite)
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
