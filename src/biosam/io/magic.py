"""What a file really is, from its first bytes: for messages when its extension says otherwise."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

from biosam.io.files import suffix_of


@dataclass(frozen=True)
class Kind:
    """A file type recognised by its signature."""

    name: str  # for messages: "a PNG image"
    suffix: str | None = None  # the extension biosam reads it by; None when biosam does not read it
    advice: str | None = None  # what to do instead of renaming (archives, pointers, web pages)


_UNREADABLE = "biosam does not read it; convert it to TIFF (e.g. in Fiji with Bio-Formats) and try again."
# (offset, signature, kind); checked in order, so longer signatures come before their prefixes.
_SIGNATURES: tuple[tuple[int, bytes, Kind], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", Kind("a PNG image", ".png")),
    (0, b"\xff\xd8\xff", Kind("a JPEG image", ".jpg")),
    (128, b"DICM", Kind("a DICOM file", ".dcm")),
    (344, b"n+1\x00", Kind("a NIfTI image", ".nii")),
    (344, b"ni1\x00", Kind("a NIfTI image (header of a .hdr/.img pair)", None, _UNREADABLE)),
    (4, b"n+2\x00", Kind("a NIfTI-2 image", ".nii")),
    (208, b"MAP ", Kind("an MRC volume", ".mrc")),
    (0, b"\x93NUMPY", Kind("a NumPy .npy array", None,
                            "biosam does not read .npy; save the array as TIFF (tifffile.imwrite) and try again.")),
    (0, b"\x89HDF\r\n\x1a\n", Kind("an HDF5 file (.h5, Imaris .ims, ...)", None, _UNREADABLE)),
    (0, b"ZISRAWFILE", Kind("a Zeiss CZI file", None, _UNREADABLE)),
    (0, b"\xda\xce\xbe\x0a", Kind("a Nikon ND2 file", None, _UNREADABLE)),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", Kind("an OLE2 container (Olympus .oib, Zeiss .zvi, ...)", None, _UNREADABLE)),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", Kind("a JPEG 2000 image", None, _UNREADABLE)),
    (0, b"\xff\x4f\xff\x51", Kind("a JPEG 2000 codestream", None, _UNREADABLE)),
    (0, b"GIF8", Kind("a GIF image", None, _UNREADABLE)),
    (0, b"8BPS", Kind("a Photoshop document", None, _UNREADABLE)),
    (0, b"PK\x03\x04", Kind("a zip archive", None, "unzip it and give biosam the image inside.")),
    (0, b"%PDF", Kind("a PDF document", None, "export the image itself (TIFF or PNG) instead.")),
    (0, b"version https://git-lfs", Kind("a Git LFS pointer, not the image", None,
                                         "fetch the real file with `git lfs pull`.")),
)
_HEAD = 512  # enough for every offset above


def sniff(path: str | os.PathLike) -> Kind | None:
    """The kind of file ``path`` is by its signature, or None when unknown (or unreadable)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
    except OSError:
        return None
    for offset, signature, kind in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return kind
    if head[:2] == b"\x1f\x8b":
        return _gzip_kind(Path(path))
    if head.lstrip()[:15].lower() in (b"<!doctype html>", b"<html>") or head.lstrip()[:5].lower() == b"<html":
        return Kind("an HTML page (often what a failed download saves)", None,
                    "download the image again (from its direct link).")
    return None


def _gzip_kind(path: Path) -> Kind:
    try:
        with gzip.open(path, "rb") as fh:
            inner = fh.read(_HEAD)
    except (OSError, EOFError):
        inner = b""
    if inner[344:348] == b"n+1\x00":
        return Kind("a gzip-compressed NIfTI image", ".nii.gz")
    return Kind("a gzip-compressed file", None, "decompress it (gunzip) and give biosam the file inside.")


def empty_message(path: str | os.PathLike) -> str:
    """The message for a file of 0 bytes (an interrupted copy, download or export), whatever its extension."""
    return f"{path}: is empty (0 bytes), so the copy or export did not finish. Copy it again from its source."


def wrong_type_message(path: str | os.PathLike, expected: str, head: bytes = b"") -> str:
    """A message for a file whose extension says ``expected`` (e.g. "TIFF") but whose bytes do not.

    Names what the file is instead and what to do: rename it with the right
    extension, convert it, or fetch the real file.
    """
    path = Path(path)
    kind = sniff(path)
    if kind is None:
        shown = f" (it starts with {head[:8]!r})" if head else ""
        return (f"{path}: is not a {expected} file{shown}, nor another format biosam recognises. Check that this is "
                f"the file you meant; if it was converted or downloaded, do that again.")
    if kind.suffix is not None:
        suffix = suffix_of(path)
        name = path.name[: -len(suffix)] if suffix else path.name
        return (f"{path}: is not a {expected} file but {kind.name} (by its first bytes) with the wrong extension. "
                f"Rename it to {name}{kind.suffix} and biosam reads it as such.")
    return f"{path}: is not a {expected} file but {kind.name} (by its first bytes); {kind.advice}"
