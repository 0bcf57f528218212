"""`biosam volume`: follow prompted objects through the slices of a volume."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from biosam.cli.common import check_image_fits, check_overlay, input_options, write_overlay
from biosam.volume.propagate import PROJECTIONS, PropagationSettings


class _Slices:
    """A volume read one slice at a time: ``(Z, Y, X[, C])`` indexed by ``z``."""

    def __init__(self, data, meta, t: int | None, channel: int | None) -> None:
        from biosam.io import read_plane

        self._read = lambda z: read_plane(data, meta, z, t, channel)
        first = self._read(0)
        self.shape = (meta.shape[meta.axes.index("Z")], *first.shape)
        self.dtype = first.dtype

    def __getitem__(self, z: int) -> np.ndarray:
        return self._read(int(z))


class _Planes:
    """The ``(Z, Y, X)`` label planes of one time point of an output label array, indexed by ``z``.

    Lets :func:`segment_volume` write straight into what ``open_labels`` yields
    (a memmap, a Zarr array, or NumPy for formats written at the end), whatever
    its axes (``ZYX`` or ``TZYX``).
    """

    def __init__(self, out, labels_meta, t: int | None) -> None:
        from biosam.io import plane_index

        self._out = out
        self._index = lambda z: plane_index(labels_meta, int(z), t)
        axes, shape = labels_meta.axes, labels_meta.shape
        self.shape = tuple(shape[axes.index(a)] for a in "ZYX")
        self.dtype = np.dtype(out.dtype)

    def __getitem__(self, z: int) -> np.ndarray:
        return np.asarray(self._out[self._index(z)])

    def __setitem__(self, z: int, plane: np.ndarray) -> None:
        self._out[self._index(z)] = plane


def _check_prompts(prompts, prompts_file: Path, image: str, depth: int) -> None:
    from biosam.errors import InputError

    for i, prompt in enumerate(prompts):
        if prompt.z is None:
            raise InputError(f'object {i} in {prompts_file} has no "z": say which slice each object is on.')
        if prompt.z >= depth:
            raise InputError(
                f"object {i} in {prompts_file} is on slice z={prompt.z}, but {image} has {depth} slices "
                f"(z = 0..{depth - 1})."
            )


@click.command("volume")
@click.argument("image", type=str)
@click.option("-o", "--output", required=True, type=str,
              help="3D label volume to write (.tif, .ome.tif, .mrc, .nii.gz, .zarr, copick://), in IMAGE's geometry.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(path_type=Path),
              help='JSON list of objects, each on a slice: [{"box": [x0,y0,x1,y1], "points": [[x,y,label]], "z": 12}, ...]; '
                   'entries with the same "object" (an integer) are one object prompted on several slices.')
@click.option("--projection", type=click.Choice(PROJECTIONS), default=PropagationSettings.projection, show_default=True,
              help="Prompt carried from slice to slice: the last mask and its box through the model's propagation "
                   "adapter (learned), the last mask's box, box and logits, an interior point, or logits; auto: learned "
                   "where an adapter ships for the model (lite_medsam), else box.")
@click.option("--adapter", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Propagation adapter file (from biosam.train.propagation) for --projection learned/auto; "
                   "default: the one shipped for the model.")
@click.option("--min-score", type=float, default=PropagationSettings.min_score, show_default=True,
              help="An object ends where its predicted IoU falls below this.")
@click.option("--min-overlap", type=float, default=PropagationSettings.min_overlap, show_default=True,
              help="An object ends where its mask overlaps the previous slice's by less than this IoU.")
@click.option("--max-shift", type=float, default=PropagationSettings.max_shift, show_default=True,
              help="An object ends where its mean intensity moves this many standard deviations from its prompted "
                   "slice's (inf: never).")
@click.option("--zoom", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Segment small objects in a zoomed crop (auto), always, or never.")
@input_options
def volume(image, output, prompts_file, projection, adapter, min_score, min_overlap, max_shift, zoom, intensity, t, channel, axes, level,
           series, model, device, precision, runtime, embeddings, overlay, as_json, overwrite, compression) -> None:
    """Segment objects in 3D: each object is prompted on one slice (or more) and followed forward and backward.

    IMAGE is a volume (TIFF stack, MRC, NIfTI, DICOM series, Zarr/OME-Zarr,
    copick://...). OUTPUT gets label k for the k-th object of --prompts; an
    object ends where the model loses it (score, overlap, area, intensity) or
    where it runs into an object nearer its own prompted slice, never between
    two of its prompted slices.
    """
    import time

    from biosam import Predictor, load_model, read_prompts
    from biosam.io import check_labels_output, open_labels, plane_index, read_image
    from biosam.io.overlay import render_overlay
    from biosam.io.planes import plane_shape
    from biosam.prompting.prompts import check_prompts
    from biosam.prompting.intensity import check_contrast
    from biosam.volume import segment_volume
    from biosam.labels import label_dtype
    from biosam.volume.propagate import group_objects

    start = time.perf_counter()
    prompts = read_prompts(prompts_file)
    check_overlay(overlay, output, overwrite, image=image)
    data, meta = read_image(image, axes=axes, level=level, series_uid=series)
    depth = meta.shape[meta.axes.index("Z")] if "Z" in meta.axes else 1
    if depth < 2:
        raise click.UsageError(
            f"{image} is not a volume (axes {meta.axes}, shape {tuple(meta.shape)}); `biosam volume` follows objects "
            "through slices. Use `biosam segment` for a 2D image (or --axes if a stack was read as channels)."
        )
    _check_prompts(prompts, prompts_file, image, depth)
    check_labels_output(output, meta, overwrite, compression)
    plane_index(meta, 0, t, channel)  # refuse a bad --t/--channel before the model loads
    prompts = check_prompts(prompts, plane_shape(meta), image)  # boxes over the edge are clipped
    check_image_fits(meta, model)
    objects = group_objects(prompts)
    settings = PropagationSettings(projection=projection, min_score=min_score, min_overlap=min_overlap,
                                   max_shift=max_shift, zoom=zoom)
    predictor = Predictor(load_model(model, device=device, precision=precision, runtime=runtime), store=embeddings)
    if adapter is not None:
        from biosam.volume.adapter import propagation_decoder

        adapter = propagation_decoder(predictor.model, adapter)  # a bad file stops here, before the output is opened
    slices = _Slices(data, meta, t, channel)
    # a blank prompted slice, and points alone for a box-trained model, give unreliable objects (logged as well)
    warnings = [w for z in sorted({int(p.z) for p in prompts})
                if (w := check_contrast(slices[z], f"{image} (slice z={z})"))]
    warnings += predictor.prompt_warnings(prompts)
    picture = None
    n = len(objects)
    voxels = np.zeros(n + 1, dtype=np.int64)
    # Labels go to the output slice by slice as they are found (streamed for MRC and Zarr), never held whole.
    dtype = label_dtype(n)
    with open_labels(output, meta, dtype, overwrite=overwrite, compression=compression) as out:
        planes = _Planes(out, meta.labels_meta(), t)
        result = segment_volume(predictor, slices, prompts, settings, intensity=intensity, out=planes, adapter=adapter)
        if overlay is not None:
            z = int(prompts[0].z)
            pixels = result.normalize(slices[z])
            shown = [p.validate(pixels.shape[:2]) for p in prompts if p.z == z]
            picture = render_overlay(np.dstack([pixels] * 3) if pixels.ndim == 2 else pixels, planes[z], shown)
        if as_json:
            for z in range(depth):
                voxels += np.bincount(planes[z].ravel(), minlength=n + 1)[: n + 1]
    if picture is not None:
        write_overlay(overlay, picture, output, overwrite)
    if as_json:
        found_objects = []
        for i, obj in enumerate(objects):
            first, last = (int(v) for v in result.z_range[i])
            found = first >= 0
            found_objects.append({"label": i + 1, "prompt_z": [int(p.z) for p in obj], "z_first": first if found else None,
                            "z_last": last if found else None, "voxels": int(voxels[i + 1]),
                            "mean_score": round(float(np.nanmean(result.scores[i])), 4) if found else None,
                            "ended": list(result.ends[i])})  # why it stopped going down, up (null: the edge)
        click.echo(json.dumps({"image": str(image), "input": meta.summary(), "model": predictor.info.name,
                               "projection": result.projection, "output": str(output),
                               "overlay": str(overlay) if overlay else None, "warnings": warnings,
                               "objects": found_objects, "seconds": round(time.perf_counter() - start, 2)}, indent=2))
