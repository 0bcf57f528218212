"""``biosam train decoder``: a short real training run on NIH3T3 crops, resume, pairing and the nuclei split."""

from __future__ import annotations

import imageio.v3 as iio
import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED_DATA, shared_file

from biosam.automatic.data import NUCLEI_TRAIN, NUCLEI_VAL, nuclei_split, pair_by_stem
from biosam.errors import InputError
from biosam.train import TrainSettings


def test_nuclei_split_is_the_project_split():
    shared_file("nuclei_nih3t3", "images", "dna-0.png")
    train, val = nuclei_split(SHARED_DATA)
    assert [p[0].name for p in train] == [f"dna-{n}.png" for n in NUCLEI_TRAIN]
    assert [p[1].name for p in train] == [f"{n}.png" for n in NUCLEI_TRAIN]
    assert [p[0].name for p in val] == [f"dna-{n}.png" for n in NUCLEI_VAL] + ["img2d.tif"]
    assert not {p[0] for p in train} & {p[0] for p in val}
    with pytest.raises(InputError, match="nuclei data incomplete"):
        nuclei_split(SHARED_DATA / "no_such_folder")


def test_pairing_by_stem_names_the_unmatched_image(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    for name in ("a.png", "b.tif"):
        (tmp_path / "im" / name).write_bytes(b"x")
    (tmp_path / "lb" / "a.tif").write_bytes(b"x")
    with pytest.raises(InputError, match="have no label file.*first: 'b'"):
        pair_by_stem(tmp_path / "im", tmp_path / "lb")
    (tmp_path / "lb" / "b.png").write_bytes(b"x")
    assert [(i.name, lab.name) for i, lab in pair_by_stem(tmp_path / "im", tmp_path / "lb")] == [
        ("a.png", "a.tif"), ("b.tif", "b.png")
    ]
    with pytest.raises(InputError, match="not a folder"):
        pair_by_stem(tmp_path / "missing", tmp_path / "lb")


def test_settings_are_checked():
    with pytest.raises(InputError, match="one crops_per_image count per scale"):
        TrainSettings(scales=(1.0, 0.5), crops_per_image=(2, 2, 2))
    with pytest.raises(InputError, match="variants"):
        TrainSettings(variants=9)
    assert TrainSettings(scales=(1, 0.5), crops_per_image=3).crops_per_image == (3, 3)


def test_typical_object_size_is_the_median_diameter_at_the_middle_training_scale():
    from biosam.train.decoder import typical_object_size

    settings = TrainSettings(scales=(1.0, 0.5, 0.25), crops_per_image=(12, 6, 2))
    # log-midpoint of scales 1 and 1/4 is 1/2, whatever the crops per scale
    assert typical_object_size([0, 80, 90, 100], settings) == pytest.approx(45.0)
    assert typical_object_size([90], TrainSettings(scales=(1.0,), crops_per_image=(1,))) == pytest.approx(90.0)
    assert typical_object_size([], settings) == 0.0


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """Two 160 x 200 px NIH3T3 crops with nuclei, as image/label folders."""
    root = tmp_path_factory.mktemp("nuclei")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for n, (y, x) in ((0, (300, 300)), (1, (400, 500))):
        image = iio.imread(shared_file("nuclei_nih3t3", "images", f"dna-{n}.png"))[y : y + 160, x : x + 200]
        mask = iio.imread(shared_file("nuclei_nih3t3", "labels", f"{n}.png"))[y : y + 160, x : x + 200]
        assert mask.max() > 0
        iio.imwrite(root / "images" / f"{n}.png", image)
        iio.imwrite(root / "labels" / f"{n}.png", mask)
    return root


def test_train_cli_writes_a_loadable_decoder_and_resumes(tiny_pairs, tmp_path, lite_medsam):
    from biosam.automatic.ais import load_decoder
    from biosam.cli.train import train
    from biosam.train.decoder import resume_path

    out = tmp_path / "decoder.pt"
    cache = tmp_path / "cache"
    args = ["decoder", "--images", str(tiny_pairs / "images"), "--labels", str(tiny_pairs / "labels"),
            "-o", str(out), "--val-fraction", "0.5", "--crops-per-image", "1", "--batch-size", "2",
            "--cache-dir", str(cache), "--device", "cpu", "--json"]
    runner = CliRunner()
    result = runner.invoke(train, [*args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert '"train_images": 1' in result.output and '"val_images": 1' in result.output
    embedded = sorted(cache.iterdir())
    assert len(embedded) == 2  # one training tile, one validation tile (both images are smaller than 256 px)

    decoder = load_decoder(out, lite_medsam)
    info = decoder.info
    assert info["encoder"]["name"] == "lite_medsam"
    assert info["encoder"]["checkpoint_hash"] == lite_medsam.info.checkpoint_hash
    assert info["tile"] == 256 and info["intensity"] == "auto" and 20 < info["object_size"] < 150
    assert set(info["postprocessing"]) == {"foreground_threshold", "center_threshold", "boundary_threshold",
                                           "smoothing", "min_size", "fill_holes", "min_relative_size"}
    assert [row["epoch"] for row in info["training"]["history"]] == [1]
    assert "val_f1" in info["training"]["history"][0]

    # --resume continues after epoch 1 with the cached embeddings
    result = runner.invoke(train, [*args, "--epochs", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert sorted(cache.iterdir()) == embedded
    state = torch.load(resume_path(out), map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and [row["epoch"] for row in state["history"]] == [1, 2]
    assert load_decoder(out, lite_medsam).info["training"]["history"][-1]["epoch"] in (1, 2)

    # resuming with other settings, or with nothing to resume, is refused
    result = runner.invoke(train, [*args, "--epochs", "3", "--resume", "--variants", "2"])
    assert isinstance(result.exception, InputError) and "other images or settings" in str(result.exception)
    result = runner.invoke(train, [*args[:5], "-o", str(tmp_path / "new.pt"), "--resume"])
    assert isinstance(result.exception, InputError) and "no saved training state" in str(result.exception)


def test_intensity_augmentation_keeps_the_content(dsb_nuclei):
    """Re-exposed copies of real nuclei: dim 8-bit to 16-bit, nuclei still brighter than their background."""
    import numpy as np

    from biosam.train.augment import augment_intensity

    image, labels = dsb_nuclei
    rng = np.random.default_rng(0)
    copies = [augment_intensity(image, rng) for _ in range(24)]
    assert {c.dtype for c in copies} == {np.dtype(np.uint8), np.dtype(np.uint16)}
    assert min(int(c.max()) for c in copies if c.dtype == np.uint8) < 60  # some are dim
    assert len({c.tobytes() for c in copies}) == len(copies)
    for c in copies:
        assert c.shape == image.shape
        assert c[labels > 0].mean() > c[labels == 0].mean()
    with pytest.raises(InputError, match="augment"):
        TrainSettings(augment=1.5)
    with pytest.raises(InputError, match="object_size"):
        TrainSettings(object_size=2)


def test_object_size_resizes_training_images_to_one_size(tiny_pairs, tmp_path, lite_medsam):
    from biosam.automatic.ais import load_decoder
    from biosam.cli.train import train

    out = tmp_path / "sized.pt"
    args = ["decoder", "--images", str(tiny_pairs / "images"), "--labels", str(tiny_pairs / "labels"),
            "-o", str(out), "--val-fraction", "0", "--crops-per-image", "2", "--batch-size", "2", "--epochs", "1",
            "--object-size", "40", "--augment", "1", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output
    # NIH3T3 nuclei (about 85 px) were halved: the decoder records 40 px, not their size in the files.
    assert 30 < load_decoder(out, lite_medsam).info["object_size"] < 50
    assert len(list((tmp_path / "cache").iterdir())) == 4  # every tile re-exposed: 2 crops x 2 images


@pytest.mark.parametrize("command", ["decoder", "sam", "classifier"])
def test_the_train_commands_share_their_options_and_refusals(command, tmp_path):
    """One option group: the same checks and messages in every `biosam train` command, all before a model loads."""
    from biosam.cli.main import main

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(b"never read")
    out = tmp_path / "model.pt"
    base = ["train", command, "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
            "-o", str(out)]

    def run(*extra):
        return CliRunner().invoke(main, [*base, *extra])

    result = run("--lr", "0")
    assert result.exit_code == 1 and "lr must be > 0, got 0.0" in result.output
    result = run("--val-fraction", "0.95")
    assert result.exit_code == 1 and "val_fraction must lie in [0.0, 0.9], got 0.95" in result.output
    result = run("--epochs", "0")
    assert result.exit_code == 1 and "epochs must be a whole number >= 1, got 0" in result.output
    result = run("--device", "gpu")
    assert result.exit_code == 2 and "'gpu' is not one of 'cpu', 'cuda'" in result.output
    out.write_bytes(b"keep me")
    result = run()
    assert result.exit_code == 1 and f"{out}: already exists" in result.output and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me"
