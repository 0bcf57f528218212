"""Exception types shared by the whole package.

Every error a user can cause (bad file, bad prompt, unknown model) derives from
:class:`BiosamError`, so the command line can turn it into a one-line message
and a non-zero exit code instead of a traceback.
"""

from __future__ import annotations


class BiosamError(Exception):
    """Base class of the errors biosam raises for bad input or setup."""


class InputError(BiosamError, ValueError):
    """An image, prompt or parameter that cannot be used as given."""


class EmbeddingMismatchError(BiosamError):
    """A saved image embedding does not belong to the current model or image."""
