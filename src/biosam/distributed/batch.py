"""``biosam batch``: one ``biosam`` command per input file, on a Dask cluster.

Each task runs the very command a user would type (``biosam auto IN -o OUT
...``), through the same click command object, so a batch result is the result
of running that file alone. Finished outputs are skipped (outputs are written
atomically, so one that exists is complete), a failing input becomes a
``failed`` row of the summary table instead of stopping the others, and a task
whose worker dies is run again on another worker by the scheduler.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import click

from biosam.errors import InputError

logger = logging.getLogger(__name__)

COMMANDS = ("segment", "auto", "volume", "tomogram")
SUMMARY_NAME = "biosam-batch-summary.csv"
# Files a folder input contributes: what biosam reads as images or volumes (a folder is not searched deeper).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".mrc", ".rec", ".map", ".nii", ".nii.gz", ".dcm")


@dataclass
class BatchRow:
    """One input's line of the summary table."""

    input: str
    output: str
    status: str  # done, skipped (output already there), failed
    seconds: float = 0.0
    objects: int | None = None
    error: str = ""


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffixes[-2:-1] in ([".nii"], [".ome"]) else path.suffix


def copick_runs(uri: str) -> list[str]:
    """``copick://config.json[?...]`` without ``run=``: one address per run of the project (else ``[uri]``)."""
    from biosam.io.copick_project import import_copick, parse_uri

    params = parse_uri(uri)
    if "run" in params:
        return [uri]
    config = Path(params["config"])
    if not config.is_file():
        raise InputError(f"{uri}: copick config file {config} not found. Give the project's config.json path.")
    runs = sorted(r.name for r in import_copick().from_file(str(config)).runs)
    if not runs:
        raise InputError(f"{uri}: the copick project has no runs.")
    return [f"{uri}{'&' if '?' in uri else '?'}run={name}" for name in runs]


def find_inputs(patterns: list[str]) -> list[str]:
    """Input files from file paths, folders (their image files, sorted) and glob patterns, without repeats.

    Zarr stores and DICOM series folders are inputs in their own right, named directly or by a glob; a
    ``copick://config.json`` address without ``run=`` stands for every run of the project.
    """
    from biosam.io.copick_project import is_copick_uri

    found: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if is_copick_uri(pattern):
            found += copick_runs(pattern)
        elif any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise InputError(f"{pattern}: no file matches this pattern. Check the pattern (quote it so the "
                                 "shell does not expand it) or give the files.")
            found += matches
        elif path.is_dir() and _suffix(path).lower() not in (".zarr",) and not path.name.endswith(".ome.zarr"):
            files = sorted(str(p) for p in path.iterdir() if p.is_file() and _suffix(p).lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"{path}: a folder without images ({', '.join(IMAGE_SUFFIXES)}). Give the files or "
                                 "a glob pattern.")
            found += files
        elif path.exists():
            found.append(str(path))
        else:
            raise InputError(f"{path}: not found. Check the path and spelling.")
    return list(dict.fromkeys(found))


def output_for(source: str, outdir: str | Path, suffix: str) -> Path:
    """``OUTDIR/<input name without its extension><suffix>`` (a copick run's name for a copick address)."""
    from biosam.io.copick_project import is_copick_uri, parse_uri

    if is_copick_uri(source):
        return Path(outdir) / f"{parse_uri(source)['run']}{suffix}"
    name = Path(source.rstrip("/")).name
    stem = name[: -len(_suffix(Path(name)))] if _suffix(Path(name)) else name
    return Path(outdir) / f"{stem}{suffix}"


def _objects(report: dict) -> int | None:
    """The object count of a command's ``--json`` report (auto: objects; segment: its object list;
    volume: objects; tomogram: vesicles)."""
    for key in ("objects", "vesicles"):
        value = report.get(key)
        if isinstance(value, list):
            return len(value)
        if isinstance(value, int):
            return value
    return None


def run_one(command: click.Command, source: str, output: str, options: list[str]) -> BatchRow:
    """Run ``biosam COMMAND SOURCE -o OUTPUT OPTIONS --json`` in this process; the row for the summary.

    Errors of the input (and any other exception) are reported in the row, not raised; an output that is
    already there is left alone (``skipped``) unless ``--overwrite`` is among the options.
    """
    if Path(output).exists() and "--overwrite" not in options:
        return BatchRow(source, output, "skipped")
    args = [source, "-o", output, *options, *([] if "--json" in options else ["--json"])]
    printed = io.StringIO()
    start = time.perf_counter()
    try:
        # the command's own progress bars would interleave across workers; the batch has one bar for all
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            command.main(args=args, prog_name=f"biosam {command.name}", standalone_mode=False)
    except click.ClickException as exc:
        return BatchRow(source, output, "failed", round(time.perf_counter() - start, 2), None, exc.format_message())
    except Exception as exc:  # one bad input must not stop the batch; its message goes into the table
        logger.debug("%s failed", source, exc_info=True)
        return BatchRow(source, output, "failed", round(time.perf_counter() - start, 2), None, str(exc) or repr(exc))
    seconds = round(time.perf_counter() - start, 2)
    try:
        report = json.loads(printed.getvalue())
    except ValueError:
        report = {}
    return BatchRow(source, output, "done", seconds, _objects(report))


def check_options(command: click.Command, options: list[str]) -> None:
    """Refuse options that ``biosam COMMAND`` does not take, or ``-o`` (the batch names every output)."""
    if command.name not in COMMANDS:
        raise InputError(f"batch: '{command.name}' is not a command biosam batch runs; use one of "
                         f"{', '.join(COMMANDS)}.")
    if any(o in ("-o", "--output") or o.startswith("--output=") for o in options):
        raise InputError("batch: -o names the output folder; each input's output is OUTDIR/<name><suffix>.")
    try:
        command.make_context(f"biosam {command.name}", ["INPUT", "-o", "OUTPUT", *options])
    except click.ClickException as exc:
        raise InputError(f"biosam {command.name}: {exc.format_message()}") from None


def write_summary(rows: list[BatchRow], outdir: str | Path) -> Path:
    """Write the summary table as ``OUTDIR/biosam-batch-summary.csv`` (atomically) and return its path."""
    from biosam.io.files import atomic_path

    path = Path(outdir) / SUMMARY_NAME
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(BatchRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path


def format_summary(rows: list[BatchRow]) -> str:
    """The summary as an aligned text table, with a count line."""
    header = ("input", "status", "seconds", "objects", "error")
    table = [(Path(r.input).name, r.status, f"{r.seconds:.1f}", "" if r.objects is None else str(r.objects),
              r.error.splitlines()[0][:80] if r.error else "") for r in rows]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *table]]
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "skipped", "failed")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def run_command_batch(command: click.Command, inputs: list[str], outdir: str | Path, options: list[str] | None = None,
                      *, suffix: str = ".tif", workers: int = 2, scheduler: str | None = None, client: Any = None,
                      progress: bool = True, retries: int = 0) -> list[BatchRow]:
    """Run the ``biosam`` subcommand ``command`` on every input (files, folders, globs) with outputs in ``outdir``;
    the summary rows (:func:`biosam.distributed.run_batch` takes the command's name).

    One task per input on ``client``, the cluster at ``scheduler``, or a new ``LocalCluster`` of
    ``workers`` single-threaded processes (see :func:`biosam.distributed.cluster.open_client`). Inputs whose
    output exists are skipped without a task. The table is also written to ``OUTDIR/biosam-batch-summary.csv``.
    """
    from tqdm.auto import tqdm

    from biosam.distributed.cluster import open_client, require_distributed, task_resources
    from biosam.io.files import check_output_path

    require_distributed()
    from distributed import as_completed

    options = list(options or [])
    check_options(command, options)
    sources = find_inputs(list(inputs))
    outdir = Path(outdir)
    check_output_path(outdir / SUMMARY_NAME, (".csv",), overwrite=True)  # a folder that can be written
    outputs = [str(output_for(s, outdir, suffix)) for s in sources]
    if len(set(outputs)) < len(outputs):
        raise InputError(f"batch: several inputs would write the same output in {outdir} (inputs with the same "
                         "name in different folders); run them in separate batches.")
    overwrite = "--overwrite" in options
    rows: dict[str, BatchRow] = {s: BatchRow(s, o, "skipped") for s, o in zip(sources, outputs)
                                 if Path(o).exists() and not overwrite}
    todo = [(s, o) for s, o in zip(sources, outputs) if s not in rows]
    logger.info("batch %s: %d inputs, %d already done", command.name, len(sources), len(rows))
    if todo:
        run = uuid.uuid4().hex[:8]  # keys unique to this run: a key still known to the scheduler would be reused
        with open_client(workers, scheduler, client) as cl:
            gpu = task_resources(cl)  # one input at a time per GPU, where the workers offer GPUs

            def submit(source: str, output: str, attempt: int) -> Any:
                return cl.submit(run_one, command, source, output, options, pure=False, resources=gpu,
                                 key=f"biosam-{command.name}-{run}-{attempt}-{Path(source).name}")

            futures = {submit(s, o, 0): (s, o, 0) for s, o in todo}
            bar = tqdm(total=len(futures), desc=f"biosam {command.name}", unit="input", disable=not progress)
            pending = as_completed(list(futures))
            for future in pending:
                source, output, attempt = futures.pop(future)
                try:
                    row = future.result()
                except Exception as exc:  # the task itself was lost (e.g. its worker died more often than allowed)
                    row = BatchRow(source, output, "failed", 0.0, None, f"{type(exc).__name__}: {exc}")
                if row.status == "failed" and attempt < retries:  # run_one reports errors, so retry here
                    again = submit(source, output, attempt + 1)
                    futures[again] = (source, output, attempt + 1)
                    pending.add(again)
                    continue
                rows[source] = row
                bar.update()
            bar.close()
    ordered = [rows[s] for s in sources]
    write_summary(ordered, outdir)
    return ordered
