"""napari sample data: the README quick start's cell image and a small synthetic cryo-ET tomogram.

Both are made on the spot, nothing is downloaded: ``cell.png`` ships inside scikit-image's wheel, and the
tomogram is rendered by :func:`biosam.tomogram.synthetic_tomogram` with a fixed seed (the same volume every
time, a fraction of a second on a laptop).
"""

from __future__ import annotations

from typing import Any

from biosam.napari.reader import METADATA_KEY, layer_parameters

LayerData = tuple[Any, dict[str, Any], str]

TOMOGRAM_SHAPE = (32, 128, 128)
TOMOGRAM_VOXEL_SIZE = 20.0  # Å: 64 x 256 x 256 nm, room for vesicles of up to 20 nm radius
TOMOGRAM_SEED = 0


def cell() -> list[LayerData]:
    """scikit-image's phase-contrast ``cell.png`` (660 x 550), the image of the README's quick start."""
    import skimage.data

    return [(skimage.data.cell(), {"name": "cell", "metadata": {METADATA_KEY: {"source": "skimage.data.cell()"}}},
             "image")]


def tomogram() -> list[LayerData]:
    """A synthetic tomogram of 8 lipid vesicles, 32 x 128 x 128 voxels at 20 Å, scaled in Å."""
    from biosam.tomogram import synthetic_tomogram

    synthetic = synthetic_tomogram(TOMOGRAM_SHAPE, voxel_size=TOMOGRAM_VOXEL_SIZE, n_vesicles=8,
                                   radius_range_nm=(10.0, 20.0), seed=TOMOGRAM_SEED)
    size = float(synthetic.voxel_size)
    info = {"source": f"biosam.tomogram.synthetic_tomogram(seed={TOMOGRAM_SEED})", "axes": "ZYX", "unit": "angstrom"}
    kwargs: dict[str, Any] = {"name": "synthetic tomogram", "scale": (size,) * 3, "metadata": {METADATA_KEY: info}}
    if "units" in layer_parameters():
        kwargs["units"] = ("angstrom",) * 3
    return [(synthetic.volume, kwargs, "image")]
