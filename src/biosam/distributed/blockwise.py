"""Automatic segmentation of one image or volume too large for one process: overlapping blocks on Dask workers.

The blocks are the tiles of :func:`biosam.automatic.tiling.tile_grid` (inner boxes
of ``block`` pixels that partition the image, each grown by ``halo`` on every
side), and objects are joined across block faces by the rule of
:func:`biosam.automatic.tiling.merge_instance_tiles`, applied with blocks as tiles:
an object belongs to the block whose inner box holds its centre of mass and is
kept whole, as segmented with the halo's context (so it is never cut at a face);
it fills only pixels no earlier object took, and is dropped when more than half
of it is taken (the same object kept from a neighbouring block). The result is
therefore exactly ``merge_instance_tiles(normalised image, segment_automatic on
a block, block + 2 * halo, halo)``, computed in four steps whose memory is set
by the block, not the image:

1. one intensity window for the whole image, from patches sampled over it, and
   one scale (``ais``: estimated once on the central block unless given), so
   every block sees the same contrast and object size;
2. ``segment`` (one task per block, in parallel): :func:`segment_automatic` on
   the block with its halo; the objects it owns are stored in a scratch Zarr
   array the size of the block. A block of one grey value is skipped without
   the model (as is one whose raw maximum is at most ``background``);
3. ``decide`` (one task per block, after the earlier blocks that overlap it):
   which owned objects are kept, painting them over the earlier blocks' kept
   objects exactly as the sequential rule would;
4. ``write`` (one task per output chunk, in parallel): every pixel gets the
   kept object of the earliest block covering it; ids are numbered in block
   order (contiguous 1..N, the type from :func:`biosam.labels.label_dtype`).

A volume (``Z`` axis, no ``z`` chosen) is segmented slice by slice by these
steps (every slice's blocks on the workers at once, each slice with its own
intensity window, one scale for all), and ``biosam auto``'s rule for volumes then
makes 3D objects: objects of neighbouring slices are linked one-to-one by IoU
(:meth:`biosam.volume.SliceLinker.link`, the rule of ``link_iou``). Step 4 writes
each slice's labels (ids per slice) to a scratch array; one ``link`` task reads
them slice by slice (two slices of labels held at a time) and returns a table
per slice from slice ids to 3D ids; one ``relabel`` task per output chunk then
writes the 3D ids. ``link_iou=0`` keeps the slices apart: ids continue from slice
to slice, as ``biosam auto --link-iou 0`` numbers them.

The scratch folder (beside the output by default) must be reachable from every
worker, as the input and output are: on a cluster, a shared file system.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from biosam.automatic.run import AutoSettings
from biosam.automatic.tiling import Tile, owned_objects, paint_object, tile_grid
from biosam.errors import InputError

logger = logging.getLogger(__name__)

# Patches sampled for the intensity window: a grid of up to 4 x 4 of this size.
_SAMPLE_PATCH, _SAMPLE_GRID = 256, 4


@dataclass(frozen=True)
class Source:
    """Where the blocks' pixels come from: a file (read lazily by each task) or an array in memory."""

    path: str | None = None
    array: Any = None
    axes: str | None = None
    level: int | None = None
    z: int | None = None
    t: int | None = None
    channel: int | None = None

    def open(self) -> tuple[Any, Any]:
        """The (lazy) pixel array and its :class:`ImageMeta`."""
        from biosam.io import read_image
        from biosam.io.meta import ImageMeta

        if self.path is not None:
            return read_image(self.path, axes=self.axes, level=self.level)
        array = np.asarray(self.array) if not hasattr(self.array, "chunks") else self.array
        # a last axis of up to 4 is colour, as biosam.prompting.intensity reads images; else a 3D array is a volume
        axes = self.axes or {2: "YX", 3: "YXC" if array.shape[-1] <= 4 else "ZYX"}.get(array.ndim)
        if axes is None:
            raise InputError(f"an array of shape {array.shape}: name its axes (e.g. 'YX', 'YXC', 'ZYX').")
        return array, ImageMeta("array", "array", axes, tuple(array.shape), np.dtype(array.dtype).str)

    def read(self, box: tuple[int, int, int, int], array: Any = None) -> np.ndarray:
        """The window ``(y0, y1, x0, x1)`` of the chosen plane, ``YX`` or ``YXC`` (of ``array`` when given: the
        copy a task received in place of the source's own)."""
        from biosam.io import read_plane

        data, meta = (self if array is None else dataclasses.replace(self, array=array)).open()
        return read_plane(data, meta, self.z, self.t, self.channel, box=box)


def intensity_normaliser(source: Source, intensity: str = "auto") -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping any window of ``source`` to 8-bit pixels with one intensity window for the whole image.

    The window follows :func:`biosam.prompting.intensity.volume_normalizer` on a stack of patches sampled
    over the image, so a block is normalised as the whole image would be (per block for colour images).
    """
    from biosam.automatic.run import to_uint8
    from biosam.io.planes import plane_shape
    from biosam.prompting.intensity import volume_normalizer

    _, meta = source.open()
    height, width = plane_shape(meta)
    size = min(_SAMPLE_PATCH, height, width)
    ys = np.unique(np.linspace(0, height - size, _SAMPLE_GRID).round().astype(int))
    xs = np.unique(np.linspace(0, width - size, _SAMPLE_GRID).round().astype(int))
    patches = [source.read((int(y), int(y) + size, int(x), int(x) + size)) for y in ys for x in xs]
    if patches[0].ndim != 2:  # colour: each block on its own, as biosam.automatic.run.to_uint8 does it
        return lambda pixels: to_uint8(pixels, intensity)
    window = volume_normalizer(np.stack(patches), intensity)
    return lambda pixels: np.rint(window(pixels)).astype(np.uint8)


def block_grid(shape: tuple[int, int], block: int, halo: int) -> list[Tile]:
    """Blocks of ``block`` pixels (inner boxes, partitioning ``shape``) grown by ``halo`` on each side."""
    return tile_grid(shape, block + 2 * halo, halo)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    y0, y1, x0, x1 = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def _blocks_over(tiles: list[Tile], box: tuple[int, int, int, int], columns: int) -> list[int]:
    """Indices (ascending) of the blocks whose outer boxes overlap ``box``.

    :func:`tile_grid` lists its tiles row by row (``columns`` to a row), so rows and columns are searched
    apart: a few dozen comparisons per box, not one per block of a large image.
    """
    rows = [r for r in range(len(tiles) // columns)
            if tiles[r * columns].outer[0] < box[1] and box[0] < tiles[r * columns].outer[1]]
    cols = [c for c in range(columns) if tiles[c].outer[2] < box[3] and box[2] < tiles[c].outer[3]]
    return [r * columns + c for r in rows for c in cols]


def _within(box: tuple[int, int, int, int], origin: tuple[int, int, int, int]) -> tuple[slice, slice]:
    """``box`` (image pixels) as slices of an array whose top-left corner is ``origin``'s."""
    return slice(box[0] - origin[0], box[1] - origin[0]), slice(box[2] - origin[2], box[3] - origin[2])


def _predictor(model: str, device: str | None, precision: str, runtime: str = "auto"):
    # On a worker load_model keeps its models (biosam.distributed.cluster), so this loads once per worker.
    from biosam import Predictor, load_model

    return Predictor(load_model(model, device=device, precision=precision, runtime=runtime))


def _estimate_scale(candidates: list[tuple[Source, tuple[int, int, int, int], Callable]], array: Any,
                    settings: AutoSettings, model: str, device: str | None, precision: str,
                    runtime: str = "auto") -> float:
    """The scale estimated on the first of ``candidates`` (plane, box, its normaliser) that is not empty (1.0
    when all are)."""
    from biosam.automatic.run import estimated_scale, resolve_decoder

    for source, box, normalise in candidates:
        pixels = normalise(source.read(box, array))
        if pixels.min() != pixels.max():
            predictor = _predictor(model, device, precision, runtime)
            return estimated_scale(predictor, resolve_decoder(predictor, settings.decoder), pixels)
    return 1.0


def _segment_block(index: int, tile: Tile, source: Source, array: Any, normalise: Callable, settings: AutoSettings,
                   model: str, device: str | None, precision: str, runtime: str, scratch: str,
                   background: float | None) -> tuple[int, list[int], bool]:
    """Step 2: segment block ``index`` with its halo and store the objects it owns; their ids, and whether
    the block was skipped as empty."""
    import zarr

    from biosam.automatic.run import segment_automatic

    raw = source.read(tile.outer, array)
    if background is not None and float(raw.max()) <= background:
        return index, [], True
    pixels = normalise(raw)
    del raw
    if pixels.min() == pixels.max():  # segment_automatic returns nothing for it: spare the model
        return index, [], True
    labels = segment_automatic(_predictor(model, device, precision, runtime), pixels, settings)
    owned = owned_objects(labels, tile)
    if len(owned):
        labels[~np.isin(labels, owned)] = 0
        zarr.save_array(f"{scratch}/{index}", labels.astype(np.uint32, copy=False))
    return index, [int(i) for i in owned], False


def _read_owned(scratch: str, index: int, tile: Tile, box: tuple[int, int, int, int]) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(f"{scratch}/{index}", mode="r")[_within(box, tile.outer)])


def _decide_block(index: int, tile: Tile, ids: list[int], neighbours: dict[int, Tile], scratch: str,
                  max_overlap: float, *earlier: tuple[int, list[int]]) -> tuple[int, list[int]]:
    """Step 3: the owned objects ``ids`` of block ``index`` that are kept, given the kept objects of the
    ``earlier`` blocks that overlap it (``neighbours``: their tiles)."""
    if not ids:
        return index, []
    local = _read_owned(scratch, index, tile, tile.outer)
    region = np.zeros(local.shape, dtype=np.uint8)  # nonzero: taken by an earlier block's kept object
    for other, kept in earlier:
        box = _overlap(neighbours[other].outer, tile.outer)
        if kept and box is not None:
            region[_within(box, tile.outer)] |= np.isin(_read_owned(scratch, other, neighbours[other], box), kept)
    return index, [i for i in ids if paint_object(region, local == i, 1, max_overlap)]


def _write_chunk(box: tuple[int, int, int, int], out: Any, index: tuple,
                 blocks: list[tuple[int, Tile, list[int], int]], scratch: str) -> int:
    """Step 4: the final labels of one output chunk ``box`` from the ``blocks`` that overlap it (index, tile,
    kept ids, first global id; in block order); the number of labelled pixels."""
    labels = np.zeros((box[1] - box[0], box[3] - box[2]), dtype=out.dtype)
    for i, tile, kept, first_id in blocks:  # block order: the earliest block's object wins a pixel
        overlap = _overlap(tile.outer, box)
        local = _read_owned(scratch, i, tile, overlap)
        ids = np.asarray(kept)
        where = labels[_within(overlap, box)]  # a view
        fill = np.isin(local, ids) & (where == 0)
        # kept ids are ascending, so each local id's rank among them is its offset from the block's first id
        where[fill] = (first_id + np.searchsorted(ids, local[fill])).astype(labels.dtype)
    out[(*index[:-2], slice(box[0], box[1]), slice(box[2], box[3]))] = labels  # label arrays end in Y, X
    return int((labels > 0).sum())


def _link_slices(slices: Any, min_iou: float) -> tuple[list[np.ndarray], int]:
    """Volumes: one table per slice of ``slices`` (per-slice ids) to 3D ids, and the number of 3D objects.

    Reads one slice at a time; :class:`~biosam.volume.SliceLinker` keeps the previous one.
    """
    from biosam.volume import SliceLinker

    linker = SliceLinker(min_iou)
    tables = [linker.link(np.asarray(slices[k])) for k in range(slices.shape[0])]
    return tables, linker.count


def _relabel_chunk(box: tuple[int, int, int, int], slices: Any, k: int, table: np.ndarray, out: Any,
                   index: tuple) -> None:
    """Volumes: chunk ``box`` of slice ``k`` of ``slices`` written to ``out`` with its 3D ids."""
    local = np.asarray(slices[k, box[0]:box[1], box[2]:box[3]])
    out[(*index[:-2], slice(box[0], box[1]), slice(box[2], box[3]))] = table[local].astype(out.dtype)


def segment_blockwise(image: str | Any, output: str | Path, *, block: int = 2048, halo: int | None = None,
                      settings: AutoSettings | None = None, model: str = "lite_medsam", device: str | None = None,
                      precision: str = "auto", runtime: str = "auto", axes: str | None = None, level: int | None = None,
                      z: int | None = None, t: int | None = None, channel: int | None = None,
                      link_iou: float = 0.3, background: float | None = None, max_overlap: float = 0.5,
                      overwrite: bool = False, workers: int = 2, scheduler: str | None = None, client: Any = None,
                      scratch: str | Path | None = None, progress: bool = True) -> dict:
    """Segment a 2D image or a volume (a file, or a NumPy/Zarr array) block by block on a Dask cluster into Zarr
    ``output``.

    ``block``: inner block size in pixels; ``halo`` (default ``block // 8``) must exceed the radius of
    the largest object, which is kept whole from the block holding its centre. ``settings`` are
    :func:`segment_automatic`'s (its ``tile`` and ``halo`` tile each block again for the model). A volume
    is segmented whole unless ``z`` picks a slice; ``link_iou`` links its slices into 3D objects (0: not).
    Returns a summary: objects, blocks, skipped blocks, the scale used, seconds, block and halo (and for a
    volume: slices, link_iou and the seconds of the one link task).
    """
    from tqdm.auto import tqdm

    from biosam.distributed.cluster import open_client, require_distributed, task_resources
    from biosam.export.runtime import resolve_runtime
    from biosam.io import check_labels_output, open_labels, plane_index
    from biosam.io.files import suffix_of
    from biosam.io.planes import plane_shape
    from biosam.labels import label_dtype

    require_distributed()
    import zarr
    from distributed import as_completed

    start = time.perf_counter()
    settings = dataclasses.replace(settings) if settings is not None else AutoSettings()
    halo = block // 8 if halo is None else int(halo)
    if block < 32 or halo < 0:
        raise InputError(f"blocks: {block} px with a halo of {halo} px; give blocks of at least 32 px and a halo >= 0.")
    if not 0.0 <= link_iou <= 1.0:
        raise InputError(f"link_iou: {link_iou}; give a value in [0, 1] (0 keeps the slices apart).")
    resolve_runtime(runtime, device or "cpu", precision)  # a bad runtime is refused here, not on every worker
    output = Path(output)
    if suffix_of(output) not in (".zarr", ".ome.zarr"):
        raise InputError(f"{output}: blockwise segmentation writes Zarr chunk by chunk; name a .zarr or .ome.zarr "
                         "output.")
    source = Source(path=str(image), axes=axes, level=level, z=z, t=t, channel=channel) if isinstance(image, (str, Path)) \
        else Source(array=image, axes=axes, z=z, t=t, channel=channel)
    data, meta = source.open()
    depth = meta.shape[meta.axes.index("Z")] if "Z" in meta.axes else 1
    planes: list[int | None] = list(range(depth)) if z is None and depth > 1 else [z]
    plane_index(meta, planes[0], t, channel)  # bad --z/--t/--channel are refused before any work
    labels_meta = meta.labels_meta()
    if labels_meta.axes[-2:] != "YX":
        raise InputError(f"{meta.path}: axes {meta.axes}; blockwise segmentation needs Y and X as the last "
                         "spatial axes.")
    check_labels_output(output, meta, overwrite)
    shape = plane_shape(meta)
    tiles = block_grid(shape, block, halo)
    columns = sum(1 for tl in tiles if tl.inner[0] == 0)  # tiles per row
    sources = [dataclasses.replace(source, z=p) for p in planes]
    # one window per slice, as `biosam auto` normalises each slice of a volume on its own
    normalisers = [intensity_normaliser(src, settings.intensity) for src in sources]
    settings.intensity = "auto"  # the blocks arrive as 8-bit pixels, normalised with the whole image's window
    link = len(planes) > 1 and link_iou > 0
    run = uuid.uuid4().hex[:8]  # task keys unique to this call, on a client that may have run others
    jobs = [(k, i) for k in range(len(planes)) for i in range(len(tiles))]
    scratch_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".blocks.tmp",
                                        dir=scratch or output.parent))
    try:
        with open_client(workers, scheduler, client) as cl:
            gpu = task_resources(cl)  # the model's tasks on GPU workers, where the cluster has them
            array = None
            if isinstance(image, np.ndarray):  # one copy per worker, not one per task
                array = cl.scatter(image, broadcast=True)
                sources = [dataclasses.replace(src, array=None) for src in sources]
            model_args = (model, device, precision, runtime)
            if settings.mode == "ais" and settings.scale is None and settings.object_size is None:
                # on the blocks nearest the centre of the middle slice that have contrast (edges are often empty)
                middle = np.array(shape) / 2
                nearest = sorted(tiles, key=lambda tl: float(np.hypot(*(np.array(tl.outer[::2]) - middle + block / 2))))
                mid = len(planes) // 2
                candidates = [(sources[mid], tl.outer, normalisers[mid]) for tl in nearest[:8]]
                settings.scale = cl.submit(_estimate_scale, candidates, array, settings, *model_args, pure=False,
                                           resources=gpu).result()
                logger.info("blockwise: scale %.3g estimated", settings.scale)
            futures = [cl.submit(_segment_block, i, tiles[i], sources[k], array, normalisers[k], settings,
                                 *model_args, f"{scratch_dir}/{k}", background, pure=False, resources=gpu,
                                 key=f"biosam-block-{run}-{k}-{i}") for k, i in jobs]
            owned: dict[tuple[int, int], list[int]] = {}
            skipped = 0
            done = {f.key: job for f, job in zip(futures, jobs)}
            for future in tqdm(as_completed(futures), total=len(futures), desc="blocks", unit="block",
                               disable=not progress):
                _, ids, empty = future.result()
                owned[done[future.key]] = ids
                skipped += empty
            decided: dict[tuple[int, int], Any] = {}
            for k, i in jobs:  # each after the earlier blocks of its slice that overlap it
                near = {j: tiles[j] for j in _blocks_over(tiles, tiles[i].outer, columns) if j < i}
                decided[k, i] = cl.submit(_decide_block, i, tiles[i], owned[k, i], near, f"{scratch_dir}/{k}",
                                          max_overlap, *[decided[k, j] for j in near], pure=False,
                                          key=f"biosam-decide-{run}-{k}-{i}")
            kept = {job: f.result()[1] for job, f in decided.items()}
            first_id, total = {}, 0
            for k, i in jobs:  # linked slices are numbered on their own (the link step gives 3D ids)
                if link and i == 0:
                    total = 0
                first_id[k, i] = total + 1
                total += len(kept[k, i])

            def chunks_of(chunk: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
                cy, cx = chunk[-2:]
                return [(y, min(y + cy, shape[0]), x, min(x + cx, shape[1]))
                        for y in range(0, shape[0], cy) for x in range(0, shape[1], cx)]

            def write(target: Any, indices: list[tuple]) -> None:
                """Step 4 for every slice into ``target`` (the output, or the scratch slices to link)."""
                boxes = chunks_of(target.chunks)
                args = [(box, target, indices[k], [(i, tiles[i], kept[k, i], first_id[k, i])
                                                   for i in _blocks_over(tiles, box, columns) if kept[k, i]],
                         f"{scratch_dir}/{k}") for k in range(len(planes)) for box in boxes]
                cl.gather(cl.map(_write_chunk, *zip(*args), pure=False))

            out_index = [plane_index(labels_meta, p, t) for p in planes]
            if link:
                slices = zarr.create_array(str(scratch_dir / "slices"), shape=(len(planes), *shape),
                                           chunks=(1, min(block, shape[0]), min(block, shape[1])),
                                           dtype=np.uint32, fill_value=0)
                write(slices, [(k, slice(None), slice(None)) for k in range(len(planes))])
                linking = time.perf_counter()
                tables, total = cl.submit(_link_slices, slices, link_iou, pure=False,
                                          key=f"biosam-link-{run}").result()
                link_seconds = round(time.perf_counter() - linking, 2)
                logger.info("blockwise: %d slices linked into %d objects", len(planes), total)
            with open_labels(output, meta, label_dtype(total), overwrite=overwrite) as out:
                if link:
                    args = [(box, slices, k, tables[k], out, out_index[k])
                            for k in range(len(planes)) for box in chunks_of(out.chunks)]
                    cl.gather(cl.map(_relabel_chunk, *zip(*args), pure=False))
                else:
                    write(out, out_index)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    report = {"output": str(output), "objects": total, "blocks": len(jobs), "skipped_blocks": skipped,
              "scale": settings.scale, "block": block, "halo": halo, "shape": list(shape),
              "seconds": round(time.perf_counter() - start, 2)}
    if len(planes) > 1:
        report |= {"slices": len(planes), "link_iou": link_iou}
    if link:
        report["link_seconds"] = link_seconds
    return report
