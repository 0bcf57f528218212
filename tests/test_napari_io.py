"""The napari plugin's I/O: readers keep the geometry, the labels writer keeps it and never overwrites, sample
data, the npe2 manifest, and `biosam annotate` (error paths and, headless, the success path)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import mrcfile
import nibabel as nib
import numpy as np
import pytest
import zarr

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no display in CI; set before napari loads Qt
napari = pytest.importorskip("napari", reason="napari is not installed (pip install 'biosam[napari]')")
npe2 = pytest.importorskip("npe2", reason="npe2 is not installed (pip install 'biosam[napari]')")

from click.testing import CliRunner  # noqa: E402
from napari.components import ViewerModel  # noqa: E402

from biosam.cli.main import main  # noqa: E402
from biosam.errors import InputError  # noqa: E402
from biosam.io import read_image  # noqa: E402
from biosam.io.formats import WRITE_SUFFIXES  # noqa: E402
from biosam.napari import reader, sample, writer  # noqa: E402
from biosam.napari.reader import METADATA_KEY, get_reader, read_layers  # noqa: E402

from conftest import make_copick_project, shared_file  # noqa: E402

MANIFEST = Path(reader.__file__).with_name("napari.yaml")


@pytest.fixture(scope="module", autouse=True)
def plugins():
    """napari's plugin registry with the installed plugins (a headless ViewerModel does not look for them)."""
    manager = npe2.PluginManager.instance()
    manager.discover()
    return manager


def only_layer(path, **options):
    (layer,) = read_layers(path, **options)
    return layer


def save_labels(path, labels, image_kwargs, plugin="biosam", **extra):
    """Save ``labels`` through napari's own save path (a labels layer drawn over the image layer)."""
    viewer = ViewerModel()
    layer = viewer.add_labels(labels, scale=image_kwargs.get("scale"), translate=image_kwargs.get("translate"),
                              metadata=image_kwargs.get("metadata", {}), **extra)
    return layer.save(str(path), plugin=plugin)


# ----------------------------------------------------------------------------- readers


def test_real_mrc_opens_with_its_voxel_size_memory_mapped():
    path = shared_file("mrcfile_emdb_maps", "EMD-3197.map")
    with mrcfile.open(path, permissive=True) as mrc:
        voxel = mrc.voxel_size
        origin = mrc.header.origin
        expected = mrc.data.copy()
    assert get_reader(str(path)) is read_layers
    data, kwargs, layer_type = only_layer(path)
    assert layer_type == "image" and isinstance(data, np.memmap)  # not loaded: a 2 GB tomogram stays on disk
    np.testing.assert_allclose(kwargs["scale"], [voxel.z, voxel.y, voxel.x], rtol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], [origin.z, origin.y, origin.x])
    np.testing.assert_array_equal(np.asarray(data), expected)
    info = kwargs["metadata"][METADATA_KEY]
    assert info["unit"] == "angstrom" and info["source"] == str(path) and info["axes"] == "ZYX"


def test_mrc_origin_becomes_the_translation(tmp_path):
    real = shared_file("mrcfile_emdb_maps", "EMD-3197.map")
    with mrcfile.open(real) as mrc:
        volume = mrc.data.copy()
    path = tmp_path / "shifted.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = (11.4, 12.0, 13.5)  # x, y, z
        mrc.header.origin = (100.0, 200.0, 300.0)
    _, kwargs, _ = only_layer(path)
    np.testing.assert_allclose(kwargs["scale"], [13.5, 12.0, 11.4], rtol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], [300.0, 200.0, 100.0])


@pytest.mark.parametrize("parts", [("nibabel_mri", "anatomical.nii"),
                                   ("totalseg_ct_mr_examples", "example_ct_sm.nii.gz")])
def test_real_nifti_opens_with_its_zooms(parts):
    path = shared_file(*parts)
    img = nib.load(path)
    data, kwargs, layer_type = only_layer(path)
    assert get_reader(str(path)) is read_layers and layer_type == "image"
    np.testing.assert_allclose(kwargs["scale"], img.header.get_zooms()[:3][::-1])  # (i, j, k) -> (z, y, x)
    np.testing.assert_array_equal(np.asarray(data), np.asanyarray(img.dataobj).T)
    assert kwargs["metadata"][METADATA_KEY]["unit"] == "millimeter"


def test_anisotropic_nifti_axes_are_not_mixed_up(tmp_path):
    img = nib.load(shared_file("nibabel_mri", "anatomical.nii"))
    path = tmp_path / "aniso.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([0.5, 1.25, 3.0, 1.0])), path)
    data, kwargs, _ = only_layer(path)
    assert data.shape == img.shape[::-1]
    np.testing.assert_allclose(kwargs["scale"], [3.0, 1.25, 0.5])


def test_dicom_file_has_its_pixel_spacing_and_hounsfield_units():
    import pydicom

    path = shared_file("pydicom_ct_mr", "CT_small.dcm")
    ds = pydicom.dcmread(path)
    data, kwargs, _ = only_layer(path)
    np.testing.assert_allclose(kwargs["scale"], [float(v) for v in ds.PixelSpacing])  # (row, column) = (y, x)
    np.testing.assert_allclose(np.asarray(data), ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


def test_folders_are_claimed_only_when_they_hold_dicom_or_zarr(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not an image")
    assert get_reader(str(tmp_path / "notes")) is None
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001").write_bytes(shared_file("pydicom_ct_mr", "CT_small.dcm").read_bytes())
    assert get_reader(str(series)) is read_layers
    # napari opens TIFF and PNG itself; biosam's reader is for what napari cannot place in space
    assert get_reader(str(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))) is None
    assert get_reader([str(shared_file("nibabel_mri", "anatomical.nii"))] * 2) is None  # a stack: not ours


def test_read_layers_reads_tiff_with_its_spacing_for_annotate():
    path = shared_file("cryoet_microtubule_subtomo_cylindra", "13pf_MT.tif")
    _, meta = read_image(path)
    data, kwargs, _ = only_layer(path)
    assert data.shape == (36, 206, 94)
    np.testing.assert_allclose(kwargs["scale"], [meta.spacing[a] for a in "ZYX"])
    np.testing.assert_allclose(kwargs["scale"], [1.052] * 3, rtol=1e-6)  # the MANIFEST's 1.052 nm voxels
    assert kwargs["metadata"][METADATA_KEY]["unit"] == "nanometer"


def write_ome_image(path: Path, stack: np.ndarray) -> None:
    """A 3-level OME-Zarr (NGFF 0.4) written by the ome-zarr package, not by biosam."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    levels = [stack, stack[:, ::2, ::2], stack[:, ::4, ::4]]
    transforms = [[{"type": "scale", "scale": [50.0, 4.0 * f, 4.0 * f]},
                   {"type": "translation", "translation": [100.0, 8.0 * f, 12.0 * f]}] for f in (1, 2, 4)]
    with warnings.catch_warnings():  # ome-zarr deprecates explicit transforms, the only way to give a translation
        warnings.simplefilter("ignore", DeprecationWarning)
        write_multiscale(levels, group, fmt=FormatV04(), axes=axes, coordinate_transformations=transforms,
                         storage_options={"chunks": (1, 128, 128)})


@pytest.fixture(scope="module")
def em_stack() -> np.ndarray:
    """Three real ISBI 2012 ssTEM slices, (3, 512, 512) uint8."""
    return np.stack([iio.imread(shared_file("isbi2012_em_membranes", "images", f"{i}.png")) for i in range(3)])


def test_ome_zarr_opens_all_levels_as_multiscale(tmp_path, em_stack):
    path = tmp_path / "em.ome.zarr"
    write_ome_image(path, em_stack)
    assert get_reader(str(path)) is read_layers
    data, kwargs, layer_type = only_layer(path)
    assert layer_type == "image" and kwargs["multiscale"] is True
    assert [level.shape for level in data] == [(3, 512, 512), (3, 256, 256), (3, 128, 128)]
    assert all(isinstance(level, zarr.Array) for level in data)  # lazy
    np.testing.assert_array_equal(data[2][1], em_stack[1, ::4, ::4])
    assert kwargs["scale"] == (50.0, 4.0, 4.0) and kwargs["translate"] == (100.0, 8.0, 12.0)
    assert kwargs["metadata"][METADATA_KEY]["unit"] == "nanometer"

    full, full_kwargs, _ = only_layer(path, multiscale=False)
    assert full.shape == (3, 512, 512) and "multiscale" not in full_kwargs and full_kwargs["scale"] == kwargs["scale"]
    small, small_kwargs, _ = only_layer(path, level=1)  # one level alone, with that level's geometry
    assert small.shape == (3, 256, 256) and "multiscale" not in small_kwargs
    assert small_kwargs["scale"] == (50.0, 8.0, 8.0) and small_kwargs["translate"] == (100.0, 16.0, 24.0)

    (layer,) = ViewerModel().open(str(path), plugin="biosam")  # through napari and the manifest
    assert layer.multiscale and layer.data.shapes[0] == (3, 512, 512)
    np.testing.assert_allclose(layer.scale, [50.0, 4.0, 4.0])


def test_copick_tomogram_opens_with_its_voxel_spacing_and_levels(tmp_path):
    from biosam.io.copick_project import import_copick  # copick itself needs biosam's zarr 3 stand-in first

    try:
        import_copick()
    except InputError as exc:
        pytest.skip(str(exc))
    config, tomogram = make_copick_project(tmp_path)
    uri = f"copick://{config}?run=TS_001"
    assert get_reader(uri) is read_layers
    data, kwargs, _ = only_layer(uri)
    assert kwargs["multiscale"] is True and len(data) == 2 and data[0].shape == tomogram.shape
    assert data[1].shape[0] < tomogram.shape[0]
    np.testing.assert_array_equal(np.asarray(data[0][10]), tomogram[10])
    assert kwargs["scale"] == (10.0, 10.0, 10.0) and kwargs["name"] == "TS_001 wbp"
    assert kwargs["metadata"][METADATA_KEY]["unit"] == "angstrom"
    full, full_kwargs, _ = only_layer(uri, multiscale=False)  # what `biosam annotate` opens
    assert full.shape == tomogram.shape and "multiscale" not in full_kwargs and full_kwargs["scale"] == (10.0,) * 3


def test_unreadable_file_raises_biosam_error(tmp_path):
    broken = tmp_path / "broken.mrc"
    broken.write_bytes(b"not an MRC file at all" * 10)
    with pytest.raises(InputError, match="broken.mrc: not a valid MRC file"):
        read_layers(broken)


# ----------------------------------------------------------------------------- writer


def test_labels_saved_from_napari_keep_the_mrc_header_geometry(tmp_path):
    real = shared_file("mrcfile_emdb_maps", "EMD-3197.map")
    source = tmp_path / "map.mrc"
    with mrcfile.open(real) as mrc:
        volume = mrc.data.copy()
    with mrcfile.new(source) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = (11.4, 12.0, 13.5)
        mrc.header.origin = (100.0, 200.0, 300.0)
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = -2, -3, -4
    data, kwargs, _ = only_layer(source)
    labels = (np.asarray(data) > np.percentile(data, 90)).astype(np.int32) * 7  # napari's default label dtype
    out = tmp_path / "labels.mrc"
    assert save_labels(out, labels, kwargs, plugin=None) == [str(out)]  # napari picks biosam's writer for .mrc
    with mrcfile.open(out) as back, mrcfile.open(source) as original:
        np.testing.assert_array_equal(back.data, labels)
        assert back.voxel_size == original.voxel_size and back.header.origin == original.header.origin
        assert (back.header.nxstart, back.header.nystart, back.header.nzstart) == (-2, -3, -4)
    # and it opens again as labels, in place over the image
    back_data, back_kwargs, layer_type = only_layer(out)
    assert layer_type == "labels" and back_kwargs["scale"] == kwargs["scale"]
    assert back_kwargs["translate"] == kwargs["translate"]


def test_labels_saved_as_nifti_keep_the_affine(tmp_path):
    img = nib.load(shared_file("totalseg_ct_mr_examples", "example_ct_sm.nii.gz"))
    data, kwargs, _ = only_layer(shared_file("totalseg_ct_mr_examples", "example_ct_sm.nii.gz"))
    labels = (np.asarray(data) > 200).astype(np.uint8)  # bone, in HU
    out = tmp_path / "bone.nii.gz"
    save_labels(out, labels, kwargs)
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, img.affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj).T, labels)
    assert only_layer(out)[2] == "labels"  # written with the NIfTI label intent


def test_labels_of_a_dicom_image_are_saved_as_nifti_in_patient_space(tmp_path):
    from biosam.io.nifti import swap_ijk

    data, kwargs, _ = only_layer(shared_file("pydicom_ct_mr", "CT_small.dcm"))
    labels = (np.asarray(data) > 0).astype(np.uint8)  # soft tissue and bone, in HU
    out = tmp_path / "ct.nii.gz"
    save_labels(out, labels, kwargs)
    dicom_affine = kwargs["metadata"][METADATA_KEY]["image_meta"].affine
    np.testing.assert_allclose(nib.load(out).affine, swap_ijk(dicom_affine))  # (z, y, x) -> NIfTI (i, j, k)
    with pytest.raises(InputError, match="biosam does not write DICOM"):
        writer.write_labels(str(tmp_path / "ct.dcm"), labels, {"metadata": kwargs["metadata"]})


def test_labels_inside_an_ome_zarr_image_keep_its_levels_geometry(tmp_path, em_stack):
    image = tmp_path / "em.ome.zarr"
    write_ome_image(image, em_stack)
    data, kwargs, _ = only_layer(image)
    labels = (np.asarray(data[0]) > 150).astype(np.uint16)
    out = image / "labels" / "cells"
    assert writer.write_labels(str(out), labels, {"metadata": kwargs["metadata"]}) == [str(out)]
    back, back_kwargs, layer_type = only_layer(out)
    assert layer_type == "labels" and back_kwargs["scale"] == (50.0, 4.0, 4.0)
    assert back_kwargs["translate"] == (100.0, 8.0, 12.0)
    np.testing.assert_array_equal(np.asarray(back), labels)


def test_labels_without_biosam_metadata_take_the_layer_scale_and_unit(tmp_path):
    labels = np.zeros((4, 32, 48), dtype=np.int64)
    labels[1:3, 5:20, 10:30] = 3
    out = tmp_path / "drawn.tif"
    save_labels(out, labels, {"scale": (2.5, 0.5, 0.25), "translate": (10.0, 0.0, 0.0),
                              "metadata": {METADATA_KEY: {"unit": "micrometer"}}})
    back, meta = read_image(out)
    np.testing.assert_array_equal(back, labels)
    assert meta.unit == "micrometer"
    assert meta.spacing == pytest.approx({"Z": 2.5, "Y": 0.5, "X": 0.25})


def test_napari_units_name_the_unit_when_no_biosam_metadata(tmp_path):
    if "units" not in reader.layer_parameters():
        pytest.skip("this napari version has no layer units")
    labels = np.zeros((3, 16, 16), dtype=np.int32)
    labels[1, 4:8, 4:8] = 1
    out = tmp_path / "drawn.mrc"
    save_labels(out, labels, {"scale": (4.0, 2.0, 2.0)}, units=("nanometer",) * 3)
    with mrcfile.open(out) as back:  # MRC stores Å
        np.testing.assert_allclose([back.voxel_size.z, back.voxel_size.y, back.voxel_size.x], [40.0, 20.0, 20.0])


def test_writer_refuses_to_overwrite_and_leaves_the_file_as_it_was(tmp_path):
    path = shared_file("nibabel_mri", "anatomical.nii")
    data, kwargs, _ = only_layer(path)
    labels = (np.asarray(data) > np.percentile(data, 80)).astype(np.uint8)
    out = tmp_path / "brain.nii.gz"
    save_labels(out, labels, kwargs)
    before = out.read_bytes()
    with pytest.raises(InputError, match=r"brain\.nii\.gz: already exists.*another name"):
        writer.write_labels(str(out), labels * 2, {"metadata": kwargs["metadata"]})
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brain.nii.gz"]  # no temporary left behind


def test_writer_refuses_labels_a_format_cannot_hold(tmp_path):
    labels = np.ones((3, 8, 8), dtype=np.uint8)
    with pytest.raises(InputError, match="PNG holds 2D labels only"):
        writer.write_labels(str(tmp_path / "volume.png"), labels, {})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- sample data


def test_sample_cell_is_the_quick_start_image():
    import skimage.data

    (data, kwargs, layer_type), = sample.cell()
    assert layer_type == "image" and data.shape == (660, 550)
    np.testing.assert_array_equal(data, skimage.data.cell())


def test_sample_tomogram_is_small_fixed_and_scaled_in_angstrom():
    (first, kwargs, _), = sample.tomogram()
    (again, _, _), = sample.tomogram()
    assert first.shape == (32, 128, 128) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)  # fixed seed
    assert kwargs["scale"] == (20.0, 20.0, 20.0) and kwargs["metadata"][METADATA_KEY]["unit"] == "angstrom"
    assert first.std() > 0
    (layer,) = ViewerModel().open_sample("biosam", "tomogram")  # through napari and the manifest
    np.testing.assert_allclose(layer.scale, [20.0] * 3)


# ----------------------------------------------------------------------------- manifest


def test_manifest_validates_and_lists_the_contract():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "biosam"
    contributions = manifest.contributions
    assert [w.display_name for w in contributions.widgets] == [
        "Annotator", "Image series annotator", "Automatic segmentation", "Tomogram vesicles"]
    commands = {c.id: c.python_name for c in contributions.commands}
    assert [commands[w.command] for w in contributions.widgets] == [
        "biosam.napari.annotator:AnnotatorWidget", "biosam.napari.series:SeriesAnnotatorWidget",
        "biosam.napari.automatic:AutomaticWidget", "biosam.napari.tomogram:TomogramWidget"]
    (labels_writer,) = contributions.writers
    assert labels_writer.layer_types == ["labels"]
    assert tuple(labels_writer.filename_extensions) == WRITE_SUFFIXES == writer.LABEL_SUFFIXES
    assert {s.key for s in contributions.sample_data} == {"cell", "tomogram"}


def test_manifest_commands_all_import():
    npe2.PluginManifest.from_file(MANIFEST).validate_imports()  # every python_name resolves


def test_installed_plugin_is_this_manifest():
    # `npe2 validate biosam`: the entry point and the packaged napari.yaml of the installed distribution
    installed = npe2.PluginManifest.from_distribution("biosam")
    assert installed == npe2.PluginManifest.from_file(MANIFEST)


def test_importing_the_plugin_package_imports_neither_napari_nor_qt():
    code = ("import sys, biosam.napari; bad = [m for m in ('napari', 'qtpy', 'PyQt5') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ----------------------------------------------------------------------------- biosam annotate


def test_annotate_without_napari_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "napari", None)  # import napari -> ImportError
    result = CliRunner().invoke(main, ["annotate", str(shared_file("nibabel_mri", "anatomical.nii"))])
    assert result.exit_code == 1
    assert 'pip install "biosam[napari]"' in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name, message", [("missing.mrc", "missing.mrc: file not found"),
                                           ("notes.txt", "unsupported file type '.txt'")])
def test_annotate_bad_input_exits_1_with_a_message(tmp_path, monkeypatch, name, message):
    opened = []
    monkeypatch.setattr("biosam.cli.annotate.make_viewer", lambda title: opened.append(title))
    if name == "notes.txt":
        (tmp_path / name).write_text("hello")
    result = CliRunner().invoke(main, ["annotate", str(tmp_path / name)])
    assert result.exit_code == 1 and message in result.output
    assert opened == []  # no window for an image that cannot be read


class HeadlessViewer:
    """What `biosam annotate` uses of napari.Viewer, without a window: napari's ViewerModel and a dock list."""

    def __init__(self, title: str) -> None:
        self.model = ViewerModel(title=title)
        self.docked: list[tuple[str, object, str]] = []
        self.shown = False
        self.window = SimpleNamespace(
            add_dock_widget=lambda widget, name, area: self.docked.append((name, widget, area)))

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def show(self) -> None:
        self.shown = True


class FakeBox:
    def __init__(self, items):
        self.items, self.current = list(items), items[0]

    def findText(self, text):  # noqa: N802 (Qt's name)
        return self.items.index(text) if text in self.items else -1

    def count(self):
        return len(self.items)

    def itemText(self, i):  # noqa: N802
        return self.items[i]

    def setCurrentText(self, text):  # noqa: N802
        self.current = text


class FakeAnnotator:
    def __init__(self, napari_viewer):
        self.viewer = napari_viewer
        self.model_selector = SimpleNamespace(set_model=lambda name: setattr(self, "model", name),
                                              device_box=FakeBox(["auto", "cpu"]),
                                              precision_box=FakeBox(["auto", "fp32", "bf16"]))
        self.model = None


@pytest.fixture
def headless(monkeypatch):
    """`biosam annotate` with napari.run and the viewer replaced; returns what it opened and ran."""
    state = SimpleNamespace(viewers=[], runs=0)

    def make_viewer(title):
        state.viewers.append(HeadlessViewer(title))
        return state.viewers[-1]

    monkeypatch.setattr("biosam.cli.annotate.make_viewer", make_viewer)
    monkeypatch.setattr(napari, "run", lambda: setattr(state, "runs", state.runs + 1))
    return state


def test_annotate_opens_the_image_in_its_geometry_and_sets_the_model(monkeypatch, headless):
    monkeypatch.setattr("biosam.cli.annotate._annotator_class", lambda: FakeAnnotator)
    path = shared_file("mrcfile_emdb_maps", "EMD-3197.map")
    result = CliRunner().invoke(main, ["annotate", str(path), "--model", "vit_b_lm", "--device", "cpu",
                                       "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    (viewer,) = headless.viewers
    assert headless.runs == 1 and viewer.shown
    (layer,) = viewer.layers
    np.testing.assert_allclose(layer.scale, [11.4] * 3, rtol=1e-6)
    assert layer.metadata[METADATA_KEY]["source"] == str(path)
    ((name, widget, area),) = viewer.docked
    assert (name, area) == ("Annotator", "right") and widget.viewer is viewer
    assert widget.model == "vit_b_lm"
    assert widget.model_selector.device_box.current == "cpu" and widget.model_selector.precision_box.current == "fp32"


def test_annotate_refuses_a_device_the_machine_lacks(monkeypatch, headless):
    monkeypatch.setattr("biosam.cli.annotate._annotator_class", lambda: FakeAnnotator)
    result = CliRunner().invoke(main, ["annotate", str(shared_file("nibabel_mri", "anatomical.nii")),
                                       "--device", "cuda"])
    assert result.exit_code == 1 and "--device cuda is not available here (choices: auto, cpu)" in result.output
    assert headless.runs == 0


def test_annotate_reads_with_the_reading_options(tmp_path, monkeypatch, headless):
    import pydicom

    monkeypatch.setattr("biosam.cli.annotate._annotator_class", lambda: FakeAnnotator)
    folder = tmp_path / "two series"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(shared_file("pydicom_ct_mr", name).read_bytes())
    refused = CliRunner().invoke(main, ["annotate", str(folder)])
    assert refused.exit_code == 1 and "holds 2 DICOM series" in refused.output and headless.viewers == []
    mr = pydicom.dcmread(folder / "MR_small.dcm")
    result = CliRunner().invoke(main, ["annotate", str(folder), "--series", str(mr.SeriesInstanceUID)])
    assert result.exit_code == 0, result.output
    (layer,) = headless.viewers[0].layers
    assert layer.data.shape[-2:] == (64, 64)
    np.testing.assert_allclose(layer.scale[-2:], [float(v) for v in mr.PixelSpacing])


def test_annotate_opens_one_resolution_level_of_an_ome_zarr(tmp_path, monkeypatch, headless, em_stack):
    monkeypatch.setattr("biosam.cli.annotate._annotator_class", lambda: FakeAnnotator)
    path = tmp_path / "em.ome.zarr"
    write_ome_image(path, em_stack)
    cases = [([], (3, 512, 512), [50.0, 4.0, 4.0]), (["--level", "2"], (3, 128, 128), [50.0, 16.0, 16.0])]
    for options, shape, scale in cases:
        result = CliRunner().invoke(main, ["annotate", str(path), *options])
        assert result.exit_code == 0, result.output
        (layer,) = headless.viewers[-1].layers
        assert not layer.multiscale and layer.data.shape == shape  # the Annotator segments one level
        np.testing.assert_allclose(layer.scale, scale)


def test_annotate_docks_the_real_annotator(qtbot, headless):
    pytest.importorskip("biosam.napari.annotator", reason="the Annotator widget is not in this checkout")
    result = CliRunner().invoke(main, ["annotate", str(shared_file("nibabel_mri", "anatomical.nii")),
                                       "--model", "lite_medsam"])
    assert result.exit_code == 0, result.output
    (viewer,) = headless.viewers
    ((name, widget, _),) = viewer.docked
    qtbot.addWidget(widget)
    assert name == "Annotator" and widget.model_selector.model_name() == "lite_medsam"
    np.testing.assert_allclose(viewer.layers[0].scale, [2.0] * 3)


def test_annotate_refuses_an_unknown_model_before_showing_a_window(qtbot, headless):
    pytest.importorskip("biosam.napari.annotator", reason="the Annotator widget is not in this checkout")
    result = CliRunner().invoke(main, ["annotate", str(shared_file("nibabel_mri", "anatomical.nii")),
                                       "--model", "no_such_model"])
    assert result.exit_code == 1 and "model 'no_such_model' is neither a zoo name" in result.output
    assert not headless.viewers[0].shown and headless.runs == 0
