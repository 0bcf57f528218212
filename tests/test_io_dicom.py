"""DICOM files and series: HU values, slice order, geometry, refusals, and labels written as NIfTI."""

from __future__ import annotations

import copy
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale
from pydicom.uid import generate_uid

from biosam.errors import InputError
from biosam.io import dicom, nifti

from conftest import shared_file

# An oblique orientation: rows run along (0.8, 0.6, 0), columns go to the feet; normal (-0.6, 0.8, 0).
ROW, COL = np.array([0.8, 0.6, 0.0]), np.array([0.0, 0.0, -1.0])
NORMAL = np.cross(ROW, COL)
FIRST = np.array([-100.0, 50.0, 20.0])
STEP = 2.5
PIXEL_SPACING = (0.5, 0.7)  # between rows, between columns


def ras(lps) -> np.ndarray:
    return np.asarray(lps, dtype=float) * [-1, -1, 1]


def world(ds, y: int, x: int) -> np.ndarray:
    """RAS position of pixel (row y, column x) of a slice, straight from its DICOM tags."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    spacing = np.array(ds.PixelSpacing, dtype=float)
    return ras(np.array(ds.ImagePositionPatient, dtype=float) + x * spacing[1] * iop[:3] + y * spacing[0] * iop[3:])


def make_series(folder, n=5, size=(40, 32), edit=None, series_uid=None, seed=0):
    """Copies of CT_small.dcm as a series of ``n`` slices under shuffled names; returns paths by slice."""
    base = pydicom.dcmread(shared_file("pydicom_ct_mr", "CT_small.dcm"))
    uid = series_uid or generate_uid()
    names = np.random.default_rng(seed).permutation(n)
    folder.mkdir(exist_ok=True)
    paths = []
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = uid
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [*ROW, *COL]
        ds.ImagePositionPatient = [round(float(v), 4) for v in FIRST + k * STEP * NORMAL]
        ds.PixelSpacing = list(PIXEL_SPACING)
        rows, cols = size
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = (base.pixel_array[:rows, :cols] + 10 * k).astype(np.int16).tobytes()
        if edit:
            edit(k, ds)
        paths.append(folder / f"IM{names[k]:04d}.dcm")
        ds.save_as(paths[-1])
    return paths


def test_real_single_files_hu():
    ct_path = shared_file("pydicom_ct_mr", "CT_small.dcm")
    ct = pydicom.dcmread(ct_path)
    data, meta = dicom.read(ct_path)
    assert meta.axes == "YX" and meta.format == "dicom" and data.dtype == np.int16 and data.shape == (128, 128)
    np.testing.assert_array_equal(data, apply_rescale(ct.pixel_array, ct))
    np.testing.assert_array_equal(data, ct.pixel_array.astype(int) * 1 - 1024)
    assert meta.spacing == pytest.approx({"Y": 0.661468, "X": 0.661468}) and meta.unit == "millimeter"
    np.testing.assert_allclose(meta.affine @ [0, 7, 11, 1], [*world(ct, 7, 11), 1])

    mr_path = shared_file("pydicom_ct_mr", "MR_small.dcm")
    mr = pydicom.dcmread(mr_path)
    data, meta = dicom.read(mr_path)
    assert "RescaleSlope" not in mr and data.dtype == mr.pixel_array.dtype
    np.testing.assert_array_equal(data, mr.pixel_array)
    assert meta.spacing == {"Y": 0.3125, "X": 0.3125}


def test_float_rescale(tmp_path):
    ds = pydicom.dcmread(shared_file("pydicom_ct_mr", "CT_small.dcm"))
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1000.25
    ds.save_as(tmp_path / "scaled.dcm")
    data, _ = dicom.read(tmp_path / "scaled.dcm")
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, apply_rescale(ds.pixel_array, ds).astype(np.float32))


def test_series_order_values_and_geometry(tmp_path):
    paths = make_series(tmp_path / "series")
    (tmp_path / "series" / "README.txt").write_text("not DICOM")  # skipped quietly
    data, meta = dicom.read(tmp_path / "series")
    assert meta.axes == "ZYX" and data.shape == meta.shape == (5, 40, 32) and data.dtype == np.int16
    assert meta.extra["files"] == [str(p) for p in paths]  # sorted by position, not by name
    assert meta.spacing == pytest.approx({"Z": STEP, "Y": 0.5, "X": 0.7}, abs=1e-3)
    base = pydicom.dcmread(shared_file("pydicom_ct_mr", "CT_small.dcm"))
    for k in range(5):
        np.testing.assert_array_equal(data[k], base.pixel_array[:40, :32] + 10 * k - 1024)
        ds = pydicom.dcmread(paths[k])
        np.testing.assert_allclose(meta.affine @ [k, 39, 31, 1], [*world(ds, 39, 31), 1], atol=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nicom warns that it is experimental
            from nibabel.nicom import dicomwrappers

            lps = dicomwrappers.wrapper_from_data(ds).affine @ [39, 31, 0, 1]  # nicom indexes (row, column)
        np.testing.assert_allclose(meta.affine @ [k, 39, 31, 1], [*ras(lps[:3]), 1], atol=1e-3)


def test_series_labels_to_nifti_align(tmp_path):
    paths = make_series(tmp_path / "series")
    _, meta = dicom.read(tmp_path / "series")
    labels = np.zeros(meta.shape, np.uint8)
    labels[3, 10, 20] = 5
    labels[0, 0, 0] = 1
    with pytest.raises(InputError, match=r"\.nii\.gz"):
        dicom.write_labels(tmp_path / "seg.dcm", labels, like=meta)
    out = nifti.write_labels(tmp_path / "seg.nii.gz", labels, like=meta)

    img = nib.load(out)
    assert img.shape == (32, 40, 5) and int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.header.get_qform(), img.affine, atol=1e-4)  # both forms agree
    volume = np.asanyarray(img.dataobj)
    for value, k, y, x in ((5, 3, 10, 20), (1, 0, 0, 0)):
        (i, j, kk), = np.argwhere(volume == value)
        assert (i, j, kk) == (x, y, k)
        np.testing.assert_allclose(img.affine @ [i, j, kk, 1], [*world(pydicom.dcmread(paths[k]), y, x), 1], atol=1e-3)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(nifti.swap_ijk(meta.affine))

    back, back_meta = nifti.read(out)
    assert np.array_equal(back, labels)
    np.testing.assert_allclose(back_meta.affine, meta.affine, atol=1e-4)


def test_single_file_labels_to_nifti(tmp_path):
    path = shared_file("pydicom_ct_mr", "CT_small.dcm")
    _, meta = dicom.read(path)
    labels = np.zeros(meta.shape, np.uint8)
    labels[5, 9] = 1
    img = nib.load(nifti.write_labels(tmp_path / "seg.nii.gz", labels, like=meta))
    (i, j), = np.argwhere(np.asanyarray(img.dataobj) == 1)
    np.testing.assert_allclose(img.affine @ [i, j, 0, 1], [*world(pydicom.dcmread(path), 5, 9), 1], atol=1e-4)


def test_several_series(tmp_path):
    folder = tmp_path / "mixed"
    make_series(folder, n=3, series_uid="1.2.3.4", seed=1)
    for path in folder.iterdir():
        path.rename(folder / f"a_{path.name}")
    make_series(folder, n=4, series_uid="1.2.3.5", seed=2)
    with pytest.raises(InputError, match=r"2 DICOM series.*series_uid=") as error:
        dicom.read(folder)
    assert "1.2.3.4 (3 files" in str(error.value) and "1.2.3.5 (4 files" in str(error.value)
    data, meta = dicom.read(folder, series_uid="1.2.3.5")
    assert data.shape[0] == 4 and meta.extra["series_uid"] == "1.2.3.5"
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 9.9"):
        dicom.read(folder, series_uid="9.9")


def _resize(k, ds):
    if k == 2:
        ds.Rows, ds.Columns = 30, 32
        ds.PixelData = np.zeros((30, 32), np.int16).tobytes()


def _rotate(k, ds):
    if k == 2:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]


def _duplicate(k, ds):
    if k == 2:
        ds.ImagePositionPatient = [round(float(v), 4) for v in FIRST + 3 * STEP * NORMAL]


def _gap(k, ds):
    if k >= 3:  # slice 3 is missing: 2 -> 4
        ds.ImagePositionPatient = [round(float(v), 4) for v in FIRST + (k + 1) * STEP * NORMAL]


@pytest.mark.parametrize(
    ("edit", "message"),
    [(_resize, "30x32 pixels"), (_rotate, "oriented differently"), (_duplicate, "same position"),
     (_gap, "not evenly spaced")],
)
def test_inconsistent_series(tmp_path, edit, message):
    paths = make_series(tmp_path / "bad", edit=edit)
    with pytest.raises(InputError, match=message) as error:
        dicom.read(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(error.value) and paths[2].name in str(error.value)
    if edit is _gap:
        assert paths[3].name in str(error.value)


def test_corrupt_slice(tmp_path):
    paths = make_series(tmp_path / "bad")
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: int(len(whole) * 0.7)])
    with pytest.raises(InputError, match=f"cannot decode the pixels of {paths[1].name}"):
        dicom.read(tmp_path / "bad")


def test_empty_missing_and_not_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM images"):
        dicom.read(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM images"):
        dicom.read(tmp_path / "empty")
    with pytest.raises(InputError, match="not a DICOM file"):
        dicom.read(tmp_path / "empty" / "notes.txt")
    with pytest.raises(InputError, match="not found"):
        dicom.read(tmp_path / "missing")
