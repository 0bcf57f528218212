"""A volume's voxel size: read once from the file's metadata (or given), checked once, converted here.

Cryo-ET formats record voxel sizes in Å (MRC headers, copick), other formats
in their own units (:data:`biosam.io.meta.UNIT_ANGSTROM`); the tomogram code
takes lengths in nm. :class:`VoxelSize` holds the size in Å per axis and is
the one place that checks it and turns it into nm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

from biosam.errors import InputError
from biosam.io.meta import ImageMeta, unit_factor
from biosam.settings import check, rule

logger = logging.getLogger(__name__)

__all__ = ["ANGSTROM_PER_NM", "VoxelSize", "angstrom_to_nm", "voxel_size_of"]

ANGSTROM_PER_NM = 10.0


def angstrom_to_nm(length_a: float) -> float:
    """A length in Å, in nm."""
    return length_a / ANGSTROM_PER_NM


def _usable(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class VoxelSize:
    """The voxel size of a ``(Z, Y, X)`` volume in Å along each axis (floats, finite, > 0)."""

    z: float
    y: float
    x: float

    def __post_init__(self) -> None:
        check("voxel size", [rule(all(_usable(v) for v in self.angstrom),
                                  f"z, y and x must be positive numbers of Å, got {self.angstrom}")])
        for axis, value in zip("zyx", self.angstrom):
            object.__setattr__(self, axis, float(value))  # plain floats, whatever number type came in

    @classmethod
    def of(cls, value: VoxelSize | float | Sequence[float]) -> VoxelSize:
        """``value`` as a voxel size: a :class:`VoxelSize`, one number in Å (cubic voxels) or ``(z, y, x)`` in Å."""
        if isinstance(value, VoxelSize):
            return value
        try:
            values = np.atleast_1d(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError):
            values = np.zeros(0)
        if values.size == 1:
            values = np.repeat(values, 3)
        if values.shape != (3,) or not all(_usable(v) for v in values.tolist()):
            raise InputError(f"voxel size must be one positive number or (z, y, x) in Å, got {value!r}.")
        return cls(*(float(v) for v in values))

    @property
    def angstrom(self) -> tuple[float, float, float]:
        """``(z, y, x)`` in Å."""
        return self.z, self.y, self.x

    @property
    def nm(self) -> tuple[float, float, float]:
        """``(z, y, x)`` in nm."""
        return angstrom_to_nm(self.z), angstrom_to_nm(self.y), angstrom_to_nm(self.x)

    @property
    def pixel_nm(self) -> float:
        """The in-plane (y, x) pixel size in nm: their geometric mean, for lengths measured on a slice."""
        _, y, x = self.nm
        return math.sqrt(y * x)

    @property
    def voxel_nm3(self) -> float:
        """One voxel's volume in nm³."""
        return float(np.prod(self.nm))


def voxel_size_of(meta: ImageMeta, given: float | None, path: str) -> VoxelSize:
    """The voxel size of a volume read by :func:`biosam.io.read_image`: the header's, or ``given`` (Å, a
    command's ``--voxel-size``), which replaces the header's; refused when neither is known."""
    spacing = meta.spacing or {}
    scale = unit_factor(meta.unit, "angstrom")
    recorded = None
    if scale is not None and all(spacing.get(a, 0) > 0 for a in "ZYX"):
        recorded = tuple(float(spacing[a]) * scale for a in "ZYX")
    if given is not None:
        if not (given > 0 and math.isfinite(given)):
            raise InputError(f"--voxel-size must be a positive size in Å, got {given}.")
        if recorded is not None and not np.allclose(recorded, given, rtol=1e-3):
            logger.warning("%s: header voxel size %s Å replaced by --voxel-size %g Å", path, recorded, given)
        return VoxelSize.of(float(given))
    if recorded is None:
        raise InputError(
            f"{path}: the file does not record its voxel size (0 or missing in the header). Give it with "
            "--voxel-size in Å (e.g. --voxel-size 10)."
        )
    return VoxelSize.of(recorded)
