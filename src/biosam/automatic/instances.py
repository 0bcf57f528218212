"""From the instance decoder's maps to objects: seeds from the distance maps, then a seeded watershed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import watershed

from biosam.automatic.labels import relabel
from biosam.errors import InputError


@dataclass(frozen=True)
class PostProcessing:
    """Parameters of :func:`maps_to_instances`.

    The defaults are where tuning starts; every trained decoder stores the
    values tuned on its training tiles (see ``decoder_postprocessing``).

    - ``foreground_threshold``: foreground probability above which a pixel belongs to an object.
    - ``center_threshold`` / ``boundary_threshold``: a seed is where the centre
      distance and the boundary distance are both below these (values near the
      middle of an object).
    - ``smoothing``: Gaussian sigma (pixels) applied to the maps first, against
      speckle from upsampling.
    - ``min_size``: objects smaller than this many pixels are dropped.
    - ``min_relative_size``: objects smaller than this fraction of the typical
      object in the image are dropped too (typical: the size that half of all
      object pixels lie in objects of at least that size, so fragments barely
      move it). Scale-free, unlike ``min_size``.
    - ``fill_holes``: fill holes in the foreground first (textured nuclei leave
      gaps in it; switch off for ring-shaped objects).
    """

    foreground_threshold: float = 0.4
    center_threshold: float = 0.5
    boundary_threshold: float = 0.5
    smoothing: float = 2.0
    min_size: int = 50
    fill_holes: bool = True
    min_relative_size: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PostProcessing:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes) -> PostProcessing:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise InputError(f"unknown post-processing parameter(s): {', '.join(sorted(unknown))}.")
        return PostProcessing(**{**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})


def maps_to_instances(maps: np.ndarray, params: PostProcessing | None = None, **overrides) -> np.ndarray:
    """Instance labels ``(H, W)`` from decoder maps ``(3, H, W)`` (foreground, centre and boundary distance).

    Seeds are the connected regions where both distances are small inside the
    foreground (holes filled unless ``fill_holes`` is off); a watershed on the boundary distance grows them to fill the
    foreground. Foreground regions that received no seed become objects of
    their own. Objects below ``min_size`` pixels are removed; ids are 1..N
    (uint16, uint32 from 65536 objects on). Keyword overrides replace single
    fields of ``params``.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != 3:
        raise InputError(f"decoder maps must have shape (3, H, W), got {maps.shape}.")
    p = (params or PostProcessing()).replace(**overrides)
    if p.smoothing > 0:
        maps = np.stack([ndimage.gaussian_filter(m, p.smoothing) for m in maps])
    foreground, center, boundary = maps
    mask = foreground > p.foreground_threshold
    if p.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    seeds = connected_components(mask & (center < p.center_threshold) & (boundary < p.boundary_threshold))
    labels = watershed(boundary, markers=seeds, mask=mask)
    # Foreground the seeds did not reach (an object whose distances were unsure) still counts.
    orphans = connected_components(mask & (labels == 0))
    labels = np.where(orphans > 0, orphans + labels.max(), labels)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    limit = p.min_size
    if p.min_relative_size > 0 and sizes.any():
        limit = max(limit, p.min_relative_size * typical_size(sizes[sizes > 0]))
    if limit > 0:
        labels[(sizes < limit)[labels] & (labels > 0)] = 0
    return relabel(labels)


def typical_size(sizes: np.ndarray) -> float:
    """The pixel-weighted median of object sizes: half of all object pixels lie in objects at least this big."""
    sizes = np.sort(np.asarray(sizes, dtype=np.float64))
    if sizes.size == 0:
        return 0.0
    cumulative = np.cumsum(sizes)
    return float(sizes[np.searchsorted(cumulative, cumulative[-1] / 2)])
