"""Synthetic cryo-ET volumes with exact ground truth.

:func:`synthetic_tomogram` (:mod:`.simple`): vesicles rendered and filtered in
Fourier space, fast and exactly controlled, for unit tests.
:func:`realistic_tomogram` (:mod:`.realistic`): a crowded synapse imaged as a
tilt series with a CTF and reconstructed, for training and validation.
"""

from biosam.tomogram.synthetic.realistic import POLARITIES, realistic_tomogram
from biosam.tomogram.synthetic.simple import (
    LEAFLET_FWHM_NM,
    LEAFLET_SPACING_NM,
    SyntheticTomogram,
    synthetic_tomogram,
)

__all__ = [
    "LEAFLET_FWHM_NM",
    "LEAFLET_SPACING_NM",
    "POLARITIES",
    "SyntheticTomogram",
    "realistic_tomogram",
    "synthetic_tomogram",
]
