"""copick projects: copick:// addresses, tomogram reading, segmentations and picks written through copick."""

from __future__ import annotations


import numpy as np
import pytest
import zarr
from skimage.measure import label as connected_components

from biosam.errors import InputError
from biosam.io import read_image
from biosam.io.copick_project import import_copick, is_copick_uri, parse_uri, read, write_labels, write_picks

from conftest import make_copick_project


@pytest.fixture
def project(tmp_path):
    """A copick project on disk (see conftest.make_copick_project) and its TS_001 tomogram."""
    return make_copick_project(tmp_path)


def _run(config, name="TS_001"):
    return import_copick().from_file(str(config)).get_run(name)


def test_parse_uri():
    assert is_copick_uri("copick:///p/config.json") and not is_copick_uri("/p/config.json")
    assert parse_uri("copick:///data/my%20project/config.json?run=TS_1&voxel_spacing=7.84&tomo_type=denoised") == {
        "config": "/data/my project/config.json", "run": "TS_1", "voxel_spacing": 7.84, "tomo_type": "denoised",
    }
    assert parse_uri("copick://rel/config.json?name=ribo&multilabel=TRUE")["multilabel"] is True
    for bad, message in [
        ("copick://?run=a", "names no config"), ("copick://c.json?runn=a", "unknown key 'runn'"),
        ("copick://c.json?run=a&run=b", "given twice"), ("copick://c.json?voxel_spacing=ten", "not a number"),
        ("copick://c.json?run=", "has no value"), ("copick://c.json?multilabel=maybe", "true or false"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_uri(bad)


def test_read_tomogram(project):
    config, tomogram = project
    data, meta = read_image(f"copick://{config}?run=TS_001")  # voxel spacing and tomogram type: the only ones
    assert isinstance(data, zarr.Array) and meta.format == "copick" and meta.axes == "ZYX"
    assert meta.shape == tomogram.shape and meta.unit == "angstrom" and meta.spacing == {"Z": 10.0, "Y": 10.0, "X": 10.0}
    assert {k: meta.extra[k] for k in ("config", "run", "voxel_spacing", "tomo_type")} == {
        "config": str(config), "run": "TS_001", "voxel_spacing": 10.0, "tomo_type": "wbp",
    }
    np.testing.assert_array_equal(data[17], tomogram[17])
    np.testing.assert_array_equal(read(f"copick://{config}", run="TS_001", voxel_spacing=10, tomo_type="wbp")[0][:], tomogram)


def test_write_segmentation_and_picks(project):
    config, tomogram = project
    _, like = read(f"copick://{config}?run=TS_001")
    membrane = (tomogram > 140).astype(np.uint8)
    out = write_labels(f"copick://{config}?name=membrane&session_id=7", membrane, like=like)
    assert out.endswith("Segmentations/10.000_biosam_7_membrane.zarr")

    (seg,) = _run(config).get_segmentations(name="membrane", user_id="biosam", session_id="7")
    assert (seg.voxel_size, seg.is_multilabel) == (10.0, False)
    group = zarr.open_group(seg.zarr(), mode="r")
    np.testing.assert_array_equal(group["0"][:], membrane)
    assert group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [10.0] * 3}]
    assert {a["unit"] for a in group.attrs["multiscales"][0]["axes"]} == {"angstrom"}

    with pytest.raises(InputError, match="already exists.*--overwrite"):
        write_labels(f"copick://{config}?name=membrane&session_id=7", membrane, like=like)
    write_labels(f"copick://{config}?name=membrane&session_id=7", 1 - membrane, like=like, overwrite=True)
    (seg,) = _run(config).get_segmentations(name="membrane", user_id="biosam", session_id="7")
    np.testing.assert_array_equal(zarr.open_group(seg.zarr(), mode="r")["0"][:], 1 - membrane)

    instances = connected_components(membrane).astype(np.int32)
    uri = f"copick://{config}?run=TS_001&voxel_spacing=10&name=instances&user_id=sam&session_id=2&multilabel=true"
    write_labels(uri, instances, like=like)
    (seg,) = _run(config).get_segmentations(name="instances", user_id="sam", is_multilabel=True)
    stored = zarr.open_group(seg.zarr(), mode="r")["0"]
    assert stored.dtype == (np.uint8 if instances.max() < 256 else np.uint16)
    np.testing.assert_array_equal(stored[:], instances)

    centers = np.array([[5, 100, 40], [20, 57, 63]])
    path = write_picks(f"copick://{config}", centers, like=like, object_name="vesicle")
    (picks,) = _run(config).get_picks(object_name="vesicle", user_id="biosam", session_id="0")
    assert picks.path == path
    positions, _ = picks.numpy()
    np.testing.assert_allclose(positions, [[400.0, 1000.0, 50.0], [630.0, 570.0, 200.0]])  # x, y, z in angstrom
    with pytest.raises(InputError, match="already exist"):
        write_picks(f"copick://{config}", centers, like=like, object_name="vesicle")
    write_picks(f"copick://{config}?name=vesicle", centers[:1], like=like, overwrite=True)
    assert len(_run(config).get_picks(object_name="vesicle")[0].numpy()[0]) == 1


def test_failed_write_leaves_nothing(project, monkeypatch):
    config, tomogram = project
    _, like = read(f"copick://{config}?run=TS_001")

    def disk_full(self, key, value):
        raise OSError("No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_labels(f"copick://{config}?name=membrane", tomogram > 140, like=like)
    assert _run(config).get_segmentations() == []
    assert not (config.parent / "overlay" / "ExperimentRuns" / "TS_001" / "Segmentations").exists()


def test_bad_inputs(project):
    config, tomogram = project
    with pytest.raises(InputError, match=r"2 runs \(TS_001, TS_002\).*run="):
        read(f"copick://{config}")
    with pytest.raises(InputError, match="no run 'TS_009'; available: TS_001, TS_002"):
        read(f"copick://{config}?run=TS_009")
    with pytest.raises(InputError, match=r"2 voxel spacings \(10.0, 20.0\).*voxel_spacing="):
        read(f"copick://{config}?run=TS_002")
    with pytest.raises(InputError, match="no voxel spacing '5.0'; available: 10.0"):
        read(f"copick://{config}?run=TS_001&voxel_spacing=5")
    with pytest.raises(InputError, match="config file .*missing.json not found"):
        read(f"copick://{config.parent / 'missing.json'}?run=TS_001")

    _, like = read(f"copick://{config}?run=TS_001")
    labels = (tomogram > 140).astype(np.uint8)
    with pytest.raises(InputError, match="name=..."):
        write_labels(f"copick://{config}", labels, like=like)
    with pytest.raises(InputError, match="Objects: vesicle, membrane; or add multilabel=true"):
        write_labels(f"copick://{config}?name=ribosome", labels, like=like)
    with pytest.raises(InputError, match="must not contain '_'"):
        write_labels(f"copick://{config}?name=membrane&user_id=my_tool", labels, like=like)
    with pytest.raises(InputError, match="do not fit"):
        write_labels(f"copick://{config}?name=membrane", labels[:-1], like=like)
    with pytest.raises(InputError, match="give run="):
        write_labels(f"copick://{config}?name=membrane", labels)
    with pytest.raises(InputError, match="picked object's name"):
        write_picks(f"copick://{config}", [[1, 2, 3]], like=like)


def test_missing_copick_names_the_extra(project, monkeypatch):
    """copick is the `cryoet` extra: without it a copick address says which extra to install."""
    import sys

    config, _ = project
    monkeypatch.setitem(sys.modules, "copick", None)  # makes `import copick` raise ImportError
    with pytest.raises(InputError, match=r"pip install 'biosam\[cryoet\]'"):
        read_image(f"copick://{config}?run=TS_001")
