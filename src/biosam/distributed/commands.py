"""``biosam batch``'s commands by name, for Python users (the CLI hands its command objects over itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from biosam.distributed.batch import COMMANDS, BatchRow, run_command_batch
from biosam.errors import InputError


def command_named(name: str) -> click.Command:
    """The click command ``biosam NAME`` for one of :data:`COMMANDS`."""
    if name not in COMMANDS:
        raise InputError(f"batch: '{name}' is not a command biosam batch runs; use one of {', '.join(COMMANDS)}.")
    from biosam.cli.main import main

    return main.commands[name]


def run_batch(command: str | click.Command, inputs: list[str], outdir: str | Path, options: list[str] | None = None,
              **kwargs: Any) -> list[BatchRow]:
    """Run ``biosam COMMAND`` (``"segment"``, ``"auto"``, ``"volume"``, ``"tomogram"``) on every input, one
    task per input on a Dask cluster; see :func:`biosam.distributed.batch.run_command_batch` for the options."""
    cmd = command_named(command) if isinstance(command, str) else command
    return run_command_batch(cmd, inputs, outdir, options, **kwargs)
