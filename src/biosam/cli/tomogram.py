"""``biosam tomogram``: find membrane-bound vesicles in a cryo-ET tomogram, segment and measure them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import click
import numpy as np

from biosam.cli.common import input_options
from biosam.errors import BiosamError, InputError
from biosam.io.volumes import zyx_volume
from biosam.io.voxel_size import VoxelSize, voxel_size_of
from biosam.tomogram.grid import POLARITY_CHOICES
from biosam.tomogram.vesicles import CANDIDATE_METHODS

# The options behind VesicleSettings fields, for error messages.
_OPTION_NAMES = {"min_diameter_nm": "--min-diameter", "max_diameter_nm": "--max-diameter",
                 "slab_thickness": "--slab-thickness", "n_slabs": "--multi-slab", "z_step": "--z-step",
                 "slab_step": "--slab-step"}


def _base(output: str) -> Path:
    """``OUT`` without its format extension (``labels.ome.zarr`` -> ``labels``)."""
    from biosam.io.files import suffix_of

    path = Path(output)
    suffix = suffix_of(path)
    return path.with_name(path.name[: len(path.name) - len(suffix)] if suffix else path.name)


def _labels_like(meta, voxel: VoxelSize, from_header: bool):
    """Geometry of the label volume: the input's own, with the voxel size filled in when the header had none."""
    if from_header:
        return meta
    extra = {k: v for k, v in meta.extra.items() if k != "mrc_geometry"}
    spacing = dict(zip("ZYX", voxel.angstrom))
    return dataclasses.replace(meta, spacing={**meta.spacing, **spacing}, unit="angstrom", extra=extra)


def _copick_targets(meta, obj: str, user: str, session: str, output: str) -> dict[str, str]:
    """The copick addresses of the picks and (unless ``-o`` is one) the segmentation of a copick input run."""
    from urllib.parse import quote

    from biosam.io.copick_project import is_copick_uri

    extra = meta.extra
    base = (f"copick://{quote(str(extra['config']))}?run={quote(str(extra['run']))}"
            f"&voxel_spacing={extra['voxel_spacing']:g}&user_id={quote(user)}&session_id={quote(session)}")
    targets = {"picks": f"{base}&name={quote(obj)}"}
    if not is_copick_uri(output):
        targets["segmentation"] = f"{base}&name={quote(obj)}&multilabel=true"
    return targets


def _check_copick(targets: dict[str, str], meta, overwrite: bool) -> None:
    """Refuse copick outputs that exist already, before any work (the writers check again when writing)."""
    from biosam.io.copick_project import import_copick, parse_uri

    for kind, uri in targets.items():
        params = parse_uri(uri)
        known = meta.extra if meta.format == "copick" else {}
        run_name, size = params.get("run", known.get("run")), params.get("voxel_spacing", known.get("voxel_spacing"))
        name = params.get("name")
        if run_name is None or size is None or name is None:
            continue  # the writer names what is missing
        user, session = params.get("user_id", "biosam"), params.get("session_id", "0")
        try:
            run = import_copick().from_file(str(params["config"])).get_run(run_name)
        except Exception:  # noqa: BLE001 - a broken project is reported by the writer with its own message
            continue
        if run is None:
            continue
        if kind == "picks":
            found = run.get_picks(object_name=name, user_id=user, session_id=session)
        else:
            found = run.get_segmentations(user_id=user, session_id=session, name=name,
                                          is_multilabel=bool(params.get("multilabel", False)), voxel_size=float(size))
        if found and (not overwrite or found[0].read_only):
            raise InputError(f"{uri}: the {kind} '{name}' by {user}, session {session} already exist in run "
                             f"{run_name}; pass --overwrite to replace them or choose another session.")


def _remove(written: list[str]) -> None:
    """Take away outputs of this run after a failure (all outputs or none)."""
    for item in reversed(written):
        path = Path(item)
        with contextlib.suppress(OSError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


@click.command("tomogram")
@click.argument("tomogram", type=str)
@click.option("-o", "--output", required=True, type=str,
              help="Label volume to write (.mrc, .tif, .zarr, .nii.gz or copick://...); vesicles get ids 1..N.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None,
              help="Measurements table (default: OUTPUT's name with .csv).")
@click.option("--overlay", type=click.Path(path_type=Path), default=None,
              help="Picture of the slab with the vesicles found (default: OUTPUT's name with _overlay.png).")
@click.option("--z", type=int, default=None, help="Centre slice of the slab (default: the middle slice).")
@click.option("--multi-slab", type=click.IntRange(min=1), default=None, metavar="N",
              help="Look for vesicles on N slabs at evenly spaced depths (duplicates merged). One slab finds only "
                   "the vesicles crossing it; 5 found 95% of them in a 96-slice synthetic tomogram.")
@click.option("--slab-thickness", type=int, default=11, show_default=True, help="Slices averaged into a slab (--method decoder: nm).")
@click.option("--method", type=click.Choice(list(CANDIDATE_METHODS)), default=None,
              help="decoder = a trained decoder finds vesicles on slabs through the whole tomogram and links them "
                   "in 3D (default; with --z, --multi-slab or --classifier: lumen); or 2D candidates on one or more slabs, followed "
                   "through z by SAM: lumen = regions enclosed by membrane, hough = circle transform, amg = SAM's "
                   "automatic masks with a grid of boxes.")
@click.option("--polarity", type=click.Choice(list(POLARITY_CHOICES)), default="auto", show_default=True,
              help="Contrast: dark = dense material dark (as reconstructed), bright = inverted; auto detects it.")
@click.option("--decoder", "vesicle_decoder", type=click.Path(path_type=Path), default=None,
              help="Vesicle decoder checkpoint for --method decoder (default: the one shipped for the model).")
@click.option("--min-diameter", type=float, default=None, help="Smallest vesicle diameter in nm (default 20).")
@click.option("--max-diameter", type=float, default=None, help="Largest vesicle diameter in nm (default 150).")
@click.option("--slab-step", type=int, default=None,
              help="--method decoder: nm between the centres of successive slabs (default 4).")
@click.option("--z-step", type=int, default=None,
              help="Propagate through every N-th slice of the z-smoothed volume (default 2; others take the nearest slice's masks).")
@click.option("--voxel-size", type=float, default=None,
              help="Voxel size in Å, for files whose header does not record it (overrides the header).")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="Mask classifier trained on tomogram candidates (`biosam train classifier`): only the slab "
                   "candidates it puts in --keep-classes are followed through z.")
@click.option("--keep-classes", default=None, metavar="NAME,...",
              help="With --classifier: classes to keep (default: every class but background).")
@click.option("--copick-object", default="vesicle", show_default=True,
              help="copick input: pickable object the picks (and segmentation) are stored under.")
@click.option("--copick-user", default="biosam", show_default=True, help="copick input: user_id of the outputs.")
@click.option("--copick-session", default="0", show_default=True, help="copick input: session_id of the outputs.")
@input_options(only=("axes", "level", "model", "device", "precision", "runtime", "embeddings", "as_json", "overwrite"))
def tomogram(tomogram, output, csv_path, overlay, z, multi_slab, slab_thickness, method, polarity, vesicle_decoder,
             min_diameter, max_diameter, slab_step, z_step, voxel_size, classifier, keep_classes, copick_object, copick_user, copick_session, axes, level, model, device,
             precision, runtime, embeddings, as_json, overwrite) -> None:
    """Find membrane-bound vesicles in TOMOGRAM, segment each in 3D and measure it.

    Default (--method decoder): the tomogram is resampled to 10 Å voxels and
    made dense-dark (--polarity), a trained decoder finds vesicle
    cross-sections on slabs every --slab-step nm through the whole volume, and
    sections that overlap from slab to slab become one vesicle, completed over
    the poles the missing wedge hides. Other methods: a slab of
    --slab-thickness slices around the middle (or --z, or N slabs with
    --multi-slab) is searched for vesicle cross-sections (dark rings around a
    lumen); SAM follows each through z. Writes OUTPUT (vesicle ids
    1..N in the tomogram's geometry), a CSV of measurements (centroid in Å,
    volume in nm³, diameters and z-extent in nm, mean score) and an overlay
    PNG; for a copick run also picks at the centroids and a segmentation.
    """
    from biosam.io.copick_project import is_copick_uri
    from biosam.io.files import check_output_path

    if keep_classes is not None and classifier is None:
        raise click.UsageError("--keep-classes needs --classifier.")
    if z is not None and multi_slab is not None:
        raise click.UsageError("give either --z (one slab) or --multi-slab N, not both.")
    if is_copick_uri(output) and csv_path is None:
        raise click.UsageError("with a copick:// output, give the measurements table's path with --csv.")
    base = None if is_copick_uri(output) else _base(output)
    csv_path = csv_path or base.with_name(base.name + ".csv")
    overlay = overlay or (None if base is None else base.with_name(base.name + "_overlay.png"))
    files = [Path(p).resolve() for p in (output, csv_path, overlay) if p is not None and not is_copick_uri(p)]
    if len(set(files)) != len(files):
        raise click.UsageError("-o, --csv and --overlay must be different files.")

    from biosam.io import check_labels_output, read_image, write_image, write_labels
    from biosam.tomogram.measure import measure_vesicles, write_measurements
    from biosam.tomogram.vesicles import VesicleSettings

    # Everything that can be refused is refused before the model loads.
    data, meta = read_image(tomogram, axes=axes, level=level)
    if not set("ZYX") <= set(meta.axes) or meta.shape[meta.axes.index("Z")] < 2:
        zyx_volume(data, meta, tomogram)  # raises the 2D-input message
    depth = meta.shape[meta.axes.index("Z")]
    if z is not None and not 0 <= z < depth:
        raise InputError(f"{tomogram}: --z {z} is outside the volume; it has {depth} slices (z = 0..{depth - 1}).")
    voxel = voxel_size_of(meta, voxel_size, tomogram)
    like = _labels_like(meta, voxel, from_header=voxel_size is None)
    check_labels_output(output, like, overwrite)
    check_output_path(csv_path, (".csv",), overwrite)
    if overlay is not None:
        check_output_path(overlay, (".png",), overwrite)
    targets = _copick_targets(meta, copick_object, copick_user, copick_session, output) if meta.format == "copick" else {}
    _check_copick({**targets, **({"segmentation": output} if is_copick_uri(output) else {})}, meta, overwrite)
    if method is None and (classifier is not None or z is not None or multi_slab is not None):
        method = "lumen"  # slab depths and the classifier belong to the slab-candidate methods
    options = {"slab_thickness": slab_thickness, "z": z, "n_slabs": multi_slab or 1, "method": method,
               "polarity": polarity, "decoder": str(vesicle_decoder) if vesicle_decoder else None,
               "min_diameter_nm": min_diameter, "max_diameter_nm": max_diameter, "z_step": z_step,
               "slab_step": slab_step}
    try:
        settings = VesicleSettings(**{k: v for k, v in options.items() if v is not None})
    except InputError as exc:
        # Name the command's options, not the settings fields behind them.
        message = str(exc)
        for field_name, option in _OPTION_NAMES.items():
            message = message.replace(field_name, option)
        raise click.UsageError(message) from exc
    volume = zyx_volume(data, meta, tomogram)

    from biosam import Predictor, load_model
    from biosam.io.overlay import render_overlay
    from biosam.tomogram.pipeline import segment_vesicles

    predictor = Predictor(load_model(model, device=device, precision=precision, runtime=runtime), store=embeddings)
    keep = keep_classes.split(",") if keep_classes else None
    judge = None
    if classifier is not None:
        from biosam.classify import load_classifier

        judge = load_classifier(classifier, predictor.model, source="tomogram")
        judge.keep_ids(keep)
    start = time.perf_counter()
    try:
        result = segment_vesicles(predictor, volume, voxel, settings, classifier=judge, keep=keep, progress=True)
    except BiosamError as exc:
        raise BiosamError(f"{tomogram}: {exc}") from exc
    table = measure_vesicles(result.labels, voxel, result.scores)
    centres_vox = np.column_stack([table[f"centroid_{a}_A"] / s for a, s in zip("zyx", voxel.angstrom)])
    written: list[str] = []
    try:
        written.append(str(write_labels(output, result.labels, like=like, overwrite=overwrite)))
        written.append(str(write_measurements(csv_path, table, overwrite=overwrite)))
        if overlay is not None:
            zc = result.slabs[0]
            picture = render_overlay(np.dstack([result.slab] * 3), result.labels[zc])
            written.append(str(write_image(overlay, picture, overwrite=overwrite)))
        if targets:
            from biosam.io.copick_project import write_labels as copick_labels
            from biosam.io.copick_project import write_picks

            if "segmentation" in targets:
                written.append(copick_labels(targets["segmentation"], result.labels, like=meta, overwrite=overwrite))
            written.append(write_picks(targets["picks"], centres_vox, like=meta, object_name=copick_object,
                                       overwrite=overwrite))
    except BaseException:
        _remove(written)
        raise
    if as_json:
        report = {"tomogram": str(tomogram), "input": meta.summary(), "voxel_size_A": list(voxel.angstrom),
                  "model": predictor.info.name, "method": settings.method,
                  "classifier": str(classifier) if classifier else None, "slabs": result.slabs,
                  "candidates": result.candidates, "polarity": result.polarity, "vesicles": int(len(table["label"])),
                  "output": str(output),
                  "csv": str(csv_path), "overlay": str(overlay) if overlay else None,
                  "copick": targets or None, "seconds": round(time.perf_counter() - start, 2)}
        click.echo(json.dumps(report, indent=2))
