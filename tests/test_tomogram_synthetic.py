"""Synthetic cryo-ET tomograms: geometry, ground truth, filters and noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from biosam.tomogram import SyntheticTomogram, synthetic_tomogram
from biosam.tomogram.synthetic import LEAFLET_FWHM_NM, LEAFLET_SPACING_NM

CLEAN = {"snr": None, "bandpass": False, "missing_wedge_deg": None}


@pytest.fixture(scope="module")
def crowded() -> SyntheticTomogram:
    """The default tomogram with every kind of distractor."""
    return synthetic_tomogram(seed=7, n_gold=5, n_ice=3, n_membranes=3)


def _ball_voxels(radius_vox: float) -> float:
    return 4 / 3 * math.pi * radius_vox**3


def test_defaults_shape_and_types(crowded: SyntheticTomogram) -> None:
    t = crowded
    assert t.volume.shape == t.labels.shape == (96, 256, 256)
    assert t.volume.dtype == np.float32 and np.isfinite(t.volume).all()
    assert t.labels.dtype == np.uint16
    assert t.voxel_size == 10.0
    n = 20 + 5 + 3 + 3
    assert t.centers.shape == (n, 3) and t.radii_nm.shape == (n,)
    assert sorted(t.classes) == list(range(1, n + 1))
    assert set(np.unique(t.labels)) == set(range(n + 1))


def test_same_seed_same_tomogram_other_seed_differs() -> None:
    kwargs = {"shape": (48, 128, 128), "n_vesicles": 4, "radius_range_nm": (15, 18), "n_gold": 2, "n_ice": 1}
    a = synthetic_tomogram(seed=3, **kwargs)
    b = synthetic_tomogram(seed=3, **kwargs)
    c = synthetic_tomogram(seed=4, **kwargs)
    np.testing.assert_array_equal(a.volume, b.volume)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_array_equal(a.radii_nm, b.radii_nm)
    assert a.classes == b.classes
    assert not np.array_equal(a.labels, c.labels)
    assert not np.array_equal(a.volume, c.volume)


def test_vesicle_labels_match_geometry(crowded: SyntheticTomogram) -> None:
    t = crowded
    nm = t.voxel_size / 10
    counts = np.bincount(t.labels.ravel(), minlength=len(t.classes) + 1)
    boxes = ndimage.find_objects(t.labels)
    vesicles = [i for i, kind in t.classes.items() if kind == "vesicle"]
    assert len(vesicles) == 20
    for i in vesicles:
        radius = t.radii_nm[i - 1]
        assert 15 <= radius <= 30
        assert counts[i] == pytest.approx(_ball_voxels(radius / nm), rel=0.03)
        box = boxes[i - 1]
        centroid = np.array(ndimage.center_of_mass(t.labels[box] == i)) + [s.start for s in box]
        np.testing.assert_allclose(centroid, t.centers[i - 1], atol=0.3)
        # Fully inside the volume: the ball is not cut by any face.
        assert np.all(t.centers[i - 1] >= radius / nm)
        assert np.all(t.centers[i - 1] <= np.array(t.volume.shape) - 1 - radius / nm)


def test_objects_do_not_overlap_or_touch(crowded: SyntheticTomogram) -> None:
    labels = crowded.labels
    # The default gap is 2 nm = 2 voxels: labels of two objects are never neighbours.
    for axis in range(3):
        for step in (1, 2):
            n = labels.shape[axis]
            a = np.take(labels, range(n - step), axis=axis)
            b = np.take(labels, range(step, n), axis=axis)
            assert not np.any((a > 0) & (b > 0) & (a != b))
    spheres = [i - 1 for i, kind in crowded.classes.items() if kind in ("vesicle", "gold")]
    nm = crowded.voxel_size / 10
    centers, radii = crowded.centers[spheres], crowded.radii_nm[spheres] / nm
    dist = np.linalg.norm(centers[:, None] - centers[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    assert np.all(dist >= radii[:, None] + radii[None] + 2 - 1e-9)


def test_distractor_classes(crowded: SyntheticTomogram) -> None:
    t = crowded
    kinds = list(t.classes.values())
    assert kinds == ["vesicle"] * 20 + ["gold"] * 5 + ["ice"] * 3 + ["membrane"] * 3
    boxes = ndimage.find_objects(t.labels)
    for i, kind in t.classes.items():
        mask = t.labels[boxes[i - 1]] == i
        assert ndimage.label(mask)[1] == 1, f"{kind} {i} is not one connected piece"
        if kind == "gold":
            assert 2.5 <= t.radii_nm[i - 1] <= 5.0
        elif kind in ("ice", "membrane"):
            assert np.isnan(t.radii_nm[i - 1])
    # Gold is much denser than membranes: the darkest voxels of the clean volume are gold.
    clean = synthetic_tomogram(seed=7, n_gold=5, n_ice=3, n_membranes=3, **CLEAN)
    gold = np.isin(clean.labels, [i for i, k in clean.classes.items() if k == "gold"])
    assert clean.volume[gold].min() < 2 * clean.volume[~gold].min()
    # A membrane fragment is a thin open sheet: it fills only a small part of its bounding box.
    for i in (i for i, k in t.classes.items() if k == "membrane"):
        box = boxes[i - 1]
        assert (t.labels[box] == i).sum() < 0.3 * math.prod(s.stop - s.start for s in box)


def test_contrast_dense_is_dark() -> None:
    t = synthetic_tomogram((48, 64, 64), n_vesicles=2, radius_range_nm=(15, 18), lumen_density=0, seed=1, **CLEAN)
    assert t.volume.dtype == np.float32
    assert t.volume.max() == pytest.approx(0.0, abs=1e-6)  # background, nothing brighter
    assert t.volume.min() < -0.9  # leaflet centres about -1
    assert np.all(t.volume[t.labels == 0] > -0.6)  # outside labels only faint leaflet tails


@pytest.mark.parametrize(("voxel_size", "shape"), [(10.0, (48, 48, 48)), (5.0, (72, 72, 72))])
def test_bilayer_profile_has_two_minima_4nm_apart(voxel_size: float, shape: tuple[int, int, int]) -> None:
    t = synthetic_tomogram(shape, voxel_size=voxel_size, n_vesicles=1, radius_range_nm=(15, 15), seed=2, **CLEAN)
    nm = voxel_size / 10
    center, radius = t.centers[0], t.radii_nm[0] / nm
    for direction in ((0, 0, 1), (1, 0, 0), (0.6, 0.8, 0)):
        steps = np.arange(0, radius + 3 / nm, 0.02)
        points = center[:, None] + np.asarray(direction, float)[:, None] * steps[None]
        profile = ndimage.map_coordinates(t.volume, points, order=3)
        minima = np.flatnonzero((profile[1:-1] < profile[:-2]) & (profile[1:-1] <= profile[2:])) + 1
        deepest = np.sort(steps[minima[np.argsort(profile[minima])[:2]]]) * nm
        outer = 15 - LEAFLET_FWHM_NM / 2
        assert deepest[1] - deepest[0] == pytest.approx(LEAFLET_SPACING_NM, abs=0.3)
        assert deepest[1] == pytest.approx(outer, abs=0.3)
        # Between the leaflets the density is much lower than at them.
        middle = profile[np.argmin(np.abs(steps * nm - (outer - LEAFLET_SPACING_NM / 2)))]
        assert middle > 0.5 * profile[minima].min()


def _wedge_regions(shape: tuple[int, ...], max_tilt_deg: float, margin_deg: float = 1.0) -> tuple[np.ndarray, ...]:
    """Masks of the full-FFT grid strictly inside the missing wedge and strictly in the sampled region."""
    kz = np.abs(np.fft.fftfreq(shape[0]))[:, None, None]
    kx = np.abs(np.fft.fftfreq(shape[2]))[None, None, :]
    angle = np.degrees(np.arctan2(kz, kx))  # angle of (kx, kz) from the kx axis; tilt axis y
    angle = np.broadcast_to(angle, (shape[0], shape[1], shape[2]))
    return angle > max_tilt_deg + margin_deg, angle < max_tilt_deg - margin_deg


def test_missing_wedge_is_empty_in_fourier_space(crowded: SyntheticTomogram) -> None:
    power = np.abs(np.fft.fftn(crowded.volume.astype(np.float64))) ** 2
    inside, outside = _wedge_regions(power.shape, 60.0)
    assert inside.mean() > 0.1 and outside.mean() > 0.1
    assert power[inside].max() < 1e-8 * power[outside].mean()
    assert np.count_nonzero(power[outside] > 1e-6 * power[outside].mean()) > 0.99 * outside.sum()


def test_missing_wedge_angle_and_disable() -> None:
    shape = (48, 80, 80)
    kwargs = {"n_vesicles": 3, "radius_range_nm": (10, 12), "seed": 5}
    narrow = synthetic_tomogram(shape, missing_wedge_deg=45.0, **kwargs)
    power = np.abs(np.fft.fftn(narrow.volume.astype(np.float64))) ** 2
    inside, outside = _wedge_regions(shape, 45.0)
    assert power[inside].max() < 1e-8 * power[outside].mean()
    full = synthetic_tomogram(shape, missing_wedge_deg=None, **kwargs)
    power = np.abs(np.fft.fftn(full.volume.astype(np.float64))) ** 2
    inside, outside = _wedge_regions(shape, 60.0)
    assert power[inside].mean() > 0.1 * power[outside].mean()
    no_wedge = synthetic_tomogram(shape, missing_wedge_deg=90.0, **kwargs)
    np.testing.assert_array_equal(no_wedge.volume, full.volume)


def test_bandpass_transfer_function() -> None:
    shape = (32, 64, 64)
    kwargs = {"n_vesicles": 2, "radius_range_nm": (12, 14), "snr": None, "missing_wedge_deg": None, "seed": 9}
    raw = np.fft.rfftn(synthetic_tomogram(shape, bandpass=False, **kwargs).volume.astype(np.float64))
    filtered = np.fft.rfftn(synthetic_tomogram(shape, bandpass=(20.0, 4.0), **kwargs).volume.astype(np.float64))
    k2 = (
        np.fft.fftfreq(shape[0])[:, None, None] ** 2
        + np.fft.fftfreq(shape[1])[None, :, None] ** 2
        + np.fft.rfftfreq(shape[2])[None, None, :] ** 2
    )  # voxel size 10 Å: cycles per voxel = cycles per nm
    expected = (1 - np.exp(-0.5 * k2 * 20.0**2)) * np.exp(-0.5 * k2 * 4.0**2)
    strong = np.abs(raw) > 1e-3 * np.abs(raw).max()
    np.testing.assert_allclose(filtered[strong], raw[strong] * expected[strong], rtol=1e-3, atol=1e-3)
    assert abs(filtered[0, 0, 0]) < 1e-3  # the high-pass removes the mean


@pytest.mark.parametrize("snr", [0.1, 0.5, 1.0])
def test_noise_matches_requested_snr(snr: float) -> None:
    kwargs = {"shape": (32, 96, 96), "n_vesicles": 4, "radius_range_nm": (12, 15), "n_gold": 1, "seed": 11}
    clean = synthetic_tomogram(snr=None, **kwargs)
    noisy = synthetic_tomogram(snr=snr, **kwargs)
    np.testing.assert_array_equal(clean.labels, noisy.labels)
    noise = noisy.volume.astype(np.float64) - clean.volume
    measured = clean.volume.var(dtype=np.float64) / noise.var()
    assert measured == pytest.approx(snr, rel=0.1)
    # Noise is unrelated to the signal.
    assert abs(np.corrcoef(noise.ravel(), clean.volume.ravel())[0, 1]) < 0.05


def test_snr_inf_means_no_noise() -> None:
    kwargs = {"shape": (32, 64, 64), "n_vesicles": 2, "radius_range_nm": (12, 14), "seed": 1}
    np.testing.assert_array_equal(
        synthetic_tomogram(snr=math.inf, **kwargs).volume, synthetic_tomogram(snr=None, **kwargs).volume
    )


def test_volume_fraction_crowding() -> None:
    shape = (64, 128, 128)
    t = synthetic_tomogram(shape, volume_fraction=0.15, radius_range_nm=(12, 20), seed=4, **CLEAN)
    vesicles = [i - 1 for i, k in t.classes.items() if k == "vesicle"]
    balls = sum(_ball_voxels(r) for r in t.radii_nm[vesicles])
    assert 0.15 <= balls / math.prod(shape) < 0.15 + _ball_voxels(20) / math.prod(shape)
    assert np.count_nonzero(t.labels) / math.prod(shape) == pytest.approx(balls / math.prod(shape), rel=0.03)


def test_large_radii_honored_when_they_fit() -> None:
    t = synthetic_tomogram((64, 128, 128), voxel_size=40.0, n_vesicles=3, radius_range_nm=(60, 100), seed=0, **CLEAN)
    radii = t.radii_nm
    assert np.all((radii >= 60) & (radii <= 100))
    counts = np.bincount(t.labels.ravel())[1:]
    np.testing.assert_allclose(counts, [_ball_voxels(r / 4) for r in radii], rtol=0.03)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"radius_range_nm": (15, 100)}, "do not fit"),
        ({"shape": (32, 64, 64), "n_vesicles": 60, "radius_range_nm": (14, 15)}, "could not place"),
        ({"shape": (32, 64, 64), "volume_fraction": 0.6, "radius_range_nm": (10, 12)}, "could not place"),
        ({"shape": (8, 64, 64), "n_vesicles": 0, "n_membranes": 1}, "n_membranes"),
        ({"radius_range_nm": (30, 20)}, "radius_range_nm"),
        ({"radius_range_nm": (3, 20)}, "radius_range_nm"),
        ({"snr": 0}, "snr"),
        ({"snr": -1.0}, "snr"),
        ({"missing_wedge_deg": 0}, "missing_wedge_deg"),
        ({"missing_wedge_deg": 120}, "missing_wedge_deg"),
        ({"bandpass": (3.0, 40.0)}, "bandpass"),
        ({"volume_fraction": 1.0}, "volume_fraction"),
        ({"voxel_size": 0}, "voxel_size"),
        ({"n_vesicles": -1}, "n_vesicles"),
        ({"shape": (64, 64)}, "shape"),
    ],
)
def test_impossible_requests_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic_tomogram(seed=0, **kwargs)
