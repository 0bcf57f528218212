"""Exceptions raised by the model zoo.

All derive from :class:`ZooError`, itself a :class:`biosam.errors.BiosamError`, so the
command line prints the message (written to say what to do next) instead of a traceback.
"""

from __future__ import annotations

from biosam.errors import BiosamError, InputError


class ZooError(BiosamError):
    """Base class of every error raised by :mod:`biosam.zoo`."""


class UnknownModelError(ZooError, LookupError):
    """A name is neither in the registry nor an existing checkpoint file."""


class UnknownVersionError(UnknownModelError, InputError):
    """A zoo model exists, but not in the version asked for (``vit_b_lm:v9``)."""


class UnsupportedModelError(ZooError):
    """The model is listed in the registry but this version cannot run it."""


class DownloadError(ZooError):
    """A checkpoint could not be downloaded or failed verification."""


class EmbeddedAssetError(ZooError):
    """The checkpoint shipped inside an installed package is missing or damaged."""
