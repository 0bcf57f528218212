"""Labelled images for the instance decoder: pairing, label loading, training targets, the nuclei split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential

from biosam.errors import InputError

#: NIH3T3 image numbers (``nuclei_nih3t3/images/dna-N.png``) used for training and for validation.
NUCLEI_TRAIN = (0, 1, 26, 27, 28, 29, 30, 31, 32, 33, 37, 40, 42, 44)
NUCLEI_VAL = (45, 46, 47, 49)
DATA_ENV = "BIOSAM_DATA"

Pair = tuple[Path, Path]


def nuclei_split(root: str | os.PathLike | None = None) -> tuple[list[Pair], list[Pair]]:
    """The project's fixed nuclei split as ``(train, val)`` lists of ``(image_path, label_path)``.

    ``root`` is the data folder holding ``nuclei_nih3t3/`` (images ``dna-N.png``,
    binary masks ``N.png``) and ``stardist_dsb2018_nuclei_2d/`` (default: the
    ``BIOSAM_DATA`` environment variable). Train: NIH3T3 numbers
    :data:`NUCLEI_TRAIN`; validation: :data:`NUCLEI_VAL` and, last, the DSB2018
    image when present.
    """
    if root is None:
        if DATA_ENV not in os.environ:
            raise InputError(f"nuclei_split needs the data folder: pass root= or set {DATA_ENV}.")
        root = os.environ[DATA_ENV]
    nih = Path(root) / "nuclei_nih3t3"

    def pairs(numbers: tuple[int, ...]) -> list[Pair]:
        out = [(nih / "images" / f"dna-{n}.png", nih / "labels" / f"{n}.png") for n in numbers]
        missing = [str(p) for pair in out for p in pair if not p.is_file()]
        if missing:
            raise InputError(f"nuclei data incomplete: {missing[0]} not found (looked in {nih}).")
        return out

    train, val = pairs(NUCLEI_TRAIN), pairs(NUCLEI_VAL)
    dsb = Path(root) / "stardist_dsb2018_nuclei_2d"
    if (dsb / "img2d.tif").is_file() and (dsb / "mask2d.tif").is_file():
        val.append((dsb / "img2d.tif", dsb / "mask2d.tif"))
    return train, val


def pair_by_stem(images: str | os.PathLike, labels: str | os.PathLike) -> list[Pair]:
    """Pair every file in ``images`` with the file of the same stem in ``labels``.

    Raises :class:`InputError` when a folder is missing, empty, or an image has no label.
    """
    folders = {"images": Path(images), "labels": Path(labels)}
    listing = {}
    for what, folder in folders.items():
        if not folder.is_dir():
            raise InputError(f"--{what} {folder}: not a folder.")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise InputError(f"--{what} {folder}: the folder holds no files.")
        listing[what] = {_stem(p): p for p in files}
    unmatched = sorted(set(listing["images"]) - set(listing["labels"]))
    if unmatched:
        raise InputError(
            f"{len(unmatched)} image(s) in {folders['images']} have no label file of the same name in "
            f"{folders['labels']} (first: '{unmatched[0]}'); give each image a label image with the same stem."
        )
    return [(listing["images"][s], listing["labels"][s]) for s in sorted(listing["images"])]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def as_instances(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Instance labels ``1..N`` (int32) from an instance label image or a binary mask.

    A mask with a single foreground value (e.g. 0/255) is split into objects by
    4-connected components; touching objects in such a mask stay merged.
    """
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[-1] in (3, 4) and np.all(labels[..., :3] == labels[..., :1]):
        labels = labels[..., 0]  # a grey mask saved as RGB(A)
    if labels.ndim != 2:
        raise InputError(f"{name}: expected a 2D label image, got shape {labels.shape}.")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        if not np.all(np.mod(labels, 1) == 0):
            raise InputError(f"{name}: label images need integer values, got {labels.dtype} with fractions.")
    if labels.min(initial=0) < 0:
        raise InputError(f"{name}: label images cannot hold negative values.")
    labels = labels.astype(np.int64)
    values = np.unique(labels)
    if len(values[values > 0]) == 1:
        return connected_components(labels > 0, connectivity=1).astype(np.int32)
    return relabel_sequential(labels)[0].astype(np.int32)


def read_pair(image_path: str | os.PathLike, label_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 2D image and its instance labels (see :func:`as_instances`), checked to have the same size."""
    from biosam.io import read_image

    image, _ = read_image(image_path)
    raw, _ = read_image(label_path)
    labels = as_instances(raw, str(label_path))
    image = np.asarray(image)
    if image.shape[:2] != labels.shape and not (image.ndim == 3 and image.shape[1:] == labels.shape):
        raise InputError(
            f"{label_path}: label image of size {labels.shape} does not match its image {image_path} "
            f"of size {image.shape[:2]}."
        )
    return image, labels


def distance_targets(labels: np.ndarray) -> np.ndarray:
    """Training targets ``(3, H, W)`` float32 from instance labels.

    Channel 0: foreground (0/1). Channel 1: distance to the object's centre,
    divided by its largest value inside the object (0 at the centre, 1 at the
    farthest pixel). Channel 2: distance to the object's boundary turned around
    and normalised the same way (0 at the innermost pixel, 1 on the boundary).
    Both distances are 1 in the background. The centre is the centroid, or the
    innermost pixel when the centroid falls outside the object. An object at
    most two pixels thin has no inside; its boundary distance is 0 throughout,
    so that it still yields a seed.
    """
    labels = np.asarray(labels)
    out = np.ones((3,) + labels.shape, dtype=np.float32)
    out[0] = labels > 0
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        # One pixel of background around the crop, so the border counts as boundary.
        y0, x0 = box[0].start, box[1].start
        mask = np.pad(labels[box] == index + 1, 1)
        inner = ndimage.distance_transform_edt(mask) - 1.0  # 0 on the object's outermost pixels
        ys, xs = np.nonzero(mask)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        if not mask[cy, cx]:
            cy, cx = np.unravel_index(np.argmax(inner), inner.shape)
        yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
        centre = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        peak = inner.max()
        boundary = (peak - inner) / peak if peak > 0 else np.zeros_like(inner)
        far = centre[mask].max()
        centre = centre / far if far > 0 else centre
        m = mask[1:-1, 1:-1]
        region = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        out[1][region][m] = centre[1:-1, 1:-1][m]
        out[2][region][m] = boundary[1:-1, 1:-1][m]
    return out


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 rotations/flips of the last two axes: ``k % 4`` quarter turns, then a flip if ``k >= 4``."""
    out = np.rot90(array, k % 4, axes=(-2, -1))
    if k >= 4:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


#: The light-microscopy sets with dense instance labels under the project's data folder, for training and
#: leave-one-set-out scoring of the shipped decoder (BBBC007's labels are sparse: see :func:`bbbc007_pairs`).
LM_SETS = ("nih3t3", "dsb2018", "stardist3d")


def light_microscopy_sets(root: str | os.PathLike, scratch: str | os.PathLike) -> dict[str, list[Pair]]:
    """The :data:`LM_SETS` as ``{name: [(image_path, label_path), ...]}``.

    ``root`` holds ``nuclei_nih3t3/`` (18 Hoechst images, binary masks),
    ``stardist_dsb2018_nuclei_2d/`` (one DSB2018 image) and
    ``stardist_synthetic_nuclei_3d/`` (a 3D volume whose every second z slice
    with at least 3 nuclei becomes a 2D pair, written to ``scratch`` once).
    """
    root, scratch = Path(root), Path(scratch)
    nih = root / "nuclei_nih3t3"
    numbers = sorted(int(p.stem.split("-")[1]) for p in (nih / "images").glob("dna-*.png"))
    dsb = root / "stardist_dsb2018_nuclei_2d"
    sets = {"nih3t3": [(nih / "images" / f"dna-{n}.png", nih / "labels" / f"{n}.png") for n in numbers],
            "dsb2018": [(dsb / "img2d.tif", dsb / "mask2d.tif")],
            "stardist3d": _volume_slices(root / "stardist_synthetic_nuclei_3d", scratch / "stardist3d")}
    missing = [str(p) for pairs in sets.values() for pair in pairs for p in pair if not p.is_file()]
    if missing or not sets["nih3t3"]:
        raise InputError(f"light-microscopy data incomplete: {missing[0] if missing else nih} not found.")
    return sets


def _write_pair(scratch: Path, name: str, image: np.ndarray, labels: np.ndarray) -> Pair:
    """``scratch/images/NAME.tif`` and ``scratch/labels/NAME.tif``, written unless both exist already."""
    import tifffile

    pair = (scratch / "images" / f"{name}.tif", scratch / "labels" / f"{name}.tif")
    if not all(p.is_file() for p in pair):
        for path, data in zip(pair, (image, labels)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, data)
    return pair


def _volume_slices(folder: Path, scratch: Path) -> list[Pair]:
    import tifffile

    image_path, label_path = folder / "img3d.tif", folder / "mask3d.tif"
    if not image_path.is_file():
        return [(image_path, label_path)]  # reported as missing by the caller
    volume, labels = tifffile.imread(image_path), tifffile.imread(label_path)
    return [_write_pair(scratch, f"z{z:02d}", volume[z], labels[z])
            for z in range(0, volume.shape[0], 2) if len(np.unique(labels[z])) - 1 >= 3]


def bbbc007_pairs(root: str | os.PathLike) -> list[Pair]:
    """BBBC007's 6 DNA images with their sparse labels (6-9 nuclei each; the other nuclei are unlabelled)."""
    folder = Path(root) / "bbbc007_sparse_instances"
    return pair_by_stem(folder / "images", folder / "sparse_labels")


#: NIH3T3 images whose nucleus-free regions the tests use as unseen background; never training background.
BACKGROUND_TEST_IMAGES = (1, 46)


def background_pairs(root: str | os.PathLike, scratch: str | os.PathLike, real: bool = True) -> list[Pair]:
    """Images without objects, with empty labels, written to ``scratch`` once: they teach a decoder to find nothing.

    Six camera-noise images (Poisson and Gaussian, dim 8-bit and 16-bit, flat and
    with uneven illumination) and, with ``real``, one nucleus-free 256 px region
    of each NIH3T3 image that has one (except :data:`BACKGROUND_TEST_IMAGES`).
    """
    from biosam.io import read_image

    rng = np.random.default_rng(2026)
    yy, xx = np.mgrid[:256, :256] / 256.0
    images = {
        "poisson1": rng.poisson(1.0, (256, 256)).astype(np.uint8),
        "poisson8": rng.poisson(8.0 * (1 + 0.5 * xx), (256, 256)).astype(np.uint8),
        "gauss16": (300 + rng.normal(0, 12, (256, 256))).astype(np.uint16),
        "ramp16": (2000 + 800 * yy + rng.normal(0, 40, (256, 256))).astype(np.uint16),
        "smooth8": np.clip(20 + 15 * ndimage.gaussian_filter(rng.normal(0, 1, (256, 256)), 12) * 12
                           + rng.normal(0, 2, (256, 256)), 0, 255).astype(np.uint8),
        "speckle16": (100 + 30 * rng.exponential(1.0, (256, 256))).astype(np.uint16),
    }
    if real:
        nih = Path(root) / "nuclei_nih3t3"
        for path in sorted((nih / "labels").glob("*.png")):
            if int(path.stem) in BACKGROUND_TEST_IMAGES:
                continue
            labels = np.asarray(read_image(path)[0]) > 0
            free = ndimage.uniform_filter(labels.astype(np.float32), 256)[128:-128, 128:-128] == 0
            spots = np.argwhere(free)
            if len(spots):
                y, x = spots[len(spots) // 2]
                image = np.asarray(read_image(nih / "images" / f"dna-{path.stem}.png")[0])
                images[f"nih3t3_{path.stem}"] = image[y : y + 256, x : x + 256]
    return [_write_pair(Path(scratch), name, image, np.zeros(image.shape[:2], np.uint8))
            for name, image in images.items()]
