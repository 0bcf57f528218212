"""The options every ``biosam train`` command takes: data, output, model, the training loop, device, report.

Defaults come from each trainer's Settings class and values are checked there
(or, for ``--val-fraction``, by the training harness), so the command line and
Python refuse the same values with the same message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import click

from biosam.cli.common import input_options
from biosam.train.harness import DEFAULT_VAL_FRACTION

_HELP = {
    "images": "Folder of training images.",
    "labels": "Folder of label images (instance labels or binary masks) with the same file names (stems) as the "
              "images.",
    "output": "Checkpoint to write (.pt).",
    "val_fraction": "Share of the image pairs held out for validation (chosen with --seed); 0 trains on all.",
    "epochs": "Most epochs to train.",
    "patience": "Stop after this many epochs without a better validation score.",
    "batch_size": "Samples per training step.",
    "lr": "Learning rate (AdamW).",
    "seed": "Seed for the split and every random choice of training.",
    "resume": "Continue the run that was writing OUTPUT from its last finished epoch.",
}


def train_options(settings: type, *, resume: bool = True, data_required: bool = True,
                  help: Mapping[str, str] | None = None) -> Callable:
    """Decorate a ``biosam train`` command with the shared options.

    ``--images``, ``--labels``, ``-o/--output``, ``--val-fraction``, ``--epochs``,
    ``--patience`` (when ``settings`` has it), ``--batch-size``, ``--lr``,
    ``--seed``, ``--resume`` (unless ``resume`` is False), and from
    :func:`~biosam.cli.common.input_options` ``--model``, ``--intensity``,
    ``--device``, ``--json`` and ``--overwrite``. Defaults are the fields of the
    ``settings`` dataclass; ``help`` replaces option help texts by name.
    """
    unknown = set(help or ()) - set(_HELP)
    if unknown:
        raise ValueError(f"no shared training option {sorted(unknown)}")
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    text = {**_HELP, **(help or {})}
    path = click.Path(path_type=Path)
    options = [
        click.option("--images", required=data_required, default=None, type=path, help=text["images"]),
        click.option("--labels", required=data_required, default=None, type=path, help=text["labels"]),
        click.option("-o", "--output", required=True, type=path, help=text["output"]),
        click.option("--val-fraction", default=defaults.get("val_fraction", DEFAULT_VAL_FRACTION), show_default=True,
                     type=float, help=text["val_fraction"]),
        click.option("--epochs", default=defaults["epochs"], show_default=True, type=int, help=text["epochs"]),
    ]
    if "patience" in defaults:
        options.append(click.option("--patience", default=defaults["patience"], show_default=True, type=int,
                                    help=text["patience"]))
    options += [
        click.option("--batch-size", default=defaults["batch_size"], show_default=True, type=int,
                     help=text["batch_size"]),
        click.option("--lr", default=defaults["lr"], show_default=True, type=float, help=text["lr"]),
        click.option("--seed", default=defaults["seed"], show_default=True, type=int, help=text["seed"]),
    ]
    if resume:
        options.append(click.option("--resume", is_flag=True, help=text["resume"]))
    shared = input_options(only=("model", "intensity", "device", "as_json", "overwrite"))

    def apply(command: Callable) -> Callable:
        command = shared(command)  # listed after the options above
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def training_pairs(images: Path, labels: Path, val_fraction: float, seed: int) -> tuple[list, list]:
    """Image/label pairs of two folders (paired by file name), split into training and validation pairs."""
    from biosam.automatic.data import pair_by_stem
    from biosam.train.harness import split

    return split(pair_by_stem(images, labels), val_fraction, seed)
