"""The ``biosam`` command."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from biosam.errors import BiosamError, InputError
from biosam.models import CheckpointError
from biosam.prompting.preprocess import PREPROCESSINGS
from biosam.prompting.zoom import ZOOM_MODES
from biosam.cli.common import check_image_fits, check_overlay, input_options, write_overlay
from biosam.zoo.errors import ZooError

logger = logging.getLogger("biosam")

USER_ERRORS = (BiosamError, CheckpointError, ZooError)


class _Group(click.Group):
    """Turns biosam's own errors into a one-line message and exit code 1, and SIGINT/SIGTERM into a clean stop.

    While a command runs, SIGINT and SIGTERM raise exceptions (see
    :mod:`biosam.cli.signals`), so unfinished outputs are removed on the way out;
    the exit codes are 130 and 143 as from a shell, not click's "Aborted!" and 1.
    """

    def invoke(self, ctx: click.Context):
        from biosam.cli.signals import EXIT_CODES, Terminated, signals_as_exceptions

        try:
            with signals_as_exceptions():
                try:
                    return super().invoke(ctx)
                except USER_ERRORS as exc:
                    raise click.ClickException(str(exc)) from exc
        except (KeyboardInterrupt, Terminated) as exc:
            sig = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
            click.echo(f"\nbiosam: stopped by {sig.name}; unfinished outputs were removed.", err=True)
            ctx.exit(EXIT_CODES[sig])


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="biosam")
def main(verbose: int) -> None:
    """Segment Anything for biomedical images."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from biosam.runtime import configure_cpu

    configure_cpu()  # this process is ours: keep freed activations for reuse (see biosam.runtime)


def _numbers(text: str, what: str, counts: tuple[int, ...]) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise click.BadParameter(f"'{text}' is not {what}.")
    return values


def _cli_prompts(boxes: tuple[str, ...], points: tuple[str, ...], prompts_file: Path | None):
    from biosam.prompting import Prompt, read_prompts

    if prompts_file is not None:
        if boxes or points:
            raise click.UsageError("use either --prompts or --box/--point, not both.")
        return read_prompts(prompts_file)
    box_list = [_numbers(b, "x0,y0,x1,y1", (4,)) for b in boxes]
    point_rows = [_numbers(p, "x,y or x,y,label", (2, 3)) for p in points]
    pts = [r[:2] for r in point_rows] or None
    labels = [int(r[2]) if len(r) == 3 else 1 for r in point_rows] or None
    if not box_list and not pts:
        raise click.UsageError("give at least one --box or --point (or --prompts FILE).")
    if len(box_list) > 1 and pts:
        raise click.UsageError("with several boxes, attach points to their boxes in a --prompts JSON file.")
    if not box_list:
        return [Prompt(points=pts, point_labels=labels)]
    return [Prompt(box=box_list[0], points=pts, point_labels=labels)] if pts else [Prompt(box=b) for b in box_list]


def _slices(prompts, meta, z: int | None) -> dict[int | None, list[int]]:
    """Group object indices by the slice they are on (``None`` for data without a Z axis)."""
    depth = meta.shape[meta.axes.index("Z")] if "Z" in meta.axes else 1
    volume = depth > 1
    groups: dict[int | None, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if not volume and prompt.z not in (None, 0):
            raise click.UsageError(f"{meta.path} has no slices, but object {i} has \"z\": {prompt.z}.")
        if prompt.z is not None and prompt.z >= depth:
            raise InputError(f"object {i} has \"z\": {prompt.z}, but {meta.path} has {depth} slices "
                                   f"(z = 0..{depth - 1}).")
        groups.setdefault((prompt.z if prompt.z is not None else z) if volume else None, []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


@main.command()
@click.argument("image", type=str)
@click.option("-o", "--output", required=True, type=str,
              help="Label image to write; the format follows the extension (.tif, .ome.tif, .png, .mrc, .nii.gz, .zarr, copick://).")
@click.option("--box", "boxes", multiple=True, metavar="x0,y0,x1,y1", help="A box prompt; repeat for several objects.")
@click.option("--point", "points", multiple=True, metavar="x,y[,label]",
              help="A point (label 1 object, 0 background); all points describe one object.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help='JSON list of objects: [{"box": [x0,y0,x1,y1], "points": [[x,y,label], ...], "z": slice}, ...].')
@click.option("--zoom", type=click.Choice(ZOOM_MODES), default="auto", show_default=True,
              help="Segment small objects in a zoomed crop (auto), always, or never (as the model's authors run it).")
@click.option("--multimask", is_flag=True, help="Predict 3 masks per object and keep the best-scored one.")
@click.option("--z", type=int, default=None, help="Slice of a volume to segment (objects in --prompts may give their own \"z\").")
@input_options
@click.option("--preprocessing", type=click.Choice(list(PREPROCESSINGS)), default=None,
              help="Override the preprocessing of a checkpoint file that is not in the zoo.")
def segment(image, output, boxes, points, prompts_file, zoom, multimask, z, intensity, t, channel, axes, level, series,
            model, device, precision, runtime, embeddings, overlay, as_json, overwrite, compression, preprocessing) -> None:
    """Segment the objects given by box/point prompts in IMAGE.

    IMAGE is a TIFF/OME-TIFF, PNG, JPEG, MRC, NIfTI, DICOM file or series
    folder, Zarr/OME-Zarr, or copick://config.json?run=...; for volumes choose
    the slice with --z or give "z" per object. OUTPUT gets label k for the k-th
    object (prompt order; later objects drawn over earlier ones) in IMAGE's
    geometry. Coordinates are pixels of the slice, x to the right and y down.
    Any number of objects is fine: they are decoded a batch at a time (with a
    progress bar) and drawn straight into the labels. Results not to be trusted
    (points alone with a box-trained model, empty objects, an image without
    contrast) are warned about on stderr and in the --json "warnings".
    """
    from tqdm.auto import tqdm

    from biosam import Predictor, load_model
    from biosam.io import check_labels_output, open_labels, plane_index, read_image, read_plane
    from biosam.labels import label_dtype
    from biosam.io.overlay import render_overlay
    from biosam.io.planes import plane_shape
    from biosam.prompting.intensity import check_contrast
    from biosam.prompting.prompts import check_prompts

    prompts = _cli_prompts(boxes, points, prompts_file)
    check_overlay(overlay, output, overwrite, image=image)
    data, meta = read_image(image, axes=axes, level=level, series_uid=series)
    groups = _slices(prompts, meta, z)
    check_labels_output(output, meta, overwrite, compression)
    for zz in groups:  # refuse bad --z/--t/--channel before the model loads
        plane_index(meta, z if zz is None else zz, t, channel)
    # and prompts outside the image (boxes over its edge are clipped), or an image the model cannot take
    prompts = check_prompts(prompts, plane_shape(meta), image)
    check_image_fits(meta, model, preprocessing)
    predictor = Predictor(load_model(model, device=device, preprocessing=preprocessing, precision=precision,
                                     runtime=runtime),
                          store=embeddings)
    labels_meta = meta.labels_meta()
    objects: list[dict] = [{} for _ in prompts]
    warnings: list[str] = []  # also logged to stderr as they arise
    picture = None
    with open_labels(output, meta, label_dtype(len(prompts)), overwrite=overwrite, compression=compression) as out:
        for zz, members in tqdm(groups.items(), desc="slices", disable=len(groups) < 2):
            where = f"{image}{'' if zz is None else f' (slice z={zz})'}"
            try:
                pixels = read_plane(data, meta, zz, t, channel)
                warnings += filter(None, [check_contrast(pixels, where)])
                predictor.set_image(pixels, intensity=intensity)
                # decoded a batch at a time and drawn straight into the plane: memory does not grow with objects
                result = predictor.predict_labels([prompts[i] for i in members], multimask=multimask, zoom=zoom,
                                                  progress=True, ids=[i + 1 for i in members])
            except BiosamError as exc:
                raise BiosamError(f"{where}: {exc}") from exc
            warnings += result.warnings
            plane = result.labels.astype(out.dtype, copy=False)
            out[plane_index(labels_meta, zz, t)] = plane
            for k, i in enumerate(members):
                objects[i] = {"label": i + 1, "z": zz, "score": round(float(result.scores[k]), 4),
                              "area": int(result.areas[k]), "visible_area": int(result.visible_areas[k]),
                              "zoomed": bool(result.zoomed[k])}
            if overlay is not None and picture is None:  # the first segmented slice
                shown = [prompts[i].validate(plane.shape) for i in members]
                picture = render_overlay(predictor.image_rgb, plane, shown)
    if picture is not None:
        write_overlay(overlay, picture, output, overwrite)
    if as_json:
        if all(o["z"] is None for o in objects):
            for o in objects:
                del o["z"]
        click.echo(json.dumps({"image": str(image), "input": meta.summary(), "model": predictor.info.name,
                               "intensity": predictor.intensity, "output": str(output),
                               "overlay": str(overlay) if overlay else None, "warnings": warnings,
                               "objects": objects}, indent=2))


@main.group(cls=_Group, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the model zoo: name, architecture, size, domain, and whether it is cached."""
    if ctx.invoked_subcommand is not None:
        return
    from biosam.zoo import describe_models

    rows = describe_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("name", "version", "architecture", "size (MB)", "status", "domain")
    table = [
        (
            r["name"],
            r["version"] or "-",
            r["architecture"],
            "?" if r["size_mb"] is None else f"{r['size_mb']:.0f}",
            "not yet supported" if not r["supported"] else "cached" if r["cached"] else "downloads on first use",
            r["domain"],
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


@models.command("fetch")
@click.argument("name")
def models_fetch(name: str) -> None:
    """Download a zoo model into the cache (hash-checked) and print its path."""
    from biosam.zoo import fetch, get_spec

    click.echo(str(fetch(get_spec(name))))


def _register() -> None:
    from biosam.cli.annotate import annotate
    from biosam.cli.auto import auto
    from biosam.cli.batch import batch
    from biosam.cli.evaluate import evaluate
    from biosam.cli.export import export
    from biosam.cli.tomogram import tomogram
    from biosam.cli.train import train
    from biosam.cli.volume import volume

    main.add_command(annotate)
    main.add_command(auto)
    main.add_command(batch)
    main.add_command(evaluate)
    main.add_command(export)
    main.add_command(tomogram)
    main.add_command(train)
    main.add_command(volume)


_register()
