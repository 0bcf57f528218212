"""Crop planning for small objects."""

from __future__ import annotations

import numpy as np
import pytest

from biosam.errors import InputError
from biosam.prompting.zoom import ZoomSettings, plan_crops


def test_auto_zooms_small_objects_only():
    extents = np.array([[100, 100, 120, 118], [0, 0, 900, 800], [np.nan] * 4])
    crops, whole = plan_crops(extents, (1100, 1100), "auto")
    assert whole == [1, 2]  # the large object and the point-only object stay on the whole image
    assert len(crops) == 1 and crops[0].objects == [0]
    x0, y0, x1, y1 = crops[0].box
    assert x0 <= 100 and y0 <= 100 and x1 >= 120 and y1 >= 118
    assert max(x1 - x0, y1 - y0) == pytest.approx(max(20 * ZoomSettings().context, ZoomSettings().min_crop), abs=1)


def test_off_and_on():
    extents = np.array([[100, 100, 120, 118], [0, 0, 200, 200]])
    assert plan_crops(extents, (1100, 1100), "off") == ([], [0, 1])
    crops, whole = plan_crops(extents, (1100, 1100), "on")
    assert whole == [] and sorted(o for c in crops for o in c.objects) == [0, 1]
    with pytest.raises(InputError):
        plan_crops(extents, (1100, 1100), "sometimes")


def test_neighbours_share_a_crop_and_windows_stay_inside_the_image():
    # Three nuclei of ~20 px close together and one far away, one touching the image corner.
    extents = np.array([[200, 200, 216, 216], [212, 204, 226, 218], [204, 212, 218, 226], [1080, 1080, 1099, 1099]])
    crops, whole = plan_crops(extents, (1100, 1100), "auto")
    assert whole == []
    assert sorted(sorted(c.objects) for c in crops) == [[0, 1, 2], [3]]
    for c in crops:
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= 1100 and 0 <= y0 < y1 <= 1100
        for i in c.objects:
            assert x0 <= extents[i, 0] and extents[i, 2] <= x1 and y0 <= extents[i, 1] and extents[i, 3] <= y1
