"""Tomograms that look like real cryo-ET: a crowded synapse phantom imaged as a tilt series and reconstructed.

:func:`realistic_tomogram` draws a scene (:mod:`.scene`), projects it at every
tilt of a dose-symmetric series, applies the contrast transfer function with
its envelopes and per-tilt noise, and reconstructs by weighted
back-projection (:mod:`.tilt`). The missing wedge, its streaks and the CTF's
fringes thus arise as they do in real data. The noise-free reconstruction
and the noise reconstruction are made separately (both are linear in their
input) and summed with the noise scaled so that
``var(signal) / var(noise)`` over the volume equals ``snr``.

Polarity: ``"dark"`` keeps dense material dark (a reconstruction as it
comes); ``"bright"`` inverts it, as some processing pipelines store
tomograms. The labels (vesicles, endosomes) are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from biosam.errors import InputError
from biosam.io.voxel_size import angstrom_to_nm
from biosam.tomogram.synthetic.scene import SceneSettings, render_scene
from biosam.tomogram.synthetic.simple import SyntheticTomogram, _check_shape, _check_snr, _positive
from biosam.tomogram.synthetic.tilt import Microscope, back_project, image_series, project, series_noise, tilt_angles

POLARITIES = ("dark", "bright")


def realistic_tomogram(
    shape: Sequence[int] = (128, 320, 320),
    *,
    voxel_size: float = 10.0,
    snr: float | None = 0.3,
    polarity: str = "dark",
    defocus_um: float = 4.0,
    max_tilt: float = 60.0,
    tilt_step: float = 3.0,
    scene: SceneSettings | None = None,
    seed: int | None = None,
) -> SyntheticTomogram:
    """A reconstructed tomogram of a synapse-like scene, with exact labels of its vesicles and endosomes.

    ``shape`` ``(z, y, x)`` voxels of ``voxel_size`` Å; ``snr`` the per-voxel
    signal-to-noise ratio of the reconstruction (None: no noise);
    ``polarity`` one of :data:`POLARITIES`; ``defocus_um`` underfocus at
    300 kV; tilts ``-max_tilt..max_tilt`` every ``tilt_step`` degrees.
    Objects in the returned ``classes`` are ``"vesicle"`` or ``"endosome"``.
    """
    shape_t = _check_shape(shape)
    voxel_size = _positive("voxel_size", voxel_size)
    noise_snr = _check_snr(snr)
    if polarity not in POLARITIES:
        raise InputError(f"polarity must be one of {', '.join(POLARITIES)}, got {polarity!r}.")
    if not 0 < max_tilt < 90 or not 0 < tilt_step <= max_tilt:
        raise InputError(f"need 0 < tilt_step <= max_tilt < 90 degrees, got {tilt_step} and {max_tilt}.")
    defocus_um = _positive("defocus_um", defocus_um)
    scene_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    drawn = render_scene(shape_t, angstrom_to_nm(voxel_size), np.random.default_rng(scene_seed), scene or SceneSettings())
    angles = tilt_angles(max_tilt, tilt_step)
    scope = Microscope(defocus_um=defocus_um)
    images = image_series(project(drawn.density, angles), angles, voxel_size, scope)
    volume = back_project(images, angles, shape_t[0])
    if noise_snr is not None:
        noise = back_project(series_noise(images.shape, angles, np.random.default_rng(noise_seed)), angles, shape_t[0])
        signal_var = float(volume.var(dtype=np.float64))
        noise *= np.float32(math.sqrt(signal_var / noise_snr) / max(float(noise.std(dtype=np.float64)), 1e-12))
        volume += noise
    if polarity == "bright":
        np.negative(volume, out=volume)
    return SyntheticTomogram(
        volume=np.ascontiguousarray(volume, np.float32),
        labels=drawn.labels,
        classes=drawn.classes,
        centers=np.array(drawn.centers, np.float64).reshape(-1, 3),
        radii_nm=np.array(drawn.radii_nm, np.float64),
        voxel_size=voxel_size,
    )
