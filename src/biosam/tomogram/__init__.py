"""Cryo-electron tomograms: synthetic test volumes with exact ground truth, and vesicle finding and measurement."""

from biosam.tomogram.measure import fit_sphere, measure_vesicles, write_measurements
from biosam.tomogram.pipeline import segment_vesicles
from biosam.tomogram.synthetic import SyntheticTomogram, realistic_tomogram, synthetic_tomogram
from biosam.tomogram.vesicles import VesicleSegmentation, VesicleSettings

__all__ = [
    "SyntheticTomogram",
    "VesicleSegmentation",
    "VesicleSettings",
    "fit_sphere",
    "measure_vesicles",
    "segment_vesicles",
    "realistic_tomogram",
    "synthetic_tomogram",
    "write_measurements",
]
