"""`biosam segment` on volumes in every format: geometry kept, labels on the right voxels, refusals.

Inputs are the real volumes in ../shared/data (StarDist 3D nuclei, ISBI2012 EM sections, the nibabel
MRI, pydicom's CT slice as a series, an EMDB map, a cryo-ET tomogram in a copick project).
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import mrcfile
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from click.testing import CliRunner
from skimage.measure import label as connected_components

from biosam.cli.main import main
from biosam.evaluate import boxes_from_labels, mask_iou
from biosam.io import read_image
from biosam.io.copick_project import import_copick

from conftest import make_copick_project, shared_file
from test_io_dicom import make_series, world


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def box_text(box) -> str:
    return ",".join(str(int(v)) for v in box)


@pytest.fixture(scope="module")
def nuclei3d(tmp_path_factory):
    """StarDist's 3D nuclei as an ImageJ hyperstack with anisotropic spacing, and two prompts on different slices."""
    folder = tmp_path_factory.mktemp("nuclei3d")
    image = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "img3d.tif"))
    truth = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "mask3d.tif"))
    path = folder / "nuclei.tif"
    tifffile.imwrite(path, image, imagej=True, resolution=(1 / 0.5, 1 / 0.5), metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"})
    objects = []
    for z, object_id in ((10, 59), (20, 81)):
        boxes, ids = boxes_from_labels(truth[z])
        objects.append({"box": boxes[list(ids).index(object_id)].tolist(), "z": z, "id": object_id})
    prompts = folder / "prompts.json"
    prompts.write_text(json.dumps([{"box": o["box"], "z": o["z"]} for o in objects]))
    return path, truth, objects, prompts


@pytest.fixture(scope="module")
def nuclei3d_result(nuclei3d):
    """``biosam segment`` of the two prompts into an ImageJ TIFF: output path and the JSON report."""
    path, _, _, prompts = nuclei3d
    out = path.parent / "labels.tif"
    res = run("segment", path, "--prompts", prompts, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_objects_on_their_own_slices(nuclei3d, nuclei3d_result):
    path, truth, objects, prompts = nuclei3d
    out, report = nuclei3d_result
    assert [o["z"] for o in report["objects"]] == [10, 20]
    assert report["input"]["spacing"] == {"z": 2.0, "y": 0.5, "x": 0.5} and report["intensity"] == "percentile"

    labels, meta = read_image(out)
    assert labels.shape == truth.shape and meta.axes == "ZYX"
    assert meta.spacing == {"Z": 2.0, "Y": 0.5, "X": 0.5} and meta.unit == "micrometer"
    for k, o in enumerate(objects, start=1):
        # Synthetic, touching, low-contrast nuclei: LiteMedSAM reaches IoU 0.5-0.65 on these two
        # (0.48 mean over slice 10); what matters here is that each label sits on its own nucleus.
        under = truth[o["z"]][labels[o["z"]] == k]
        assert np.bincount(under).argmax() == o["id"]
        assert mask_iou(labels[o["z"]] == k, truth[o["z"]] == o["id"]) > 0.45
    others = np.delete(labels, [10, 20], axis=0)
    assert not others.any(), "labels written on slices that had no prompt"


@pytest.mark.parametrize("suffix", [".mrc", ".nii.gz", ".ome.zarr", ".ome.tif"])
def test_every_output_format_holds_the_same_labels(nuclei3d, nuclei3d_result, suffix, tmp_path):
    path, truth, objects, prompts = nuclei3d
    reference = nuclei3d_result[0]
    out = tmp_path / f"labels{suffix}"
    res = run("segment", path, "--prompts", prompts, "-o", out)
    assert res.exit_code == 0, res.output
    labels, meta = read_image(out)
    np.testing.assert_array_equal(np.asarray(labels[:]), tifffile.imread(reference))
    assert meta.spacing == pytest.approx({"Z": 2.0, "Y": 0.5, "X": 0.5}, rel=1e-6) or suffix == ".mrc"
    if suffix == ".mrc":  # MRC stores angstrom
        assert meta.unit == "angstrom" and meta.spacing == pytest.approx({"Z": 2e4, "Y": 5e3, "X": 5e3}, rel=1e-6)


def test_isbi_em_stack_to_ome_zarr_labels_inside_the_image(tmp_path):
    """ISBI2012 serial sections as an OME-Zarr; a cell on slice 15 segmented into the image's labels group."""
    folder = shared_file("isbi2012_em_membranes", "images")
    stack = np.stack([iio.imread(folder / f"{k}.png") for k in range(30)])
    cells = connected_components(iio.imread(folder.parent / "labels" / "15.png") > 0)
    boxes, ids = boxes_from_labels(cells)
    areas = np.array([(cells == i).sum() for i in ids])
    chosen = ids[np.argsort(areas)[len(areas) // 2]]  # a typical, mid-sized cell
    box = boxes[list(ids).index(chosen)]

    image = tmp_path / "isbi.ome.zarr"
    from biosam.io import zarr_store

    zarr_store.write_labels(image, stack, like=None)  # an OME-Zarr image of the stack (uint8, ZYX)
    res = run("segment", image, "--z", 15, "--box", box_text(box), "-o", image / "labels" / "cell")
    assert res.exit_code == 0, res.output
    labels, meta = read_image(image / "labels" / "cell")
    assert labels.shape == stack.shape and meta.axes == "ZYX"
    assert mask_iou(np.asarray(labels[15]) == 1, cells == chosen) > 0.8
    assert int(np.asarray(labels[:]).astype(bool).sum()) == int((np.asarray(labels[15]) == 1).sum())


def test_nifti_output_has_the_input_affine_and_voxels(tmp_path):
    """The nibabel MRI (RAS with a flipped x axis): labels land on the voxels that were segmented."""
    path = shared_file("nibabel_mri", "anatomical.nii")
    src = nib.load(path)
    data, meta = read_image(path)
    assert data.shape == src.shape[::-1]
    out = tmp_path / "brain.nii.gz"
    res = run("segment", path, "--z", 12, "--box", "4,4,28,36", "-o", out)
    assert res.exit_code == 0, res.output
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, src.affine)
    assert written.shape == src.shape and nib.aff2axcodes(written.affine) == nib.aff2axcodes(src.affine)
    mask = np.asarray(written.dataobj) > 0
    assert mask.any() and not np.delete(mask, 12, axis=2).any()  # nibabel's k axis is our Z
    # The intensities under the labels, read by nibabel alone, are those of the pixels we segmented.
    ours = np.asarray(read_image(out)[0][12]) > 0
    np.testing.assert_array_equal(np.sort(src.get_fdata()[mask]), np.sort(np.asarray(data[12])[ours].astype(float)))


def test_dicom_series_to_nifti_in_world_coordinates(tmp_path):
    """A 5-slice oblique CT series (pydicom's CT slice, repositioned): the label voxel is at the DICOM pixel's position."""
    paths = make_series(tmp_path / "series", n=5, size=(128, 128))
    out = tmp_path / "ct.nii.gz"
    res = run("segment", tmp_path / "series", "--z", 3, "--box", "30,30,100,100", "--intensity", "ct-soft-tissue",
              "-o", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["intensity"] == "ct-soft-tissue"
    labels, meta = read_image(out)
    plane = np.asarray(labels[3]) > 0
    assert plane.any() and np.asarray(labels[:]).astype(bool).sum() == plane.sum()
    ys, xs = np.nonzero(plane)
    y, x = int(np.median(ys)), int(np.median(xs))
    if not plane[y, x]:
        y, x = int(ys[0]), int(xs[0])
    ds = pydicom.dcmread(paths[3])
    written = nib.load(out)
    ijk = np.linalg.solve(written.affine, [*world(ds, y, x), 1.0])[:3]
    assert np.asarray(written.dataobj)[tuple(np.round(ijk).astype(int))] == 1
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)


def test_mrc_map_keeps_voxel_size_and_origin(tmp_path):
    path = shared_file("mrcfile_emdb_maps", "EMD-3197.map")
    out = tmp_path / "labels.mrc"
    res = run("segment", path, "--z", 10, "--box", "3,3,16,16", "-o", out)
    assert res.exit_code == 0, res.output
    with mrcfile.open(out) as m, mrcfile.open(path) as ref:
        assert m.voxel_size == ref.voxel_size and m.header.origin == ref.header.origin
        assert (m.header.nxstart, m.header.nystart, m.header.nzstart) == (
            ref.header.nxstart, ref.header.nystart, ref.header.nzstart)
        assert m.data.shape == ref.data.shape and m.data[10].any() and not np.delete(m.data, 10, axis=0).any()


def test_copick_tomogram_in_segmentation_out(tmp_path):
    """A cryo-ET tomogram read from a copick run; the segmentation lands in the project's overlay."""
    config, tomogram = make_copick_project(tmp_path)
    source = f"copick://{config}?run=TS_001&voxel_spacing=10&tomo_type=wbp"
    target = f"copick://{config}?run=TS_001&voxel_spacing=10&name=membrane&user_id=biosam&session_id=1"
    mrc_out = tmp_path / "same.mrc"
    box = "20,40,75,170"
    for output in (target, mrc_out):
        res = run("segment", source, "--z", 18, "--box", box, "-o", output)
        assert res.exit_code == 0, res.output
    run_ = import_copick().from_file(str(config)).get_run("TS_001")
    (seg,) = run_.get_segmentations(name="membrane", user_id="biosam", session_id="1")
    import zarr

    stored = zarr.open_group(seg.zarr(), mode="r")["0"][:]
    assert stored.shape == tomogram.shape and stored[18].any() and not np.delete(stored, 18, axis=0).any()
    np.testing.assert_array_equal(stored > 0, mrcfile.read(mrc_out) > 0)
    with mrcfile.open(mrc_out) as m:
        assert m.voxel_size.x == pytest.approx(10.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--box", "3,3,16,16"], "--z"),  # a volume without a slice
        (["--z", "40", "--box", "3,3,16,16"], "40"),  # a slice that is not there
        (["--axes", "YX", "--z", "1", "--box", "3,3,16,16"], "axes"),  # axes do not apply to MRC
    ],
)
def test_bad_volume_requests_leave_no_output(tmp_path, args, message):
    out = tmp_path / "labels.mrc"
    res = run("segment", shared_file("mrcfile_emdb_maps", "EMD-3197.map"), *args, "-o", out)
    assert res.exit_code != 0 and message in res.output and "EMD-3197.map" in res.output
    assert list(tmp_path.iterdir()) == []


def test_bad_files_and_projects(tmp_path):
    junk = tmp_path / "broken.mrc"
    junk.write_bytes(b"not an mrc header" * 10)
    res = run("segment", junk, "--z", 0, "--box", "1,1,5,5", "-o", tmp_path / "a.tif")
    assert res.exit_code != 0 and "broken.mrc" in res.output

    res = run("segment", tmp_path / "scan.xyz", "--box", "1,1,5,5", "-o", tmp_path / "a.tif")
    assert res.exit_code != 0 and "scan.xyz" in res.output

    res = run("segment", shared_file("pydicom_ct_mr", "CT_small.dcm"), "--box", "1,1,5,5", "-o", tmp_path / "a.dcm")
    assert res.exit_code != 0 and ".nii.gz" in res.output

    (tmp_path / "project").mkdir()
    config, _ = make_copick_project(tmp_path / "project")
    res = run("segment", f"copick://{config}?run=TS_404", "--z", 1, "--box", "1,1,5,5", "-o", tmp_path / "a.mrc")
    assert res.exit_code != 0 and "TS_404" in res.output

    png = tmp_path / "flat.png"
    iio.imwrite(png, np.zeros((32, 32), np.uint8))
    (tmp_path / "p.json").write_text(json.dumps([{"box": [1, 1, 5, 5], "z": 3}]))
    res = run("segment", png, "--prompts", tmp_path / "p.json", "-o", tmp_path / "a.png")
    assert res.exit_code != 0 and "flat.png" in res.output and "z" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mrc", "flat.png", "p.json", "project"]


def test_dicom_folder_with_two_series(tmp_path):
    folder = tmp_path / "mixed"
    make_series(folder, n=3, size=(64, 64), series_uid="1.2.3.4", seed=1)
    for path in folder.iterdir():
        path.rename(folder / f"a_{path.name}")
    make_series(folder, n=4, size=(64, 64), series_uid="1.2.3.5", seed=2)
    out = tmp_path / "ct.nii.gz"
    res = run("segment", folder, "--z", 1, "--box", "10,10,50,50", "-o", out)
    assert res.exit_code != 0 and "--series" in res.output and not out.exists()
    res = run("segment", folder, "--series", "1.2.3.5", "--z", 1, "--box", "10,10,50,50", "-o", out)
    assert res.exit_code == 0, res.output
    assert nib.load(out).shape[2] == 4
