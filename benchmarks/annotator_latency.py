"""Latency of the napari annotator, driven through its widget as a user would (offscreen, no canvas).

Measures, with LiteMedSAM on the CPU: loading the model and embedding a 1024 x 1344
NIH3T3 image (empty embeddings folder, then again from the folder), the time from a box
added to the ``prompts`` layer to its mask shown in ``current_object`` (median over
ground-truth nucleus boxes, zoom off and auto), and Shift+S (segment the object through all
slices) on a 64-slice volume: the StarDist synthetic nuclei resampled to 64 x 244 x 228.

    QT_QPA_PLATFORM=offscreen python benchmarks/annotator_latency.py [--boxes 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def wait(app, widget, timeout: float = 3600.0) -> float:
    """Process Qt events until the widget is idle; seconds waited."""
    start = time.perf_counter()
    while not widget.idle:
        app.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the annotator did not finish")
    app.processEvents()
    return time.perf_counter() - start


def rectangle(box: np.ndarray, z: int | None = None) -> np.ndarray:
    """napari rectangle vertices for a biosam box (napari puts pixel centres at integers)."""
    x0, y0, x1, y1 = np.asarray(box, dtype=float) - 0.5
    corners = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
    return corners if z is None else np.column_stack([np.full(4, z), corners])


def make_widget(viewer, store: Path, zoom: str = "auto"):
    from biosam.napari.annotator import AnnotatorWidget

    widget = AnnotatorWidget(viewer)
    widget.store_edit.setText(str(store))
    widget.model_selector.device_box.setCurrentText("cpu")
    widget.zoom_box.setCurrentText(zoom)
    return widget


def bench_2d(app, store: Path, n_boxes: int) -> list[tuple[str, str]]:
    import imageio.v3 as iio
    from napari.components import ViewerModel
    from scipy import ndimage as ndi

    from biosam.napari.annotator import BOXES
    from biosam.prompting.prompts import mask_box

    image = iio.imread(DATA / "nuclei_nih3t3" / "images" / "dna-0.png")
    truth, _ = ndi.label(iio.imread(DATA / "nuclei_nih3t3" / "labels" / "0.png") > 0)
    ids = [i for i in np.unique(truth) if i and (truth == i).sum() > 200][:n_boxes]
    boxes = [mask_box(truth == i) for i in ids]
    rows = []
    for zoom in ("off", "auto"):
        viewer = ViewerModel()
        viewer.add_image(image, name="nih3t3")
        widget = make_widget(viewer, store, zoom)
        if zoom == "off":
            start = time.perf_counter()
            widget.model_selector.load()
            rows.append(("load lite_medsam", f"{time.perf_counter() - start:.2f} s"))
            widget.compute_embedding()
            rows.append((f"embedding {image.shape[0]}x{image.shape[1]} (empty folder)", f"{wait(app, widget):.2f} s"))
            widget.session = None  # forget it: the next embedding comes from the folder
            widget.compute_embedding()
            rows.append(("embedding again (from the embeddings folder)", f"{wait(app, widget) * 1000:.0f} ms"))
        else:
            widget.compute_embedding()
            wait(app, widget)
        times, zoomed = [], 0
        for box in boxes:
            widget.clear()
            wait(app, widget)
            start = time.perf_counter()
            viewer.layers[BOXES].add_rectangles(rectangle(box))
            widget.segment()
            wait(app, widget)
            times.append(time.perf_counter() - start)
            zoomed += _was_zoomed(widget, box)
        what = f"box -> mask shown, zoom {zoom}, median of {len(times)}"
        detail = f" ({zoomed} zoomed crops, first time each)" if zoom == "auto" else ""
        rows.append((what, f"{np.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}, max "
                           f"{max(times) * 1000:.0f}){detail}"))
        widget.close()
    return rows


def _was_zoomed(widget, box: np.ndarray) -> bool:
    from biosam.prompting.zoom import plan_crops

    session = widget.session
    crops, _ = plan_crops(np.asarray(box)[None], session.shape[-2:], session.zoom, session.predictor.zoom_settings)
    return bool(crops)


def bench_3d(app, store: Path) -> list[tuple[str, str]]:
    import tifffile
    from napari.components import ViewerModel
    from scipy import ndimage as ndi

    from biosam.napari.annotator import BOXES, CURRENT
    from biosam.prompting.prompts import mask_box

    volume = tifffile.imread(DATA / "stardist_synthetic_nuclei_3d" / "img3d.tif")
    truth = tifffile.imread(DATA / "stardist_synthetic_nuclei_3d" / "mask3d.tif") == 81
    factors = (64 / volume.shape[0], 4, 4)
    volume = ndi.zoom(volume.astype(np.float32), factors, order=1).astype(np.uint16)
    truth = ndi.zoom(truth.astype(np.uint8), factors, order=0) > 0
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    z = int((zs[0] + zs[-1]) // 2)
    rows = []
    for run in ("empty folder", "again, from the folder"):
        viewer = ViewerModel()
        viewer.add_image(volume, name="nuclei3d")
        widget = make_widget(viewer, store)
        widget.model_selector.load()
        widget.clear()
        wait(app, widget)
        viewer.layers[BOXES].add_rectangles(rectangle(mask_box(truth[z]), z))
        widget.segment_volume()
        seconds = wait(app, widget)
        result = viewer.layers[CURRENT].data > 0
        covered = np.flatnonzero(result.any(axis=(1, 2)))
        iou = (result & truth).sum() / max(1, (result | truth).sum())
        shape = "x".join(map(str, volume.shape))
        rows.append((f"Shift+S, {shape} volume, {run}",
                     f"{seconds:.1f} s ({len(covered)} slices, IoU {iou:.2f} vs ground truth)"))
        widget.close()
    return rows


def pictures(app, store: Path, folder: Path) -> list[Path]:
    """The annotator's results drawn with biosam's overlay writer (napari cannot screenshot offscreen)."""
    import imageio.v3 as iio
    import tifffile
    from napari.components import ViewerModel
    from scipy import ndimage as ndi

    from biosam import Prompt
    from biosam.io.overlay import render_overlay
    from biosam.napari.annotator import BOXES, COMMITTED, CURRENT
    from biosam.prompting.prompts import mask_box

    folder.mkdir(parents=True, exist_ok=True)
    # 2D: five committed nuclei, and a sixth being segmented from its box
    crop = np.s_[576:960, 576:1088]  # the 512 x 384 window of this image with the most whole nuclei
    image = iio.imread(DATA / "nuclei_nih3t3" / "images" / "dna-0.png")[crop]
    truth, _ = ndi.label(iio.imread(DATA / "nuclei_nih3t3" / "labels" / "0.png")[crop] > 0)
    edge = set(truth[[0, -1]].ravel()) | set(truth[:, [0, -1]].ravel())
    inner = [i for i in np.unique(truth) if i and i not in edge and (truth == i).sum() > 400][:6]
    viewer = ViewerModel()
    viewer.add_image(image, name="nih3t3")
    widget = make_widget(viewer, store)
    for k, label in enumerate(inner):
        viewer.layers[BOXES].add_rectangles(rectangle(mask_box(truth == label)))
        widget.segment()
        if k < len(inner) - 1:
            widget.commit()
        wait(app, widget)
    labels = viewer.layers[COMMITTED].data.astype(np.int32)
    labels[(viewer.layers[CURRENT].data > 0) & (labels == 0)] = labels.max() + 1
    rgb = widget.session.predictor.image_rgb
    paths = [folder / "annotator_2d.png"]
    iio.imwrite(paths[0], render_overlay(rgb, labels, [Prompt(box=mask_box(truth == inner[-1]))]))
    widget.close()

    # 3D: one nucleus boxed on its middle slice and followed through the slices (Shift+S), every 3rd slice shown
    volume = tifffile.imread(DATA / "stardist_synthetic_nuclei_3d" / "img3d.tif")
    truth3 = tifffile.imread(DATA / "stardist_synthetic_nuclei_3d" / "mask3d.tif") == 81
    factors = (64 / volume.shape[0], 4, 4)
    volume = ndi.zoom(volume.astype(np.float32), factors, order=1).astype(np.uint16)
    truth3 = ndi.zoom(truth3.astype(np.uint8), factors, order=0) > 0
    zs = np.flatnonzero(truth3.any(axis=(1, 2)))
    z = int((zs[0] + zs[-1]) // 2)
    viewer = ViewerModel()
    viewer.add_image(volume, name="nuclei3d")
    widget = make_widget(viewer, store)
    widget.clear()
    wait(app, widget)
    box = mask_box(truth3[z])
    viewer.layers[BOXES].add_rectangles(rectangle(box, z))
    widget.segment_volume()
    wait(app, widget)
    current = viewer.layers[CURRENT].data
    covered = np.flatnonzero(current.any(axis=(1, 2)))
    shown = [k for k in range(covered[0] - 1, covered[-1] + 2, 3) if 0 <= k < len(volume)]
    # each tile a 128 px window around the object, so that the picture stays small
    cy, cx = (int(c) for c in ndi.center_of_mass(current[z]))
    h, w = volume.shape[1:]
    y0, x0 = min(max(0, cy - 64), h - 128), min(max(0, cx - 64), w - 128)
    window = np.s_[y0 : y0 + 128, x0 : x0 + 128]
    tile_box = box - np.array([x0, y0, x0, y0])
    tiles = [render_overlay(np.repeat(widget.session.plane(k)[window][..., None], 3, axis=-1),
                            current[k][window].astype(np.int32), [Prompt(box=tile_box)] if k == z else None)
             for k in shown]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    paths.append(folder / "annotator_3d.png")
    iio.imwrite(paths[1], row)
    widget.close()
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=20, help="boxes timed per zoom setting")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--pictures", type=Path, default=None,
                        help="also draw the annotator's results into this folder (README pictures), and stop")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import torch
    from qtpy.QtWidgets import QApplication

    from biosam.runtime import configure_cpu

    configure_cpu(args.threads)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    with tempfile.TemporaryDirectory() as tmp:
        if args.pictures is not None:
            for path in pictures(app, Path(tmp) / "pictures", args.pictures):
                print(f"{path}: {path.stat().st_size // 1024} KiB")
            return
        rows = bench_2d(app, Path(tmp) / "store2d", args.boxes) + bench_3d(app, Path(tmp) / "store3d")
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, model lite_medsam (fp32, CPU)\n")
    print("| step | time |")
    print("|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")


if __name__ == "__main__":
    main()
