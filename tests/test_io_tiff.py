"""TIFF reading and writing with axes and voxel size (tifffile), and the format dispatcher."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from biosam.errors import InputError
from biosam.io import format_of, read_image, read_plane, write_labels
from biosam.io.meta import ImageMeta

from conftest import shared_file


def test_imagej_cryoet_subtomogram_round_trip(tmp_path):
    """Real ImageJ hyperstack (cryo-ET microtubule, 1.052 nm voxels): geometry survives read -> write -> read."""
    data, meta = read_image(shared_file("cryoet_microtubule_subtomo_cylindra", "13pf_MT.tif"))
    assert isinstance(data, np.memmap)  # uncompressed: mapped, not loaded
    assert meta.format == "imagej-tiff" and meta.axes == "ZYX" and meta.shape == (36, 206, 94)
    assert meta.unit == "nanometer"
    assert meta.spacing["Z"] == pytest.approx(1.052) and meta.spacing["X"] == pytest.approx(1.052, rel=1e-6)
    labels = (np.asarray(data) > 150).astype(np.uint16) * 3
    out = write_labels(tmp_path / "labels.tif", labels, like=meta)
    back, back_meta = read_image(out)
    np.testing.assert_array_equal(back, labels)
    assert back.dtype == np.uint16  # labels are never 8-bit (biosam.labels.label_dtype)
    assert (back_meta.axes, back_meta.unit) == ("ZYX", "nanometer")
    assert back_meta.spacing == pytest.approx(meta.spacing, rel=1e-6)


def test_ome_tiff_channels_and_spacing(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 4000, (2, 3, 40, 50), dtype=np.uint16)
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, image, ome=True, metadata={
        "axes": "CZYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65, "PhysicalSizeZ": 2.0,
        "Channel": {"Name": ["DAPI", "GFP"]},
    })
    data, meta = read_image(path)
    assert meta.format == "ome-tiff" and meta.axes == "CZYX" and meta.channel_names == ["DAPI", "GFP"]
    assert meta.spacing == {"X": 0.65, "Y": 0.65, "Z": 2.0} and meta.unit == "micrometer"
    np.testing.assert_array_equal(read_plane(data, meta, z=1, channel=1), image[1, 1])
    assert read_plane(data, meta, z=2).shape == (40, 50, 2)  # channels last, for the composite
    labels = np.zeros(meta.labels_meta().shape, dtype=np.int32)
    labels[1, 10:20, 5:15] = 7
    out = write_labels(tmp_path / "labels.ome.tif", labels, like=meta)
    back, back_meta = read_image(out)
    assert back_meta.axes == "ZYX" and back_meta.spacing == meta.spacing
    np.testing.assert_array_equal(back, labels)


def test_plain_stacks_rgb_bigtiff_and_axes_override(tmp_path):
    slices = np.stack([iio.imread(shared_file("isbi2012_em_membranes", "images", f"{i}.png")) for i in range(3)])
    tifffile.imwrite(tmp_path / "stack.tif", slices, photometric="minisblack")
    data, meta = read_image(tmp_path / "stack.tif")
    assert meta.axes == "ZYX" and meta.spacing == {}
    np.testing.assert_array_equal(read_plane(data, meta, z=2), slices[2])

    tifffile.imwrite(tmp_path / "big.tif", slices, bigtiff=True, compression="zlib", photometric="minisblack")
    data, meta = read_image(tmp_path / "big.tif")
    assert not isinstance(data, np.memmap) and meta.shape == slices.shape

    rgb = iio.imread(shared_file("skimage_bundled", "ihc.png"))
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    assert read_image(tmp_path / "rgb.tif")[1].axes == "YXC"

    # A 4D stack without metadata is ambiguous until the user names the axes.
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 8, 9), np.uint8), metadata={"axes": "QQYX"}, photometric="minisblack")
    with pytest.raises(InputError, match="--axes"):
        read_image(tmp_path / "4d.tif")
    assert read_image(tmp_path / "4d.tif", axes="tzyx")[1].axes == "TZYX"
    with pytest.raises(InputError, match="3 letters"):
        read_image(tmp_path / "4d.tif", axes="ZYX")


def test_bad_files_and_outputs(tmp_path):
    good = shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="broken.tif: the TIFF file is damaged or truncated"):
        read_image(broken)
    with pytest.raises(InputError, match="missing.tif: file not found"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file type '.txt'"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="do not apply to TIFF"):
        read_image(good, level=1)

    meta = ImageMeta("v.tif", "tiff", "ZYX", (3, 8, 8), "<u2")
    labels = np.ones((3, 8, 8), np.uint8)
    with pytest.raises(InputError, match="PNG holds 2D labels"):
        write_labels(tmp_path / "out.png", labels, like=meta)
    with pytest.raises(InputError, match="does not write DICOM"):
        write_labels(tmp_path / "out.dcm", labels, like=meta)
    with pytest.raises(InputError, match="do not fit"):
        write_labels(tmp_path / "out.tif", labels[:2], like=meta)
    write_labels(tmp_path / "out.tif", labels, like=meta)
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        write_labels(tmp_path / "out.tif", labels * 2, like=meta)
    write_labels(tmp_path / "out.tif", labels * 2, like=meta, overwrite=True)
    assert read_image(tmp_path / "out.tif")[0].max() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.tif", "notes.txt", "out.tif"]  # no temp files


def test_format_of_recognises_folders_and_addresses(tmp_path):
    assert format_of("scan.nii.gz") == "nifti" and format_of("tomo.rec") == "mrc" and format_of("a.ome.zarr") == "zarr"
    assert format_of("copick:///data/config.json?run=TS_1") == "copick"
    (tmp_path / "series").mkdir()
    assert format_of(tmp_path / "series") == "dicom"
    (tmp_path / "plain.store").mkdir()
    (tmp_path / "plain.store" / "zarr.json").write_text("{}")
    assert format_of(tmp_path / "plain.store") == "zarr"
    assert format_of(shared_file("pydicom_ct_mr", "CT_small.dcm")) == "dicom"


def test_angstrom_spacing_written_to_imagej_tiff_as_nm(tmp_path):
    """ImageJ metadata is ASCII: labels of an MRC tomogram (spacing in Å) are written with their spacing in nm."""
    import mrcfile

    from biosam.io import read_image, write_labels

    with mrcfile.new(tmp_path / "tomo.mrc") as mrc:
        mrc.set_data(np.zeros((4, 32, 32), np.float32))
        mrc.voxel_size = 12.0
    _, meta = read_image(tmp_path / "tomo.mrc")
    labels = np.zeros((4, 32, 32), np.uint16)
    labels[1, 3:9, 3:9] = 1
    write_labels(tmp_path / "labels.tif", labels, like=meta)
    data, back = read_image(tmp_path / "labels.tif")
    assert np.array_equal(np.asarray(data), labels)
    assert back.unit == "nanometer"
    assert back.spacing == pytest.approx({"Z": 1.2, "Y": 1.2, "X": 1.2})
