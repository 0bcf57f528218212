"""The one resampling used by decoder training and by `biosam auto --scale/--object-size`."""

import numpy as np

from biosam.automatic.resample import resize_image, resize_labels, resize_maps, scaled_shape


def test_labels_keep_their_ids_and_geometry():
    labels = np.zeros((40, 60), dtype=np.uint32)
    labels[10:30, 6:26] = 7
    labels[0:8, 40:60] = 70000
    small = resize_labels(labels, scaled_shape(labels.shape, 0.5))
    assert small.shape == (20, 30) and small.dtype == np.uint32
    assert set(np.unique(small)) == {0, 7, 70000}
    assert (small == 7).sum() == 100  # 20 x 20 square halves to 10 x 10
    assert np.array_equal(resize_labels(small, labels.shape), labels)


def test_integer_images_stay_in_range_and_shrinking_is_antialiased():
    stripes = np.zeros((64, 64), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: without anti-aliasing a 1/4 resize picks all-black or all-white
    small = resize_image(stripes, (16, 16))
    assert small.dtype == np.uint8 and small.shape == (16, 16)
    assert 110 <= small.mean() <= 145 and small.std() < 10
    rgb = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    big = resize_image(rgb, (60, 40))
    assert big.shape == (60, 40, 3) and big.dtype == np.uint8
    assert resize_image(rgb, (30, 20)) is rgb


def test_maps_follow_the_image_size():
    maps = np.random.default_rng(1).random((3, 50, 70)).astype(np.float32)
    out = resize_maps(maps, (100, 140))
    assert out.shape == (3, 100, 140) and out.dtype == np.float32
    assert abs(out.mean() - maps.mean()) < 0.01 and out.min() >= maps.min() and out.max() <= maps.max()
