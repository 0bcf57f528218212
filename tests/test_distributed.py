"""Scale-out on Dask (biosam.distributed) with a real LocalCluster of 2 single-threaded workers, on real images."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage

from conftest import shared_file

distributed = pytest.importorskip("distributed")

from biosam.cli.main import main  # noqa: E402
from biosam.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def client():
    from biosam.distributed import open_client

    with open_client(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> list:
    """Three 256 px quarters of a real nuclei image (DSB2018) as TIFF files."""
    folder = tmp_path_factory.mktemp("inputs")
    dsb = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))
    paths = []
    for name, pixels in (("dsb_a", dsb[:256, :256]), ("dsb_b", dsb[256:, 256:]), ("dsb_c", dsb[:256, 256:])):
        tifffile.imwrite(folder / f"{name}.tif", np.ascontiguousarray(pixels))
        paths.append(folder / f"{name}.tif")
    return paths


@pytest.fixture(scope="module")
def batch_run(client, crops, tmp_path_factory):
    """A batch of the crops and one broken file, run once for the tests that read its results."""
    from biosam.distributed import run_batch

    folder = crops[0].parent
    (folder / "broken.tif").write_bytes(b"not a TIFF")
    outdir = tmp_path_factory.mktemp("batch")
    # retries=1: the broken file is tried twice, then reported
    rows = run_batch("auto", [str(folder)], outdir, ["--model", "lite_medsam"], client=client, progress=False,
                     retries=1)
    (folder / "broken.tif").unlink()
    return rows, outdir


def test_batch_matches_each_file_run_alone(batch_run, crops, tmp_path):
    rows, outdir = batch_run
    by_name = {os.path.basename(r.input): r for r in rows}
    assert {n: r.status for n, r in by_name.items()} == {"broken.tif": "failed", "dsb_a.tif": "done",
                                                         "dsb_b.tif": "done", "dsb_c.tif": "done"}
    assert "broken.tif" in by_name["broken.tif"].error
    for path in crops:  # the same command, run alone through the CLI
        alone = tmp_path / f"{path.stem}.tif"
        result = CliRunner().invoke(main, ["auto", str(path), "-o", str(alone)])
        assert result.exit_code == 0, result.output
        expected, got = tifffile.imread(alone), tifffile.imread(outdir / f"{path.stem}.tif")
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        assert by_name[path.name].objects == int(expected.max()) > 0
    table = (outdir / "biosam-batch-summary.csv").read_text().splitlines()
    assert table[0] == "input,output,status,seconds,objects,error" and len(table) == 5


def test_resume_skips_finished_outputs(batch_run, crops):
    from biosam.distributed import run_batch

    _, outdir = batch_run
    stamps = {p.name: (outdir / p.name).stat().st_mtime_ns for p in crops}
    # nothing left to do: no cluster is started at all (client=None would start one)
    rows = run_batch("auto", [str(p) for p in crops], outdir, [], progress=False)
    assert [r.status for r in rows] == ["skipped"] * 3
    assert {p.name: (outdir / p.name).stat().st_mtime_ns for p in crops} == stamps


def test_killed_worker_tasks_rerun(client, crops, tmp_path):
    from biosam.distributed import run_batch

    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(3):
        for path in crops[:2]:
            shutil.copy(path, inputs / f"{path.stem}_{k}.tif")
    outdir = tmp_path / "out"
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(rows=run_batch("auto", [str(inputs)], outdir, [],
                                                                        client=client, progress=False)))
    runner.start()
    deadline = time.time() + 60
    while time.time() < deadline and not any(client.processing().values()):
        time.sleep(0.2)
    time.sleep(1.0)  # the task is running now
    busy = [w for w, tasks in client.processing().items() if tasks]
    assert busy, "no task started"
    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
    os.kill(pid, signal.SIGKILL)  # the nanny starts a new worker; the scheduler gives the lost task to a worker
    runner.join(timeout=150)
    assert not runner.is_alive()
    rows = done["rows"]
    assert [r.status for r in rows] == ["done"] * 6, [(r.input, r.status, r.error) for r in rows]
    assert all((outdir / os.path.basename(r.input)).exists() for r in rows)
    client.wait_for_workers(2, timeout=60)


def test_blockwise_equals_single_process_tiled_labels(client, tmp_path, lite_medsam):
    """Blockwise on a real image = merge_instance_tiles(segment_automatic per block) in one process: same ids."""
    import zarr

    from biosam import Predictor
    from biosam.automatic.run import AutoSettings, segment_automatic
    from biosam.automatic.tiling import merge_instance_tiles
    from biosam.distributed import segment_blockwise
    from biosam.distributed.blockwise import Source, intensity_normaliser

    image = tifffile.imread(shared_file("stardist_dsb2018_nuclei_2d", "img2d.tif"))[:320, :320]
    zarr.create_array(str(tmp_path / "in.zarr"), data=image, chunks=(128, 128))
    block, halo, settings = 160, 40, AutoSettings(scale=1.0)
    report = segment_blockwise(str(tmp_path / "in.zarr"), tmp_path / "out.zarr", block=block, halo=halo,
                               settings=settings, client=client, progress=False)
    labels = np.asarray(zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["0"])
    assert report["blocks"] == 4 and report["objects"] == int(labels.max()) > 20

    normalise = intensity_normaliser(Source(path=str(tmp_path / "in.zarr")))
    predictor = Predictor(lite_medsam)
    single = merge_instance_tiles(normalise(image), lambda t: segment_automatic(predictor, t, settings),
                                  block + 2 * halo, halo)
    assert labels.dtype == single.dtype and np.array_equal(labels, single)  # same objects, same ids: IoU 1
    # objects cross the block faces (at 160 px) whole: one connected piece each, some on both sides
    ids = np.arange(1, labels.max() + 1)
    pieces = [ndimage.label(labels == i)[1] for i in ids]
    assert max(pieces) == 1
    crossing = np.intersect1d(labels[:, 159], labels[:, 160])
    assert len(crossing[crossing > 0]) > 0


def test_blockwise_skips_empty_blocks(client, tmp_path):
    from biosam.distributed import segment_blockwise

    image = np.zeros((200, 200), dtype=np.uint16)
    report = segment_blockwise(image, tmp_path / "out.zarr", block=100, halo=10, client=client, progress=False)
    assert report["objects"] == 0 and report["skipped_blocks"] == report["blocks"] == 4


def test_missing_distributed_is_a_clear_error(monkeypatch, tmp_path, crops):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
    from biosam.distributed import run_batch

    with pytest.raises(InputError, match=r'pip install "biosam\[distributed\]"'):
        run_batch("auto", [str(crops[0])], tmp_path, [])
    result = CliRunner().invoke(main, ["batch", "auto", str(crops[0]), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and 'pip install "biosam[distributed]"' in result.output


def test_batch_command_line_options(tmp_path, crops):
    from biosam.cli.batch import _split

    inputs, options = _split(main.commands["auto"], [str(crops[0]), "--mode", "ais", "--json", "x.tif",
                                                     "--tile=256"])
    assert inputs == [str(crops[0]), "x.tif"] and options == ["--mode", "ais", "--json", "--tile=256"]
    result = CliRunner().invoke(main, ["batch", "auto", str(crops[0]), "-o", str(tmp_path), "--no-such"])
    assert result.exit_code != 0 and "--no-such" in result.output


def test_command_line_on_an_existing_cluster(client, crops, tmp_path):
    import json

    import zarr

    address = client.scheduler.address
    result = CliRunner().invoke(main, ["batch", "auto", str(crops[0]), "-o", str(tmp_path / "b"),
                                       "--scheduler", address, "--tile", "256"])
    assert result.exit_code == 0, result.output
    assert "1 done, 0 skipped, 0 failed" in result.output and (tmp_path / "b" / "dsb_a.tif").exists()
    zarr.create_array(str(tmp_path / "in.zarr"), data=tifffile.imread(crops[0]), chunks=(128, 128))
    result = CliRunner().invoke(main, ["auto", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "out.zarr"),
                                       "--blocks", "128", "--scale", "1", "--scheduler", address, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    labels = np.asarray(zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["0"])
    assert report["blocks"] == 4 and report["objects"] == int(labels.max()) > 0


def test_batch_runs_prompted_segmentation(client, crops, tmp_path):
    from biosam.distributed import run_batch

    options = ["--box", "20,20,90,90", "--zoom", "off"]
    rows = run_batch("segment", [str(crops[0])], tmp_path / "b", options, client=client, progress=False)
    assert [(r.status, r.objects) for r in rows] == [("done", 1)]
    result = CliRunner().invoke(main, ["segment", str(crops[0]), "-o", str(tmp_path / "alone.tif"), *options])
    assert result.exit_code == 0, result.output
    assert np.array_equal(tifffile.imread(tmp_path / "b" / "dsb_a.tif"), tifffile.imread(tmp_path / "alone.tif"))
    with pytest.raises(InputError, match="-o names the output folder"):
        run_batch("segment", [str(crops[0])], tmp_path / "c", ["-o", "x.tif"], client=client)
    with pytest.raises(InputError, match="not a command"):
        run_batch("train", [str(crops[0])], tmp_path / "c", [], client=client)


def _worker_state() -> tuple[int, int | None]:
    import torch

    from biosam import load

    return torch.get_num_threads(), None if load._kept is None else len(load._kept)


def test_workers_keep_one_model_and_one_thread(batch_run, client):
    # after the batch (several inputs per worker): one torch thread per single-threaded worker, and the
    # lite_medsam model loaded once per worker that ran a task (not once per input)
    states = client.run(_worker_state)
    assert all(threads == 1 for threads, _ in states.values())
    assert all(kept is not None and kept <= 1 for _, kept in states.values())


def test_a_copick_project_is_one_input_per_run(tmp_path):
    from conftest import make_copick_project

    from biosam.distributed.batch import find_inputs, output_for

    config, _ = make_copick_project(tmp_path)
    uri = f"copick://{config}"
    runs = find_inputs([uri])
    assert runs == [f"{uri}?run=TS_001", f"{uri}?run=TS_002"]
    assert output_for(runs[0], tmp_path / "out", ".mrc") == tmp_path / "out" / "TS_001.mrc"
    assert find_inputs([f"{uri}?run=TS_002"]) == [f"{uri}?run=TS_002"]


def _merged_slice(volume: str, z: int, block: int, halo: int, settings) -> np.ndarray:
    """One process's blockwise rule on one slice: merge_instance_tiles of segment_automatic per block."""
    from biosam import Predictor, load_model
    from biosam.automatic.run import segment_automatic
    from biosam.automatic.tiling import merge_instance_tiles
    from biosam.distributed.blockwise import Source, intensity_normaliser

    source = Source(path=volume, z=z)
    predictor = Predictor(load_model("lite_medsam"))
    plane = source.open()[0][z]
    return merge_instance_tiles(intensity_normaliser(source)(plane),
                                lambda t: segment_automatic(predictor, t, settings), block + 2 * halo, halo)


def test_blockwise_volume_links_slices_like_auto(client, tmp_path):
    """A (Z, Y, X) zarr in blocks smaller than a slice = each slice's tiled labels linked by SliceLinker's rule."""
    import zarr

    from biosam.automatic.run import AutoSettings
    from biosam.distributed import segment_blockwise
    from biosam.volume import link_slices

    volume = tifffile.imread(shared_file("stardist_synthetic_nuclei_3d", "img3d.tif"))[13:17]
    path = str(tmp_path / "in.zarr")
    zarr.create_array(path, data=volume, chunks=(1, 32, 32))
    block, halo, settings = 32, 8, AutoSettings(scale=1.0)
    report = segment_blockwise(path, tmp_path / "out.zarr", block=block, halo=halo, settings=settings,
                               client=client, progress=False)
    labels = np.asarray(zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["0"])
    assert labels.shape == volume.shape and report["slices"] == 4 and report["blocks"] == 16

    # the same rule in one process per slice (run on the workers, in parallel), linked as `biosam auto` links
    planes = client.gather(client.map(_merged_slice, [path] * 4, range(4), block=block, halo=halo,
                                      settings=settings, pure=False))
    expected = link_slices(np.stack(planes), 0.3)
    assert report["objects"] == int(expected.max()) == int(labels.max()) > 3
    assert np.array_equal(labels, expected)
    # linked: some objects span several slices; none is cut at a block face (one piece per slice)
    assert max(len(np.unique(np.nonzero(labels == i)[0])) for i in range(1, labels.max() + 1)) > 1
    assert all(ndimage.label(plane == i)[1] <= 1 for plane in labels for i in np.unique(plane[plane > 0]))
    # link_iou 0: the slices' objects keep their own ids, numbered on from slice to slice
    apart = segment_blockwise(path, tmp_path / "apart.zarr", block=block, halo=halo, settings=settings,
                              link_iou=0, client=client, progress=False)
    assert apart["objects"] == sum(int(p.max()) for p in planes)


def _visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpu_workers_get_one_device_and_the_resource(tmp_path, monkeypatch):
    """gpus=2 on a CPU machine: two workers, each offering GPU=1 and seeing one device; tasks ask for GPU=1."""
    from biosam.distributed import open_client, run_batch
    from biosam.distributed.cluster import task_resources

    with open_client(gpus=0) as plain:  # without GPUs nothing changes: no resources asked for
        assert task_resources(plain) is None
        assert all(not w.get("resources") for w in plain.scheduler_info()["workers"].values())
    with open_client(gpus=2) as gpu:
        workers = gpu.scheduler_info()["workers"].values()
        assert sorted(w["resources"].get("GPU") for w in workers) == [1, 1]
        assert sorted(gpu.run(_visible_devices).values()) == ["0", "1"]
        assert task_resources(gpu) == {"GPU": 1}
        asked = []
        submit = gpu.submit
        monkeypatch.setattr(gpu, "submit", lambda *a, **k: asked.append(k.get("resources")) or submit(*a, **k))
        (tmp_path / "broken.tif").write_bytes(b"not a TIFF")  # fails fast, without loading a model
        rows = run_batch("auto", [str(tmp_path / "broken.tif")], tmp_path / "out", [], client=gpu, progress=False)
        assert [r.status for r in rows] == ["failed"] and asked == [{"GPU": 1}]


def test_blockwise_volume_from_the_command_line(client, tmp_path):
    """`biosam auto VOLUME.zarr --blocks`: the whole volume (no --z), empty blocks skipped, slices linked."""
    import json

    import zarr

    volume = np.zeros((3, 64, 64), dtype=np.uint8)
    zarr.create_array(str(tmp_path / "in.zarr"), data=volume, chunks=(1, 32, 32))
    result = CliRunner().invoke(main, ["auto", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "out.zarr"),
                                       "--blocks", "32", "--scheduler", client.scheduler.address, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert (report["slices"], report["blocks"], report["skipped_blocks"], report["objects"]) == (3, 12, 12, 0)
    labels = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["0"]
    assert labels.shape == (3, 64, 64) and not np.asarray(labels).any()
    with pytest.raises(InputError, match="link_iou"):
        from biosam.distributed import segment_blockwise

        segment_blockwise(volume, tmp_path / "x.zarr", axes="ZYX", link_iou=1.5, client=client)


def test_array_axes_are_guessed_like_images():
    """A NumPy volume needs no axes: a last axis of up to 4 is colour, anything else deeper is Z."""
    from biosam.distributed.blockwise import Source

    assert Source(array=np.zeros((31, 61, 57), np.uint8)).open()[1].axes == "ZYX"
    assert Source(array=np.zeros((61, 57, 3), np.uint8)).open()[1].axes == "YXC"
    assert Source(array=np.zeros((61, 57), np.uint8)).open()[1].axes == "YX"
    with pytest.raises(InputError, match="name its axes"):
        Source(array=np.zeros((2, 3, 61, 57), np.uint8)).open()
