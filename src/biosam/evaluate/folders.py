"""Scoring label images on disk: pair prediction and ground-truth files by name, read them, pool the scores."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from skimage.measure import label

from biosam.errors import InputError
from biosam.evaluate.instances import MSA_THRESHOLDS, _check_thresholds, aggregate, as_labels, instance_counts
from biosam.io.files import suffix_of
from biosam.io.formats import READ_SUFFIXES, read_image

logger = logging.getLogger(__name__)

_IMAGE_FOLDERS = (".zarr", ".ome.zarr")  # folders that are one image, not a collection


def _split_name(path: Path) -> tuple[str, str]:
    suffix = suffix_of(path)
    return (path.name[: -len(suffix)] if suffix else path.name), suffix


def _is_collection(path: Path) -> bool:
    return path.is_dir() and _split_name(path)[1] not in _IMAGE_FOLDERS


def _label_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem, suffix = _split_name(path)
        if path.name.startswith(".") or suffix not in READ_SUFFIXES or (path.is_dir() and suffix not in _IMAGE_FOLDERS):
            continue
        if stem in files:
            raise InputError(f"{folder}: '{files[stem].name}' and '{path.name}' have the same name; "
                             "keep one file per image.")
        files[stem] = path
    if not files:
        raise InputError(f"{folder}: holds no label images ({', '.join(READ_SUFFIXES)}).")
    return files


def pair_files(pred: str | os.PathLike, gt: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(name, pred_file, gt_file)`` for two files, or for two folders paired by file name without extension.

    Raises :class:`InputError` listing the names found on one side only.
    """
    pred, gt = Path(pred), Path(gt)
    for path, role in ((pred, "prediction"), (gt, "ground truth")):
        if not path.exists():
            raise InputError(f"{path}: {role} not found. Check the path and spelling.")
    kinds = [_is_collection(pred), _is_collection(gt)]
    if not any(kinds):
        return [(_split_name(pred)[0], pred, gt)]
    if not all(kinds):
        raise InputError(f"{pred}, {gt}: give two files or two folders, not a file and a folder.")
    ours, theirs = _label_files(pred), _label_files(gt)
    only_pred, only_gt = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if only_pred or only_gt:
        raise InputError("files are paired by name without extension, and these have no counterpart: "
                         + "; ".join(f"only in {where}: {', '.join(names)}"
                                     for where, names in ((pred, only_pred), (gt, only_gt)) if names)
                         + ". Rename them or remove the extra files.")
    natural = [(stem, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem)]) for stem in ours]
    return [(stem, ours[stem], theirs[stem]) for stem, _ in sorted(natural, key=lambda item: item[1])]


def read_labels(path: str | os.PathLike, binary_to_instances: bool = False) -> np.ndarray:
    """Read an instance label image in any format :func:`biosam.io.read_image` reads.

    With ``binary_to_instances``, a mask holding 0 and one other value becomes
    instances by connected components (4-connectivity in 2D, so nuclei touching
    only at a corner stay apart).
    """
    data, meta = read_image(path)
    if "C" in meta.axes:
        raise InputError(f"{path}: has channels (axes {meta.axes}); a label image holds one id per pixel. "
                         "Save it as a single-channel image.")
    labels = as_labels(np.asarray(data), str(path))
    if binary_to_instances and np.unique(labels).size == 2 and labels.min() == 0:
        logger.warning("%s is a binary mask; splitting it into objects by connected components.", path)
        labels = label(labels > 0, connectivity=1)
    return labels


def evaluate_folders(pred: str | os.PathLike, gt: str | os.PathLike, thresholds: Iterable[float] = MSA_THRESHOLDS,
                     progress: bool = False) -> dict:
    """Score predicted label files against ground truth (two files, or two folders paired by name).

    Binary ground-truth masks become instances by connected components (with a
    warning). Returns ``thresholds``, ``images`` (name -> scores as in
    :func:`~biosam.evaluate.evaluate_instances`) and ``aggregate`` (TP, FP, FN
    and pixel counts summed over images, then the scores; plus ``images`` and
    ``mean_image_msa``).
    """
    from tqdm.auto import tqdm

    thresholds = list(_check_thresholds(thresholds))
    pairs = pair_files(pred, gt)
    images, counts = {}, []
    for name, pred_file, gt_file in tqdm(pairs, desc="images", disable=not progress or len(pairs) < 2):
        pred_labels, gt_labels = read_labels(pred_file), read_labels(gt_file, binary_to_instances=True)
        try:
            counts.append(instance_counts(pred_labels, gt_labels, thresholds))
        except InputError as exc:
            raise InputError(f"{pred_file} vs {gt_file}: {exc}") from exc
        images[name] = counts[-1].summary(thresholds)
    return {"thresholds": thresholds, "images": images, "aggregate": aggregate(counts, thresholds)}
