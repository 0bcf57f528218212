"""``biosam train classifier``: a mask classifier for ``biosam auto`` or ``biosam tomogram`` candidates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import numpy as np

from biosam.automatic.run import MODES
from biosam.cli.train_options import train_options
from biosam.errors import InputError
from biosam.io.voxel_size import VoxelSize
from biosam.tomogram.vesicles import CANDIDATE_METHODS
from biosam.train.classifier import LABEL_TYPES, ClassifierSettings

# The decoder method finds vesicles without slab candidates: it leaves nothing for a classifier to sort.
_SORTED_METHODS = tuple(m for m in CANDIDATE_METHODS if m != "decoder")


def _files(images: Path, labels: Path) -> list[tuple[Path, Path]]:
    """Image/label pairs: two files, or two folders paired by file name."""
    from biosam.automatic.data import pair_by_stem

    if images.is_file() and labels.is_file():
        return [(images, labels)]
    if images.is_dir() and labels.is_dir():
        return pair_by_stem(images, labels)
    raise InputError(f"--images {images} and --labels {labels} must both be files or both folders (and exist).")


def _read(path: Path, voxel_size: float | None) -> tuple[np.ndarray, VoxelSize | None]:
    """A 2D image (any channels) or a (Z, Y, X) volume with its voxel size."""
    from biosam.io import read_image, voxel_size_of, zyx_volume

    data, meta = read_image(path)
    if "Z" in meta.axes and meta.shape[meta.axes.index("Z")] > 1:
        return zyx_volume(data, meta, str(path)), voxel_size_of(meta, voxel_size, str(path))
    return np.asarray(data), None


def _check_same_size(image: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path, volume: bool) -> None:
    size = image.shape if volume else image.shape[:2]
    if labels.shape != size and not (not volume and image.ndim == 3 and image.shape[1:] == labels.shape):
        raise InputError(f"{label_path}: label image of size {labels.shape} does not match its image {image_path} "
                         f"of size {size}; give each image the labels drawn on it.")


def _json_entries(path: Path) -> list[dict]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the labelled candidates ({exc}).") from exc
    if isinstance(entries, dict):
        entries = entries.get("candidates", [])
    needed = {"image", "masks", "mask_id", "class"}
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and needed <= set(e) for e in entries):
        raise InputError(f"{path}: expected a list of objects with keys {sorted(needed)} (optional 'z'), e.g. "
                         '[{"image": "a.tif", "masks": "a_auto.tif", "mask_id": 3, "class": "vesicle"}].')
    base = path.parent
    for entry in entries:
        for key in ("image", "masks"):
            entry[key] = Path(entry[key]) if Path(entry[key]).is_absolute() else base / entry[key]
    return entries


@click.command("classifier")
@train_options(ClassifierSettings, resume=False, data_required=False, help={
    "images": "Training image or tomogram, or a folder of them.",
    "labels": "Label image(s) for --images (same file names in a folder): instances, or classes with --label-type.",
    "output": "Classifier checkpoint (.pt).",
    "val_fraction": "Share of the images (or, with one image, of the candidates) held out for validation.",
    "patience": "Stop after this many epochs without a better validation macro-F1.",
    "batch_size": "Candidates per training step (at least 2).",
})
@click.option("--labelled", "labelled", type=click.Path(path_type=Path), default=None,
              help='JSON list of candidates a user labelled: [{"image": ..., "masks": ..., "mask_id": N, "class": NAME, '
                   '"z": optional slice}, ...]; masks is a label image (e.g. from `biosam auto`); classes must include background.')
@click.option("--classes", default=None, metavar="NAME,...",
              help="Class names for values 0, 1, ... of the labels; the first is background "
                   "[default: background,object; with --labelled: from the JSON].")
@click.option("--label-type", type=click.Choice(LABEL_TYPES), default="instances", show_default=True,
              help="instances: every labelled object is class 1; classes: pixel values are class indices.")
@click.option("--mode", type=click.Choice(MODES), default="ais", show_default=True,
              help="2D images: how `biosam auto` finds the candidates.")
@click.option("--method", type=click.Choice(_SORTED_METHODS), default="lumen", show_default=True,
              help="Tomograms: slab candidate method (as `biosam tomogram --method`).")
@click.option("--multi-slab", type=click.IntRange(1), default=5, show_default=True,
              help="Tomograms: candidates from N slabs at evenly spaced depths.")
@click.option("--slab-thickness", type=click.IntRange(1), default=11, show_default=True)
@click.option("--voxel-size", type=float, default=None, help="Tomograms: voxel size in Å when the header has none.")
@click.option("--variants", default=ClassifierSettings.variants, show_default=True, type=int,
              help="Encoded versions of each training candidate (the first as is, the others augmented).")
@click.option("--ema/--no-ema", default=ClassifierSettings.ema, show_default=True,
              help="Keep an exponential moving average of the weights.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Cache of candidates and features [default: OUTPUT's name + _cache next to it].")
def classifier(images, labels, labelled, output, classes, label_type, model, mode, intensity, method, multi_slab,
               slab_thickness, voxel_size, epochs, patience, batch_size, lr, variants, val_fraction, ema, seed,
               cache_dir, device, overwrite, as_json) -> None:
    """Train a mask classifier on frozen SAM features of candidate masks.

    Candidates are what `biosam auto` (2D images) or `biosam tomogram`
    (tomograms) would propose on --images; each takes the class of the labelled
    object it overlaps (IoU >= 0.5) or is background. Alternatively --labelled
    lists candidates a user sorted by hand. Writes OUTPUT, OUTPUT.metrics.json
    (per-class precision, recall, F1, confusion matrix on held-out data) and
    OUTPUT.curves.png; use it with `biosam auto --classifier` or
    `biosam tomogram --classifier`. --intensity applies to 2D images (as
    `biosam auto --intensity`).
    """
    from biosam.automatic.run import AutoSettings
    from biosam.tomogram.vesicles import VesicleSettings
    from biosam.train.classifier import check_outputs

    if (images is None) != (labels is None):
        raise click.UsageError("--images and --labels go together.")
    if images is None and labelled is None:
        raise click.UsageError("give training data: --images with --labels, or --labelled candidates.json.")
    if images is not None and labelled is not None:
        raise click.UsageError("give either --images/--labels or --labelled, not both.")
    check_outputs(output, overwrite)
    settings = ClassifierSettings(epochs=epochs, patience=patience, batch_size=batch_size, lr=lr, variants=variants,
                                  val_fraction=val_fraction, ema=ema, seed=seed)
    vesicles = VesicleSettings(method=method, n_slabs=multi_slab, slab_thickness=slab_thickness)
    auto = AutoSettings(mode=mode, intensity=intensity)
    cache_dir = cache_dir or output.with_name(output.stem + "_cache")

    from biosam import Predictor, load_model
    from biosam.train.classifier import train_classifier

    if labelled is not None:
        entries = _json_entries(labelled)
        names = sorted({str(e["class"]) for e in entries} - {"background"})
        if classes is not None:
            raise click.UsageError("with --labelled the classes come from the JSON; leave out --classes.")
        class_names = ["background", *names]
        if not any(str(e["class"]) == "background" for e in entries):
            raise InputError(f"{labelled}: no candidate is labelled 'background'; label some candidates that are "
                             "none of your classes as background.")
        jobs, kind = _labelled_jobs(entries, class_names, vesicles, intensity, voxel_size, settings)
    else:
        class_names = (classes or "background,object").split(",")
        if class_names[0] != "background":
            raise click.UsageError("--classes: the first name (label value 0) must be background.")
        if label_type == "instances" and len(class_names) != 2:
            raise click.UsageError("--label-type instances gives two classes (background and one object class); "
                                   "for more classes give class label images with --label-type classes.")
        jobs, kind = _label_jobs(_files(images, labels), class_names, label_type, voxel_size, settings, auto, vesicles)
    predictor = Predictor(load_model(model, device=device))
    candidate_settings = ({"kind": "tomogram", "vesicles": dataclasses.asdict(vesicles)} if kind == "tomogram"
                          else {"kind": "image", "mode": mode, "intensity": intensity})
    sources = [job(predictor, cache_dir, candidate_settings) for job in jobs]
    result = train_classifier(predictor.model, sources, class_names, output, settings, source_kind=kind,
                              info={"candidates": candidate_settings}, cache_dir=cache_dir, overwrite=overwrite)
    summary = {"output": str(result.output), "metrics": str(result.metrics_path), "curves": str(result.curves_path),
               "classes": class_names, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "macro_f1": result.metrics["macro_f1"], "per_class": result.metrics["per_class"],
               "training": result.classifier.info["training"]["train_candidates"],
               "seconds": round(result.seconds, 1)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote {result.output} (epoch {result.best_epoch} of {result.epochs_run}); validation macro-F1 "
               f"{result.metrics['macro_f1']:.3f}; metrics {result.metrics_path}, curves {result.curves_path}")


def _label_jobs(pairs, class_names, label_type, voxel_size, settings, auto, vesicles):
    """One candidate-finding job per image/label pair, all of one kind (2D images or tomograms)."""
    from biosam.train.classifier import (
        cached_candidates,
        file_digest,
        image_candidates,
        instance_classes,
        tomogram_candidates,
    )

    kinds = set()
    jobs = []
    for image_path, label_path in pairs:
        image, spacing = _read(image_path, voxel_size)
        truth, _ = _read(label_path, spacing.z if spacing else None)
        volume = spacing is not None
        kinds.add("tomogram" if volume else "image")
        _check_same_size(image, truth, image_path, label_path, volume)
        instances, classes = instance_classes(truth, label_type, len(class_names), str(label_path))

        def job(predictor, cache_dir, candidate_settings, image=image, instances=instances, classes=classes,
                spacing=spacing, image_path=image_path, label_path=label_path):
            key = {"files": file_digest(image_path, label_path), "model": predictor.info.checkpoint_hash,
                   "candidates": candidate_settings, "label_type": label_type, "crop": settings.crop.to_dict(),
                   "match": (settings.match_iou, settings.ignore_iou)}
            if spacing is not None:
                make = lambda: tomogram_candidates(predictor, image, spacing, instances, classes, "",  # noqa: E731
                                                   settings, vesicles)
            else:
                make = lambda: image_candidates(predictor, image, instances, classes, "", settings, auto)  # noqa: E731
            return cached_candidates(make, key, image_path.name, cache_dir)

        jobs.append(job)
    if len(kinds) > 1:
        raise InputError("--images mixes 2D images and volumes; train one classifier for `auto` (2D) and one for "
                         "`tomogram` (volumes).")
    return jobs, kinds.pop()


def _labelled_jobs(entries, class_names, vesicles, intensity, voxel_size, settings):
    """One job per image of a user's labelled-candidates JSON."""
    from biosam.automatic.run import to_uint8
    from biosam.tomogram.candidates import sam_view
    from biosam.tomogram.slabs import contrast_window, slab_image
    from biosam.train.classifier import LabelledCandidates, crop_candidates

    by_image: dict[tuple, list[dict]] = {}
    for entry in entries:
        by_image.setdefault((entry["image"], entry["masks"]), []).append(entry)
    kinds, jobs = set(), []
    for (image_path, masks_path), items in by_image.items():
        image, spacing = _read(image_path, voxel_size)
        masks, _ = _read(masks_path, spacing.z if spacing else None)
        volume = spacing is not None
        kinds.add("tomogram" if volume else "image")
        _check_same_size(image, masks, image_path, masks_path, volume)
        cut, labels = [], []
        for item in items:
            mask = masks == int(item["mask_id"])
            if not mask.any():
                raise InputError(f"{masks_path}: has no object with id {item['mask_id']} (listed for class "
                                 f"'{item['class']}'); check the mask_id values.")
            if volume:
                z = int(item["z"]) if "z" in item else int(np.argmax(mask.reshape(len(mask), -1).sum(1)))
                window = contrast_window(vesicles.background_nm, spacing)
                view = sam_view(slab_image(image, z, vesicles.slab_thickness, window), vesicles)
                mask = mask[z]
            else:
                view = to_uint8(image, intensity)
            cut += crop_candidates(view, [mask], settings.crop)
            labels.append(class_names.index(str(item["class"])))
        found = LabelledCandidates(image_path.name, cut, np.array(labels, np.int64))
        jobs.append(lambda predictor, cache_dir, candidate_settings, found=found: found)
    if len(kinds) > 1:
        raise InputError("the labelled candidates mix 2D images and volumes; train one classifier per kind.")
    return jobs, kinds.pop()
