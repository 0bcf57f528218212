"""Issue 14's "done when": `biosam segment` and `biosam auto` give identical labels whatever the input TIFF's
compression, and `--compression` sets how the labels are stored (refused before the model loads when wrong)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import biosam
from biosam.cli.main import main
from biosam.evaluate import boxes_from_labels
from biosam.io import read_image

INPUTS = {"lzw": 5, "zlib": 8, "zstd": 50000, None: 1}  # tifffile compression -> the TIFF tag it writes


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _compression_of(path) -> int:
    with tifffile.TiffFile(path) as tif:
        return int(tif.pages.first.compression)


@pytest.fixture(scope="module")
def copies(tmp_path_factory, dsb_nuclei):
    """A 256 x 256 crop of the real DSB2018 nuclei image saved with each compression, and boxes of 3 nuclei."""
    folder = tmp_path_factory.mktemp("compressed")
    image, labels = (a[:256, :256] for a in dsb_nuclei)
    paths = []
    for compression, code in INPUTS.items():
        path = folder / f"crop_{compression or 'none'}.tif"
        tifffile.imwrite(path, image, compression=compression)
        assert _compression_of(path) == code
        paths.append(path)
    boxes, _ = boxes_from_labels(labels)
    # One embeddings store for every run: it is keyed by the pixels' hash, so equal pixels (what this file is
    # about) are embedded once, which keeps these runs fast; different pixels would be embedded anew.
    return folder, paths, [",".join(str(v) for v in b) for b in boxes[:3]], ["--embeddings", folder / "emb.zarr"]



# The labels' --compression for each input copy, so every output choice is checked on the way (None: the default).
OUTPUTS = ((None, 8), ("none", 1), ("lzw", 5), ("zstd", 50000))


def test_segment_and_auto_give_identical_labels_on_every_compression(copies, shared_model):
    folder, paths, boxes, store = copies
    pixels = [np.asarray(read_image(path)[0]) for path in paths]
    for path, image in zip(paths[1:], pixels[1:]):
        np.testing.assert_array_equal(image, pixels[0], err_msg=path.name)
    every, lzw_and_none = range(len(paths)), (0, len(paths) - 1)
    runs = (("segment", [a for b in boxes for a in ("--box", b)], every),
            ("auto", [], every),  # auto's default: the AIS decoder
            # a prompt grid, kept small (and to the LZW vs uncompressed pair) to stay fast
            ("auto", ["--mode", "amg", "--points-per-side", "4"], lzw_and_none))
    for command, extra, which in runs:
        results = []
        for i in which:
            path, (compression, code) = paths[i], OUTPUTS[i]
            out = folder / f"{command}{len(extra)}_{path.stem}.tif"
            option = [] if compression is None else ["--compression", compression]
            res = run(command, path, "-o", out, *extra, *store, *option)
            assert res.exit_code == 0, res.output
            assert _compression_of(out) == code, f"{command} --compression {compression}"
            results.append(tifffile.imread(out))
        assert results[0].max() >= 3, f"{command} {extra} found too little to compare"
        for i, labels in zip(which[1:], results[1:]):
            np.testing.assert_array_equal(labels, results[0], err_msg=f"{command} {extra} on {paths[i].name}")


def test_bad_compression_is_refused_before_the_model_loads(copies, tmp_path, monkeypatch):
    _, paths, boxes, _ = copies

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was refused")

    monkeypatch.setattr(biosam, "load_model", no_model)
    res = CliRunner().invoke(main, ["auto", str(paths[0]), "-o", str(tmp_path / "o.tif"), "--compression", "jpeg"])
    assert res.exit_code == 2 and "Invalid value for '--compression'" in res.output and "deflate" in res.output
    for command, extra in (("segment", ["--box", boxes[0]]), ("auto", [])):
        res = run(command, paths[0], "-o", tmp_path / "o.mrc", "--compression", "lzw", *extra)
        assert res.exit_code == 1, res.output
        assert "o.mrc: --compression lzw applies to TIFF labels only" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []
