"""MRC reading (memory-mapped), label writing and streaming, on a real EMDB map and generated files."""

from __future__ import annotations

import gc

import mrcfile
import numpy as np
import pytest

from biosam.errors import InputError
from biosam.io import mrc
from biosam.io.meta import ImageMeta

from conftest import shared_file


def make_mrc(path, data, voxel_size=(1.5, 2.5, 3.5), origin=(10.0, -20.0, 30.0), nstart=(-4, 5, 6)):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = voxel_size
        m.header.origin = origin
        m.header.nxstart, m.header.nystart, m.header.nzstart = nstart
    return path


def same_geometry(a: ImageMeta, b: ImageMeta) -> None:
    assert a.axes == b.axes and a.spacing == b.spacing and a.origin == b.origin and a.unit == b.unit
    assert a.extra["nstart"] == b.extra["nstart"]


def test_real_map_read_and_round_trip(tmp_path):
    path = shared_file("mrcfile_emdb_maps", "EMD-3197.map")
    data, meta = mrc.read(path)
    assert isinstance(data, np.memmap) and meta.axes == "ZYX" and data.shape == meta.shape == (20, 20, 20)
    assert meta.unit == "angstrom" and meta.spacing == {"Z": 11.4, "Y": 11.4, "X": 11.4}
    assert meta.extra["nstart"] == {"X": -2, "Y": 0, "Z": 0}
    np.testing.assert_array_equal(data, mrcfile.read(path))

    labels = (np.asarray(data) > np.percentile(data, 90)).astype(np.int64) * 300
    out = mrc.write_labels(tmp_path / "labels.mrc", labels, like=meta)
    back, back_meta = mrc.read(out)
    same_geometry(back_meta, meta)
    assert back.dtype == np.uint16 and np.array_equal(back, labels)
    assert mrcfile.validate(out)
    with mrcfile.open(out) as m, mrcfile.open(path) as ref:
        assert m.header.mode == 6 and m.voxel_size == ref.voxel_size and m.header.dmax == 300
        assert m.header.origin == ref.header.origin


def test_anisotropic_origin_and_array_outlives_metadata(tmp_path):
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    data, meta = mrc.read(make_mrc(tmp_path / "vol.rec", volume))
    assert meta.spacing == pytest.approx({"Z": 3.5, "Y": 2.5, "X": 1.5})
    assert meta.origin == {"Z": 30.0, "Y": -20.0, "X": 10.0}
    assert meta.extra["nstart"] == {"X": -4, "Y": 5, "Z": 6}
    del meta
    gc.collect()
    np.testing.assert_array_equal(data[2:4], volume[2:4])  # still mapped after the MrcMemmap is gone

    _, meta = mrc.read(tmp_path / "vol.rec")
    labels = np.zeros(volume.shape, np.uint8)
    labels[1, 2, 3] = 200  # uint8 labels come back as uint16 with the same values
    back, back_meta = mrc.read(mrc.write_labels(tmp_path / "labels.mrc", labels, like=meta))
    same_geometry(back_meta, meta)
    assert back.dtype == np.uint16 and np.array_equal(back, labels)


def test_single_section_is_2d(tmp_path):
    image = np.random.default_rng(0).integers(0, 100, (1, 8, 9)).astype(np.int16)
    data, meta = mrc.read(make_mrc(tmp_path / "section.mrc", image))
    assert meta.axes == "YX" and data.shape == (8, 9) and set(meta.spacing) == {"Y", "X"}
    back, back_meta = mrc.read(mrc.write_labels(tmp_path / "labels.mrc", image[0] > 50, like=meta))
    assert back_meta.axes == "YX" and back_meta.spacing == meta.spacing and np.array_equal(back, image[0] > 50)


def test_labels_from_another_format_and_without_geometry(tmp_path):
    like = ImageMeta("x.tif", "tiff", "ZYX", (2, 3, 4), "uint8", {"Z": 2.0, "Y": 1.0, "X": 0.5}, "nanometer")
    _, meta = mrc.read(mrc.write_labels(tmp_path / "nm.mrc", np.ones((2, 3, 4), int), like=like))
    assert meta.spacing == pytest.approx({"Z": 20.0, "Y": 10.0, "X": 5.0}) and meta.unit == "angstrom"
    _, meta = mrc.read(mrc.write_labels(tmp_path / "plain.mrc", np.ones((2, 3, 4), int)))
    assert meta.spacing == {"Z": 1.0, "Y": 1.0, "X": 1.0}


def test_open_labels_streams_and_commits_only_on_success(tmp_path):
    _, meta = mrc.read(make_mrc(tmp_path / "vol.mrc", np.zeros((4, 6, 5), np.float32)))
    with mrc.open_labels(tmp_path / "stream.mrc", meta, np.uint16) as out:
        assert isinstance(out, np.memmap) and out.shape == (4, 6, 5)
        for z in range(4):
            out[z] = z + 1
    back, back_meta = mrc.read(tmp_path / "stream.mrc")
    same_geometry(back_meta, meta)
    assert [int(back[z].max()) for z in range(4)] == [1, 2, 3, 4]
    assert mrcfile.validate(tmp_path / "stream.mrc")

    with pytest.raises(RuntimeError):
        with mrc.open_labels(tmp_path / "failed.mrc", meta, np.uint16) as out:
            out[0] = 7
            raise RuntimeError("segmentation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.mrc", "vol.mrc"]  # no partial or temp file

    with pytest.raises(InputError, match="already exists"):
        with mrc.open_labels(tmp_path / "stream.mrc", meta, np.uint16):
            pass
    with pytest.raises(InputError, match=r"\.tif or \.zarr"):  # uint32 ids go to float32 (mode 2): exact up to 2**24
        with mrc.open_labels(tmp_path / "big.mrc", meta, np.uint32) as out:
            out[0] = 2**24 + 1


def test_bad_labels(tmp_path):
    _, meta = mrc.read(make_mrc(tmp_path / "vol.mrc", np.zeros((2, 3, 4), np.float32)))
    with pytest.raises(InputError, match=r"\.tif or \.zarr"):
        mrc.write_labels(tmp_path / "a.mrc", np.full((2, 3, 4), 2**24 + 1), like=meta)
    with pytest.raises(InputError, match="do not fit"):
        mrc.write_labels(tmp_path / "a.mrc", np.zeros((2, 3, 5), int), like=meta)
    with pytest.raises(InputError, match="integers"):
        mrc.write_labels(tmp_path / "a.mrc", np.zeros((2, 3, 4), float), like=meta)
    with pytest.raises(InputError, match=">= 0"):
        mrc.write_labels(tmp_path / "a.mrc", -np.ones((2, 3, 4), int), like=meta)
    assert not (tmp_path / "a.mrc").exists()
    mrc.write_labels(tmp_path / "a.mrc", np.zeros((2, 3, 4), int), like=meta)
    with pytest.raises(InputError, match="already exists"):
        mrc.write_labels(tmp_path / "a.mrc", np.zeros((2, 3, 4), int), like=meta)
    mrc.write_labels(tmp_path / "a.mrc", np.zeros((2, 3, 4), int), like=meta, overwrite=True)
    with pytest.raises(InputError, match="is the input"):  # never, not even with overwrite
        mrc.write_labels(tmp_path / "vol.mrc", np.zeros((2, 3, 4), int), like=meta, overwrite=True)


@pytest.mark.parametrize("keep", [1500, 500, 0])
def test_truncated_or_corrupt_file(tmp_path, keep):
    whole = make_mrc(tmp_path / "whole.mrc", np.zeros((4, 5, 6), np.float32)).read_bytes()
    broken = tmp_path / "broken.mrc"
    broken.write_bytes(whole[:keep])
    with pytest.raises(InputError, match="not a valid MRC file.*broken.mrc|broken.mrc.*not a valid MRC file"):
        mrc.read(broken)


def test_not_mrc_and_missing(tmp_path):
    junk = tmp_path / "junk.map"
    junk.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(InputError, match="mrcfile.validate"):
        mrc.read(junk)
    with pytest.raises(InputError, match="not found"):
        mrc.read(tmp_path / "missing.mrc")
