"""Downloading checkpoints into the local cache, verified by hash.

Layout: ``<cache_dir>/<model name>/<spec.filename>``, the model name without its version (a
``:`` is not allowed in Windows folder names); each version has its own file name
(``vit_b_lm/vit_b_lm_v2.pt``), so versions never overwrite each other. One folder per model
keeps names from colliding (several micro-sam files are called ``vit_l.pt``) and means that a
folder only ever holds that model's files plus pooch's in-flight temporary files, so stale
leftovers can be removed without touching anything else.

pooch writes to a temporary file in the target folder, checks the hash and only then renames
it to the final name, so a failed or corrupt transfer never appears as a cached checkpoint.
pooch and requests are imported lazily to keep ``import biosam.zoo`` cheap.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

from .embedded import lite_medsam_path
from .errors import DownloadError, EmbeddedAssetError, UnsupportedModelError
from .registry import VERSION_SEP, ModelSpec, split_name

logger = logging.getLogger(__name__)

CACHE_ENV = "BIOSAM_CACHE_DIR"
DEFAULT_TIMEOUT_S = 60.0
# A live download rewrites its temporary file continuously and gives up after the read
# timeout, so a temporary file untouched for this long belongs to a killed process.
_STALE_PARTIAL_S = 3600.0
# Models whose checkpoint comes from an installed package instead of a download.
_EMBEDDED = {"lite_medsam": lite_medsam_path}


def cache_dir() -> Path:
    """Root of the checkpoint cache: ``$BIOSAM_CACHE_DIR`` or the OS cache folder (not created)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import pooch

    return Path(pooch.os_cache("biosam"))


def cache_path(spec: ModelSpec) -> Path:
    """Where the checkpoint of ``spec`` lives once downloaded (or must be placed by hand)."""
    return cache_dir() / spec.base_name / spec.filename


def _is_embedded(spec: ModelSpec) -> bool:
    return spec.url is None and spec.name in _EMBEDDED


def is_cached(spec: ModelSpec) -> bool:
    """True when the checkpoint file is present locally (its hash is checked by fetch)."""
    if _is_embedded(spec):
        try:
            _EMBEDDED[spec.name]()
        except (EmbeddedAssetError, OSError):
            return False
        return True
    return cache_path(spec).is_file()


def require_supported(spec: ModelSpec) -> None:
    """Raise UnsupportedModelError for registry entries this version cannot run."""
    if spec.supported:
        return
    if spec.family == "decoder":
        name, version = split_name(spec.name)
        base = name.removesuffix("_decoder") + (f"{VERSION_SEP}{version}" if version else "")
        raise UnsupportedModelError(
            f"{spec.name!r} is a micro-sam instance-segmentation decoder; automatic instance "
            f"segmentation is not supported yet in this version of biosam. For prompted "
            f"segmentation use {base!r}."
        )
    raise UnsupportedModelError(f"{spec.name!r} is not supported yet in this version of biosam.")


@functools.lru_cache(maxsize=32)
def _file_matches(path: str, mtime_ns: int, size: int, known_hash: str) -> bool:
    # Keyed on mtime and size so a replaced file is checked again, while repeated loads of
    # the same multi-GB checkpoint in one process hash it only once.
    import pooch

    algorithm, _, expected = known_hash.partition(":")
    return pooch.file_hash(path, alg=algorithm.lower()).lower() == expected.lower()


def _verified(path: Path, known_hash: str | None) -> bool:
    if known_hash is None:
        return True
    stat = path.stat()
    return _file_matches(str(path), stat.st_mtime_ns, stat.st_size, known_hash)


def _manual_hint(spec: ModelSpec, target: Path) -> str:
    source = f"download {spec.url} with a browser (or on another machine) and " if spec.url else ""
    check = f" (its hash must be {spec.known_hash})" if spec.known_hash else ""
    return (
        f"To install it by hand, {source}save it as {target}{check}; "
        f"or pass a local checkpoint file with --model PATH. "
        f"Set {CACHE_ENV} to use another cache folder."
    )


def _error(spec: ModelSpec, target: Path, reason: str) -> DownloadError:
    return DownloadError(
        f"could not download model {spec.name!r} from {spec.url}: {reason} "
        f"The checkpoint belongs at {target}. {_manual_hint(spec, target)}"
    )


def _remove_partial(path: Path | None) -> None:
    if path is not None and path.exists():
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("could not remove partial download %s: %s", path, exc)


def _remove_stale_partials(folder: Path, keep: str) -> None:
    """Delete temporary files left in a model folder by a killed download."""
    if not folder.is_dir():
        return
    now = time.time()
    for entry in folder.iterdir():
        if entry.name == keep or not entry.name.startswith("tmp") or not entry.is_file():
            continue
        try:
            age = now - entry.stat().st_mtime
        except OSError:  # finished or removed by its owner meanwhile
            continue
        if age > _STALE_PARTIAL_S:
            logger.info("removing stale partial download %s", entry)
            _remove_partial(entry)


class _RecordingDownloader:
    """Wraps pooch's HTTP downloader to remember the temporary file it writes."""

    def __init__(self, progress: bool, timeout: float) -> None:
        import pooch

        self._inner = pooch.HTTPDownloader(progressbar=progress, timeout=timeout)
        self.partial: Path | None = None

    def __call__(self, url: str, output_file: str, pooch_obj: object, check_only: bool = False):
        self.partial = Path(output_file)
        return self._inner(url, output_file, pooch_obj, check_only=check_only)


def _reason(exc: Exception, timeout: float) -> str:
    import requests

    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return f"the server answered HTTP {exc.response.status_code} ({exc.response.reason})"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {timeout:g} s ({exc})"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"connection failed; offline, blocked by a firewall, or the host is down ({exc})"
    if isinstance(exc, requests.exceptions.RequestException):
        return f"the transfer broke off ({exc})"
    if isinstance(exc, ValueError):  # pooch's hash check; its text has expected and got hashes
        return f"checksum mismatch: {str(exc).rstrip('.')}"
    return f"could not write into the cache folder ({exc})"


def fetch(spec: ModelSpec, progress: bool = True, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Local path of the checkpoint of ``spec``, downloading and verifying it if needed.

    ``progress`` shows a tqdm bar on stderr. ``timeout`` bounds each connect/read wait
    (not the whole transfer). Raises UnsupportedModelError for entries this version cannot
    run and DownloadError when the file cannot be obtained; no partial file is left behind.
    """
    if _is_embedded(spec):
        return _EMBEDDED[spec.name]()
    require_supported(spec)
    target = cache_path(spec)
    mismatch = ""
    if target.is_file():
        if _verified(target, spec.known_hash):
            return target
        # Not deleted: pooch replaces it only once a verified copy has arrived, so a failed
        # attempt leaves the user's file where it was.
        logger.warning("cached %s does not match %s; downloading it again", target, spec.known_hash)
        mismatch = f" The file already at {target} does not match {spec.known_hash}."
    if spec.url is None:
        raise DownloadError(
            f"no download address is known for model {spec.name!r}.{mismatch} "
            f"{_manual_hint(spec, target)}"
        )

    import pooch
    import requests

    _remove_stale_partials(target.parent, keep=target.name)
    downloader = _RecordingDownloader(progress, timeout)
    try:
        pooch.retrieve(spec.url, known_hash=spec.known_hash, fname=target.name,
                       path=target.parent, downloader=downloader)
    except (ValueError, OSError, requests.exceptions.RequestException) as exc:
        # pooch deletes its temporary file itself; this is a second line of defence.
        _remove_partial(downloader.partial)
        raise _error(spec, target, _reason(exc, timeout) + "." + mismatch) from exc
    except BaseException:
        _remove_partial(downloader.partial)
        raise
    return target
