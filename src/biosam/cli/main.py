"""The ``biosam`` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from biosam.errors import BiosamError
from biosam.models import CheckpointError
from biosam.zoo.errors import ZooError

logger = logging.getLogger("biosam")

USER_ERRORS = (BiosamError, CheckpointError, ZooError)


class _Group(click.Group):
    """Turns biosam's own errors into a one-line message and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="biosam")
def main(verbose: int) -> None:
    """Segment Anything for biomedical images."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


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


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Label image to write (.tif or .png).")
@click.option("--model", default="lite_medsam", show_default=True, help="Zoo name (see `biosam models`) or checkpoint path.")
@click.option("--box", "boxes", multiple=True, metavar="x0,y0,x1,y1", help="A box prompt; repeat for several objects.")
@click.option("--point", "points", multiple=True, metavar="x,y[,label]",
              help="A point (label 1 object, 0 background); all points describe one object.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help='JSON list of objects: [{"box": [x0,y0,x1,y1], "points": [[x,y,label], ...]}, ...].')
@click.option("--zoom", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Segment small objects in a zoomed crop (auto), always, or never (as the model's authors run it).")
@click.option("--multimask", is_flag=True, help="Predict 3 masks per object and keep the best-scored one.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda if available, else cpu.")
@click.option("--preprocessing", type=click.Choice(["sam", "medsam", "lite_medsam"]), default=None,
              help="Override the preprocessing of a checkpoint file that is not in the zoo.")
@click.option("--overlay", type=click.Path(path_type=Path), help="Also write a picture of the result (.png).")
@click.option("--json", "as_json", is_flag=True, help="Print per-object score and area as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def segment(image, output, model, boxes, points, prompts_file, zoom, multimask, device, preprocessing, overlay,
            as_json, overwrite) -> None:
    """Segment the objects given by box/point prompts in a 2D IMAGE (TIFF, PNG, JPEG).

    OUTPUT gets label k for the k-th object (prompt order; later objects are
    drawn over earlier ones). Coordinates are pixels of IMAGE, x to the right
    and y down.
    """
    from biosam import Predictor, load_model
    from biosam.io import LABEL_SUFFIXES, read_image, write_image, write_labels
    from biosam.io.images import check_output_path
    from biosam.io.overlay import render_overlay

    prompts = _cli_prompts(boxes, points, prompts_file)
    check_output_path(output, LABEL_SUFFIXES, overwrite)
    if overlay is not None:
        check_output_path(overlay, (".png",), overwrite)
        if overlay.resolve() == output.resolve():
            raise click.UsageError("--overlay and -o must be different files.")
    pixels = read_image(image)
    net = load_model(model, device=device, preprocessing=preprocessing)
    predictor = Predictor(net)
    try:
        predictor.set_image(pixels)
        result = predictor.predict_prompts(prompts, multimask=multimask, zoom=zoom, progress=True)
    except BiosamError as exc:
        raise BiosamError(f"{image}: {exc}") from exc
    labels = result.to_labels()
    picture = render_overlay(predictor._rgb, labels, [p.validate(labels.shape) for p in prompts]) if overlay else None

    write_labels(output, labels, overwrite=overwrite)
    if picture is not None:
        try:
            write_image(overlay, picture, overwrite=overwrite)
        except BaseException:
            output.unlink(missing_ok=True)  # all outputs or none
            raise
    if as_json:
        best = result.scores.argmax(axis=1)
        objects = [
            {
                "label": k + 1,
                "score": round(float(result.scores[k, best[k]]), 4),
                "area": int(result.masks[k, best[k]].sum()),
                "visible_area": int((labels == k + 1).sum()),
                "zoomed": bool(result.zoomed[k]),
            }
            for k in range(len(prompts))
        ]
        click.echo(json.dumps({"image": str(image), "model": net.info.name, "output": str(output),
                               "overlay": str(overlay) if overlay else None, "objects": objects}, indent=2))


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
    header = ("name", "architecture", "size (MB)", "status", "domain")
    table = [
        (
            r["name"],
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
