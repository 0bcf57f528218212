"""Shared fixtures: the real data in ../shared/data and the embedded default model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
