"""Safe output files: validated before work starts, written beside the target, put in place only when complete.

Every output biosam writes (labels, overlays, tables, checkpoints) follows the same rules, kept here:

* :func:`check_output_path` is the pre-flight check the commands run before any work: the type, an existing
  output (``--overwrite``), the input itself (never overwritten), and whether the folder can be written (a real
  probe: a temporary file is created and removed, which also catches read-only file systems and ACLs that mode
  bits do not show, and works for root, who ignores mode bits).
* ``--overwrite`` replaces a file. A folder is replaced only when it is a label store (Zarr) biosam wrote or an
  NGFF label image; any other folder in the way is refused, never deleted.
* Results are written to a temporary name beside the target and renamed over it on success
  (:func:`atomic_path`, :func:`atomic_dir`), so a failure or a signal leaves the old output as it was.
* Temporary names carry the writer's host and process id (``.NAME.biosam-HOST-PID-XXXXXXXX.tmpSUFFIX``): a
  later run writing the same output removes those of processes that are gone (SIGKILL, power loss), on this host
  at once and from other hosts after a day.
* New files get the usual permissions, ``0o666 & ~umask`` (folders ``0o777 & ~umask``), not ``mkstemp``'s 0600;
  a replaced file keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from biosam.errors import InputError

log = logging.getLogger(__name__)

# The attribute biosam puts in the label stores (Zarr) it writes: with it, --overwrite may replace the folder.
STORE_MARK = "biosam"
# Temporary files of another host are removed only when older than this (its processes cannot be asked).
_FOREIGN_TEMP_AGE_S = 24 * 3600
_TEMP_TAG = ".biosam-"


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case extension, with the double extensions biosam knows (``.nii.gz``, ``.ome.tif``, ``.ome.zarr``)."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; a brief set-and-restore elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)  # no /proc (macOS): the only portable way to read it
    os.umask(old)
    return old


def new_mode(folder: bool = False) -> int:
    """Permission bits of a new file (``0o666 & ~umask``) or folder (``0o777 & ~umask``)."""
    return (0o777 if folder else 0o666) & ~umask()


# ----------------------------------------------------------------------------- temporary names


def _host() -> str:
    # '-' separates the fields of a temporary name, so it may not appear in the host part.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}{_TEMP_TAG}{_host()}-{os.getpid()}-"


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary name beside ``path`` (not created; make it with ``O_EXCL`` or ``mkdir``).

    It follows the scheme :func:`remove_stale_temps` knows: ``.NAME.biosam-HOST-PID-RANDOM.tmpSUFFIX``.
    """
    path = Path(path)
    return path.parent / f"{_temp_prefix(path)}{secrets.token_hex(4)}.tmp{suffix}"


def _temp_owner(name: str, target: str | None) -> tuple[str, int] | None:
    """(host, pid) of a temporary name made for the output called ``target`` (None: for any output); None for
    other names."""
    if target is None:
        tag = name.rfind(_TEMP_TAG)  # the host part has no '-', so the last tag is the one
        if not name.startswith(".") or tag < 2:
            return None
        target = name[1:tag]
    start = f".{target}{_TEMP_TAG}"
    if not name.startswith(start):
        return None
    match = re.match(r"([A-Za-z0-9._]+)-(\d+)-[A-Za-z0-9_]+\.tmp", name[len(start):])
    return (match[1], int(match[2])) if match else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike, *, foreign_age: float = _FOREIGN_TEMP_AGE_S) -> list[Path]:
    """Remove temporary files and folders left beside ``path`` by writers of it that are gone; return them.

    A writer on this host is gone when its process id is no longer running (a
    reused id keeps the file: the safe side); one on another host when its file
    is older than ``foreign_age`` seconds (a day by default).
    """
    path = Path(path)
    return _remove_stale(path.parent, path.name, foreign_age)


def remove_stale_temps_in(folder: str | os.PathLike, *, foreign_age: float = _FOREIGN_TEMP_AGE_S) -> list[Path]:
    """:func:`remove_stale_temps` for every output in ``folder`` (e.g. the entries of an embedding store)."""
    return _remove_stale(Path(folder), None, foreign_age)


def _remove_stale(folder: Path, target: str | None, foreign_age: float) -> list[Path]:
    removed: list[Path] = []
    host, now = _host(), time.time()
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            owner = _temp_owner(entry.name, target)
            if owner is None or owner == (host, os.getpid()):
                continue
            try:
                gone = not _pid_alive(owner[1]) if owner[0] == host else (
                    now - entry.stat(follow_symlinks=False).st_mtime > foreign_age)
                if not gone:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue  # another cleaner was first
            except OSError as exc:
                log.warning("could not remove the leftover temporary %s: %s", entry.path, exc)
                continue
            removed.append(Path(entry.path))
            log.info("removed %s, left by an interrupted run (process %d on %s)", entry.path, owner[1], owner[0])
    return removed


# ----------------------------------------------------------------------------- pre-flight check


def is_label_store(path: str | os.PathLike) -> bool:
    """True for a Zarr folder biosam wrote as labels (its mark) or an NGFF label image (``image-label``)."""
    path = Path(path)
    for name, nested in (("zarr.json", True), (".zattrs", False)):
        with contextlib.suppress(OSError, ValueError):
            attrs = json.loads((path / name).read_text())
            attrs = attrs.get("attributes", {}) if nested else attrs
            ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
            if STORE_MARK in attrs or "image-label" in ome:
                return True
    return False


def _check_not_input(path: Path, source: str | os.PathLike) -> None:
    if str(source).startswith("copick://") or not path.exists():
        return  # an output that does not exist yet cannot be the (existing) input
    source = Path(source)
    if not source.exists():
        return
    inside = path.is_dir() and source.resolve().is_relative_to(path.resolve())
    if inside or os.path.samefile(path, source):
        what = "is the input" if not inside or source.resolve() == path.resolve() else f"holds the input {source}"
        raise InputError(f"{path}: {what}; biosam never writes over its input, not even with --overwrite. "
                         "Choose another output name.")


def _check_folder(path: Path) -> None:
    """Refuse an output whose folder cannot be made or written, with a probe file (see the module docstring)."""
    folder = path.absolute().parent
    existing = folder
    while not existing.exists():  # the folders that would be created: probe the first existing one
        if existing.is_symlink():
            raise InputError(f"{path}: cannot be written: {existing} is a broken link. Fix it or choose another "
                             "output folder.")
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{path}: cannot be written: {existing} is a file, not a folder. Choose an output path "
                         "in a folder (or another name for that file).")
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                  errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
        where = f"its folder {folder}" if existing == folder else f"{existing} (to create {folder} in it)"
        raise InputError(f"{path}: cannot write in {where}: {reason}. Choose an output folder you can write to "
                         "(or get write access to this one).") from exc


def _check_sticky(path: Path) -> None:
    # In a sticky folder (/tmp) only a file's owner may replace it; the probe cannot see that.
    with contextlib.suppress(OSError):
        folder, euid = path.absolute().parent.stat(), os.geteuid() if hasattr(os, "geteuid") else 0
        owner = path.lstat().st_uid
        if folder.st_mode & stat.S_ISVTX and euid not in (0, owner, folder.st_uid):
            raise InputError(f"{path}: belongs to another user in a shared folder, so it cannot be replaced. "
                             "Choose another name.")


def check_output_path(
    path: str | os.PathLike,
    suffixes: tuple[str, ...] | None,
    overwrite: bool,
    *,
    source: str | os.PathLike | None = None,
    folder: bool = False,
) -> Path:
    """Validate an output path before any work is done; returns it as a :class:`Path`.

    Raises :class:`InputError` (naming the path, the problem and the fix) for an
    extension not in ``suffixes`` (``None``: the caller checked the type), the
    input ``source`` itself (even with ``overwrite``), an existing output without
    ``overwrite``, a folder in the way (``folder=True`` outputs, Zarr stores, may
    replace a label store; nothing else replaces a folder), or a place that cannot
    be written (a parent that is a file, a read-only or foreign folder).
    """
    path = Path(path)
    if suffixes is not None and suffix_of(path) not in suffixes:
        raise InputError(f"{path}: unsupported output type '{suffix_of(path) or '(none)'}'; use one of {', '.join(suffixes)}.")
    if source is not None:
        _check_not_input(path, source)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise InputError(f"{path}: already exists. Choose another name or pass --overwrite to replace it.")
        if path.is_dir() and not folder:
            raise InputError(f"{path}: is a folder; --overwrite replaces files only, never a folder. Choose "
                             "another name (or remove the folder yourself).")
        if path.is_dir() and not is_label_store(path):
            raise InputError(f"{path}: is a folder biosam did not write as labels; --overwrite replaces only label "
                             "stores. Choose another name (or remove the folder yourself).")
        _check_sticky(path)
    _check_folder(path)
    return path


# ----------------------------------------------------------------------------- writing


def _final_mode(path: Path, folder: bool) -> int:
    with contextlib.suppress(OSError):
        if path.is_dir() == folder:
            return stat.S_IMODE(path.stat().st_mode)  # a replaced output keeps its mode
    return new_mode(folder)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` that replaces it only on success (never a folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp" + suffix_of(path), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.is_dir() and not path.is_symlink():  # appeared after the pre-flight check
            raise InputError(f"{path}: is a folder; biosam replaces files only. Choose another name.")
        os.chmod(tmp_path, _final_mode(path, folder=False))
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that replaces it only on success (Zarr stores).

    An existing folder is replaced only if it is a label store (:func:`is_label_store`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp_path = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp" + suffix_of(path), dir=path.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, _final_mode(path, folder=True))
        if path.is_dir() and not path.is_symlink():
            if not is_label_store(path):
                raise InputError(f"{path}: is a folder biosam did not write as labels; it is left as it is. "
                                 "Choose another name.")
            # Set the old store aside under a temporary name (removed next run if we die now), then swap.
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp.old", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.exists() or path.is_symlink():
                path.unlink()
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
