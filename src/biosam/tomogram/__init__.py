"""Synthetic cryo-electron tomograms with exact ground truth, for tests and benchmarks."""

from biosam.tomogram.synthetic import SyntheticTomogram, synthetic_tomogram

__all__ = ["SyntheticTomogram", "synthetic_tomogram"]
