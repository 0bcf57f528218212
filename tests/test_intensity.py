"""Intensity presets: percentile, min-max, none, and CT windows on real Hounsfield units."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from biosam.errors import InputError
from biosam.prompting.intensity import CT_WINDOWS, normalize_intensity, resolve_preset

from conftest import shared_file


@pytest.fixture(scope="module")
def ct_hu():
    ds = pydicom.dcmread(shared_file("pydicom_ct_mr", "CT_small.dcm"))
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.mark.parametrize("preset", list(CT_WINDOWS))
def test_ct_windows_map_level_and_width(ct_hu, preset):
    level, width = CT_WINDOWS[preset]
    out = normalize_intensity(ct_hu, preset)[..., 0]
    lo, hi = level - width / 2, level + width / 2
    assert np.all(out[ct_hu <= lo] == 0) and np.all(out[ct_hu >= hi] == 255)
    inside = (ct_hu > lo) & (ct_hu < hi)
    np.testing.assert_allclose(out[inside], (ct_hu[inside] - lo) * 255 / width, rtol=1e-5, atol=1e-3)


def test_windows_differ_on_real_ct(ct_hu):
    """The soft-tissue window spreads soft tissue (0-100 HU) over ~4x the grey levels the lung window gives it,
    and the two windows disagree on most of the slice (measured: 90% of pixels by more than 10 levels)."""
    soft, lung = (normalize_intensity(ct_hu, p)[..., 0] for p in ("ct-soft-tissue", "ct-lung"))
    tissue = (ct_hu > 0) & (ct_hu < 100)
    assert tissue.mean() > 0.2
    assert soft[tissue].std() > 3 * lung[tissue].std()
    assert (np.abs(soft - lung) > 10).mean() > 0.8


def test_minmax_none_and_auto():
    image = np.array([[10, 20], [30, 50]], dtype=np.uint16)
    np.testing.assert_allclose(normalize_intensity(image, "minmax")[..., 0], [[0, 63.75], [127.5, 255]])
    np.testing.assert_array_equal(normalize_intensity(image, "none")[..., 0], image)
    assert resolve_preset("auto", np.uint8) == "percentile" and resolve_preset("auto", np.float32) == "percentile"
    with pytest.raises(InputError, match="unknown intensity preset 'gamma'"):
        normalize_intensity(image, "gamma")
