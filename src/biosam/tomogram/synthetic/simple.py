"""Synthetic cryo-electron tomograms of vesicles with exact ground truth.

:func:`synthetic_tomogram` renders lipid vesicles (and optional distractors)
into a ``(z, y, x)`` volume, then degrades it the way a tomogram is degraded:
a band-pass standing in for the CTF, a missing wedge and Gaussian noise at a
set SNR. The instance labels, classes, centres and radii are exact, so the
volume can score a vesicle segmentation without any manual annotation.

Geometry and conventions
------------------------
* Axes are ``(z, y, x)``; the beam runs along z and the tilt axis is y.
  Voxels are cubic, ``voxel_size`` Å on a side; voxel ``i`` has its centre
  at coordinate ``i`` (centres are given in these voxel coordinates).
* Density is rendered in "leaflet units": the centre of one lipid leaflet is
  1, the background (cytosol) 0. The output is the negated density, so
  membranes, gold and ice are darker than the background, as in cryo-ET.
  With ``bandpass=False`` the background stays exactly 0; the band-pass
  removes the mean, so then the background sits near 0 instead.
* A vesicle of outer radius ``R`` is a bilayer: two leaflets with a Gaussian
  profile of FWHM 1.8 nm whose centres lie at ``R - 0.9 nm`` (outer) and
  4 nm further in (inner). ``R`` is thus the outer half-maximum of the outer
  leaflet, and the vesicle's label is the filled ball ``r <= R`` (lumen
  included). The lumen, inside the inner leaflet centre, has density
  ``lumen_density``.
* Every object lies entirely inside the volume (none is clipped at a face)
  and the label extents of any two objects are at least ``min_gap_nm``
  apart. Positions come from rejection sampling, largest objects first, with
  an exhaustive search of the voxel grid when random tries keep missing;
  when an object cannot be placed at all, :class:`~biosam.errors.InputError`
  (a ``ValueError``) is raised rather than returning fewer objects.
* Instance ids: vesicles ``1..n``, then gold, ice, membrane fragments.
  ``centers[i]`` and ``radii_nm[i]`` describe id ``i + 1``.
* Distractors: gold fiducials are solid balls of 5-10 nm diameter and
  density 5; ice blobs are smooth irregular blobs (star-shaped: a sphere
  with smooth random bumps and dents, bounding radius 8-20 nm, density 1.5); membrane fragments
  are open spherical caps of bilayer (bounding radius 15-40 nm, half-opening
  angle 30-75 degrees), labelled over the bilayer's thickness.
  Their ``centers`` are the centres of their bounding spheres and
  their ``radii_nm`` are NaN except for gold (the ball's radius).

Degradations, in order
----------------------
1. Band-pass (``bandpass``): a Gaussian band-pass chosen as a smooth
   stand-in for the CTF envelope (no sign oscillation, so the contrast stays
   "dense is dark"). Its transfer at spatial frequency ``k`` (1/nm) is
   ``(1 - exp(-(k * hp)**2 / 2)) * exp(-(k * lp)**2 / 2)`` with
   ``(hp, lp) = (40, 3)`` nm by default: it removes gradients larger than
   vesicles and softens detail finer than ~3 nm while keeping the two
   leaflets (4 nm apart) visible.
2. Missing wedge (``missing_wedge_deg``): the maximum tilt angle ``a``. By
   the projection-slice theorem, tilts in ``[-a, a]`` about y sample the
   Fourier coefficients with ``|kz| <= |kx| * tan(a)``; every coefficient
   with ``|kz| * cos(a) > |kx| * sin(a)`` (a double wedge around the kz
   axis, any ky) is set to zero. ``a = 60`` gives the usual +-60 degree
   tilt series; ``a = 90`` or ``None`` applies no wedge.
3. Noise (``snr``): white Gaussian noise passed through the same wedge
   (the noise of a reconstruction also lacks those directions) and scaled so
   that ``var(clean) / var(noise)`` equals ``snr`` exactly, ``clean``
   being the filtered noise-free volume.

The random stream for the noise is separate from the one for the objects:
with the same ``seed``, calls that differ only in ``snr``, ``bandpass`` or
``missing_wedge_deg`` give the same objects and labels, so
``synthetic_tomogram(seed=s, snr=0.5).volume - synthetic_tomogram(seed=s,
snr=None).volume`` is exactly the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft

from biosam.errors import InputError
from biosam.io.voxel_size import angstrom_to_nm
from biosam.labels import label_dtype

# Bilayer geometry, nm: leaflet centres 4 nm apart, each leaflet a Gaussian of this FWHM.
LEAFLET_SPACING_NM = 4.0
LEAFLET_FWHM_NM = 1.8
# Densities in leaflet units (a leaflet's peak is 1).
GOLD_DENSITY = 5.0
ICE_DENSITY = 1.5
# Distractor sizes, nm: gold ball radius, ice and fragment bounding-sphere radii.
GOLD_RADIUS_NM = (2.5, 5.0)
ICE_RADIUS_NM = (8.0, 20.0)
FRAGMENT_RADIUS_NM = (15.0, 40.0)
FRAGMENT_HALF_ANGLE_DEG = (30.0, 75.0)
# Default band-pass (high-pass, low-pass) wavelengths, nm.
DEFAULT_BANDPASS_NM = (40.0, 3.0)

# Rejection sampling: candidates drawn per batch and in all per object before searching the grid.
_BATCH = 256
_MAX_CANDIDATES = 40_000

@dataclass(eq=False)
class SyntheticTomogram:
    """A synthetic tomogram and its exact ground truth.

    ``centers[i]`` and ``radii_nm[i]`` belong to instance id ``i + 1``.
    """

    volume: np.ndarray = field(repr=False)  # (z, y, x) float32, dense material dark
    labels: np.ndarray = field(repr=False)  # (z, y, x) instance ids, 0 = background
    classes: dict[int, str]  # instance id -> "vesicle" | "gold" | "ice" | "membrane"
    centers: np.ndarray  # (n, 3) z, y, x in voxels
    radii_nm: np.ndarray  # (n,) outer radius in nm, NaN for non-spherical objects
    voxel_size: float  # Å per voxel


@dataclass
class _Object:
    """One object to place: its kind, bounding radius (voxels) and shape parameters."""

    kind: str
    radius: float  # label extent around the centre, voxels
    params: dict[str, float | np.ndarray]
    center: np.ndarray | None = None


def synthetic_tomogram(
    shape: Sequence[int] = (96, 256, 256),
    *,
    voxel_size: float = 10.0,
    n_vesicles: int = 20,
    volume_fraction: float | None = None,
    radius_range_nm: tuple[float, float] = (15.0, 30.0),
    min_gap_nm: float = 2.0,
    lumen_density: float = 0.1,
    n_gold: int = 0,
    n_ice: int = 0,
    n_membranes: int = 0,
    snr: float | None = 0.5,
    missing_wedge_deg: float | None = 60.0,
    bandpass: bool | tuple[float, float] = True,
    seed: int | None = None,
) -> SyntheticTomogram:
    """Render a synthetic cryo-ET volume of lipid vesicles with exact labels.

    Parameters
    ----------
    shape : (z, y, x) size in voxels.
    voxel_size : Å per voxel.
    n_vesicles : number of vesicles; ignored when ``volume_fraction`` is given.
    volume_fraction : if given, vesicles are added until their balls fill at
        least this fraction of the volume (crowding by fraction, not count).
        Random placement jams well before dense packing: about 0.25 is the
        practical limit with the default shape and radii.
    radius_range_nm : (min, max) outer vesicle radius in nm, drawn uniformly.
        The default (15, 30) nm is typical of synaptic vesicles and fits the
        default 96 nm thick volume; larger radii (up to ~100 nm) need a
        larger ``shape`` or ``voxel_size``.
    min_gap_nm : smallest distance between the label extents of two objects.
    lumen_density : density of the vesicle lumen relative to a leaflet's peak
        (positive: slightly denser, so darker, than the background; 0: none).
    n_gold, n_ice, n_membranes : numbers of distractors (gold fiducials, ice
        blobs, open membrane fragments), each a class of its own.
    snr : var(signal) / var(noise) of the output; ``None`` or ``inf``: no noise.
    missing_wedge_deg : maximum tilt angle of the simulated tilt series
        (tilt axis y, beam z); ``None`` (or 90): no missing wedge.
    bandpass : ``True`` for the default Gaussian band-pass, ``False`` for none,
        or ``(highpass_nm, lowpass_nm)`` wavelengths.
    seed : seed of the random generator, for reproducible volumes.

    Returns
    -------
    SyntheticTomogram with a float32 volume and uint16 (uint32 past 65535
    objects) labels. See the module docstring for the geometry.

    Raises
    ------
    InputError (a ValueError) for invalid parameters or objects that do not
    fit: a radius too large for the volume, or too many objects to place
    without overlap.
    """
    shape_t = _check_shape(shape)
    voxel_size = _positive("voxel_size", voxel_size)
    nm = angstrom_to_nm(voxel_size)  # nm per voxel
    lo_nm, hi_nm = _check_radius_range(radius_range_nm)
    min_gap_nm = _non_negative("min_gap_nm", min_gap_nm)
    lumen_density = _finite("lumen_density", lumen_density)
    counts = {
        "n_gold": _count("n_gold", n_gold),
        "n_ice": _count("n_ice", n_ice),
        "n_membranes": _count("n_membranes", n_membranes),
    }
    if volume_fraction is None:
        n_vesicles = _count("n_vesicles", n_vesicles)
    else:
        volume_fraction = _non_negative("volume_fraction", volume_fraction)
        if volume_fraction >= 1:
            raise InputError(f"volume_fraction must be below 1, got {volume_fraction}.")
    noise_snr = _check_snr(snr)
    wedge = _check_wedge(missing_wedge_deg)
    band = _check_bandpass(bandpass)

    # Largest radius (voxels) an object can have and still lie fully inside the volume.
    fit_nm = (min(shape_t) - 1) / 2 * nm
    wants_vesicles = volume_fraction > 0 if volume_fraction is not None else n_vesicles > 0
    if wants_vesicles and hi_nm > fit_nm:
        raise InputError(
            f"vesicles of radius up to {hi_nm:g} nm do not fit: their diameter is "
            f"{2 * hi_nm / nm:.0f} voxels at {voxel_size:g} Å/voxel, but the smallest dimension of shape "
            f"{shape_t} is {min(shape_t)} voxels (largest radius that fits: {fit_nm:.1f} nm). "
            "Enlarge shape, raise voxel_size or lower radius_range_nm."
        )
    for name, size in (("n_gold", GOLD_RADIUS_NM), ("n_ice", ICE_RADIUS_NM), ("n_membranes", FRAGMENT_RADIUS_NM)):
        if counts[name] and size[0] > fit_nm:
            raise InputError(
                f"{name}: these objects need a radius of at least {size[0]:g} nm, but the largest that fits "
                f"shape {shape_t} at {voxel_size:g} Å/voxel is {fit_nm:.1f} nm."
            )

    object_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(object_seed)

    objects = _draw_vesicles(rng, n_vesicles, volume_fraction, (lo_nm, hi_nm), shape_t, nm)
    objects += _draw_distractors(rng, counts, fit_nm, nm)
    _place(rng, objects, shape_t, min_gap_nm / nm)

    n = len(objects)
    density = np.zeros(shape_t, np.float32)
    labels = np.zeros(shape_t, label_dtype(n))
    render = {"vesicle": _render_vesicle, "gold": _render_gold, "ice": _render_ice, "membrane": _render_fragment}
    for label, obj in enumerate(objects, start=1):
        render[obj.kind](density, labels, label, obj, nm, lumen_density)

    # Negate so dense material is dark, then degrade with one FFT pair for the whole volume.
    clean = np.negative(density, out=density)
    band_tf, wedge_mask = _transfer_functions(shape_t, nm, band, wedge)
    if band_tf is not None or wedge_mask is not None:
        spectrum = sfft.rfftn(clean)
        if band_tf is not None:
            spectrum *= band_tf
        if wedge_mask is not None:
            spectrum *= wedge_mask
        clean = sfft.irfftn(spectrum, s=shape_t).astype(np.float32, copy=False)
        del spectrum

    volume = clean
    if noise_snr is not None:
        noise = np.random.default_rng(noise_seed).standard_normal(shape_t, dtype=np.float32)
        if wedge_mask is not None:
            noise = sfft.irfftn(sfft.rfftn(noise) * wedge_mask, s=shape_t).astype(np.float32, copy=False)
        # Scale to the exact requested ratio, so benchmarks run at the SNR they name.
        signal_var = float(clean.var(dtype=np.float64))
        noise -= np.float32(noise.mean(dtype=np.float64))
        noise_std = float(noise.std(dtype=np.float64))
        target_std = math.sqrt(signal_var / noise_snr) if signal_var > 0 else 1.0  # empty volume: unit noise
        if noise_std > 0:  # a one-voxel volume has no variance to scale
            noise *= np.float32(target_std / noise_std)
        volume = clean + noise

    centers = np.array([obj.center for obj in objects], np.float64).reshape(n, 3)
    radii = np.array([obj.radius * nm if obj.kind in ("vesicle", "gold") else np.nan for obj in objects], np.float64)
    return SyntheticTomogram(
        volume=np.ascontiguousarray(volume, np.float32),
        labels=labels,
        classes={label: obj.kind for label, obj in enumerate(objects, start=1)},
        centers=centers,
        radii_nm=radii,
        voxel_size=voxel_size,
    )


# --------------------------------------------------------------------------- parameter checks


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be three integers (z, y, x), got {shape!r}.") from None
    if len(dims) != 3 or any(d < 1 for d in dims) or any(d != s for d, s in zip(dims, shape)):
        raise InputError(f"shape must be three positive integers (z, y, x), got {tuple(shape)!r}.")
    return dims  # type: ignore[return-value]


def _finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}.")
    return value


def _positive(name: str, value: float) -> float:
    value = _finite(name, value)
    if value <= 0:
        raise InputError(f"{name} must be positive, got {value}.")
    return value


def _non_negative(name: str, value: float) -> float:
    value = _finite(name, value)
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value}.")
    return value


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def _check_radius_range(radius_range_nm: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(r) for r in radius_range_nm)
    except (TypeError, ValueError):
        raise InputError(f"radius_range_nm must be (min, max) in nm, got {radius_range_nm!r}.") from None
    # Below this the inner leaflet would reach the centre and there would be no lumen.
    smallest = LEAFLET_SPACING_NM + LEAFLET_FWHM_NM
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or lo <= smallest:
        raise InputError(
            f"radius_range_nm must be (min, max) with {smallest:g} nm < min <= max (a bilayer is "
            f"{smallest:g} nm thick), got {radius_range_nm!r}."
        )
    return lo, hi


def _check_snr(snr: float | None) -> float | None:
    if snr is None:
        return None
    try:
        snr = float(snr)
    except (TypeError, ValueError):
        raise InputError(f"snr must be a positive number, None or inf, got {snr!r}.") from None
    if snr == math.inf:
        return None
    if not snr > 0 or math.isnan(snr):
        raise InputError(f"snr must be positive (None or inf for no noise), got {snr}.")
    return snr


def _check_wedge(missing_wedge_deg: float | None) -> float | None:
    if missing_wedge_deg is None:
        return None
    angle = _finite("missing_wedge_deg", missing_wedge_deg)
    if not 0 < angle <= 90:
        raise InputError(
            f"missing_wedge_deg is the maximum tilt angle and must be in (0, 90] (None for no wedge), got {angle}."
        )
    return None if angle == 90 else angle


def _check_bandpass(bandpass: bool | tuple[float, float]) -> tuple[float, float] | None:
    if isinstance(bandpass, (bool, np.bool_)):
        return DEFAULT_BANDPASS_NM if bandpass else None
    try:
        hp, lp = (float(v) for v in bandpass)
    except (TypeError, ValueError):
        raise InputError(f"bandpass must be True, False or (highpass_nm, lowpass_nm), got {bandpass!r}.") from None
    if not (math.isfinite(hp) and math.isfinite(lp)) or not hp > lp > 0:
        raise InputError(f"bandpass (highpass_nm, lowpass_nm) needs highpass_nm > lowpass_nm > 0, got {bandpass!r}.")
    return hp, lp


# --------------------------------------------------------------------------- drawing and placing


def _draw_vesicles(
    rng: np.random.Generator,
    n_vesicles: int,
    volume_fraction: float | None,
    radius_range: tuple[float, float],
    shape: tuple[int, int, int],
    nm: float,
) -> list[_Object]:
    """Vesicle radii: ``n_vesicles`` of them, or enough to fill ``volume_fraction``."""
    lo, hi = radius_range
    if volume_fraction is None:
        radii = list(rng.uniform(lo, hi, n_vesicles))
    else:
        target = volume_fraction * math.prod(shape) * nm**3
        radii, filled = [], 0.0
        while filled < target:
            radii.append(rng.uniform(lo, hi))
            filled += 4 / 3 * math.pi * radii[-1] ** 3
    return [_Object("vesicle", r / nm, {}) for r in radii]


def _draw_distractors(rng: np.random.Generator, counts: dict[str, int], fit_nm: float, nm: float) -> list[_Object]:
    """Sizes and shapes of the gold, ice and membrane-fragment distractors."""

    def radius(size: tuple[float, float]) -> float:
        # Sizes are physical; the upper bound only shrinks when the volume is too thin for it.
        return rng.uniform(size[0], min(size[1], fit_nm)) / nm

    objects = [_Object("gold", radius(GOLD_RADIUS_NM), {}) for _ in range(counts["n_gold"])]
    for _ in range(counts["n_ice"]):
        bound = radius(ICE_RADIUS_NM)
        # A star-shaped blob: a sphere whose radius varies smoothly with direction through a few
        # von Mises bumps and dents, so it is irregular yet always one connected piece.
        n_bumps = int(rng.integers(4, 9))
        bumps = {
            "directions": _unit_vectors(rng, n_bumps),
            "heights": rng.uniform(-0.35, 0.7, n_bumps),
            "sharpness": rng.uniform(2.0, 6.0, n_bumps),
        }
        peak = _blob_radius(_unit_vectors(rng, 2000), **bumps).max()
        objects.append(_Object("ice", bound, {**bumps, "scale": bound / peak}))
    half_thickness = (LEAFLET_SPACING_NM + LEAFLET_FWHM_NM) / 2 / nm
    for _ in range(counts["n_membranes"]):
        bound = radius(FRAGMENT_RADIUS_NM)
        theta = math.radians(rng.uniform(*FRAGMENT_HALF_ANGLE_DEG))
        # Seen from the point halfway between apex and rim plane, the farthest point of a cap of
        # curvature radius rc is on its rim, at rc * reach(theta); the bilayer adds its half thickness.
        reach = math.hypot((1 - math.cos(theta)) / 2, math.sin(theta))
        curvature = (bound - half_thickness) / reach
        axis = _unit_vectors(rng, 1)[0]
        objects.append(_Object("membrane", bound, {"theta": theta, "curvature": curvature, "axis": axis}))
    return objects


def _blob_radius(
    unit: np.ndarray, directions: np.ndarray, heights: np.ndarray, sharpness: np.ndarray
) -> np.ndarray:
    """Radius of an ice blob (before scaling) along unit vectors ``unit`` (..., 3)."""
    radius = np.ones(unit.shape[:-1], np.float32)
    for d, h, k in zip(directions, heights, sharpness):
        radius += np.float32(h) * np.exp(np.float32(k) * (unit @ d.astype(np.float32) - 1))
    # Deep dents overlapping could pinch the blob to nothing; keep a solid core.
    return np.maximum(radius, np.float32(0.4))


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _place(rng: np.random.Generator, objects: list[_Object], shape: tuple[int, int, int], gap: float) -> None:
    """Give every object a centre: fully inside, bounding spheres ``gap`` voxels apart."""
    upper = np.array(shape, np.float64) - 1
    placed_c = np.empty((len(objects), 3))
    placed_r = np.empty(len(objects))
    n_placed = 0
    # Largest first: big objects are the hard ones to fit once the volume fills up.
    order = sorted(range(len(objects)), key=lambda i: -objects[i].radius)
    for rank, i in enumerate(order):
        obj = objects[i]
        lo, hi = np.full(3, obj.radius), upper - obj.radius
        reach = placed_r[:n_placed] + obj.radius + gap  # closest allowed centre distances
        for _ in range(_MAX_CANDIDATES // _BATCH):
            cand = rng.uniform(lo, hi, (_BATCH, 3))
            dist = np.linalg.norm(cand[:, None, :] - placed_c[None, :n_placed], axis=2)
            hits = np.flatnonzero(np.all(dist >= reach, axis=1))
            if hits.size:
                obj.center = cand[hits[0]]
                break
        else:
            # Random tries miss small pockets of free space; search the voxel grid before giving up.
            obj.center = _free_grid_point(rng, lo, hi, placed_c[:n_placed], reach)
            if obj.center is None:
                article = "an" if obj.kind[0] in "aeiou" else "a"
                raise InputError(
                    f"could not place {article} {obj.kind} of radius {obj.radius:.1f} voxels without overlap "
                    f"({rank} of {len(objects)} objects placed in shape {shape}, largest first); request fewer "
                    "objects, a smaller volume_fraction, smaller radii, a smaller min_gap_nm, a larger shape or "
                    "another seed."
                )
        placed_c[n_placed] = obj.center
        placed_r[n_placed] = obj.radius
        n_placed += 1


def _free_grid_point(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, centers: np.ndarray, reach: np.ndarray
) -> np.ndarray | None:
    """A random integer point in ``[lo, hi]`` at least ``reach[j]`` from every ``centers[j]``, or None."""
    start = np.ceil(lo).astype(int)
    stop = np.floor(hi).astype(int) + 1
    if np.any(stop <= start):
        return None
    free = np.ones(tuple(stop - start), bool)
    for c, e in zip(centers, reach):
        # Only the box around each exclusion ball can be blocked by it.
        a = np.maximum(np.ceil(c - e).astype(int), start)
        b = np.minimum(np.floor(c + e).astype(int) + 1, stop)
        if np.any(b <= a):
            continue
        dz, dy, dx = (np.arange(a[k], b[k]) - c[k] for k in range(3))
        blocked = dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2 < e**2
        free[tuple(slice(a[k] - start[k], b[k] - start[k]) for k in range(3))] &= ~blocked
    spots = np.flatnonzero(free)
    if not spots.size:
        return None
    return np.array(np.unravel_index(rng.choice(spots), free.shape), np.float64) + start


# --------------------------------------------------------------------------- rendering


def _box(
    center: np.ndarray, extent: float, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Slices of the box within ``extent`` voxels of ``center``, and broadcastable offsets from it."""
    lo = np.maximum(np.floor(center - extent).astype(int), 0)
    hi = np.minimum(np.ceil(center + extent).astype(int) + 1, shape)
    axes = [(np.arange(a, b) - c).astype(np.float32) for a, b, c in zip(lo, hi, center)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    return sl, axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _leaflet_sigma(nm: float) -> float:
    """Gaussian sigma of a leaflet profile in voxels, widened by the voxel's own width.

    Point-sampling a profile barely wider than a voxel aliases; adding the variance of a
    one-voxel box (1/12) approximates averaging the profile over each voxel instead.
    """
    sigma = LEAFLET_FWHM_NM / (2 * math.sqrt(2 * math.log(2))) / nm
    return math.sqrt(sigma**2 + 1 / 12)


def _bilayer(r: np.ndarray, outer: float, inner: float, sigma: float) -> np.ndarray:
    """Density of two leaflets centred at radii ``outer`` and ``inner`` (voxels)."""
    scale = np.float32(-0.5 / sigma**2)
    return np.exp(scale * (r - np.float32(outer)) ** 2) + np.exp(scale * (r - np.float32(inner)) ** 2)


def _set_labels(labels: np.ndarray, sl: tuple[slice, ...], mask: np.ndarray, label: int) -> None:
    box = labels[sl]
    # Placement keeps objects apart; this guards the ground truth against a rendering bug.
    if np.any(box[mask]):
        raise RuntimeError(f"object {label} overlaps another object's label")
    box[mask] = label


def _render_vesicle(
    density: np.ndarray, labels: np.ndarray, label: int, obj: _Object, nm: float, lumen: float
) -> None:
    sigma = _leaflet_sigma(nm)
    outer = obj.radius - LEAFLET_FWHM_NM / 2 / nm
    inner = outer - LEAFLET_SPACING_NM / nm
    sl, dz, dy, dx = _box(obj.center, obj.radius + 3 * sigma, density.shape)
    r = np.sqrt(dz**2 + dy**2 + dx**2)
    rho = _bilayer(r, outer, inner, sigma)
    if lumen:
        # Linear ramp over one voxel at the inner leaflet's centre: an anti-aliased lumen edge.
        rho += np.float32(lumen) * np.clip(np.float32(inner + 0.5) - r, 0, 1)
    density[sl] += rho
    _set_labels(labels, sl, r <= obj.radius, label)


def _render_gold(density: np.ndarray, labels: np.ndarray, label: int, obj: _Object, nm: float, lumen: float) -> None:
    sl, dz, dy, dx = _box(obj.center, obj.radius + 1, density.shape)
    r = np.sqrt(dz**2 + dy**2 + dx**2)
    density[sl] += np.float32(GOLD_DENSITY) * np.clip(np.float32(obj.radius + 0.5) - r, 0, 1)
    _set_labels(labels, sl, r <= obj.radius, label)


def _render_ice(density: np.ndarray, labels: np.ndarray, label: int, obj: _Object, nm: float, lumen: float) -> None:
    p = obj.params
    sl, dz, dy, dx = _box(obj.center, obj.radius + 1, density.shape)
    offsets = np.stack(np.broadcast_arrays(dz, dy, dx), axis=-1)
    r = np.linalg.norm(offsets, axis=-1)
    unit = offsets / np.maximum(r, np.float32(1e-6))[..., None]
    surface = np.float32(p["scale"]) * _blob_radius(unit, p["directions"], p["heights"], p["sharpness"])
    # The bump maximum was found on sampled directions; the bounding ball caps any excess.
    surface = np.minimum(surface, np.float32(obj.radius))
    density[sl] += np.float32(ICE_DENSITY) * np.clip(surface - r + np.float32(0.5), 0, 1)
    _set_labels(labels, sl, r <= surface, label)


def _render_fragment(
    density: np.ndarray, labels: np.ndarray, label: int, obj: _Object, nm: float, lumen: float
) -> None:
    theta = float(obj.params["theta"])
    rc = float(obj.params["curvature"])
    axis = np.asarray(obj.params["axis"], np.float64)
    sigma = _leaflet_sigma(nm)
    half_spacing = LEAFLET_SPACING_NM / 2 / nm
    half_thickness = half_spacing + LEAFLET_FWHM_NM / 2 / nm
    # obj.center is the bounding sphere's centre, on the cap's axis halfway between apex and
    # rim plane; the cap's curvature centre lies rc (1 + cos theta) / 2 behind it.
    shift = (axis * rc * (1 + math.cos(theta)) / 2).astype(np.float32)
    sl, dz, dy, dx = _box(obj.center, obj.radius + 3 * sigma, density.shape)
    pz, py, px = dz + shift[0], dy + shift[1], dx + shift[2]
    r = np.sqrt(pz**2 + py**2 + px**2)
    cos_angle = (pz * np.float32(axis[0]) + py * np.float32(axis[1]) + px * np.float32(axis[2])) / np.maximum(r, 1e-6)
    angle = np.arccos(np.clip(cos_angle, -1, 1))
    # Soft rim: fade over about one voxel of arc length so the open edge does not alias.
    taper = np.clip(r * (np.float32(theta) - angle) + np.float32(0.5), 0, 1)
    density[sl] += _bilayer(r, rc + half_spacing, rc - half_spacing, sigma) * taper
    _set_labels(labels, sl, (np.abs(r - np.float32(rc)) <= half_thickness) & (angle <= theta), label)


# --------------------------------------------------------------------------- Fourier filters


def _transfer_functions(
    shape: tuple[int, int, int], nm: float, band: tuple[float, float] | None, wedge_deg: float | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Band-pass transfer and missing-wedge mask on the ``rfftn`` grid of ``shape`` (either may be None)."""
    kz = sfft.fftfreq(shape[0]).astype(np.float32)[:, None, None]  # cycles per voxel
    ky = sfft.fftfreq(shape[1]).astype(np.float32)[None, :, None]
    kx = sfft.rfftfreq(shape[2]).astype(np.float32)[None, None, :]
    band_tf = None
    if band is not None:
        hp, lp = band
        k2 = (kz**2 + ky**2 + kx**2) / np.float32(nm**2)  # (1/nm)^2
        band_tf = (1 - np.exp(k2 * np.float32(-0.5 * hp**2))) * np.exp(k2 * np.float32(-0.5 * lp**2))
    wedge_mask = None
    if wedge_deg is not None:
        a = math.radians(wedge_deg)
        # Sampled where |kz| <= |kx| tan(a); written with cos/sin so a -> 90 degrees stays finite.
        missing = np.abs(kz) * np.float32(math.cos(a)) > np.abs(kx) * np.float32(math.sin(a))
        wedge_mask = (~missing).astype(np.float32)  # (nz, 1, nx // 2 + 1): the same for every ky
    return band_tf, wedge_mask
