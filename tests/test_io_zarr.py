"""Zarr and OME-Zarr (NGFF 0.4 / 0.5): reading levels, labels inside the image, standalone labels."""

from __future__ import annotations

import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from ome_zarr.writer import write_multiscale

from biosam.errors import InputError
from biosam.io import read_image
from biosam.io.zarr_store import open_labels, read, write_labels

from conftest import shared_file

SCALES = [[50.0, 4.0, 4.0], [50.0, 8.0, 8.0]]  # nm; anisotropic like serial-section TEM
SHIFTS = [[100.0, 8.0, 12.0], [100.0, 10.0, 14.0]]


@pytest.fixture(scope="module")
def em_stack() -> np.ndarray:
    """Three real ISBI 2012 ssTEM slices as a ZYX stack (3, 512, 512) uint8."""
    return np.stack([iio.imread(shared_file("isbi2012_em_membranes", "images", f"{i}.png")) for i in range(3)])


def write_ome_image(path, stack: np.ndarray, version: str) -> None:
    """A 2-level OME-Zarr written by ome-zarr itself (not by the code under test)."""
    fmt = FormatV05() if version == "0.5" else FormatV04()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    transforms = [[{"type": "scale", "scale": s}, {"type": "translation", "translation": t}] for s, t in zip(SCALES, SHIFTS)]
    with warnings.catch_warnings():  # ome-zarr deprecates explicit transforms, the only way to give a translation
        warnings.simplefilter("ignore", DeprecationWarning)
        write_multiscale([stack, stack[:, ::2, ::2]], group, fmt=fmt, axes=axes, coordinate_transformations=transforms,
                         storage_options={"chunks": (1, 256, 256)})


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_levels_and_labels_inside_the_image(tmp_path, em_stack, version):
    image = tmp_path / "em.ome.zarr"
    write_ome_image(image, em_stack, version)
    root_attrs = zarr.open_group(str(image), mode="r").attrs.asdict()

    data, meta = read(image)
    assert isinstance(data, zarr.Array) and meta.format == "ome-zarr" and meta.axes == "ZYX"
    assert meta.shape == (3, 512, 512) and meta.unit == "nanometer" and meta.extra["ngff_version"] == version
    assert meta.spacing == {"Z": 50.0, "Y": 4.0, "X": 4.0} and meta.origin == {"Z": 100.0, "Y": 8.0, "X": 12.0}
    np.testing.assert_array_equal(data[1], em_stack[1])

    small, small_meta = read_image(image, level=1)  # through the dispatcher
    assert small_meta.shape == (3, 256, 256) and small_meta.spacing["X"] == 8.0 and small_meta.origin["X"] == 14.0
    with pytest.raises(InputError, match=r"level 2 does not exist.*0: \(3, 512, 512\), 1: \(3, 256, 256\)"):
        read(image, level=2)

    # Labels at level 1: dark membrane pixels, labelled with the slice number so a z mix-up shows.
    membranes = (np.asarray(small) < 90).astype(np.uint8) * np.arange(1, 4, dtype=np.uint8)[:, None, None]
    write_labels(image / "labels" / "membranes", membranes, like=small_meta)
    cells = (em_stack > 150).astype(np.uint16) * 300
    write_labels(image / "labels" / "cells", cells, like=meta)
    with pytest.raises(InputError, match="'cells' already exists"):
        write_labels(image / "labels" / "cells", cells, like=meta)
    write_labels(image / "labels" / "cells", cells * 2, like=meta, overwrite=True)

    labels_group = zarr.open_group(str(image / "labels"), mode="r")
    assert labels_group.metadata.zarr_format == (3 if version == "0.5" else 2)
    listing = labels_group.attrs["ome"]["labels"] if version == "0.5" else labels_group.attrs["labels"]
    assert listing == ["membranes", "cells"]  # earlier entry kept, no duplicate after overwrite

    back, back_meta = read(image / "labels" / "membranes")
    assert back_meta.shape == small_meta.shape and back_meta.extra["ngff_version"] == version
    assert (back_meta.spacing, back_meta.origin, back_meta.unit) == (small_meta.spacing, small_meta.origin, "nanometer")
    np.testing.assert_array_equal(back[:], membranes)
    assert back.chunks == (1, 256, 256)
    np.testing.assert_array_equal(read(image / "labels" / "cells")[0][:], cells * 2)

    # The image itself is untouched.
    assert zarr.open_group(str(image), mode="r").attrs.asdict() == root_attrs
    np.testing.assert_array_equal(read(image)[0][:], em_stack)

    # What napari's OME-Zarr reader sees: the image, its labels group, and a label layer aligned with level 1.
    nodes = list(Reader(parse_url(str(image)))())
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(nodes) == 4 and len(label_nodes) == 2
    by_name = {n.metadata["name"]: n for n in label_nodes}
    assert by_name["membranes"].metadata["coordinateTransformations"] == [
        [{"type": "scale", "scale": SCALES[1]}, {"type": "translation", "translation": SHIFTS[1]}]
    ]
    np.testing.assert_array_equal(np.asarray(by_name["membranes"].data[0]), membranes)
    label_attrs = zarr.open_group(str(image / "labels" / "membranes"), mode="r").attrs.asdict()
    image_label = label_attrs["ome"]["image-label"] if version == "0.5" else label_attrs["image-label"]
    assert image_label["source"]["image"] == "../../"
    # Opening the label alone finds its image through image-label.source.
    found = [Path(n.zarr.path).resolve() for n in Reader(parse_url(str(image / "labels" / "membranes")))()]
    assert image.resolve() in found


def test_standalone_labels_streaming_and_channels(tmp_path, em_stack):
    image = tmp_path / "em.ome.zarr"
    write_ome_image(image, em_stack, "0.5")
    _, meta = read(image)
    labels = (em_stack > 150).astype(np.uint8)
    out = write_labels(tmp_path / "labels.ome.zarr", labels, like=meta)
    back, back_meta = read(out)
    assert back_meta.extra["ngff_version"] == "0.5"  # same NGFF version as the image
    assert (back_meta.axes, back_meta.spacing, back_meta.origin) == ("ZYX", meta.spacing, meta.origin)
    np.testing.assert_array_equal(back[:], labels)

    # Streaming slice by slice; NGFF 0.4 when the geometry does not come from an NGFF 0.5 image.
    plain_like = meta.__class__(meta.path, "tiff", "ZYX", meta.shape, "|u1", meta.spacing, "nanometer")
    with open_labels(tmp_path / "stream.zarr", plain_like, np.uint16) as array:
        assert array.chunks == (1, 512, 512)
        for z in range(3):
            array[z] = labels[z] * (z + 1)
    back, back_meta = read(tmp_path / "stream.zarr")
    assert back_meta.extra["ngff_version"] == "0.4" and back.dtype == np.uint16 and back_meta.spacing == meta.spacing
    np.testing.assert_array_equal(back[2], labels[2] * 3)

    # A failure while streaming leaves nothing: no output, no temporary folder, no empty labels group.
    before = sorted(p.name for p in tmp_path.iterdir())
    for target in (tmp_path / "failed.zarr", image / "labels" / "failed"):
        with pytest.raises(RuntimeError), open_labels(target, meta, np.uint8) as array:
            array[0] = 1
            raise RuntimeError("segmentation crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (image / "labels").exists()

    # Channels: CZYX OME-Zarr 0.4 with omero channel labels; the labels drop C.
    group = zarr.open_group(str(tmp_path / "two.ome.zarr"), mode="w", zarr_format=2)
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    write_multiscale([np.stack([em_stack, 255 - em_stack])], group, fmt=FormatV04(), axes=axes, scale={"z": 2.0, "y": 0.5, "x": 0.5})
    group.attrs["omero"] = {"channels": [{"label": "EM"}, {"label": "inverted"}]}
    data, cmeta = read(tmp_path / "two.ome.zarr")
    assert cmeta.axes == "CZYX" and cmeta.channel_names == ["EM", "inverted"] and cmeta.unit == "micrometer"
    write_labels(tmp_path / "two.ome.zarr" / "labels" / "cells", labels, like=cmeta)
    back, back_meta = read(tmp_path / "two.ome.zarr" / "labels" / "cells")
    assert back_meta.axes == "ZYX" and back_meta.spacing == {"Z": 2.0, "Y": 0.5, "X": 0.5}
    np.testing.assert_array_equal(back[:], labels)


def test_plain_zarr_arrays(tmp_path, em_stack):
    zarr.save_array(str(tmp_path / "v2.zarr"), em_stack, zarr_format=2)
    data, meta = read(tmp_path / "v2.zarr")
    assert isinstance(data, zarr.Array) and (meta.format, meta.axes, meta.spacing) == ("zarr", "ZYX", {})
    np.testing.assert_array_equal(data[2], em_stack[2])
    assert read(tmp_path / "v2.zarr", axes="cyx")[1].axes == "CYX"
    with pytest.raises(InputError, match=r"level 1 does not exist.*0: \(3, 512, 512\)"):
        read(tmp_path / "v2.zarr", level=1)

    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")  # zarr v3
    group.create_array("raw", data=em_stack)
    group.create_array("stack4d", data=em_stack[None])
    with pytest.raises(InputError, match=r"several arrays \(raw, stack4d\).*--array"):
        read(tmp_path / "group.zarr")
    assert read(tmp_path / "group.zarr", array="stack4d")[1].axes == "CZYX"
    with pytest.raises(InputError, match="no array 'nope'; available: raw, stack4d"):
        read(tmp_path / "group.zarr", array="nope")

    labels = (em_stack < 90).astype(np.uint8)
    out = write_labels(tmp_path / "labels.zarr", labels, like=meta)
    np.testing.assert_array_equal(read(out)[0][:], labels)
    assert read(out)[1].spacing == {"Z": 1.0, "Y": 1.0, "X": 1.0}  # unit spacing where the input had none


def test_bad_inputs(tmp_path, em_stack):
    with pytest.raises(InputError, match="not found"):
        read(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    (tmp_path / "file.zarr").write_text("not a store")
    for path in (tmp_path / "empty.zarr", tmp_path / "file.zarr"):
        with pytest.raises(InputError, match="is not a Zarr store"):
            read(path)
    image = tmp_path / "em.ome.zarr"
    write_ome_image(image, em_stack, "0.4")
    _, meta = read(image)
    with pytest.raises(InputError, match="do not fit"):
        write_labels(tmp_path / "out.zarr", np.zeros((3, 10, 10), np.uint8), like=meta)
    with pytest.raises(InputError, match="integers >= 0"):
        write_labels(tmp_path / "out.zarr", -np.ones(meta.shape, np.int16), like=meta)
    write_labels(tmp_path / "out.zarr", np.zeros(meta.shape, np.uint8), like=meta)
    with pytest.raises(InputError, match="already exists"):
        write_labels(tmp_path / "out.zarr", np.zeros(meta.shape, np.uint8), like=meta)
    with pytest.raises(InputError, match="unsupported output type"):
        write_labels(tmp_path / "out.npy", np.zeros(meta.shape, np.uint8), like=meta)
