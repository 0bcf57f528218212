"""``biosam batch``: run one command on many inputs, on a Dask cluster (see :mod:`biosam.distributed.batch`)."""

from __future__ import annotations

import click

from biosam.distributed.batch import COMMANDS


def _split(command: click.Command, tokens: list[str]) -> tuple[list[str], list[str]]:
    """``tokens`` as (inputs, options of ``command``): an option takes the next token as its value
    unless it is a flag, so inputs and options may come in any order."""
    takes_value = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                takes_value[name] = not (param.is_flag or param.count)
    inputs, options = [], []
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        name = token.split("=", 1)[0]
        if token.startswith("-") and name in takes_value:
            options.append(token)
            if takes_value[name] and "=" not in token and tokens:
                options.append(tokens.pop(0))
        elif token.startswith("-") and token != "-":
            raise click.UsageError(f"no such option for biosam {command.name}: {token}")
        else:
            inputs.append(token)
    return inputs, options


@click.command("batch", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True})
@click.argument("command", type=click.Choice(COMMANDS))
@click.argument("items", nargs=-1, type=click.UNPROCESSED, metavar="INPUTS... [COMMAND OPTIONS]")
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False),
              help="Folder of the outputs (OUTDIR/<input name><suffix>) and of biosam-batch-summary.csv.")
@click.option("--suffix", default=".tif", show_default=True,
              help="Output type, as an extension (.tif, .ome.tif, .png, .mrc, .nii.gz, .zarr).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes of a cluster on this machine (one thread each).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on an existing Dask cluster (tcp://host:8786) instead of starting one.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run an input that failed this many times more before reporting it.")
def batch(command, items, outdir, suffix, workers, scheduler, retries) -> None:
    """Run `biosam COMMAND` on every input, one task per input on a Dask cluster.

    INPUTS are files, folders (their images), quoted glob patterns, or a copick
    project (copick://config.json: every run); every other option is COMMAND's
    own (e.g. --model, --mode, --prompts). Outputs
    that exist are skipped, so a stopped batch resumes where it was; an input
    that fails is listed with its error and the others go on. The summary
    table (input, status, seconds, objects, error) is printed and written to
    OUTDIR/biosam-batch-summary.csv; the exit status is 1 if any input failed.
    Needs `pip install "biosam[distributed]"`.
    """
    from biosam.distributed.batch import format_summary, run_command_batch
    from biosam.distributed.cluster import quiet_dask_logs

    quiet_dask_logs()

    ctx = click.get_current_context()
    target = ctx.parent.command.get_command(ctx.parent, command)  # a sibling subcommand of `biosam`
    inputs, options = _split(target, list(items))
    if not inputs:
        raise click.UsageError("give at least one input (file, folder or glob pattern).")
    rows = run_command_batch(target, inputs, outdir, options, suffix=suffix, workers=workers, scheduler=scheduler,
                             retries=retries)
    click.echo(format_summary(rows))
    if any(r.status == "failed" for r in rows):
        raise SystemExit(1)
