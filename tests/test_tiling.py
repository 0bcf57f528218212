"""Tiles with a halo: coverage, seamless maps, and objects across tile borders kept whole."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label as connected_components

from biosam.automatic.labels import relabel
from biosam.automatic.tiling import merge_instance_tiles, stitch_maps, tile_grid
from biosam.errors import InputError



@pytest.mark.parametrize("shape", [(512, 512), (300, 1000), (100, 90), (8192, 8192)])
def test_inner_boxes_partition_the_image_with_full_halos(shape):
    tile, halo = 256, 32
    tiles = tile_grid(shape, tile, halo)
    count = np.zeros(shape, dtype=np.uint8) if shape[0] < 5000 else None
    for t in tiles:
        y0, y1, x0, x1 = t.inner
        oy0, oy1, ox0, ox1 = t.outer
        assert oy1 - oy0 == min(tile, shape[0]) and ox1 - ox0 == min(tile, shape[1])
        # a halo on every side that is not the image border
        assert (y0 == 0 or y0 - oy0 >= halo) and (y1 == shape[0] or oy1 - y1 >= halo)
        assert (x0 == 0 or x0 - ox0 >= halo) and (x1 == shape[1] or ox1 - x1 >= halo)
        if count is not None:
            count[y0:y1, x0:x1] += 1
    if count is not None:
        assert (count == 1).all()
    if shape == (8192, 8192):
        assert len(tiles) == 43 * 43


def test_bad_tiles_are_refused():
    with pytest.raises(InputError, match="halo"):
        tile_grid((100, 100), 64, 32)


def test_stitched_maps_equal_the_untiled_result(dsb_nuclei):
    image = dsb_nuclei[0].astype(np.float32)

    def local_mean(tile):  # a neighbourhood operation: wrong near tile borders without a halo
        from scipy import ndimage

        return ndimage.uniform_filter(tile, 9, mode="nearest")[None]

    whole = local_mean(image)[0]
    stitched = stitch_maps(image, local_mean, tile=128, halo=16, channels=1)[0]
    np.testing.assert_allclose(stitched, whole, rtol=1e-5, atol=1e-4)


def test_objects_across_tile_borders_stay_whole(dsb_nuclei):
    truth = connected_components(dsb_nuclei[1] > 0)
    mask = truth > 0

    def segment(tile):
        return connected_components(tile)

    merged = merge_instance_tiles(mask, segment, tile=128, halo=32)
    # The same objects as labelling the whole image at once: a one-to-one relabelling.
    pairs = np.unique(np.stack([merged[mask], truth[mask]]), axis=1)
    assert pairs.shape[1] == truth.max() == merged.max()
    assert (merged > 0).sum() == mask.sum()
    assert merged.dtype == np.uint16


def test_relabel_is_contiguous():
    labels = np.array([[0, 7, 7], [300000, 0, 5]], dtype=np.int64)
    out = relabel(labels)
    assert out.dtype == np.uint16 and sorted(np.unique(out)) == [0, 1, 2, 3]
    assert (out == 0).sum() == 2
