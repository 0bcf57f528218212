"""``biosam auto``: every object in an image (or every slice of a volume), no prompts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from biosam.automatic.run import MODES
from biosam.cli.common import check_image_fits, check_overlay, input_options, write_overlay


@click.command("auto")
@click.argument("image", type=str)
@click.option("-o", "--output", required=True, type=str,
              help="Instance label image to write; the format follows the extension (.tif, .png, .mrc, .nii.gz, .zarr, copick://).")
@click.option("--mode", type=click.Choice(MODES), default="ais", show_default=True,
              help="ais: the trained instance decoder (fast); amg: a grid of prompts, points or boxes by model (slow).")
@click.option("--decoder", default=None, help="Instance decoder checkpoint (default: the one shipped with the model).")
@click.option("--tile", type=click.IntRange(min=32), default=None, help="Tile size in pixels (default: the decoder's training tile for ais, 1024 for amg).")
@click.option("--halo", type=click.IntRange(min=0), default=None, help="Overlap on each side of a tile in pixels (default: tile / 8).")
@click.option("--object-size", type=float, default=None,
              help="ais: typical object diameter in pixels; the image is resized so objects have the size the decoder "
                   "segments best [default: estimated from the image, reported in --json].")
@click.option("--scale", type=float, default=None,
              help="Resize the image by this factor before segmenting (labels come back at the original size).")
@click.option("--points-per-side", type=click.IntRange(min=1), default=None, help="amg: grid points along each side of a tile (default 32).")
@click.option("--pred-iou-thresh", type=click.FloatRange(0, 1), default=None, help="amg: keep masks with a predicted IoU above this.")
@click.option("--stability-thresh", type=click.FloatRange(0, 1), default=None, help="amg: keep masks with a stability score above this.")
@click.option("--z", type=int, default=None, help="Segment only this slice of a volume (default: every slice).")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="Mask classifier (from `biosam train classifier`): keep only the objects it puts in --keep-classes.")
@click.option("--keep-classes", default=None, metavar="NAME,...",
              help="With --classifier: classes to keep (default: every class but background).")
@click.option("--link-iou", type=float, default=0.3, show_default=True,
              help="Volumes: objects of neighbouring slices overlapping by this IoU become one 3D object; 0 keeps slices apart.")
@click.option("--blocks", type=click.IntRange(min=32), default=None, metavar="SIZE",
              help="Images and volumes larger than one process: segment blocks of SIZE px (with a halo of SIZE / 8) "
                   "on Dask workers and write the .zarr OUTPUT chunk by chunk (needs biosam[distributed]).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --blocks: worker processes started on this machine.")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="With --blocks: an existing Dask cluster (tcp://...).")
@input_options
def auto(image, output, mode, decoder, tile, halo, object_size, scale, points_per_side, pred_iou_thresh, stability_thresh, z, classifier, keep_classes, link_iou, intensity, t,
         channel, axes, level, series, model, device, precision, runtime, embeddings, overlay, as_json, overwrite,
         compression, blocks=None, workers=2, scheduler=None) -> None:
    """Find every object in IMAGE and write an instance label image to OUTPUT.

    Images larger than the tile are processed in overlapping tiles and stitched
    without seams. Volumes are segmented slice by slice and the objects of
    neighbouring slices are linked into 3D objects by overlap (one-to-one).
    An empty or constant image gives an empty label image.
    """
    from tqdm.auto import tqdm

    from biosam import Predictor, load_model
    from biosam.automatic.amg import AmgSettings
    from biosam.automatic.planes import PlaneSegmenter
    from biosam.automatic.run import AutoSettings, to_uint8, working_scale
    from biosam.io import check_labels_output, open_labels, plane_index, read_image, read_plane
    from biosam.io.overlay import render_overlay
    from biosam.labels import streamed_label_dtype
    from biosam.prompting.intensity import resolve_preset

    if not 0.0 <= link_iou <= 1.0:
        raise click.BadParameter(f"must lie in [0, 1], got {link_iou}", param_hint="--link-iou")
    if mode != "ais" and (decoder is not None or object_size is not None):
        raise click.UsageError("--decoder and --object-size are used with --mode ais only (--scale works with both).")
    # settings are checked before any file is read or model loaded
    settings = AutoSettings(mode=mode, tile=tile, halo=halo, intensity=intensity, scale=scale, object_size=object_size)
    amg_overrides = {"points_per_side": points_per_side, "pred_iou_thresh": pred_iou_thresh,
                     "stability_score_thresh": stability_thresh}
    AmgSettings(**{k: v for k, v in amg_overrides.items() if v is not None})
    if blocks is not None:
        settings.decoder = decoder  # a path: each worker loads it beside its model
        _blockwise(image, output, settings, amg_overrides, blocks, workers, scheduler, z, t, channel, axes, level,
                   model, device, precision, runtime, overwrite, as_json, link_iou, unsupported={
                       "--classifier": classifier, "--overlay": overlay, "--series": series,
                       "--embeddings": embeddings})
        return
    check_overlay(overlay, output, overwrite, image=image)
    data, meta = read_image(image, axes=axes, level=level, series_uid=series)
    check_labels_output(output, meta, overwrite, compression)
    depth = meta.shape[meta.axes.index("Z")] if "Z" in meta.axes else 1
    planes = [z] if z is not None or depth == 1 else list(range(depth))
    for zz in planes:  # refuse bad --z/--t/--channel before the model loads
        plane_index(meta, zz, t, channel)
    check_image_fits(meta, model)  # and an image too elongated for the model
    predictor = Predictor(load_model(model, device=device, precision=precision, runtime=runtime), store=embeddings)
    keep = keep_classes.split(",") if keep_classes else None
    judge = None
    if classifier is not None:
        from biosam.classify import load_classifier

        judge = load_classifier(classifier, predictor.model, source="image")
        judge.keep_ids(keep)  # unknown class names are refused before any work
    elif keep_classes is not None:
        raise click.UsageError("--keep-classes needs --classifier.")
    volume = "Z" in meta.axes and depth > 1
    settings.decoder = decoder
    segmenter = PlaneSegmenter(predictor, settings, volume=volume and len(planes) > 1, amg_overrides=amg_overrides,
                               link_iou=link_iou, judge=judge, keep=keep)
    applied = working_scale(segmenter.settings, segmenter.settings.decoder if mode == "ais" else None)
    rejected = 0

    start = time.perf_counter()
    labels_meta = meta.labels_meta()
    results, picture = [], None
    warnings: list[str] = []  # also logged to stderr as they arise
    with open_labels(output, meta, streamed_label_dtype(labels_meta.shape, volume), overwrite=overwrite,
                     compression=compression) as out:
        for zz in tqdm(planes, desc="slices", disable=len(planes) < 2):
            key = zz if "Z" in meta.axes else None
            plane = read_plane(data, meta, key, t, channel)
            result = segmenter.add(plane, key, str(image))
            warnings += filter(None, [result.warning])
            rejected += result.rejected
            labels = result.labels
            if labels.max() > np.iinfo(out.dtype).max:
                raise click.ClickException(f"{image}: {int(labels.max())} objects do not fit a {out.dtype} label image.")
            out[plane_index(labels_meta, key, t)] = labels.astype(out.dtype)
            results.append({"z": key, "objects": result.objects,
                            "scale": result.scale if result.scale is not None else applied,
                            "object_size": result.object_size if result.object_size is not None else object_size})
            if overlay is not None and picture is None and (result.objects or zz == planes[-1]):
                pixels = to_uint8(plane, intensity)
                picture = render_overlay(np.dstack([pixels] * 3) if pixels.ndim == 2 else pixels, labels)
    if picture is not None:
        write_overlay(overlay, picture, output, overwrite)
    if as_json:
        report = {"image": str(image), "input": meta.summary(), "model": predictor.info.name, "mode": mode,
                  "decoder": (segmenter.settings.decoder.info or {}).get("source") if mode == "ais" else None,
                  "intensity": resolve_preset(intensity, np.dtype(meta.dtype)), "output": str(output),
                  "overlay": str(overlay) if overlay else None,
                  "objects": sum(r["objects"] for r in results),
                  "classifier": str(classifier) if classifier else None, "rejected_by_classifier": rejected,
                  "seconds": round(time.perf_counter() - start, 2), "warnings": warnings}
        if volume:
            report["slices"] = results
        else:  # the object size is estimated per image when --object-size and --scale are not given
            report |= {"scale": results[0]["scale"], "object_size": results[0]["object_size"]}
        click.echo(json.dumps(report, indent=2))


def _blockwise(image, output, settings, amg_overrides, blocks, workers, scheduler, z, t, channel, axes, level, model,
               device, precision, runtime, overwrite, as_json, link_iou, unsupported: dict) -> None:
    """``--blocks``: the image in blocks on Dask workers (see :func:`biosam.distributed.segment_blockwise`)."""
    from biosam.automatic.run import amg_settings_for
    from biosam.distributed.blockwise import segment_blockwise
    from biosam.distributed.cluster import quiet_dask_logs
    from biosam.zoo.registry import REGISTRY

    quiet_dask_logs()

    given = [name for name, value in unsupported.items() if value is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)}: not available with --blocks.")
    if settings.mode == "amg":  # the zoo's defaults for the model and the options given, without loading it here
        settings.amg = amg_settings_for(REGISTRY.get(model), **amg_overrides)
    report = segment_blockwise(image, output, block=blocks, settings=settings, model=model, device=device,
                               precision=precision, runtime=runtime, axes=axes, level=level, z=z, t=t, channel=channel,
                               link_iou=link_iou, overwrite=overwrite, workers=workers, scheduler=scheduler)
    if as_json:
        click.echo(json.dumps({"image": str(image), "model": model, "mode": settings.mode, **report}, indent=2))
