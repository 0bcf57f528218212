"""3D propagation from one prompt, diagnosed against an oracle, on the labelled volumes in ../shared/data.

For every object, one ground-truth box on the slice where the object is largest is
the only prompt; all objects of a volume are propagated together (as a user
would). The oracle is the same model given the ground-truth box on every slice
where the object is present (each slice on its own, same intensity window). Per
object: 3D Dice of both, and per slice the Dice of both against the distance from
the prompted slice. Why objects end badly, per end (above and below the prompt):
``early`` (the propagation stops before the object does), ``past`` (it goes on
after the object ends), ``leak`` (on some slice more than 20% of the mask lies on
another object), ``shrank`` (on the last third of the shared slices the mask has
less than half the true area).

- StarDist synthetic 3D nuclei (stardist 0.9.2 test data; 31 x 61 x 57, 51 nuclei).
- ISBI 2012 serial-section EM (Cardona et al. 2010; 30 x 512 x 512, 50 nm sections):
  2D cell interiors linked across sections by one-to-one overlap (IoU >= 0.5,
  biosam.volume.link_slices); cells spanning >= 5 sections and >= 200 px.
- TotalSegmentator examples (Wasserthal et al. 2023; CT 30 x 101 x 122 and MR
  20 x 91 x 117, 3 mm): organs (model-generated labels) spanning >= 3 slices and
  >= 30 px.

Held aside before any tuning (issue 17): the objects with even labels of the
three real volumes (ISBI cells after linking, CT and MR organs). The stop rules
of PropagationSettings were chosen on the others (odd labels, and every StarDist
nucleus); rows are reported for both parts. ``two slices``: the same objects
given a second true box on the slice two thirds of the way from the largest
slice to the object's farther end (the correction a user makes where a
propagation went wrong).

    python benchmarks/volume_quality.py [--model lite_medsam] [--projection box ...] [--plot dice.png]
                                        [--sets NAME ...] [--min-score 0.5 --min-overlap 0.3 --max-shift 1.5]
                                        [--out table.md]
    python benchmarks/volume_quality.py --truth-ends [--sets NAME --plot ends.png]   # where the truth
                                        # itself hands an object on to another (no model needed)
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from collections import Counter
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
from fidelity import markdown
from scipy import ndimage as ndi
from skimage.measure import label as connected_components

import biosam
from biosam.prompting.prompts import mask_box
from biosam.runtime import configure_cpu
from biosam.volume import PropagationSettings, link_slices, segment_volume
from biosam.volume.propagate import PROJECTIONS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REASONS = ("early", "past", "leak", "shrank")


def stardist_3d() -> tuple[np.ndarray, np.ndarray]:
    d = DATA / "stardist_synthetic_nuclei_3d"
    return tifffile.imread(d / "img3d.tif"), tifffile.imread(d / "mask3d.tif").astype(np.int64)


def isbi2012() -> tuple[np.ndarray, np.ndarray]:
    d = DATA / "isbi2012_em_membranes"
    image = np.stack([iio.imread(d / "images" / f"{z}.png") for z in range(30)])
    cells = np.stack([connected_components(iio.imread(d / "labels" / f"{z}.png") > 127) for z in range(30)])
    return image, link_slices(cells, min_iou=0.5).astype(np.int64)


def totalseg(kind: str):
    def load() -> tuple[np.ndarray, np.ndarray]:
        import nibabel

        d = DATA / "totalseg_ct_mr_examples"
        image_name, label_name = {"ct": ("example_ct_sm", "example_seg"), "mr": ("example_mr_sm", "example_seg_mr")}[kind]
        # NIfTI arrays are (x, y, z); slices along z, as (z, y, x).
        image = np.asarray(nibabel.load(d / f"{image_name}.nii.gz").get_fdata(), np.float32).transpose(2, 1, 0)
        labels = np.asarray(nibabel.load(d / f"{label_name}.nii.gz").get_fdata()).astype(np.int64).transpose(2, 1, 0)
        return np.ascontiguousarray(image), np.ascontiguousarray(labels)

    return load


#: name: (loader, objects spanning at least this many slices, and this many pixels on their largest slice)
SETS = {"StarDist 3D nuclei (synthetic)": (stardist_3d, 3, 20), "ISBI 2012 EM cells": (isbi2012, 5, 200),
        "TotalSegmentator CT organs": (totalseg("ct"), 3, 30), "TotalSegmentator MR organs": (totalseg("mr"), 3, 30)}


def largest_slice_prompts(labels: np.ndarray, min_slices: int, min_area: int) -> tuple[list[int], list[biosam.Prompt]]:
    """One box per object on the slice where it is largest (objects spanning >= min_slices, >= min_area px there)."""
    ids, prompts = [], []
    for i, region in enumerate(ndi.find_objects(labels), start=1):
        if region is None or region[0].stop - region[0].start < min_slices:
            continue
        areas = (labels[region] == i).sum(axis=(1, 2))
        z = int(np.argmax(areas)) + region[0].start
        if areas.max() < min_area:
            continue
        ids.append(i)
        prompts.append(biosam.Prompt(box=mask_box(labels[z] == i), z=z))
    return ids, prompts


def oracle(predictor, volume, labels, ids, normalize) -> np.ndarray:
    """Labels from a ground-truth box on every slice of every object, each slice segmented on its own."""
    out = np.zeros(labels.shape, np.int32)
    for z in range(labels.shape[0]):
        present = [(k, i) for k, i in enumerate(ids) if (labels[z] == i).any()]
        if not present:
            continue
        predictor.set_image(normalize(np.asarray(volume[z])), intensity="none")
        boxes = np.stack([mask_box(labels[z] == i) for _, i in present])
        masks = predictor.predict(box=boxes).masks
        for (k, _), mask in sorted(zip(present, masks), key=lambda pm: -pm[1].sum()):
            out[z][mask & (out[z] == 0)] = k + 1
    return out


def held_aside(volume_name: str, label: int) -> bool:
    """The objects no setting was chosen on: even labels of the real volumes."""
    return not volume_name.startswith("StarDist") and label % 2 == 0


def second_prompts(labels: np.ndarray, ids: list[int], prompts: list[biosam.Prompt]) -> list[biosam.Prompt]:
    """Each object's prompt plus a true box two thirds of the way to its farther end (one object, two slices)."""
    out = []
    for k, (i, prompt) in enumerate(zip(ids, prompts)):
        present = np.flatnonzero((labels == i).any(axis=(1, 2)))
        far = present[0] if prompt.z - present[0] > present[-1] - prompt.z else present[-1]
        z = int(present[np.abs(present - (prompt.z + (far - prompt.z) * 2 / 3)).argmin()])  # objects can skip slices
        out.append(biosam.Prompt(box=prompt.box, z=prompt.z, object=k))
        if z != prompt.z:
            out.append(biosam.Prompt(box=mask_box(labels[z] == i), z=z, object=k))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def diagnose(labels, ids, prompts, result, oracle_labels) -> tuple[list[dict], list[tuple[int, float, float]]]:
    """Per object: 3D Dice (propagated, oracle), end reasons and, for each end reached too early, the stop rule
    that ended it (``result.ends``, numbers dropped); per (object, slice): distance, both Dice."""
    objects, curve = [], []
    for k, (i, prompt) in enumerate(zip(ids, prompts)):
        truth, found, best = labels == i, result.labels == k + 1, oracle_labels == k + 1
        t_z = np.flatnonzero(truth.any(axis=(1, 2)))
        p_z = np.flatnonzero(found.any(axis=(1, 2)))
        for z in t_z:
            curve.append((abs(int(z) - prompt.z), dice(truth[z], found[z]), dice(truth[z], best[z])))
        reasons, rules = set(), []
        for side, t_end, p_end in ((0, t_z[0], p_z[0] if len(p_z) else prompt.z),
                                   (1, t_z[-1], p_z[-1] if len(p_z) else prompt.z)):
            sign = -1 if side == 0 else 1
            if (p_end - t_end) * sign < 0:
                reasons.add("early")
                why = "nothing found" if not len(p_z) else result.ends[k, side]
                rules.append("its last pixels taken by a nearer object" if why is None
                             else re.sub(r"\d+(\.\d+)?", "#", why.split(": ", 1)[-1]))
            if (p_end - t_end) * sign > 0:
                reasons.add("past")
        other = (labels > 0) & ~truth
        for z in p_z:
            if (found[z] & other[z]).sum() > 0.2 * found[z].sum():
                reasons.add("leak")
                break
        shared = np.intersect1d(t_z, p_z)
        tail = [z for z in shared if abs(z - prompt.z) >= 2 / 3 * max(abs(shared - prompt.z).max(), 1)]
        if any(found[z].sum() < 0.5 * truth[z].sum() for z in tail):
            reasons.add("shrank")
        objects.append({"dice": dice(truth, found), "oracle": dice(truth, best), "reasons": reasons,
                        "rules": rules})
    return objects, curve


def continued_ends(labels: np.ndarray, ids: list[int]) -> tuple[int, list[tuple[int, int, int, int, float]]]:
    """Ends of the objects inside the stack, and those that go on as another object: ``(label, last slice, next
    slice, other label, IoU)`` where more than half of the object's last mask lies on one other label there."""
    ends, continued = 0, []
    for i in ids:
        zs = np.flatnonzero((labels == i).any(axis=(1, 2)))
        for z, step in ((zs[-1], 1), (zs[0], -1)):
            if not 0 <= z + step < labels.shape[0]:
                continue
            ends += 1
            mask = labels[z] == i
            under = labels[z + step][mask]
            under = under[under > 0]
            if under.size == 0:
                continue
            j = int(np.bincount(under).argmax())
            other = labels[z + step] == j
            if (mask & other).sum() > 0.5 * mask.sum():
                continued.append((i, int(z), int(z + step), j, float((mask & other).sum() / (mask | other).sum())))
    return ends, continued


def plot_ends(volume: np.ndarray, labels: np.ndarray, cases: list, path: Path) -> None:
    """Each case: the object's last slice with its outline, the next slice with the other object's, and the
    next slice with the first object's outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    fig, axes = plt.subplots(len(cases), 3, figsize=(7, 2.4 * len(cases)), squeeze=False)
    for row, (i, z, z_next, j, iou) in zip(axes, cases):
        mask, other = labels[z] == i, labels[z_next] == j
        ys, xs = np.nonzero(mask | other)
        y0, x0 = max(0, ys.min() - 30), max(0, xs.min() - 30)
        box = np.s_[y0:ys.max() + 30, x0:xs.max() + 30]
        for ax, plane, outline, title in ((row[0], z, mask, f"cell {i}: its last section, z={z}"),
                                          (row[1], z_next, other, f"cell {j}, z={z_next} (IoU {iou:.2f})"),
                                          (row[2], z_next, mask, f"z={z_next} with cell {i}'s outline")):
            ax.imshow(volume[plane][box], cmap="gray")
            edge = np.zeros(outline[box].shape + (4,))
            edge[find_boundaries(outline[box])] = (1, 0, 0, 1)
            ax.imshow(edge)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=60)


def plot(curves: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for colour, (name, curve) in zip(plt.cm.tab10.colors, curves.items()):
        data = np.array(curve)
        distances = np.unique(data[:, 0])
        for column, style, what in ((1, "-", "propagated"), (2, "--", "oracle")):
            means = [data[data[:, 0] == d, column].mean() for d in distances]
            ax.plot(distances, means, style, color=colour, label=f"{name}: {what}")
    ax.set_xlabel("slices from the prompted slice")
    ax.set_ylabel("mean Dice on the slice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("One box on the largest slice, propagated, against a true box on every slice")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--projection", nargs="+", default=["box", "learned"], choices=PROJECTIONS)
    parser.add_argument("--adapter", type=Path, help="propagation adapter for 'learned' (default: the shipped one)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--min-score", type=float, default=PropagationSettings.min_score)
    parser.add_argument("--min-overlap", type=float, default=PropagationSettings.min_overlap)
    parser.add_argument("--max-shift", type=float, default=PropagationSettings.max_shift,
                        help="stop rules (PropagationSettings); e.g. 0, 0, inf switch those three off")
    parser.add_argument("--plot", type=Path, help="write the Dice-against-distance plot (PNG) here")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--truth-ends", action="store_true",
                        help="only count the objects' ends where the truth goes on as another object, and stop")
    args = parser.parse_args()
    if args.truth_ends:
        for name in args.sets:
            load, min_slices, min_area = SETS[name]
            volume, labels = load()
            ids, _ = largest_slice_prompts(labels, min_slices, min_area)
            for part in ("tuning", "held aside"):
                ends, continued = continued_ends(labels, [i for i in ids if held_aside(name, i) == (part == "held aside")])
                iou = np.median([c[-1] for c in continued]) if continued else float("nan")
                print(f"{name} ({part}): {len(continued)} of {ends} ends inside the stack go on as another object "
                      f"(median IoU {iou:.2f} with it)")
                if args.plot and part == "tuning" and continued:  # pictures of tuning objects only
                    plot_ends(volume, labels, continued[:4], args.plot)
        return 0
    configure_cpu()
    predictor = biosam.Predictor(biosam.load_model(args.model))
    rows, curves = [], {}
    for name in args.sets:
        load, min_slices, min_area = SETS[name]
        volume, labels = load()
        ids, prompts = largest_slice_prompts(labels, min_slices, min_area)
        best = None
        for projection in args.projection:
            settings = PropagationSettings(projection=projection, min_score=args.min_score,
                                           min_overlap=args.min_overlap, max_shift=args.max_shift)
            start = time.perf_counter()
            result = segment_volume(predictor, volume, prompts, settings, progress=False, adapter=args.adapter)
            seconds = time.perf_counter() - start
            two = segment_volume(predictor, volume, second_prompts(labels, ids, prompts), settings, progress=False,
                                 adapter=args.adapter)
            best = oracle(predictor, volume, labels, ids, result.normalize) if best is None else best
            objects, curve = diagnose(labels, ids, prompts, result, best)
            twice = [dice(labels == i, two.labels == k + 1) for k, i in enumerate(ids)]
            curves[f"{name.split(' (')[0]} ({projection})"] = curve
            for part in ("tuning", "held aside"):
                keep = [k for k, i in enumerate(ids) if held_aside(name, i) == (part == "held aside")]
                if not keep:
                    continue
                d, o = (np.array([objects[k][key] for k in keep]) for key in ("dice", "oracle"))
                counts = {r: sum(r in objects[k]["reasons"] for k in keep) for r in REASONS}
                rows.append([name, part, f"{volume.shape}", str(len(keep)), projection, f"{d.mean():.3f}",
                             f"{np.mean([twice[k] for k in keep]):.3f}", f"{o.mean():.3f}", f"{o.mean() - d.mean():.3f}",
                             *(str(counts[r]) for r in REASONS), f"{seconds:.0f}"])
                print(" | ".join(rows[-1]), flush=True)
                print(f"  early ends by the rule that stopped them: "
                      f"{dict(Counter(rule for k in keep for rule in objects[k]['rules']))}")
    header = ["volume", "objects", "shape (z, y, x)", "n", "projection", "3D Dice, propagated", "two slices",
              "oracle", "gap", *(f"ends: {r}" for r in REASONS), "seconds (all objects)"]
    text = (f"Model {args.model} on {platform.processor() or platform.machine()}, one box per object on its largest "
            f"slice; oracle: a true box on every slice.\n\n{markdown(header, rows)}")
    print(text)
    if args.plot:
        plot(curves, args.plot)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
