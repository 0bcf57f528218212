"""Compressed and tiled TIFF: every codec reads back, big files read lazily, errors say which problem it is."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import zipfile

import imagecodecs
import numpy as np
import pytest
import tifffile

from biosam.errors import InputError
from biosam.io import open_labels, read_image, read_plane, tiff, write_labels
from biosam.io.meta import ImageMeta

from conftest import shared_file

# name -> (the compression tag, tifffile.imwrite options); JPEG is lossy and compared with a tolerance.
C = tifffile.COMPRESSION
CODECS = {
    "lzw": (C.LZW, {"compression": "lzw"}),
    "lzw+predictor": (C.LZW, {"compression": "lzw", "predictor": True}),
    "deflate (adobe)": (C.ADOBE_DEFLATE, {"compression": "zlib"}),
    "deflate (old)": (C.DEFLATE, {"compression": C.DEFLATE}),
    "zstd": (C.ZSTD, {"compression": "zstd"}),
    "jpeg": (C.JPEG, {"compression": "jpeg"}),
    "packbits": (C.PACKBITS, {"compression": "packbits"}),
    "lzma": (C.LZMA, {"compression": "lzma"}),
    "tiled zlib": (C.ADOBE_DEFLATE, {"compression": "zlib", "tile": (64, 64)}),
    "bigtiff tiled zstd": (C.ZSTD, {"compression": "zstd", "tile": (64, 64), "bigtiff": True}),
}


@pytest.fixture(scope="module")
def nuclei_2d() -> np.ndarray:
    """Real fluorescence nuclei (DSB2018), 512x512; values 0-235, so uint8 holds them exactly (JPEG needs 8 bit)."""
    image = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))
    assert image.max() <= 255
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def cryo_3d() -> np.ndarray:
    """Real cryo-ET subtomogram, 36 x 206 x 94 uint8."""
    return tifffile.imread(shared_file("cryoet_microtubule_subtomo_cylindra", "13pf_MT.tif"))


def _open_fds(path) -> int:
    """How many of this process's file descriptors point at ``path`` (deleted or not)."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += link in (target, f"{target} (deleted)")
    return count


@pytest.mark.parametrize("codec", list(CODECS))
def test_each_compression_reads_back(tmp_path, nuclei_2d, cryo_3d, codec):
    code, options = CODECS[codec]
    atol = 8 if codec == "jpeg" else 0
    for name, image in (("2d", nuclei_2d), ("3d", cryo_3d)):
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, image, photometric="minisblack", **options)
        with tifffile.TiffFile(path) as tif:  # the file really is what the case says
            page = tif.pages.first
            assert page.compression == code
            assert page.is_tiled == ("tile" in options) and tif.is_bigtiff == ("bigtiff" in options)
        data, meta = read_image(path)
        assert meta.axes == ("YX" if name == "2d" else "ZYX") and meta.shape == image.shape
        back = np.asarray(data)
        assert back.dtype == image.dtype
        if atol:
            assert np.abs(back.astype(int) - image).mean() < 2 and np.abs(back.astype(int) - image).max() <= 64
        else:
            np.testing.assert_array_equal(back, image)
        if name == "3d":
            plane = read_plane(data, meta, z=20)
            np.testing.assert_allclose(plane, image[20], atol=64 if atol else 0)


def test_tiled_compressed_bigtiff_reads_plane_by_plane(tmp_path, monkeypatch):
    """A 65 MB stack (above EAGER_BYTES) comes back lazy; one plane costs one plane of memory, not the stack."""
    import tracemalloc

    image = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))
    stack = np.stack([np.roll(image, 3 * z, axis=1) for z in range(130)])  # distinct real planes
    assert stack.nbytes > tiff.EAGER_BYTES
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stack, bigtiff=True, tile=(128, 128), compression="zstd")

    decoded: list[int] = []

    def counting_zstd(data, *args, **kwargs):
        decoded.append(len(data))
        return imagecodecs.zstd_decode(data, *args, **kwargs)

    # Count the tile decodes tifffile makes (it looks its decoders up in this table).
    monkeypatch.setattr(tifffile.TIFF, "DECOMPRESSORS", {tifffile.COMPRESSION.ZSTD: counting_zstd})
    tracemalloc.start()
    try:
        data, meta = read_image(path)
        assert len(decoded) == 1  # one tile is decoded at open time, to check the codec and the file's start
        plane = read_plane(data, meta, z=77)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(data, tiff.LazyTiff) and not isinstance(data, np.ndarray)
    assert meta.axes == "ZYX" and meta.shape == stack.shape
    np.testing.assert_array_equal(plane, stack[77])
    tiles_per_page = 16  # 512 / 128 squared
    assert len(decoded) == 1 + tiles_per_page  # plane 77's tiles only, not the 2080 of the stack
    assert peak < 4 * stack[0].nbytes, f"reading one plane took {peak / 2**20:.1f} MiB"
    decoded.clear()
    np.testing.assert_array_equal(data[5:8, 100:300:7, -50:], stack[5:8, 100:300:7, -50:])
    assert len(decoded) == 3 * 3  # 3 planes x the 3 tiles (rows 0-383 of the last column) the crop touches


def test_lazy_indexing_matches_numpy(tmp_path, monkeypatch, cryo_3d):
    monkeypatch.setattr(tiff, "EAGER_BYTES", 0)  # read this small real stack the way big ones are read
    image = cryo_3d.reshape(2, 18, *cryo_3d.shape[1:])
    path = tmp_path / "czyx.ome.tif"
    tifffile.imwrite(path, image, ome=True, compression="zlib", metadata={
        "axes": "CZYX", "PhysicalSizeX": 1.052, "PhysicalSizeY": 1.052, "PhysicalSizeZ": 1.052, "PhysicalSizeXUnit": "nm",
        "PhysicalSizeYUnit": "nm", "PhysicalSizeZUnit": "nm", "Channel": {"Name": ["a", "b"]}})
    data, meta = read_image(path)
    assert isinstance(data, tiff.LazyTiff) and data.shape == image.shape and data.dtype == image.dtype
    assert meta.axes == "CZYX" and meta.channel_names == ["a", "b"] and meta.unit == "nanometer"
    assert meta.spacing == pytest.approx({"X": 1.052, "Y": 1.052, "Z": 1.052})
    for key in [1, -1, (0, 17), (1, 3, 10), (slice(None), 3), (Ellipsis, 5), (0, slice(2, 9, 3), slice(10, 20)),
                (1, -2, slice(None), slice(1, None, 4)), (slice(1, 1),), np.int64(1)]:
        np.testing.assert_array_equal(data[key], image[key], err_msg=str(key))
    np.testing.assert_array_equal(read_plane(data, meta, z=4, channel=1), image[1, 4])
    np.testing.assert_array_equal(read_plane(data, meta, z=4), np.moveaxis(image[:, 4], 0, -1))
    np.testing.assert_array_equal(np.asarray(data), image)
    plane = data[0, 0]
    plane[:] = 0  # what a caller gets is its own copy
    assert data[0, 0].any()
    with pytest.raises(IndexError):
        data[2]
    np.testing.assert_array_equal(data[[0, 1], 3], image[[0, 1], 3])  # Zarr's indexing, beyond basic slicing


def test_file_is_closed_when_released_and_can_be_replaced(tmp_path, monkeypatch, cryo_3d):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, cryo_3d, compression="lzw")
    data, _ = read_image(path)  # small: decoded at once, the file is closed already
    assert isinstance(data, np.ndarray) and _open_fds(path) == 0

    monkeypatch.setattr(tiff, "EAGER_BYTES", 0)
    data, _ = read_image(path)
    assert isinstance(data, tiff.LazyTiff) and _open_fds(path) == 1  # open while the lazy array lives
    del data
    gc.collect()
    assert _open_fds(path) == 0
    with read_image(path)[0] as data:
        data[3]
    assert _open_fds(path) == 0
    with pytest.raises(ValueError, match="closed"):
        data[3]

    path.unlink()  # gone and written anew: the next read sees the new file
    tifffile.imwrite(path, cryo_3d[::-1], compression="zstd")
    data, _ = read_image(path)
    np.testing.assert_array_equal(data[0], cryo_3d[-1])
    del data
    gc.collect()
    assert _open_fds(path) == 0


def test_missing_codec_is_named_with_the_fix(tmp_path, nuclei_2d):
    lzw, zlib = tmp_path / "t01.tif", tmp_path / "zlib.tif"
    tifffile.imwrite(lzw, nuclei_2d, compression="lzw")
    tifffile.imwrite(zlib, nuclei_2d, compression="zlib")
    script = (
        "import sys; sys.modules['imagecodecs'] = None  # as if it were not installed\n"
        "from biosam.io import read_image\n"
        "from biosam.errors import InputError\n"
        f"print('zlib', read_image({str(zlib)!r})[0].shape)  # zlib needs no imagecodecs\n"
        f"try:\n    read_image({str(lzw)!r})\nexcept InputError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "zlib (512, 512)" in out.stdout
    message = out.stdout.splitlines()[-1]
    assert str(lzw) in message and "LZW" in message and "pip install imagecodecs" in message
    assert "damaged" not in message and "re-export" not in message and "not a TIFF" not in message


def test_damaged_and_truncated_files_are_called_so(tmp_path, monkeypatch, cryo_3d):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, cryo_3d, compression="lzw")
    raw = good.read_bytes()
    for fraction in (0.001, 0.3, 0.7, 0.99):
        cut = tmp_path / f"cut{fraction}.tif"
        cut.write_bytes(raw[: int(len(raw) * fraction)])
        with pytest.raises(InputError) as info:
            read_image(cut)
        message = str(info.value)
        assert str(cut) in message and "damaged or truncated" in message and "Copy it again" in message, message
        assert "imagecodecs" not in message
        assert _open_fds(cut) == 0

    # Damage inside one page of a lazily read file shows when that plane is read, with the same kind of message.
    monkeypatch.setattr(tiff, "EAGER_BYTES", 0)
    bad = tmp_path / "bad.tif"
    tifffile.imwrite(bad, cryo_3d, compression="zlib")
    with tifffile.TiffFile(bad) as tif:
        offset = tif.pages[20].dataoffsets[0]
    with open(bad, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff" * 64)
    data, meta = read_image(bad)
    np.testing.assert_array_equal(data[19], cryo_3d[19])
    with pytest.raises(InputError, match=r"bad.tif: the TIFF file is damaged or truncated \(the pixels at .*20.* cannot be decoded"):
        read_plane(data, meta, z=20)


def test_png_or_jpeg_named_tif_is_read_by_its_content(tmp_path, caplog):
    """A PNG or JPEG export renamed .tif is what the user meant: read it, and say once what it really is."""
    for source, name, fmt in ((shared_file("skimage_bundled", "cell.png"), "png.tif", "png"),
                              (shared_file("stardist_he_histology", "histo.jpg"), "jpeg.tiff", "jpeg")):
        renamed = tmp_path / name
        renamed.write_bytes(source.read_bytes())
        caplog.clear()
        with caplog.at_level("WARNING", logger="biosam.io.tiff"):
            data, meta = read_image(renamed)
        expected, expected_meta = read_image(source)
        np.testing.assert_array_equal(data, expected)
        assert meta.format == fmt == expected_meta.format and meta.axes == expected_meta.axes
        assert meta.path == str(renamed)
        assert any(f"{renamed}: is a {'PNG' if fmt == 'png' else 'JPEG'} image, not a TIFF" in m
                   for m in caplog.messages), caplog.messages


def test_files_that_are_not_tiff_say_what_they_are(tmp_path):
    cases = {
        "map.ome.tif": (shared_file("mrcfile_emdb_maps", "EMD-3197.map").read_bytes()[:4096], "an MRC volume",
                        "Rename it to map.mrc"),
        "dicom.tif": (shared_file("pydicom_ct_mr", "CT_small.dcm").read_bytes(), "a DICOM file", "dicom.dcm"),
        "page.tif": (b"<!DOCTYPE html>\n<html><body>Not found</body></html>", "an HTML page", "download"),
        "text.tif": (b"hello, this is not an image", "is not a TIFF file (it starts with", "Check that this is"),
        "empty.tif": (b"", "is empty (0 bytes)", "Copy it again"),
    }
    with zipfile.ZipFile(tmp_path / "zipped.tif", "w") as archive:
        archive.writestr("t01.tif", b"II*\x00")
    cases["zipped.tif"] = (None, "a zip archive", "unzip it")
    for name, (content, *needles) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError) as info:
            read_image(tmp_path / name)
        message = str(info.value)
        assert message.startswith(str(tmp_path / name)), message
        for needle in needles:
            assert needle in message, message
        assert "damaged" not in message and "imagecodecs" not in message


def _compression_of(path) -> int:
    with tifffile.TiffFile(path) as tif:
        return int(tif.pages.first.compression)


def test_labels_are_written_losslessly_compressed(tmp_path, cryo_3d):
    labels = (cryo_3d > 150).astype(np.uint16) * 7
    meta = ImageMeta("v.tif", "tiff", "ZYX", cryo_3d.shape, "|u1", {"X": 0.5, "Y": 0.5, "Z": 2.0}, "nanometer")
    codes = {"deflate": 8, "lzw": 5, "zstd": 50000, "none": 1, None: 1, "LZW": 5}
    for compression, code in codes.items():
        out = tmp_path / f"l_{compression}.tif"
        write_labels(out, labels, like=meta, compression=compression)
        assert _compression_of(out) == code
        back, back_meta = read_image(out)
        np.testing.assert_array_equal(back, labels)
        assert back_meta.spacing == pytest.approx(meta.spacing)
    write_labels(tmp_path / "default.ome.tif", labels, like=meta)
    assert _compression_of(tmp_path / "default.ome.tif") == 8  # Deflate unless asked otherwise
    assert (tmp_path / "l_none.tif").stat().st_size > 4 * (tmp_path / "l_deflate.tif").stat().st_size

    with open_labels(tmp_path / "opened.tif", meta, np.uint8, compression="none") as out:
        out[3] = 1
    assert _compression_of(tmp_path / "opened.tif") == 1
    with open_labels(tmp_path / "opened.mrc", meta, np.uint8) as out:  # other formats: the default is ignored
        out[3] = 1
    assert (tmp_path / "opened.mrc").exists()

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match="compression 'jpeg' is not one biosam writes.*deflate, lzw, zstd, none"):
        write_labels(tmp_path / "lossy.tif", labels, like=meta, compression="jpeg")
    with pytest.raises(InputError, match="compression 'jpeg'"):
        tiff.write_labels(tmp_path / "lossy.tif", labels, like=meta, compression="jpeg")
    for other in ("l.mrc", "l.nii.gz", "l.zarr"):
        with pytest.raises(InputError, match=f"{other}: --compression lzw applies to TIFF labels only"):
            write_labels(tmp_path / other, labels, like=meta, compression="lzw")
        with pytest.raises(InputError, match="--compression none applies to TIFF"):
            with open_labels(tmp_path / other, meta, np.uint8, compression=None):
                raise AssertionError("no work may start")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused before anything was written
