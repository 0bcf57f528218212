"""Image formation of a cryo-electron tomogram: tilt series, contrast transfer, noise, reconstruction.

Geometry: volumes are ``(z, y, x)``, the beam runs along z at zero tilt and the
tilt axis is y. A tilt series is ``(n_tilts, y, u)``, ``u`` the detector axis
across the tilt axis (``u = x`` at zero tilt). Projection and back-projection
are one sparse matrix per tilt (each voxel shared linearly between the two
detector pixels its centre falls between) and its transpose, so the
reconstruction is exactly the adjoint of the projection, filtered: weighted
back-projection.

Contrast: the weak-phase image of a projected density ``p`` is
``-CTF * p`` (dense material dark where the CTF is positive, at low spatial
frequencies in underfocus), with
``CTF(k) = sqrt(1 - A^2) sin(chi) + A cos(chi)``,
``chi = pi lambda df k^2 - pi/2 Cs lambda^3 k^4``, attenuated by a B-factor
envelope and by radiation damage: with the exposure ``N`` a tilt has received
before it (dose-symmetric order), frequency ``k`` keeps
``exp(-N / (2 Ne(k)))`` of its amplitude, ``Ne(k) = 0.245 k^-1.665 + 2.81``
e-/Å² (Grant & Grigorieff 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import sparse


def electron_wavelength(kv: float) -> float:
    """Relativistic electron wavelength in Å at ``kv`` kilovolts (0.0197 Å at 300 kV)."""
    volts = kv * 1e3
    return 12.2643 / math.sqrt(volts * (1 + 0.97848e-6 * volts))


@dataclass(frozen=True)
class Microscope:
    """Imaging conditions. ``defocus_um`` is underfocus (positive, µm); ``dose`` is e-/Å² per tilt."""

    kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    defocus_um: float = 4.0
    b_factor: float = 50.0
    dose: float = 3.0


def tilt_angles(max_tilt: float = 60.0, step: float = 3.0) -> np.ndarray:
    """Tilt angles in degrees from ``-max_tilt`` to ``max_tilt`` in ``step``s."""
    n = int(math.floor(max_tilt / step + 1e-9))
    return np.arange(-n, n + 1, dtype=np.float64) * step


def dose_order(angles: np.ndarray) -> np.ndarray:
    """Exposure rank of each tilt in a dose-symmetric scheme: 0 first, then pairs of growing |angle|."""
    order = np.lexsort((angles, np.abs(angles)))
    rank = np.empty(len(angles), np.int64)
    rank[order] = np.arange(len(angles))
    return rank


def _projector(shape_zx: tuple[int, int], n_detector: int, angle_deg: float) -> sparse.csr_matrix:
    """Sparse ``(z*x, n_detector)`` matrix taking a ``(z, x)`` plane to its projection at ``angle_deg``."""
    nz, nx = shape_zx
    a = math.radians(angle_deg)
    z = np.arange(nz, dtype=np.float64) - (nz - 1) / 2
    x = np.arange(nx, dtype=np.float64) - (nx - 1) / 2
    u = (x[None, :] * math.cos(a) - z[:, None] * math.sin(a) + (n_detector - 1) / 2).ravel()
    left = np.floor(u).astype(np.int64)
    frac = u - left
    rows = np.arange(nz * nx)
    cols = np.concatenate([left, left + 1])
    vals = np.concatenate([1 - frac, frac])
    rows = np.concatenate([rows, rows])
    inside = (cols >= 0) & (cols < n_detector)
    return sparse.csr_matrix((vals[inside], (rows[inside], cols[inside])), shape=(nz * nx, n_detector))


def project(volume: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Line integrals of ``volume`` ``(z, y, x)`` at each tilt: ``(n_tilts, y, x)``, float32."""
    nz, ny, nx = volume.shape
    planes = np.ascontiguousarray(np.asarray(volume, np.float32).transpose(1, 0, 2)).reshape(ny, nz * nx)
    out = np.empty((len(angles), ny, nx), np.float32)
    for i, angle in enumerate(angles):
        out[i] = (planes @ _projector((nz, nx), nx, angle)).astype(np.float32)
    return out


def back_project(series: np.ndarray, angles: np.ndarray, depth: int, ramp: bool = True) -> np.ndarray:
    """Weighted back-projection of a tilt series ``(n_tilts, y, u)`` into a ``(depth, y, u)`` volume.

    ``ramp``: weight each projection by ``|k_u|`` (with a cosine roll-off to
    Nyquist) first, which makes it a reconstruction rather than a blurred sum.
    """
    n, ny, nx = series.shape
    if ramp:
        k = np.abs(sfft.rfftfreq(nx))
        weight = (k * np.cos(np.pi * k)).astype(np.float32)  # cos(pi k) reaches 0 at Nyquist (k = 0.5)
        weight[0] = 0.25 / nx  # a little of the mean, as ramp filters sampled on a grid keep
        series = sfft.irfft(sfft.rfft(series, axis=-1) * weight, n=nx, axis=-1).astype(np.float32)
    out = np.zeros((depth * nx, ny), np.float64)
    for i, angle in enumerate(angles):
        out += _projector((depth, nx), nx, angle) @ series[i].T.astype(np.float64)
    return np.ascontiguousarray(out.reshape(depth, nx, ny).transpose(0, 2, 1)).astype(np.float32) * np.float32(
        math.pi / len(angles)
    )


def _frequencies(shape: tuple[int, int], pixel_a: float) -> np.ndarray:
    """Spatial frequency magnitude in 1/Å on the ``rfft2`` grid of ``shape``."""
    ky = sfft.fftfreq(shape[0])[:, None]
    kx = sfft.rfftfreq(shape[1])[None, :]
    return np.sqrt(ky**2 + kx**2) / pixel_a


def contrast_transfer(k: np.ndarray, scope: Microscope, exposure: float = 0.0) -> np.ndarray:
    """The CTF at frequencies ``k`` (1/Å) with its B-factor and exposure envelopes (see the module docstring)."""
    lam = electron_wavelength(scope.kv)
    df = scope.defocus_um * 1e4
    cs = scope.cs_mm * 1e7
    chi = math.pi * lam * df * k**2 - math.pi / 2 * cs * lam**3 * k**4
    a = scope.amplitude_contrast
    ctf = math.sqrt(1 - a * a) * np.sin(chi) + a * np.cos(chi)
    envelope = np.exp(-scope.b_factor * k**2 / 4)
    if exposure > 0:
        critical = 0.245 * np.maximum(k, 1e-6) ** -1.665 + 2.81
        envelope = envelope * np.exp(-exposure / (2 * critical))
    return ctf * envelope


def image_series(projections: np.ndarray, angles: np.ndarray, pixel_a: float, scope: Microscope) -> np.ndarray:
    """Noise-free micrographs of a projection series: ``-CTF * p`` per tilt, each with its own exposure."""
    k = _frequencies(projections.shape[1:], pixel_a)
    rank = dose_order(angles)
    out = np.empty_like(projections)
    for i in range(len(angles)):
        transfer = contrast_transfer(k, scope, exposure=rank[i] * scope.dose)
        out[i] = -sfft.irfft2(sfft.rfft2(projections[i]) * transfer, s=projections.shape[1:])
    return out


def series_noise(shape: tuple[int, int, int], angles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White noise per tilt, its variance growing as ``1 / cos(angle)`` (a longer path through the ice)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= (1.0 / np.sqrt(np.cos(np.radians(angles)))).astype(np.float32)[:, None, None]
    return noise
