"""Shared fixtures: the real data in ../shared/data and the embedded default model."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def reference(module: str):
    """Import a reference implementation (``segment_anything``, ``sam2``, ``torchvision``) for a fidelity test.

    Without it the test skips, unless ``BIOSAM_REQUIRE_REFERENCES=1`` (set by ``.ci/run``): then a missing
    reference fails the run instead of silently skipping the proof that our models match it.
    """
    if os.environ.get("BIOSAM_REQUIRE_REFERENCES") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def shared_file(*parts: str) -> Path:
    """Path of a file in ../shared/data; skips the test if the data folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the project's ../shared/data folder)")
    path = SHARED_DATA.joinpath(*parts)
    assert path.exists(), f"{path} is missing from ../shared/data"
    return path


@pytest.fixture(scope="session")
def lite_medsam():
    import biosam

    return biosam.load_model("lite_medsam", device="cpu")


@pytest.fixture(scope="session")
def dsb_nuclei():
    """DSB2018 fluorescence nuclei (stardist test image): image and instance labels."""
    import tifffile

    image = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))
    labels = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "mask2d.tif"))
    return image, labels


def make_copick_project(folder: Path) -> tuple[Path, np.ndarray]:
    """A copick project on disk: runs TS_001 (a real cryo-ET tomogram at 10 A) and TS_002 (two spacings, no tomogram).

    Returns the config path and the TS_001 tomogram.
    """
    import json

    import tifffile
    import zarr

    from biosam.io.copick_project import import_copick

    config = folder / "config.json"
    config.write_text(json.dumps({
        "config_type": "filesystem",
        "name": "biosam test",
        "pickable_objects": [
            {"name": "vesicle", "is_particle": True, "label": 1, "radius": 150.0},
            {"name": "membrane", "is_particle": False, "label": 2},
        ],
        "overlay_root": f"local://{folder / 'overlay'}",
        "static_root": f"local://{folder / 'static'}",
    }))
    tomogram = tifffile.imread(shared_file("cryoet_microtubule_subtomo_cylindra", "13pf_MT.tif"))
    root = import_copick().from_file(str(config))
    spacing = root.new_run("TS_001").new_voxel_spacing(10.0)
    with zarr.config.set({"default_zarr_format": 2}):  # copick projects are Zarr v2 / NGFF 0.4
        spacing.new_tomogram("wbp").from_numpy(tomogram, levels=2, dtype=np.uint8)
    other = root.new_run("TS_002")
    other.new_voxel_spacing(10.0)
    other.new_voxel_spacing(20.0)
    return config, tomogram


@pytest.fixture
def shared_model(monkeypatch, lite_medsam):
    """``biosam.load_model`` returning the session's LiteMedSAM for the CLI's default: CLI tests are not about loading it."""
    import biosam

    real = biosam.load_model

    def load_model(name, **options):
        if name == "lite_medsam" and options.get("precision", "auto") == "auto" and not options.get("preprocessing"):
            return lite_medsam
        return real(name, **options)

    monkeypatch.setattr(biosam, "load_model", load_model)
