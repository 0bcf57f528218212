"""NIfTI reading (ZYX order, scaling, affine) and label writing that keeps the geometry exactly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from biosam.errors import InputError
from biosam.io import nifti

from conftest import shared_file


def oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-30.0, 12.5, 7.0]
    return affine


def check_affine(meta, affine_ijk, shape_ijk) -> None:
    # Our affine at (z, y, x) must land where nibabel's lands at (i, j, k) = (x, y, z).
    i, j, k = (n - 1 for n in shape_ijk[:3])
    np.testing.assert_allclose(meta.affine @ [k, j, i, 1], affine_ijk @ [i, j, k, 1])


def round_trip(tmp_path, path, name="labels.nii.gz"):
    data, meta = nifti.read(path)
    labels = np.zeros(meta.labels_meta().shape, np.uint16)
    labels[(0,) * labels.ndim] = 7  # corner voxel, where a flipped axis would show
    labels[tuple(n // 2 for n in labels.shape)] = 300
    out = nifti.write_labels(tmp_path / name, labels, like=meta)
    source, written = nib.load(path), nib.load(out)
    assert np.array_equal(written.affine, source.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    for field in ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d"):
        assert np.array_equal(written.header[field], source.header[field]), field
    assert written.get_data_dtype().kind == "u" and written.header.get_slope_inter() == (None, None)
    assert np.array_equal(np.asanyarray(written.dataobj), labels.T)
    back, back_meta = nifti.read(out)
    assert np.array_equal(back, labels) and back_meta.axes == meta.axes
    assert back_meta.spacing == meta.spacing and np.array_equal(back_meta.affine, meta.affine)
    return data, meta


def test_real_anatomical(tmp_path):
    path = shared_file("nibabel_mri", "anatomical.nii")
    img = nib.load(path)
    data, meta = round_trip(tmp_path, path)
    assert isinstance(data, np.memmap)  # uncompressed, unscaled: stays on disk
    assert meta.axes == "ZYX" and data.shape == meta.shape == (25, 41, 33)
    assert meta.spacing == {"Z": 2.0, "Y": 2.0, "X": 2.0} and meta.unit == "millimeter"
    np.testing.assert_array_equal(data, img.get_fdata().T)
    check_affine(meta, img.affine, img.shape)


def test_oblique_scaled(tmp_path):
    raw = np.random.default_rng(0).integers(-100, 100, (6, 7, 5)).astype(np.int16)
    img = nib.Nifti1Image(raw, oblique_affine())
    img.header.set_slope_inter(0.5, -3.0)
    img.set_qform(oblique_affine(), code="scanner")
    path = tmp_path / "oblique.nii"
    nib.save(img, path)
    data, meta = round_trip(tmp_path, path, "labels.nii")
    loaded = nib.load(path)
    np.testing.assert_array_equal(data, np.asanyarray(loaded.dataobj).T)
    np.testing.assert_array_equal(data, loaded.get_fdata().T)
    np.testing.assert_array_equal(data, (raw * 0.5 - 3.0).T)
    assert meta.spacing == pytest.approx({"Z": 2.5, "Y": 1.1, "X": 0.8})
    check_affine(meta, oblique_affine(), raw.shape)


def test_las_gz_and_4d(tmp_path):
    affine = np.diag([-1.5, 1.0, 3.0, 1.0])
    affine[:3, 3] = [40.0, -20.0, 5.0]
    path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5), affine), path)
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    _, meta = round_trip(tmp_path, path)
    check_affine(meta, affine, (3, 4, 5))

    series = np.random.default_rng(1).random((3, 4, 5, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(series, affine), tmp_path / "4d.nii.gz")
    data, meta = round_trip(tmp_path, tmp_path / "4d.nii.gz", "labels4d.nii.gz")
    assert meta.axes == "TZYX" and data.shape == (2, 5, 4, 3)
    assert data[1, 4, 2, 0] == series[0, 2, 4, 1]


def test_2d_and_units(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 6), np.int16), np.diag([0.5, 0.25, 1, 1])), tmp_path / "flat.nii")
    data, meta = nifti.read(tmp_path / "flat.nii")
    assert meta.axes == "YX" and data.shape == (6, 4) and meta.spacing == {"Y": 0.25, "X": 0.5}

    img = nib.Nifti1Image(np.ones((2, 2, 2), np.int16), np.diag([0.2, 0.2, 0.5, 1]))
    img.header.set_xyzt_units(xyz="micron")
    nib.save(img, tmp_path / "um.nii")
    _, meta = nifti.read(tmp_path / "um.nii")
    assert meta.unit == "micrometer" and meta.spacing == pytest.approx({"Z": 0.5, "Y": 0.2, "X": 0.2})
    np.testing.assert_allclose(meta.affine @ [1, 0, 0, 1], [0, 0, 0.5e-3, 1])  # the affine is in mm


def test_labels_without_nifti_like(tmp_path):
    out = nifti.write_labels(tmp_path / "plain.nii.gz", np.ones((2, 3, 4), np.int64))
    img = nib.load(out)
    assert img.shape == (4, 3, 2) and np.array_equal(img.affine, np.eye(4)) and img.get_data_dtype() == np.uint16


def test_bad_input(tmp_path):
    path = shared_file("nibabel_mri", "anatomical.nii")
    _, meta = nifti.read(path)
    with pytest.raises(InputError, match="do not fit"):
        nifti.write_labels(tmp_path / "a.nii.gz", np.zeros((33, 41, 25), int), like=meta)
    with pytest.raises(InputError, match="is the input"):  # refused before "already exists": even --overwrite
        nifti.write_labels(path, np.zeros(meta.shape, int), like=meta)
    with pytest.raises(InputError, match="unsupported output"):
        nifti.write_labels(tmp_path / "a.nii.bz2", np.zeros(meta.shape, int), like=meta)

    whole = path.read_bytes()
    (tmp_path / "short.nii").write_bytes(whole[:30000])
    (tmp_path / "junk.nii").write_bytes(b"not a nifti file" * 40)
    nib.save(nib.load(path), tmp_path / "full.nii.gz")
    (tmp_path / "short.nii.gz").write_bytes((tmp_path / "full.nii.gz").read_bytes()[:2000])
    for name in ("short.nii", "junk.nii", "short.nii.gz"):
        with pytest.raises(InputError, match=f"{name}: cannot be read as NIfTI"):
            nifti.read(tmp_path / name)
    with pytest.raises(InputError, match="not found"):
        nifti.read(tmp_path / "missing.nii")
