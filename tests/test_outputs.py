"""Outputs are safe (issue 14, items 2 and 6): refused before work when they cannot be written, never written over
a folder of the user's or the input, with the umask's permissions, no temporaries left by a signal or a kill,
MRC labels from `biosam auto` on a volume, and `biosam volume` labels written slice by slice.

Inputs are real images from ../shared/data (StarDist DSB2018 nuclei, the StarDist 3D nuclei volume).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import biosam
from biosam.cli.main import main
from biosam.evaluate import boxes_from_labels
from biosam.io import read_image, write_labels
from biosam.io.files import temp_path
from biosam.volume import PropagationSettings, segment_volume

from conftest import shared_file

NUCLEUS_BOX = "49,23,75,57"  # a nucleus of the DSB2018 image


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def hidden(folder: Path) -> list[str]:
    """biosam's temporary names (``.NAME.biosam-HOST-PID-RANDOM.tmp...``) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".biosam-" in p.name)


@pytest.fixture()
def nuclei(tmp_path) -> Path:
    """The real DSB2018 nuclei image as a user's TIFF."""
    path = tmp_path / "nuclei.tif"
    shutil.copyfile(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"), path)
    return path


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading the model: refusals must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(biosam, "load_model", refuse)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The StarDist 3D nuclei (31 slices) as a TIFF stack, prompts on every slice (a run of many seconds, to
    interrupt) and a prompt on one slice (a short run)."""
    folder = tmp_path_factory.mktemp("volume")
    image = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "img3d.tif"))
    truth = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "mask3d.tif"))
    path = folder / "nuclei3d.tif"
    tifffile.imwrite(path, image, imagej=True, metadata={"axes": "ZYX"})
    prompts = []
    for z in range(image.shape[0]):
        boxes, _ = boxes_from_labels(truth[z])
        if len(boxes):
            prompts.append({"box": boxes[0].tolist(), "z": z})
    many, one = folder / "every_slice.json", folder / "one_slice.json"
    many.write_text(json.dumps(prompts))
    one.write_text(json.dumps(prompts[len(prompts) // 2: len(prompts) // 2 + 1]))
    return path, many, one


# ----------------------------------------------------------------------------- unwritable places


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder modes (see the read-only file system test)")
def test_read_only_folder_is_refused_before_work(nuclei, tmp_path, no_model):
    folder = tmp_path / "results"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        res = run("segment", nuclei, "--box", NUCLEUS_BOX, "-o", folder / "labels.tif")
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert "cannot write in its folder" in res.output and "permission denied" in res.output
        res = run("segment", nuclei, "--box", NUCLEUS_BOX, "-o", tmp_path / "labels.tif",
                  "--overlay", folder / "overlay.png")
        assert res.exit_code == 1 and "permission denied" in res.output
        assert list(folder.iterdir()) == [] and not (tmp_path / "labels.tif").exists()
    finally:
        folder.chmod(0o755)


def _can_mount_read_only(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount -t tmpfs -o ro,size=1m tmpfs "$1"', "sh", str(folder)], capture_output=True)
    return probe.returncode == 0


def test_read_only_file_system_is_refused_before_work(nuclei, tmp_path):
    """A read-only file system refuses even root; mounted in a private mount namespace, gone when the run ends."""
    folder = tmp_path / "mounted"
    folder.mkdir()
    if not _can_mount_read_only(folder):
        pytest.skip("needs root with `unshare --mount` to mount a read-only file system (the mode test covers users)")
    script = 'mount -t tmpfs -o ro,size=1m tmpfs "$1" && shift && exec "$@"'
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(folder),
                          sys.executable, "-m", "biosam", "segment", str(nuclei), "--box", NUCLEUS_BOX,
                          "-o", str(folder / "labels.tif")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "cannot write in its folder" in res.stderr and "read-only file system" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert list(folder.iterdir()) == []


def test_parent_path_that_is_a_file_is_refused(nuclei, tmp_path, no_model):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for output in (notes / "labels.tif", notes / "deeper" / "labels.tif"):
        res = run("segment", nuclei, "--box", NUCLEUS_BOX, "-o", output)
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert f"{notes} is a file, not a folder" in res.output
    assert notes.read_text() == "my notes"


# ----------------------------------------------------------------------------- what --overwrite may replace


def test_overwrite_never_replaces_a_folder_of_user_files(nuclei, tmp_path, no_model):
    for name, message in (("photos.tif", "is a folder; --overwrite replaces files only"),
                          ("photos.zarr", "is a folder biosam did not write as labels")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "holiday.jpg").write_bytes(b"a photo")
        res = run("segment", nuclei, "--box", NUCLEUS_BOX, "-o", folder, "--overwrite")
        assert res.exit_code == 1 and message in res.output, res.output
        assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]
        assert (folder / "holiday.jpg").read_bytes() == b"a photo"


def test_overwrite_replaces_a_label_store_biosam_wrote(tmp_path):
    _, meta = read_image(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))
    store = tmp_path / "labels.zarr"
    write_labels(store, np.ones((512, 512), np.uint16), like=meta)
    write_labels(store, np.full((512, 512), 2, np.uint16), like=meta, overwrite=True)
    labels, _ = read_image(store)
    assert np.all(np.asarray(labels) == 2) and not hidden(tmp_path)


def test_output_equal_to_input_is_refused_even_with_overwrite(nuclei, tmp_path, no_model):
    before = nuclei.read_bytes()
    link = tmp_path / "same_file.tif"
    os.link(nuclei, link)  # another name for the same file
    for output in (nuclei, link, tmp_path / "." / nuclei.name):
        res = run("segment", nuclei, "--box", NUCLEUS_BOX, "-o", output, "--overwrite")
        assert res.exit_code == 1 and "is the input" in res.output and "not even with --overwrite" in res.output
    png = tmp_path / "nuclei.png"
    shutil.copyfile(shared_file("skimage_bundled", "microaneurysms.png"), png)
    png_before = png.read_bytes()
    res = run("segment", png, "--box", "10,10,50,50", "-o", tmp_path / "labels.tif", "--overlay", png, "--overwrite")
    assert res.exit_code == 1 and "is the input" in res.output
    assert nuclei.read_bytes() == before and png.read_bytes() == png_before
    assert not (tmp_path / "labels.tif").exists() and not hidden(tmp_path)


# ----------------------------------------------------------------------------- permissions


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_new_outputs_follow_the_umask_and_replaced_ones_keep_their_mode(nuclei, tmp_path):
    out, overlay = tmp_path / "labels.tif", tmp_path / "overlay.png"
    old = os.umask(0o022)
    try:
        res = run("segment", nuclei, "--box", NUCLEUS_BOX, "-o", out, "--overlay", overlay)
        assert res.exit_code == 0, res.output
        assert _mode(out) == 0o644 and _mode(overlay) == 0o644  # not mkstemp's 0600
        out.chmod(0o640)
        res = run("segment", nuclei, "--box", NUCLEUS_BOX, "-o", out, "--overwrite")
        assert res.exit_code == 0, res.output
        assert _mode(out) == 0o640  # the replaced file keeps its mode
        os.umask(0o027)
        res = run("segment", nuclei, "--box", NUCLEUS_BOX, "-o", tmp_path / "group.tif")
        assert res.exit_code == 0 and _mode(tmp_path / "group.tif") == 0o640
    finally:
        os.umask(old)
    assert tifffile.imread(out).max() == 1 and not hidden(tmp_path)


# ----------------------------------------------------------------------------- signals and kills


def _interactive_signals() -> None:
    # a run started from a terminal gets Ctrl-C; tests started as a background job inherit SIGINT ignored,
    # which biosam rightly keeps ignored, so the child is given the terminal's default back
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: object, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "biosam", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_interactive_signals)


def _wait_for_temporary(proc: subprocess.Popen, folder: Path, pattern: str) -> list[Path]:
    """Wait until the run has opened its output under a temporary name (it is computing then)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(folder.glob(pattern))
        if found:
            return found
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no temporary output appeared (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_removes_temporaries_and_keeps_the_old_output(volume, tmp_path, sig, code):
    image, prompts, _ = volume
    out = tmp_path / "labels.mrc"
    out.write_bytes(b"yesterday's result")  # replaced only by a complete run
    proc = _start("segment", image, "--prompts", prompts, "-o", out, "--overwrite", cwd=tmp_path)
    _wait_for_temporary(proc, tmp_path, ".labels.mrc.biosam-*.tmp.mrc")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"stopped by {sig.name}; unfinished outputs were removed" in stderr and "Traceback" not in stderr
    assert out.read_bytes() == b"yesterday's result"
    assert not hidden(tmp_path), hidden(tmp_path)


def _dead_pid() -> int:
    """A process id that is not running now."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _temp_of(output: Path, pid: int) -> Path:
    """A temporary name of ``output`` as process ``pid`` on this host would make it."""
    name = temp_path(output).name
    return output.with_name(name.replace(f"-{os.getpid()}-", f"-{pid}-"))


def test_temporaries_of_a_killed_run_are_removed_by_the_next_run(volume, tmp_path):
    image, many, one = volume
    out = tmp_path / "labels.mrc"
    proc = _start("segment", image, "--prompts", many, "-o", out, cwd=tmp_path)
    left = _wait_for_temporary(proc, tmp_path, ".labels.mrc.biosam-*.tmp.mrc")
    proc.send_signal(signal.SIGKILL)  # no cleanup possible
    proc.communicate(timeout=60)
    assert all(p.exists() for p in left) and not out.exists()
    # a temporary folder of another killed run, one of a process still running, one of another output
    dead_dir = _temp_of(out, _dead_pid())
    (dead_dir / "0").mkdir(parents=True)
    writer = subprocess.Popen(["sleep", "300"])
    running = _temp_of(out, writer.pid)
    running.write_bytes(b"being written")
    other = _temp_of(tmp_path / "other.mrc", _dead_pid())
    other.write_bytes(b"someone else's")
    try:
        res = run("segment", image, "--prompts", one, "-o", out)
    finally:
        writer.kill()
        writer.wait()
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in left) and not dead_dir.exists()
    assert running.exists() and other.exists()  # a live writer's, and another output's, are not touched
    with mrcfile.open(out) as mrc:
        assert mrc.data.max() == 1


# ----------------------------------------------------------------------------- MRC labels of a volume


def test_auto_on_an_mrc_volume_writes_mrc_labels(tmp_path):
    image = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "img3d.tif"))[10:12]
    path = tmp_path / "nuclei.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(image.astype(np.float32))
        mrc.voxel_size = 8.0
    res = run("auto", path, "-o", tmp_path / "labels.mrc", "--json")
    assert res.exit_code == 0, res.output
    objects = json.loads(res.stdout)["objects"]
    res = run("auto", path, "-o", tmp_path / "labels.ome.zarr")  # the same run into a format with uint32
    assert res.exit_code == 0, res.output
    expected = np.asarray(read_image(tmp_path / "labels.ome.zarr")[0])
    with mrcfile.open(tmp_path / "labels.mrc") as mrc:
        # uint32 ids: MRC has no 32-bit integer mode, so float32 (mode 2), exact up to 2**24
        assert int(mrc.header.mode) == 2 and mrc.voxel_size.tolist() == (8.0, 8.0, 8.0)
        stored = np.array(mrc.data)
    assert objects > 0 and len(np.unique(expected)) - 1 == objects
    assert np.array_equal(stored, expected) and np.array_equal(stored, np.round(stored))
    labels, meta = read_image(tmp_path / "labels.mrc")
    assert np.array_equal(np.asarray(labels), expected) and meta.shape == image.shape
    assert not hidden(tmp_path)


def test_mrc_holds_ids_up_to_2_to_the_24(tmp_path):
    _, meta = read_image(shared_file("mrcfile_emdb_maps", "EMD-3197.map"))
    labels = np.zeros(meta.shape, np.uint32)
    labels[0, 0, :3] = [70000, 2**24 - 1, 2**24]
    write_labels(tmp_path / "many.mrc", labels, like=meta)
    stored, _ = read_image(tmp_path / "many.mrc")
    assert np.array_equal(np.asarray(stored), labels)


# ----------------------------------------------------------------------------- `biosam volume` streams its labels


class _Planes:
    """An output label volume that records its writes and keeps only the planes written (no volume-sized array)."""

    def __init__(self, shape: tuple[int, int, int], dtype=np.uint16) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.planes: dict[int, np.ndarray] = {}
        self.writes: list[tuple[object, tuple[int, ...]]] = []

    def __getitem__(self, z):
        assert isinstance(z, (int, np.integer)), f"read of {z!r}: not one plane"
        return self.planes.get(int(z), np.zeros(self.shape[1:], self.dtype)).copy()

    def __setitem__(self, z, plane) -> None:
        plane = np.asarray(plane)
        self.writes.append((z, plane.shape))
        assert isinstance(z, (int, np.integer)) and plane.shape == self.shape[1:], f"write of {z!r}: not one plane"
        self.planes[int(z)] = plane.astype(self.dtype)

    def volume(self) -> np.ndarray:
        return np.stack([self[z] for z in range(self.shape[0])])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """8 slices of the StarDist 3D nuclei with boxes on two nuclei."""
    image = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "img3d.tif"))[2:10]
    truth = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "mask3d.tif"))[2:10]
    prompts = []
    for z in (3, 5):
        boxes, _ = boxes_from_labels(truth[z])
        prompts.append(biosam.Prompt(box=np.asarray(boxes[len(boxes) // 2], float), z=z))
    folder = tmp_path_factory.mktemp("stack")
    path = folder / "stack.tif"
    tifffile.imwrite(path, image, imagej=True, metadata={"axes": "ZYX"})
    prompts_file = folder / "prompts.json"
    prompts_file.write_text(json.dumps([{"box": p.box.tolist(), "z": p.z} for p in prompts]))
    return image, prompts, path, prompts_file


@pytest.fixture(scope="module")
def in_memory(stack, lite_medsam):
    """segment_volume with no ``out``: the labels held in memory, as `biosam volume` computed them before."""
    image, prompts, _, _ = stack
    return segment_volume(biosam.Predictor(lite_medsam), image, prompts, PropagationSettings(zoom="off"),
                          progress=False)


def test_segment_volume_writes_plane_by_plane(stack, in_memory, lite_medsam):
    image, prompts, _, _ = stack
    out = _Planes(image.shape)
    streamed = segment_volume(biosam.Predictor(lite_medsam), image, prompts, PropagationSettings(zoom="off"),
                              progress=False, out=out)
    assert streamed.labels is out  # no label volume of its own
    assert out.writes and all(shape == image.shape[1:] for _, shape in out.writes)
    assert len(out.planes) <= image.shape[0]
    assert np.array_equal(out.volume(), in_memory.labels) and in_memory.labels.max() == len(prompts)
    np.testing.assert_array_equal(streamed.scores, in_memory.scores)


@pytest.mark.parametrize("suffix", [".mrc", ".ome.zarr"])  # the two streamed formats (TIFF: tests/test_volume.py)
def test_volume_command_gives_the_labels_of_segment_volume(stack, in_memory, tmp_path, suffix):
    _, prompts, path, prompts_file = stack
    expected = in_memory.labels
    out = tmp_path / f"labels{suffix}"
    res = run("volume", path, "--prompts", prompts_file, "-o", out, "--zoom", "off", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{"):])
    labels, _ = read_image(out)
    labels = np.asarray(labels)
    assert np.array_equal(labels, expected)
    assert [o["voxels"] for o in report["objects"]] == [int((expected == k + 1).sum()) for k in range(len(prompts))]
    assert not hidden(tmp_path)
