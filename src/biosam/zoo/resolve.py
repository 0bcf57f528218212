"""Turning what a user typed (a zoo name or a file path) into a checkpoint file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .download import DEFAULT_TIMEOUT_S, fetch, is_cached, require_supported
from .errors import UnknownModelError
from .registry import REGISTRY, ModelSpec, list_specs, suggestion_text

logger = logging.getLogger(__name__)


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[Path, ModelSpec | None]:
    """Checkpoint file for a zoo name (fetched if needed) or an existing file path.

    A string equal to a zoo name always means the zoo model, whatever the current folder
    holds, so behaviour does not depend on where the command runs; write ``./vit_b`` to
    mean a local file of that name. ``os.PathLike`` arguments are always paths. Files are
    returned as given (spec None): what they contain is the checkpoint loader's business.
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text in REGISTRY:
        spec = REGISTRY[text]
        require_supported(spec)
        if Path(text).is_file():
            logger.warning("using zoo model %r; write ./%s for the local file", text, text)
        return fetch(spec, progress=progress, timeout=timeout), spec

    path = Path(text).expanduser()
    if path.is_file():
        return path, None
    detail = f" ({path} is a folder, not a checkpoint file)" if path.is_dir() else ""
    raise UnknownModelError(
        f"unknown model {text!r}: not a zoo name nor an existing file{detail};"
        f"{suggestion_text(text)} `biosam models` lists the names."
    )


def describe_models() -> list[dict[str, Any]]:
    """One row per registered model for ``biosam models`` (no network access)."""
    return [
        {
            "name": spec.name,
            "architecture": spec.architecture,
            "family": spec.family,
            "size_mb": spec.size_mb,
            "domain": spec.domain,
            "cached": is_cached(spec),
            "supported": spec.supported,
        }
        for spec in list_specs()
    ]
