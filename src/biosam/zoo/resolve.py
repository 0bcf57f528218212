"""Turning what a user typed (a zoo name or a file path) into a checkpoint file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .download import DEFAULT_TIMEOUT_S, fetch, is_cached, require_supported
from .errors import UnknownModelError, UnknownVersionError
from .registry import ModelSpec, find_spec, list_specs, suggestion_text, version_problem

logger = logging.getLogger(__name__)


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[Path, ModelSpec | None]:
    """Checkpoint file for a zoo name (fetched if needed) or an existing file path.

    Zoo names may carry a version (``vit_b_lm:v2``); without one the newest version is used.
    A string equal to a zoo name always means the zoo model, whatever the current folder
    holds, so behaviour does not depend on where the command runs; write ``./vit_b`` to
    mean a local file of that name. ``os.PathLike`` arguments are always paths. Files are
    returned as given (spec None): what they contain is the checkpoint loader's business.
    A known model in a version it does not have raises UnknownVersionError (unless a file
    of that name exists).
    """
    text = os.fspath(name_or_path)
    spec = find_spec(text) if isinstance(name_or_path, str) else None
    if spec is not None:
        require_supported(spec)
        if Path(text).is_file():
            logger.warning("using zoo model %r; write ./%s for the local file", text, text)
        return fetch(spec, progress=progress, timeout=timeout), spec

    path = Path(text).expanduser()
    if path.is_file():
        return path, None
    problem = version_problem(text) if isinstance(name_or_path, str) else None
    if problem is not None:
        raise UnknownVersionError(problem)
    detail = f" ({path} is a folder, not a checkpoint file)" if path.is_dir() else ""
    raise UnknownModelError(
        f"unknown model {text!r}: not a zoo name nor an existing file{detail};"
        f"{suggestion_text(text)} `biosam models` lists the names."
    )


def describe_models() -> list[dict[str, Any]]:
    """One row per registered entry for ``biosam models`` (no network access).

    Each version of a model is a row of its own, named as it is typed (``vit_b_lm`` for the
    newest, ``vit_b_lm:v2``); ``version`` is the publisher's label, None for unversioned models.
    """
    return [
        {
            "name": spec.name,
            "version": spec.version,
            "architecture": spec.architecture,
            "family": spec.family,
            "size_mb": spec.size_mb,
            "domain": spec.domain,
            "cached": is_cached(spec),
            "supported": spec.supported,
        }
        for spec in list_specs()
    ]
