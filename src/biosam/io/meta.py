"""What a reader knows about an image besides its pixels: axes, geometry, channels."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

AXIS_LETTERS = "TCZYX"
SPATIAL_AXES = "ZYX"


@dataclass
class ImageMeta:
    """Axes and geometry of an array returned by :func:`biosam.io.read_image`.

    ``axes`` has one upper-case letter per array dimension, from ``T C Z Y X``
    (RGB samples count as ``C``), e.g. ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"CZYX"``.
    ``spacing`` and ``origin`` map spatial axis letters to physical sizes and the
    position of voxel 0, in ``unit``. ``affine`` (4x4, NIfTI/DICOM only) maps
    array indices of the spatial axes, in ``axes`` order, to RAS+ world mm.
    ``extra`` keeps format-specific details a writer needs for a faithful round
    trip (a NIfTI header, OME-Zarr multiscales, a copick run, ...).
    """

    path: str
    format: str
    axes: str
    shape: tuple[int, ...]
    dtype: str
    spacing: dict[str, float] = field(default_factory=dict)
    unit: str | None = None
    origin: dict[str, float] = field(default_factory=dict)
    affine: np.ndarray | None = None
    channel_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.axes = self.axes.upper()
        if len(self.axes) != len(self.shape) or set(self.axes) - set(AXIS_LETTERS) or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"axes '{self.axes}' do not describe an array of shape {self.shape}")

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in SPATIAL_AXES)

    def labels_meta(self) -> ImageMeta:
        """The geometry of a label image for this image: same axes without channels."""
        keep = [i for i, a in enumerate(self.axes) if a != "C"]
        return replace(
            self,
            axes="".join(self.axes[i] for i in keep),
            shape=tuple(self.shape[i] for i in keep),
            channel_names=None,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (for ``--json`` output and logs)."""
        out: dict[str, Any] = {"path": self.path, "format": self.format, "axes": self.axes, "shape": list(self.shape)}
        if self.spacing:
            out["spacing"] = {k.lower(): v for k, v in self.spacing.items()}
            out["unit"] = self.unit
        if self.origin:
            out["origin"] = {k.lower(): v for k, v in self.origin.items()}
        if self.channel_names:
            out["channel_names"] = self.channel_names
        return out


# Lengths of the units readers report (ImageMeta.unit), in angstrom.
UNIT_ANGSTROM = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4, "millimeter": 1e7}


def unit_factor(unit: str | None, to: str) -> float | None:
    """Factor that turns lengths in ``unit`` into lengths in ``to`` (units as in :attr:`ImageMeta.unit`); None if unknown."""
    if unit not in UNIT_ANGSTROM or to not in UNIT_ANGSTROM:
        return None
    return UNIT_ANGSTROM[unit] / UNIT_ANGSTROM[to]


