"""The density of a synapse-like cell region, with exact labels of its membrane-bound compartments.

Densities are in "leaflet units" (a lipid leaflet's peak is 1, cytosol 0).
What is drawn, in this order, each kept clear of what is already there:

* a plasma membrane: a bilayer sheet across the volume near one x face,
  gently undulating;
* microtubules (hollow tubes, 25 nm across, 15 nm lumen) running roughly in
  the x-y plane;
* synaptic vesicles (30-60 nm across, bilayer shells, mildly ellipsoidal) in
  clusters, each new member 2-10 nm from a member already placed, and a few
  endosomes (80-150 nm) where they fit;
* actin filaments (7 nm), ribosome-sized particles (two lobes, ~25 nm), gold
  fiducials (10 nm, density 8) near the top and bottom faces, ice
  contamination blobs at the faces, and a crowded cytosol (a smooth random
  field).

Only vesicles and endosomes are labelled: they are what the tomogram pipeline
must find.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
from scipy import ndimage

from biosam.settings import check, rule, whole, within
from biosam.tomogram.synthetic.simple import (
    LEAFLET_FWHM_NM,
    LEAFLET_SPACING_NM,
    _bilayer,
    _blob_radius,
    _leaflet_sigma,
    _unit_vectors,
)
from biosam.tomogram.synthetic.simple import _box as _axes_box

VESICLE_DIAMETER_NM = (30.0, 60.0)
ENDOSOME_DIAMETER_NM = (80.0, 150.0)
CLUSTER_GAP_NM = (2.0, 10.0)
MICROTUBULE_NM = (7.5, 12.5)  # inner and outer wall radius
ACTIN_RADIUS_NM = 3.5
RIBOSOME_RADIUS_NM = 12.5
GOLD_RADIUS_NM = 5.0
GOLD_DENSITY = 8.0
PROTEIN_DENSITY = 0.9
LUMEN_DENSITY = 0.15
ICE_DENSITY = 1.2


@dataclass
class Scene:
    """A phantom: ``density`` ``(z, y, x)`` float32, ``labels`` of its compartments and what each one is."""

    density: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    classes: dict[int, str]
    centers: list[np.ndarray]
    radii_nm: list[float]


@dataclass(frozen=True)
class SceneSettings:
    """How crowded a scene is: objects per µm² of the x-y field (so the counts follow the field's size)."""

    vesicles_per_um2: float = 300.0
    cluster_size: tuple[int, int] = (6, 30)
    endosomes_per_um2: float = 8.0
    microtubules_per_um2: float = 10.0
    actin_per_um2: float = 60.0
    ribosomes_per_um2: float = 250.0
    gold_per_um2: float = 20.0
    ice_per_um2: float = 8.0
    plasma_membrane: bool = True
    cytosol_std: float = 0.12

    def __post_init__(self) -> None:
        sizes = tuple(self.cluster_size) if isinstance(self.cluster_size, (tuple, list)) else ()
        # Cluster sizes are drawn from [low, high): high must exceed low.
        sizes_ok = (len(sizes) == 2 and whole("low", sizes[0], 1)[0] and whole("high", sizes[1], 2)[0]
                    and sizes[0] < sizes[1])
        check("scene settings", [
            *(within(f.name, getattr(self, f.name), 0.0, math.inf) for f in fields(self) if f.name.endswith("_per_um2")),
            rule(sizes_ok, f"cluster_size must be two whole numbers 1 <= low < high, got {self.cluster_size!r}"),
            within("cytosol_std", self.cytosol_std, 0.0, math.inf),
        ])


class _Occupancy:
    """Spheres already placed, for clearance checks."""

    def __init__(self) -> None:
        self.centers = np.zeros((0, 3))
        self.radii = np.zeros(0)

    def clear(self, center: np.ndarray, radius: float, gap: float) -> bool:
        if not len(self.radii):
            return True
        d = np.linalg.norm(self.centers - center, axis=1)
        return bool(np.all(d >= self.radii + radius + gap))

    def add(self, center: np.ndarray, radius: float) -> None:
        self.centers = np.vstack([self.centers, center])
        self.radii = np.append(self.radii, radius)


def _box(center: np.ndarray, extent: float, shape: tuple[int, ...]):
    """Slices of the box within ``extent`` voxels of ``center`` and the offsets ``(..., 3)`` from it."""
    sl, dz, dy, dx = _axes_box(center, extent, shape)
    return sl, np.stack(np.broadcast_arrays(dz, dy, dx), axis=-1)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _shell(r: np.ndarray, radius: float, nm: float) -> np.ndarray:
    """Bilayer density at (scaled) radius ``r`` voxels for a compartment of outer radius ``radius`` voxels."""
    outer = radius - LEAFLET_FWHM_NM / 2 / nm
    inner = outer - LEAFLET_SPACING_NM / nm
    rho = _bilayer(r, outer, inner, _leaflet_sigma(nm))
    return rho + np.float32(LUMEN_DENSITY) * np.clip(np.float32(inner + 0.5) - r, 0, 1)


def _line_distance(shape: tuple[int, int, int], point: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Distance (voxels) of every voxel from the line through ``point`` along unit ``direction``."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) - np.float32(p) for n, p in zip(shape, point)],
                        indexing="ij", sparse=True)
    along = sum(g * np.float32(d) for g, d in zip(grids, direction))
    squared = sum(g * g for g in grids) - along * along
    return np.sqrt(np.maximum(squared, 0))


def _smooth_step(x: np.ndarray) -> np.ndarray:
    return np.clip(x + np.float32(0.5), 0, 1)


def render_scene(shape: tuple[int, int, int], nm: float, rng: np.random.Generator,
                 settings: SceneSettings = SceneSettings()) -> Scene:
    """Draw a scene of ``shape`` voxels of ``nm`` nm (see the module docstring)."""
    density = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint16)
    area_um2 = shape[1] * shape[2] * (nm / 1000) ** 2
    occupied = _Occupancy()
    lines: list[tuple[np.ndarray, np.ndarray, float]] = []  # point, direction, radius (voxels)
    classes: dict[int, str] = {}
    centers: list[np.ndarray] = []
    radii: list[float] = []
    upper = np.array(shape, np.float64) - 1

    def count(per_um2: float) -> int:
        return int(rng.poisson(per_um2 * area_um2))

    # Plasma membrane: x = x0 + a sin(2 pi y / L + phase), near the low-x face.
    pm_limit = 0.0
    if settings.plasma_membrane and shape[2] * nm > 200:
        x0 = rng.uniform(0.06, 0.12) * shape[2]
        amp, period, phase = rng.uniform(2, 8) / nm, rng.uniform(300, 800) / nm, rng.uniform(0, 2 * np.pi)
        y = np.arange(shape[1], dtype=np.float32)[None, :, None]
        x = np.arange(shape[2], dtype=np.float32)[None, None, :]
        surface = x0 + amp * np.sin(2 * np.pi * y / period + phase)
        half = LEAFLET_SPACING_NM / 2 / nm
        d = np.abs(x - surface)
        k = np.float32(-0.5 / _leaflet_sigma(nm) ** 2)
        density += np.broadcast_to(np.exp(k * (d - half) ** 2), shape)
        pm_limit = x0 + amp + (LEAFLET_SPACING_NM + LEAFLET_FWHM_NM) / nm

    def away_from_lines(center: np.ndarray, radius: float, gap: float) -> bool:
        for point, direction, line_radius in lines:
            offset = center - point
            d = np.linalg.norm(offset - offset.dot(direction) * direction)
            if d < radius + line_radius + gap:
                return False
        return True

    def inside(center: np.ndarray, radius: float) -> bool:
        return bool(np.all(center >= radius) and np.all(center <= upper - radius) and center[2] - radius > pm_limit)

    # Microtubules across the field, tilted at most 15 degrees out of the x-y plane.
    wall_in, wall_out = MICROTUBULE_NM[0] / nm, MICROTUBULE_NM[1] / nm
    for _ in range(count(settings.microtubules_per_um2)):
        point = rng.uniform([wall_out, 0, pm_limit + wall_out], upper - [wall_out, 0, 0])
        azimuth, elevation = rng.uniform(0, np.pi), np.radians(rng.uniform(-15, 15))
        direction = np.array([np.sin(elevation), np.cos(elevation) * np.sin(azimuth),
                              np.cos(elevation) * np.cos(azimuth)])
        if not away_from_lines(point, wall_out, 2 / nm):
            continue
        r = _line_distance(shape, point, direction)
        density += np.float32(PROTEIN_DENSITY) * _smooth_step(wall_out - r) * _smooth_step(r - wall_in)
        lines.append((point, direction, wall_out))

    # Vesicle clusters, then endosomes where they fit.
    def place_compartment(kind: str, radius_nm: float, near: tuple[np.ndarray, float] | None) -> bool:
        axes = np.exp(rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
        axes /= np.float32(np.prod(axes) ** (1 / 3))
        radius = radius_nm / nm
        bound = radius * float(axes.max())
        if np.any(upper < 2 * bound):
            return False  # thicker than the volume
        for _ in range(60):
            if near is None:
                center = rng.uniform(bound, upper - bound)
            else:
                gap = rng.uniform(*CLUSTER_GAP_NM) / nm
                center = near[0] + _unit_vectors(rng, 1)[0] * (near[1] + bound + gap)
            if inside(center, bound) and occupied.clear(center, bound, CLUSTER_GAP_NM[0] / nm) \
                    and away_from_lines(center, bound, 2 / nm):
                break
        else:
            return False
        sl, offsets = _box(center, bound + 3, shape)
        scaled = (offsets @ _rotation(rng).T) / axes
        r = np.linalg.norm(scaled, axis=-1)
        density[sl] += _shell(r, radius, nm)
        label = len(classes) + 1
        box = labels[sl]
        box[r <= radius] = label
        classes[label] = kind
        centers.append(center)
        radii.append(radius_nm)
        occupied.add(center, bound)
        return True

    remaining = count(settings.vesicles_per_um2)
    for _ in range(count(settings.endosomes_per_um2)):
        place_compartment("endosome", rng.uniform(*ENDOSOME_DIAMETER_NM) / 2, None)
    while remaining > 0:
        size = min(remaining, int(rng.integers(*settings.cluster_size)))
        remaining -= size
        members: list[tuple[np.ndarray, float]] = []
        for _ in range(size):
            radius_nm = rng.uniform(*VESICLE_DIAMETER_NM) / 2
            near = members[int(rng.integers(len(members)))] if members else None
            if place_compartment("vesicle", radius_nm, near):
                members.append((centers[-1], radius_nm / nm * 1.09))

    # Actin filaments: keep them off the compartments.
    actin = ACTIN_RADIUS_NM / nm
    for _ in range(count(settings.actin_per_um2)):
        point, direction = rng.uniform(0, upper), _unit_vectors(rng, 1)[0]
        direction[0] *= 0.5
        direction /= np.linalg.norm(direction)
        offsets = occupied.centers - point
        d = np.linalg.norm(offsets - np.outer(offsets @ direction, direction), axis=1)
        if np.any(d < occupied.radii + actin + 1 / nm):
            continue
        r = _line_distance(shape, point, direction)
        near_line = r < actin + 2
        density[near_line] += np.float32(PROTEIN_DENSITY) * _smooth_step(actin - r[near_line])

    # Particles: ribosomes (two lobes), gold near the faces, ice blobs on the faces.
    def particle(radius: float, z_range: tuple[float, float] | None = None) -> np.ndarray | None:
        for _ in range(30):
            center = rng.uniform(radius, upper - radius)
            if z_range is not None:
                center[0] = rng.uniform(*z_range)
            if center[2] - radius > pm_limit and occupied.clear(center, radius, 1 / nm) \
                    and away_from_lines(center, radius, 1 / nm):
                occupied.add(center, radius)
                return center
        return None

    ribosome = RIBOSOME_RADIUS_NM / nm
    for _ in range(count(settings.ribosomes_per_um2)):
        center = particle(ribosome)
        if center is None:
            continue
        sl, offsets = _box(center, ribosome + 1, shape)
        axis = _unit_vectors(rng, 1)[0].astype(np.float32) * np.float32(ribosome * 0.35)
        big = np.linalg.norm(offsets + axis, axis=-1)
        small = np.linalg.norm(offsets - axis * np.float32(1.4), axis=-1)
        lobes = np.maximum(_smooth_step(ribosome * 0.62 - big), _smooth_step(ribosome * 0.45 - small))
        density[sl] += np.float32(PROTEIN_DENSITY * 1.2) * lobes
    gold = GOLD_RADIUS_NM / nm
    edge = min(15 / nm, shape[0] / 4)
    for _ in range(count(settings.gold_per_um2)):
        top = rng.random() < 0.5
        center = particle(gold, (gold, gold + edge) if top else (upper[0] - gold - edge, upper[0] - gold))
        if center is not None:
            sl, offsets = _box(center, gold + 1, shape)
            density[sl] += np.float32(GOLD_DENSITY) * _smooth_step(gold - np.linalg.norm(offsets, axis=-1))
    for _ in range(count(settings.ice_per_um2)):
        bound = rng.uniform(15, 40) / nm
        center = particle(bound, (0, 0) if rng.random() < 0.5 else (upper[0], upper[0]))
        if center is None:
            continue
        n_bumps = int(rng.integers(4, 9))
        bumps = {"directions": _unit_vectors(rng, n_bumps), "heights": rng.uniform(-0.35, 0.7, n_bumps),
                 "sharpness": rng.uniform(2.0, 6.0, n_bumps)}
        scale = bound / _blob_radius(_unit_vectors(rng, 2000), **bumps).max()
        sl, offsets = _box(center, bound + 1, shape)
        r = np.linalg.norm(offsets, axis=-1)
        surface = np.minimum(np.float32(scale) * _blob_radius(offsets / np.maximum(r, 1e-6)[..., None], **bumps),
                             np.float32(bound))
        density[sl] += np.float32(ICE_DENSITY) * _smooth_step(surface - r)

    if settings.cytosol_std > 0:
        field_ = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5 / nm)
        field_ *= np.float32(settings.cytosol_std / max(float(field_.std()), 1e-12))
        density += np.where(labels > 0, np.float32(0.3), np.float32(1.0)) * field_
    return Scene(density, labels, classes, centers, radii)
