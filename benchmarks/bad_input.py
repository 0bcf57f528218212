"""Replay what a new user trips over (issue 14): every case runs the real `biosam` command in a child process.

For each case the table gives the exit code, the first line of the message (or what the case measured), what was
left behind in its working folder (temporary files, partial outputs) and whether the user's own files are intact.
A case passes when it either gives correct output with exit 0, or refuses with exit 1 (130/143 for signals), a
one-line message (no traceback), nothing left behind and nothing of the user's changed.

    python benchmarks/bad_input.py [--only SUBSTRING] [--out results.md]

How a case is written (append to this file; keep each case to a few seconds of CPU where possible)::

    @case("2", "read-only output folder", expect="refused")
    def _(w: Work) -> None:
        image = w.user_file("in.png", sample_png)     # the user's files: snapshotted, must stay unchanged
        w.run("segment", image, "--box", "10,10,60,60", "-o", w.path("out", "labels.tif"))
        w.outputs = []                                # files the case expects to exist afterwards (ok cases)
        w.check(condition, "what was wrong")          # extra assertions; a failed check fails the case

``expect`` is "ok" (exit 0, ``w.outputs`` exist) or "refused" (exit 1 unless ``w.exit_expected`` says otherwise).
``w.note`` replaces the message column (e.g. a measured time). Anything in the folder that is neither a user file
nor an expected output is a leftover.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fidelity import cpu_model, markdown  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@dataclass
class Work:
    """One case's working folder, its user files and what the command did."""

    root: Path
    outputs: list[Path] = field(default_factory=list)
    exit_expected: int | None = None
    note: str | None = None
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    _user: dict[Path, tuple[str, int]] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def user_file(self, name: str, make: Callable[[Path], object]) -> Path:
        """Create a file (or folder) of the user's with ``make(path)`` and remember its content and mode."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
        self.protect(path)
        return path

    def protect(self, path: Path) -> None:
        """Remember ``path`` (and everything under it) as the user's."""
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            self._user[p] = _fingerprint(p)

    def run(self, *args: object, timeout: float = 600, signal_after: tuple[float, int] | None = None,
            env: dict[str, str] | None = None) -> int:
        """Run ``biosam ARGS`` in the case folder; optionally send a signal after some seconds."""
        command = [sys.executable, "-m", "biosam", *map(str, args)]
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
        if signal_after is not None:
            delay, sig = signal_after
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        try:
            self.stdout, self.stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.stdout, self.stderr = proc.communicate()
            self.failures.append(f"still running after {timeout:.0f} s")
        self.seconds = time.perf_counter() - start
        self.code = proc.returncode
        return proc.returncode

    def check(self, condition: bool, problem: str) -> None:
        if not condition:
            self.failures.append(problem)

    def leftovers(self) -> list[str]:
        expected = set(self._user) | set(self.outputs)
        found = []
        for p in sorted(self.root.rglob("*")):
            if p in expected or any(p.is_relative_to(o) for o in self.outputs if o.is_dir()):
                continue
            if p.is_dir() and any(u.is_relative_to(p) for u in expected):
                continue  # a folder holding user files or outputs
            found.append(str(p.relative_to(self.root)))
        return found

    def damaged(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p, before in self._user.items()
                if not p.exists() or _fingerprint(p) != before]


def _fingerprint(path: Path) -> tuple[str, int]:
    mode = path.stat().st_mode if path.exists() else 0
    if not path.is_file():
        return ("dir" if path.is_dir() else "missing", mode)
    return (hashlib.sha256(path.read_bytes()).hexdigest(), mode)


@dataclass
class Case:
    item: str
    name: str
    expect: str
    body: Callable[[Work], None]


CASES: list[Case] = []


def case(item: str, name: str, expect: str) -> Callable[[Callable[[Work], None]], Callable[[Work], None]]:
    """Register a case (see the module docstring)."""
    if expect not in ("ok", "refused"):
        raise ValueError(expect)

    def register(body: Callable[[Work], None]) -> Callable[[Work], None]:
        CASES.append(Case(item, name, expect, body))
        return body

    return register


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")


def run_case(c: Case, base: Path) -> list[str]:
    root = Path(tempfile.mkdtemp(prefix="case-", dir=base))
    w = Work(root)
    try:
        c.body(w)
    except Exception as exc:  # noqa: BLE001 - a broken case is reported, not fatal
        w.failures.append(f"case error: {type(exc).__name__}: {exc}")
    message = (w.stderr + "\n" + w.stdout) if w.code else w.stdout
    if "Traceback" in w.stderr:
        w.failures.append("traceback shown")
    if c.expect == "ok":
        w.check(w.code == (w.exit_expected or 0), f"exit {w.code}")
        for out in w.outputs:
            w.check(out.exists(), f"{out.name} missing")
    else:
        w.check(w.code == (w.exit_expected or 1), f"exit {w.code}")
        w.check(bool(first_line(w.stderr)), "no message")
    left, damaged = w.leftovers(), w.damaged()
    w.check(not left, "left behind")
    w.check(not damaged, "user files changed")
    # a read-only folder made by a case must be writable again to be removed
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(root, ignore_errors=True)
    note = (w.note or first_line(message)).replace(f"{root}/", "")  # paths as the user typed them
    verdict = "pass" if not w.failures else "FAIL: " + "; ".join(w.failures)
    return [c.item, c.name, str(w.code), note.replace("|", "/")[:160], ", ".join(left)[:80] or "none",
            ", ".join(damaged) or "intact", f"{w.seconds:.1f}", verdict]


# ----------------------------------------------------------------------------- shared inputs


def real_nuclei_png(path: Path) -> None:
    """A real fluorescence nuclei image (DSB2018, from the stardist test data in ../shared/data) as PNG."""
    import imageio.v3 as iio
    import tifffile

    image = tifffile.imread(SHARED / "stardist_dsb2018_nuclei_2d" / "img2d.tif")
    image = np.clip(image.astype(np.float64) / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    iio.imwrite(path, image)


def cell_png(path: Path) -> None:
    """scikit-image's bundled phase-contrast cell (the quick start's image)."""
    import imageio.v3 as iio
    import skimage.data

    iio.imwrite(path, skimage.data.cell())


CELL_BOX = "355,300,500,445"


# ----------------------------------------------------------------------------- cases


@case("0", "quick start (reference)", expect="ok")
def _(w: Work) -> None:
    image = w.user_file("cell.png", cell_png)
    w.run("segment", image, "--box", CELL_BOX, "-o", "cell_labels.tif")
    w.outputs = [w.path("cell_labels.tif")]


NUCLEI_BOX = "49,23,75,57"  # a nucleus of real_nuclei_png


@case("3", "two runs at once fill one new embedding store", expect="ok")
def _(w: Work) -> None:
    """Two `segment` runs on different images share a store they create together; reruns read it back."""
    jobs = [(w.user_file("cell.png", cell_png), CELL_BOX, "cell"),
            (w.user_file("nuclei.png", real_nuclei_png), NUCLEI_BOX, "nuclei")]
    store = w.path("store.zarr")

    def command(image: Path, box: str, output: str) -> list[str]:
        # -vv: the store logs each lookup as "hit" or "miss"
        return [sys.executable, "-m", "biosam", "-vv", "segment", str(image), "--box", box, "-o", output,
                "--embeddings", str(store)]

    start = time.perf_counter()
    logs = [tempfile.TemporaryFile("w+") for _ in jobs]  # outside the case folder; pipes could stall a run
    procs = [subprocess.Popen(command(image, box, f"{name}_1.tif"), cwd=w.root, stdout=log, stderr=log, text=True)
             for (image, box, name), log in zip(jobs, logs)]
    codes = [proc.wait(timeout=600) for proc in procs]
    first = []
    for log in logs:
        log.seek(0)
        first.append(log.read())
        log.close()
    entries = sorted((store / "embeddings").glob("*.npy")) if store.is_dir() else []
    misses = hits = 0
    for image, box, name in jobs:
        codes.append(w.run("-vv", "segment", image, "--box", box, "-o", f"{name}_2.tif", "--embeddings", store))
        first.append(w.stderr)
        misses += w.stderr.count("embedding store") and w.stderr.count(": miss ")
        hits += w.stderr.count(": hit ")
    w.seconds = time.perf_counter() - start
    w.code = next((c for c in codes if c), 0)
    w.stderr = "\n".join(first)
    w.outputs = [store] + [w.path(f"{name}_{i}.tif") for _, _, name in jobs for i in (1, 2)]
    if w.code:
        return
    import tifffile

    for _, _, name in jobs:
        once, again = (tifffile.imread(w.path(f"{name}_{i}.tif")) for i in (1, 2))
        w.check(bool(once.any()) and np.array_equal(once, again), f"{name}: labels differ on the rerun")
    after = sorted((store / "embeddings").glob("*.npy"))
    w.check(len(entries) >= 2 and after == entries, f"store: {len(entries)} entries, then {len(after)}")
    w.check(misses == 0 and hits >= 2, f"reruns: {hits} hits, {misses} misses (recomputed)")
    hidden = [p.name for p in store.rglob(".*")]
    w.check(not hidden, f"temporaries in the store: {hidden[:3]}")
    w.note = (f"{len(entries)} embeddings from 2 runs at once; reruns: {hits} hits, {misses} misses, "
              "same labels")


# ---- item 1: compressed TIFF


def _nuclei_tiff(compression: str | None) -> Callable[[Path], None]:
    """The real DSB2018 nuclei image (uint16, as stardist ships it) saved as TIFF with ``compression``."""

    def make(path: Path) -> None:
        import tifffile

        tifffile.imwrite(path, tifffile.imread(SHARED / "stardist_dsb2018_nuclei_2d" / "img2d.tif"),
                         compression=compression)

    return make


def _tiff_compression(path: Path) -> int:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return int(tif.pages.first.compression)


@case("1", "LZW TIFF input: labels identical to the uncompressed copy", expect="ok")
def _(w: Work) -> None:
    import tifffile

    lzw, plain = w.user_file("t01.tif", _nuclei_tiff("lzw")), w.user_file("t01_plain.tif", _nuclei_tiff(None))
    w.check(_tiff_compression(lzw) == 5, "the input is not LZW-compressed")
    w.outputs = [w.path("lzw_labels.tif"), w.path("plain_labels.tif")]
    if w.run("segment", plain, "--box", NUCLEI_BOX, "-o", w.outputs[1]):
        return
    seconds = w.seconds
    if w.run("segment", lzw, "--box", NUCLEI_BOX, "-o", w.outputs[0]):
        return
    w.seconds += seconds
    once, again = (tifffile.imread(p) for p in w.outputs)
    w.check(bool(once.any()) and np.array_equal(once, again), "labels differ between the LZW and uncompressed input")
    w.check(_tiff_compression(w.outputs[0]) == 8, "labels not written losslessly compressed (Deflate) by default")
    w.note = f"identical labels ({len(np.unique(once)) - 1} object), written Deflate-compressed"


@case("1", "truncated TIFF", expect="refused")
def _(w: Work) -> None:
    def make(path: Path) -> None:
        _nuclei_tiff("lzw")(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])

    image = w.user_file("t01.tif", make)
    w.run("segment", image, "--box", NUCLEI_BOX, "-o", w.path("labels.tif"))
    w.check("damaged or truncated" in w.stderr and "Copy it again" in w.stderr, "not called damaged, with the fix")


@case("1", "PNG renamed .tif is read by its content", expect="ok")
def _(w: Work) -> None:
    def png_named_tif(path: Path) -> None:
        real_nuclei_png(path.with_suffix(".png"))
        path.with_suffix(".png").rename(path)

    image = w.user_file("nuclei.tif", png_named_tif)
    w.run("segment", image, "--box", NUCLEI_BOX, "-o", w.path("labels.tif"))
    w.outputs = [w.path("labels.tif")]
    w.check("is a PNG image, not a TIFF" in w.stderr, "no warning saying what the file really is")
    if w.code == 0:
        import tifffile

        w.check(bool(tifffile.imread(w.outputs[0]).any()), "empty labels")
    w.note = first_line(w.stderr)


@case("1", "LZW TIFF without the imagecodecs package", expect="refused")
def _(w: Work) -> None:
    """A child process in which `import imagecodecs` fails, as in an installation without it."""

    def no_imagecodecs(path: Path) -> None:
        (path / "imagecodecs").mkdir(parents=True)
        (path / "imagecodecs" / "__init__.py").write_text(
            "raise ImportError(\"No module named 'imagecodecs'\", name='imagecodecs')\n")

    hide = w.user_file("hide_imagecodecs", no_imagecodecs)
    image = w.user_file("t01.tif", _nuclei_tiff("lzw"))
    w.run("segment", image, "--box", NUCLEI_BOX, "-o", w.path("labels.tif"),
          env={"PYTHONPATH": os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])),
               "PYTHONDONTWRITEBYTECODE": "1"})
    w.check("LZW" in w.stderr and "pip install imagecodecs" in w.stderr, "codec or fix not named")


@case("1", "--compression none writes uncompressed labels", expect="ok")
def _(w: Work) -> None:
    image = w.user_file("t01.tif", _nuclei_tiff("zstd"))
    w.run("segment", image, "--box", NUCLEI_BOX, "-o", w.path("labels.tif"), "--compression", "none")
    w.outputs = [w.path("labels.tif")]
    if w.code == 0:
        code = _tiff_compression(w.outputs[0])
        w.check(code == 1, f"labels written with TIFF compression {code}")
        w.note = f"labels.tif: TIFF compression {code} (none)"


# ---- item 4: inputs and prompts


def _nuclei_rows(height: int, width: int) -> Callable[[Path], None]:
    """A ``height`` x ``width`` strip of the real nuclei image's rows, repeated along x, as PNG."""

    def make(path: Path) -> None:
        import imageio.v3 as iio

        real_nuclei_png(path)
        rows = iio.imread(path)[100 : 100 + height]
        iio.imwrite(path, np.tile(rows, (1, -(-width // rows.shape[1])))[:, :width])

    return make


def _volume_tif(path: Path) -> None:
    """8 slices of a 64 x 64 crop of the real nuclei image (ZYX)."""
    import imageio.v3 as iio
    import tifffile

    real_nuclei_png(path.with_suffix(".png"))
    crop = iio.imread(path.with_suffix(".png"))[:64, :64]
    path.with_suffix(".png").unlink()
    tifffile.imwrite(path, np.stack([crop] * 8), photometric="minisblack")


def _lite_medsam_edited(shape: tuple[int, ...]) -> Callable[[Path], None]:
    """The embedded LiteMedSAM checkpoint with ``mask_decoder.iou_token.weight`` replaced by zeros of ``shape``."""

    def make(path: Path) -> None:
        import torch

        from biosam.zoo.embedded import lite_medsam_path

        state = torch.load(lite_medsam_path(), map_location="cpu", weights_only=True)
        state["mask_decoder.iou_token.weight"] = torch.zeros(shape)
        torch.save(state, path)

    return make


class _EvalPayload:
    """Pickles as a call to eval: what a malicious "checkpoint" does."""

    def __reduce__(self):
        return eval, ("1 + 1",)


def _pickled(obj: object) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        import torch

        torch.save(obj, path)

    return make


def _before_the_model(w: Work, seconds: float = 15.0) -> None:
    """A refusal that needs only the image's metadata comes before the model loads, in seconds."""
    w.check(w.seconds < seconds, f"refused only after {w.seconds:.0f} s")


@case("4", "3 x 100000 image: segment", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("strip.png", _nuclei_rows(3, 100000))
    w.run("segment", image.name, "--box", "10,0,200,3", "-o", "labels.tif")
    w.check("too elongated" in w.stderr and "at most 1536 px long" in w.stderr, "no rule or limit in the message")
    _before_the_model(w)


@case("4", "3 x 100000 image: auto", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("strip.png", _nuclei_rows(3, 100000))
    w.run("auto", image.name, "-o", "labels.tif")
    w.check("too elongated" in w.stderr, "not called too elongated")
    _before_the_model(w)


@case("4", "3 x 1500 image (within the rule): segment", expect="ok")
def _(w: Work) -> None:
    import tifffile

    image = w.user_file("strip.png", _nuclei_rows(3, 1500))
    w.outputs = [w.path("labels.tif")]
    if w.run("segment", image.name, "--box", "10,0,200,3", "-o", w.outputs[0].name) == 0:
        shape = tifffile.imread(w.outputs[0]).shape
        w.check(shape == (3, 1500), f"labels of shape {shape}")
        w.note = f"labels {shape[0]} x {shape[1]}"


@case("4", "--channel 7 on a grayscale image", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("nuclei.png", real_nuclei_png)
    w.run("segment", image.name, "--box", NUCLEI_BOX, "--channel", "7", "-o", "labels.tif")
    w.check("no C axis" in w.stderr and "leave --channel out" in w.stderr, "not said that there is no channel axis")
    _before_the_model(w)


@case("4", "--t 3 on an image without time points", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("nuclei.png", real_nuclei_png)
    w.run("auto", image.name, "--t", "3", "-o", "labels.tif")
    w.check("no T axis" in w.stderr, "not said that there is no time axis")
    _before_the_model(w)


@case("4", "--channel -1 on an RGB image", expect="refused")
def _(w: Work) -> None:
    def rgb_cell(path: Path) -> None:
        import imageio.v3 as iio
        import skimage.data

        iio.imwrite(path, np.dstack([skimage.data.cell()] * 3))

    image = w.user_file("cell.png", rgb_cell)
    w.run("segment", image.name, "--box", CELL_BOX, "--channel", "-1", "-o", "labels.tif")
    w.check("numbered from 0" in w.stderr, "negative channel not refused as such")
    _before_the_model(w)


@case("4", "box outside the last slice of a volume (volume)", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("stack.tif", _volume_tif)
    prompts = w.user_file("prompts.json", lambda p: p.write_text(
        '[{"box": [5, 5, 30, 30], "z": 0}, {"box": [70, 70, 90, 90], "z": 7}]'))
    w.run("volume", image.name, "--prompts", prompts.name, "-o", "labels.tif")
    w.check("object 1 (slice z=7)" in w.stderr and "entirely outside the image" in w.stderr,
            "object or slice not named")
    _before_the_model(w)
    w.note = f"refused after {w.seconds:.1f} s (was 31 s): {first_line(w.stderr)}"


@case("4", "box partly over the image edge is clipped", expect="ok")
def _(w: Work) -> None:
    import tifffile

    image = w.user_file("cell.png", cell_png)
    w.outputs = [w.path("over.tif"), w.path("inside.tif")]
    if w.run("segment", image.name, "--box", "355,300,900,445", "-o", w.outputs[0].name):
        return
    warned, seconds = w.stderr, w.seconds
    if w.run("segment", image.name, "--box", "355,300,550,445", "-o", w.outputs[1].name):
        return
    w.seconds += seconds
    over, inside = (tifffile.imread(p) for p in w.outputs)
    w.check(bool(inside.any()) and np.array_equal(over, inside), "labels differ from those of the clipped box")
    w.check("reaches over the edge" in warned, "no warning about the clipping")
    w.note = "warned, and segmented the part inside: " + first_line(warned)[:100]


@case("4", "checkpoint with a wrong-shaped mask_decoder.iou_token.weight", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("cell.png", cell_png)
    ckpt = w.user_file("edited.pth", _lite_medsam_edited((1, 100)))
    w.run("segment", image.name, "--box", CELL_BOX, "--model", ckpt.name, "-o", "labels.tif")
    w.check("mask_decoder.iou_token.weight: expected shape (1, 256), found (1, 100)" in w.stderr,
            "key and shapes not named")
    w.check("get a fresh copy" in w.stderr, "no fix")
    w.note = " / ".join(line.strip() for line in w.stderr.strip().splitlines()[-2:])


@case("4", "checkpoint with an eval payload", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("cell.png", cell_png)
    ckpt = w.user_file("evil.pth", _pickled({"hook": _EvalPayload()}))
    w.run("segment", image.name, "--box", CELL_BOX, "--model", ckpt.name, "-o", "labels.tif")
    line = first_line(w.stderr)
    w.check("refused: the file asks to call eval" in line and line.endswith("publisher."), "message cut or vague")
    w.check("weights_only" not in w.stderr, "passes on torch's weights_only advice")


@case("4", "decoder file with other pickled objects (torch's weights_only hint)", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("cell.png", cell_png)
    ckpt = w.user_file("decoder.pt", _pickled({"config": slice(1, 2)}))
    w.run("auto", image.name, "--decoder", ckpt.name, "-o", "labels.tif")
    w.check("weights_only" not in w.stderr and "will likely succeed" not in w.stderr, "passes on torch's advice")
    w.check("does not load, for safety" in w.stderr, "does not say what the file holds")


@case("4", "zero-byte PNG", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("empty.png", lambda p: p.write_bytes(b""))
    w.run("segment", image.name, "--box", "1,1,5,5", "-o", "labels.tif")
    w.check("is empty (0 bytes)" in w.stderr, "not called empty")
    w.check("pyav" not in w.stderr and "plugin" not in w.stderr, "imageio plugin advice shown")


@case("4", "-o out.jpg", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("cell.png", cell_png)
    w.run("segment", image.name, "--box", CELL_BOX, "-o", "out.jpg")
    w.check("JPEG is lossy" in w.stderr and "JPEG none" not in w.stderr, "JPEG not said to be lossy")


@case("4", "--tile 0", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("cell.png", cell_png)
    w.exit_expected = 2  # a usage error, as click reports bad option values
    w.run("auto", image.name, "--tile", "0", "-o", "labels.tif")
    w.check("Invalid value for '--tile'" in w.stderr, "--tile 0 not refused")
    w.note = first_line(w.stderr.split("Error:", 1)[-1])


# ---- item 2: outputs
# (cases of the outputs helper: unwritable places, what --overwrite may replace, permissions, signals, MRC volumes)


def _o_nuclei_tif(path: Path) -> None:
    """The real DSB2018 nuclei image (stardist test data) as the user's TIFF."""
    shutil.copyfile(SHARED / "stardist_dsb2018_nuclei_2d" / "img2d.tif", path)


def _o_nuclei3d_tif(path: Path) -> None:
    """The StarDist 3D nuclei (31 x 61 x 57) as an ImageJ TIFF stack."""
    import tifffile

    image = tifffile.imread(SHARED / "stardist_synthetic_nuclei_3d" / "img3d.tif")
    tifffile.imwrite(path, image, imagej=True, metadata={"axes": "ZYX"})


def _o_nuclei3d_prompts(path: Path, every: bool = True) -> None:
    """A box on a nucleus of every slice of nuclei3d_tif (a run of many seconds), or of the middle slice only."""
    import json

    import tifffile

    from biosam.evaluate import boxes_from_labels

    truth = tifffile.imread(SHARED / "stardist_synthetic_nuclei_3d" / "mask3d.tif")
    prompts = [{"box": boxes_from_labels(truth[z])[0][0].tolist(), "z": z} for z in range(len(truth))
               if truth[z].any()]
    path.write_text(json.dumps(prompts if every else prompts[len(prompts) // 2: len(prompts) // 2 + 1]))


def _o_popen(w: Work, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "biosam", *map(str, args)], cwd=w.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _o_until_temporary(proc: subprocess.Popen, folder: Path, pattern: str, timeout: float = 300) -> list[Path]:
    """Wait until the run has its output open under a temporary name (it is computing then); [] if it ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(folder.glob(pattern))
        if found:
            return found
        time.sleep(0.05)
    return []


def _o_mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)[2:].zfill(4) if path.exists() else "missing"


def _o_mounts_read_only() -> bool:
    """Whether this process may mount a read-only file system in a private mount namespace (root, unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount -t tmpfs -o ro,size=1m tmpfs "$1"', "sh", folder],
                              capture_output=True).returncode == 0


@case("2", "read-only output folder", expect="refused")
def _(w: Work) -> None:
    """A folder the user cannot write: mode 0555 for a user; for root (who ignores modes) a read-only file system."""
    image = w.user_file("nuclei.tif", _o_nuclei_tif)
    folder = w.user_file("results", lambda p: p.mkdir())
    args = ["segment", image, "--box", NUCLEI_BOX, "-o", folder / "labels.tif"]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        w.protect(folder)
        w.run(*args)
        w.check("permission denied" in w.stderr, "not reported as permission denied")
        return
    if not _o_mounts_read_only():
        w.note, w.code, w.stderr = "not run: root without unshare/mount ignores folder modes", 1, "skipped"
        return
    # the mount exists only in the command's own mount namespace: gone when it ends
    start = time.perf_counter()
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount -t tmpfs -o ro,size=1m tmpfs "$1" && shift && exec "$@"', "sh", str(folder),
                          sys.executable, "-m", "biosam", *map(str, args)], cwd=w.root, capture_output=True,
                         text=True, timeout=300)
    w.seconds, w.code, w.stdout, w.stderr = time.perf_counter() - start, res.returncode, res.stdout, res.stderr
    w.check("read-only file system" in w.stderr, "not reported as a read-only file system")
    w.check(w.seconds < 20, f"refused only after {w.seconds:.0f} s (the model was loaded first?)")


@case("2", "output path under a file", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("nuclei.tif", _o_nuclei_tif)
    notes = w.user_file("notes.txt", lambda p: p.write_text("my notes"))
    w.run("segment", image, "--box", NUCLEI_BOX, "-o", notes / "labels.tif")
    w.check("is a file, not a folder" in w.stderr, "reason not given")


@case("2", "--overwrite onto a folder of user files", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("nuclei.tif", _o_nuclei_tif)

    def photos(path: Path) -> None:
        path.mkdir()
        (path / "holiday.jpg").write_bytes(b"a photo")
        (path / "notes.txt").write_text("keep me")

    folder = w.user_file("photos.zarr", photos)
    w.run("segment", image, "--box", NUCLEI_BOX, "-o", folder, "--overwrite")
    w.check("did not write as labels" in w.stderr, "reason not given")


@case("2", "output == input with --overwrite", expect="refused")
def _(w: Work) -> None:
    image = w.user_file("nuclei.tif", _o_nuclei_tif)
    w.run("segment", image, "--box", NUCLEI_BOX, "-o", image, "--overwrite")
    w.check("is the input" in w.stderr, "reason not given")


@case("2", "permissions of a new output (umask 022)", expect="ok")
def _(w: Work) -> None:
    image = w.user_file("nuclei.tif", _o_nuclei_tif)
    old = os.umask(0o022)  # inherited by the command
    try:
        w.run("segment", image, "--box", NUCLEI_BOX, "-o", "labels.tif", "--overlay", "overlay.png")
    finally:
        os.umask(old)
    w.outputs = [w.path("labels.tif"), w.path("overlay.png")]
    modes = [_o_mode(p) for p in w.outputs]
    w.check(modes == ["0644", "0644"], f"modes {modes}, expected 0644")
    w.note = f"labels.tif {modes[0]}, overlay.png {modes[1]} (umask 022; was 0600)"


@case("2", "permissions of an overwritten output (0640)", expect="ok")
def _(w: Work) -> None:
    image = w.user_file("nuclei.tif", _o_nuclei_tif)
    out = w.path("labels.tif")
    out.write_bytes(b"an old result")
    out.chmod(0o640)
    old = os.umask(0o022)
    try:
        w.run("segment", image, "--box", NUCLEI_BOX, "-o", out, "--overwrite")
    finally:
        os.umask(old)
    w.outputs = [out]
    w.check(_o_mode(out) == "0640" and out.read_bytes() != b"an old result", f"mode {_o_mode(out)}")
    w.note = f"labels.tif replaced, mode {_o_mode(out)} kept (umask 022)"


def _o_signal_mid_run(w: Work, sig: signal.Signals) -> None:
    """Stop a run computing into an MRC output with ``sig``; the previous output must stay as it was."""
    image = w.user_file("nuclei3d.tif", _o_nuclei3d_tif)
    prompts = w.user_file("prompts.json", _o_nuclei3d_prompts)
    out = w.user_file("labels.mrc", lambda p: p.write_bytes(b"yesterday's result"))  # --overwrite: replaced on success
    start = time.perf_counter()
    proc = _o_popen(w, "segment", image, "--prompts", prompts, "-o", out, "--overwrite")
    started = _o_until_temporary(proc, w.root, ".labels.mrc.biosam-*.tmp.mrc")
    w.check(bool(started), "the run ended before its output was opened")
    if started:
        proc.send_signal(sig)
    w.stdout, w.stderr = proc.communicate(timeout=300)
    w.code, w.seconds = proc.returncode, time.perf_counter() - start
    w.exit_expected = 128 + int(sig)
    stop = [line.strip() for line in w.stderr.splitlines() if f"stopped by {sig.name}" in line]
    w.check(bool(stop), "no message about the stop")
    w.note = stop[0] if stop else None  # (a progress bar may come first on stderr)


@case("2", "SIGTERM mid-run (scheduler)", expect="refused")
def _(w: Work) -> None:
    _o_signal_mid_run(w, signal.SIGTERM)


@case("2", "SIGINT mid-run (Ctrl-C)", expect="refused")
def _(w: Work) -> None:
    _o_signal_mid_run(w, signal.SIGINT)


@case("2", "SIGKILL leftover cleaned by the next run", expect="ok")
def _(w: Work) -> None:
    image = w.user_file("nuclei3d.tif", _o_nuclei3d_tif)
    prompts = w.user_file("prompts.json", _o_nuclei3d_prompts)
    one = w.user_file("one.json", lambda p: _o_nuclei3d_prompts(p, every=False))
    proc = _o_popen(w, "segment", image, "--prompts", prompts, "-o", "labels.mrc")
    left = _o_until_temporary(proc, w.root, ".labels.mrc.biosam-*.tmp.mrc")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    w.check(bool(left) and all(p.exists() for p in left), "the kill left no temporary file to clean")
    w.run("segment", image, "--prompts", one, "-o", "labels.mrc")
    w.outputs = [w.path("labels.mrc")]
    gone = [p.name for p in left if not p.exists()]
    w.check(len(gone) == len(left), "the leftover is still there")
    w.note = f"killed run left {', '.join(p.name for p in left)}; the next run removed it and wrote labels.mrc"


@case("2", "auto VOLUME.mrc -o out.mrc", expect="ok")
def _(w: Work) -> None:
    import mrcfile
    import tifffile

    def volume(path: Path) -> None:
        image = tifffile.imread(SHARED / "stardist_synthetic_nuclei_3d" / "img3d.tif")[10:12]
        with mrcfile.new(path) as mrc:
            mrc.set_data(image.astype(np.float32))
            mrc.voxel_size = 8.0

    image = w.user_file("nuclei.mrc", volume)
    w.run("auto", image, "-o", "labels.mrc", "--json")
    w.outputs = [w.path("labels.mrc")]
    if w.code:
        return
    import json

    objects = json.loads(w.stdout)["objects"]
    with mrcfile.open(w.outputs[0]) as mrc:
        mode, data = int(mrc.header.mode), np.array(mrc.data)
    ids = np.unique(data)[1:]
    w.check(np.array_equal(data, np.round(data)) and len(ids) == objects, f"{len(ids)} ids for {objects} objects")
    w.note = f"{objects} objects, MRC mode {mode} (float32 holds integer ids exactly up to 2**24), ids 1..{int(ids.max()) if len(ids) else 0}"


# ---- item 6: volume
# (`biosam volume` writes its labels slice by slice into the output instead of holding the label volume)


def _o_peak_anon_mb(proc: subprocess.Popen) -> float:
    """Poll the process's anonymous resident memory (heap, not file pages such as a memory-mapped output) until it
    ends; return the peak in MB."""
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            break
        time.sleep(0.1)
    return peak / 1024


@case("6", "volume streams its labels (big MRC volume)", expect="ok")
def _(w: Work) -> None:
    """The real 3D nuclei tiled to 124 x 976 x 912 (uint16 MRC, 221 MB; uint16 labels 221 MB), one nucleus prompted."""
    import json

    import mrcfile
    import tifffile

    from biosam.evaluate import boxes_from_labels

    image = tifffile.imread(SHARED / "stardist_synthetic_nuclei_3d" / "img3d.tif")
    truth = tifffile.imread(SHARED / "stardist_synthetic_nuclei_3d" / "mask3d.tif")
    image = np.clip(image.astype(np.float32) / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    big = np.tile(np.concatenate([image, image[::-1]] * 2), (1, 16, 16))

    def volume(path: Path) -> None:
        with mrcfile.new_mmap(path, big.shape, mrc_mode=6) as mrc:  # uint16 (mode 0 is signed int8)
            for z in range(len(big)):
                mrc.data[z] = big[z]
            mrc.voxel_size = 10.0

    path = w.user_file("big.mrc", volume)
    boxes, ids = boxes_from_labels(truth[20])
    box = boxes[list(ids).index(81)]  # a nucleus through 11 slices
    prompt = [{"box": box.tolist(), "z": 20}]
    small = w.user_file("small.tif", lambda p: tifffile.imwrite(p, image, imagej=True, metadata={"axes": "ZYX"}))
    prompts_small = w.user_file("small.json", lambda p: p.write_text(json.dumps(prompt)))
    prompt[0]["box"] = (box + np.array([8 * 57, 8 * 61, 8 * 57, 8 * 61])).tolist()  # the same nucleus, middle tile
    prompts = w.user_file("prompts.json", lambda p: p.write_text(json.dumps(prompt)))
    labels_mb = big.size * 2 / 2**20
    # the same command on the original 31 x 61 x 57 volume: what the process needs besides the labels
    baseline = _o_popen(w, "volume", small, "--prompts", prompts_small, "-o", "small.mrc")
    base_peak = _o_peak_anon_mb(baseline)
    baseline.communicate()
    start = time.perf_counter()
    proc = _o_popen(w, "volume", path, "--prompts", prompts, "-o", "labels.mrc", "--json")
    peak = _o_peak_anon_mb(proc)
    w.stdout, w.stderr = proc.communicate()
    w.code, w.seconds = proc.returncode, time.perf_counter() - start
    w.outputs = [w.path("labels.mrc"), w.path("small.mrc")]
    if w.code:
        return
    report = json.loads(w.stdout[w.stdout.index("{"):])
    with mrcfile.mmap(w.outputs[0], mode="r") as mrc:
        found = int((mrc.data[20] == 1).sum())
    w.check(found > 0 and report["objects"][0]["voxels"] > 0, "the prompted nucleus was not segmented")
    w.note = (f"{big.shape[0]}x{big.shape[1]}x{big.shape[2]}, {labels_mb:.0f} MB of labels: peak heap {peak:.0f} MB "
              f"({base_peak:.0f} MB for 31x61x57); object on slices {report['objects'][0]['z_first']}-"
              f"{report['objects'][0]['z_last']}")


# ---- item 4: many boxes and warnings
# (`segment` decodes a batch of prompts at a time and draws each mask straight into the labels: memory does not grow
# with the number of boxes, and a bar counts the objects; results that cannot be trusted are warned about, in the
# --json report's "warnings" and on stderr)


def _w_segment_measured(w: Work, *args: object) -> float:
    """Run ``biosam ARGS`` in the case folder like :meth:`Work.run`, sampling its memory; return the peak heap (MB)."""
    import threading

    from _memory import sample_memory

    peaks: dict[str, int] = {}
    stop = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "biosam", *map(str, args)], cwd=w.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, peaks, stop))
    sampler.start()
    w.stdout, w.stderr = proc.communicate()
    stop.set()
    sampler.join()
    w.code, w.seconds = proc.returncode, time.perf_counter() - start
    return peaks.get("RssAnon", 0) / 1e6


def _w_report(w: Work) -> dict:
    import json

    return json.loads(w.stdout[w.stdout.index("{"):]) if "{" in w.stdout else {}


@case("4", "many boxes in one prompts file (memory, progress)", expect="ok")
def _(w: Work) -> None:
    """200, then 400 nucleus-sized boxes over a real NIH3T3 image (1024 x 1344), placed as benchmarks/many_boxes.py
    places them (which measures 2,000 and more): past one decoder batch (64 objects) the peak heap must not grow
    with the number of boxes."""
    import json

    import tifffile

    from many_boxes import nucleus_boxes

    peaks, seconds = {}, 0.0
    for n in (200, 400):
        image, boxes = nucleus_boxes("dna-0", n)
        prompts = w.user_file(f"boxes{n}.json", lambda p: p.write_text(json.dumps([{"box": b} for b in boxes])))
        w.outputs.append(w.path(f"labels{n}.tif"))
        peaks[n] = _w_segment_measured(w, "segment", image, "--prompts", prompts, "-o", f"labels{n}.tif", "--json")
        seconds += w.seconds
        if w.code:
            return
    labels, report = tifffile.imread(w.outputs[-1]), _w_report(w)
    masks_mb = 200 * labels.size / 1e6  # what holding 200 more boolean masks would take
    w.check(len(report.get("objects", [])) == 400 and labels.max() > 200, "objects missing from the labels")
    w.check("objects:" in w.stderr and "400/400" in w.stderr, "no progress bar over the objects")
    w.check(peaks[400] - peaks[200] < masks_mb / 2,
            f"peak heap grows with the boxes: {peaks[200]:.0f} MB for 200, {peaks[400]:.0f} MB for 400")
    w.seconds = seconds
    w.note = (f"200 boxes: peak heap {peaks[200]:.0f} MB; 400 boxes: {peaks[400]:.0f} MB (200 more masks would "
              f"add {masks_mb:.0f} MB); 400/400 progress bar; {len(np.unique(labels)) - 1} labels visible")


def _w_warned(w: Work, phrase: str) -> None:
    """Check that the run warned with ``phrase`` in its --json report and on stderr; the warning is the note."""
    warnings = _w_report(w).get("warnings", [])
    w.check(any(phrase in m for m in warnings), "no warning in the --json report")
    w.check(phrase in w.stderr, "no warning on stderr")
    w.note = first_line("\n".join(warnings)) or None


@case("4", "point-only prompt with the box-trained default model", expect="ok")
def _(w: Work) -> None:
    image = w.user_file("nuclei.png", real_nuclei_png)
    w.outputs = [w.path("labels.tif")]
    w.run("segment", image.name, "--point", "62,40", "-o", "labels.tif", "--json")
    _w_warned(w, "box prompts only")


@case("4", "blank image (constant): segment", expect="ok")
def _(w: Work) -> None:
    import imageio.v3 as iio

    image = w.user_file("blank.png", lambda p: iio.imwrite(p, np.full((256, 256), 128, np.uint8)))
    w.outputs = [w.path("labels.tif")]
    w.run("segment", image.name, "--box", "40,40,160,160", "-o", "labels.tif", "--json")
    _w_warned(w, "no contrast")


@case("4", "blank image (camera noise, 3 grey levels): auto", expect="ok")
def _(w: Work) -> None:
    import imageio.v3 as iio

    noise = np.random.default_rng(0).integers(99, 102, (128, 128)).astype(np.uint8)
    image = w.user_file("dark.png", lambda p: iio.imwrite(p, noise))
    w.outputs = [w.path("labels.tif")]
    w.run("auto", image.name, "-o", "labels.tif", "--json")
    _w_warned(w, "no contrast")


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run only cases whose name or item contains this")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"the real images in {SHARED} are needed (the project's ../shared/data folder)")
    chosen = [c for c in CASES if args.only is None or args.only in c.name or args.only == c.item]
    rows = []
    with tempfile.TemporaryDirectory(prefix="biosam-bad-input-") as base:
        for c in chosen:
            print(f"[{c.item}] {c.name} ...", file=sys.stderr, flush=True)
            rows.append(run_case(c, Path(base)))
            print(f"    {rows[-1][-1]} ({rows[-1][-2]} s)", file=sys.stderr, flush=True)
    header = ["item", "case", "exit", "message / measured", "left behind", "user files", "s", "verdict"]
    table = markdown(header, rows)
    text = f"{table}\n\n{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    failed = sum(r[-1] != "pass" for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
