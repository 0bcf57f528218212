"""Recognising SAM 2 / 2.1 checkpoints, inferring their config, and loading them strictly.

A released file is ``{"model": state_dict}`` of sam2's ``SAM2Base``; :func:`read_state_dict`
unwraps it (and other layouts) the same way as for SAM v1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..checkpoint import CheckpointError, _compare, mismatch_error, read_state_dict
from .config import SAM2_CONFIGS, Sam2Config, sam2_config_name
from .hiera import HIERA_CONFIGS
from .model import Sam2

__all__ = [
    "default_image_size",
    "infer_sam2_config",
    "is_sam2_state_dict",
    "load_sam2_checkpoint",
    "load_sam2_state_dict",
]

logger = logging.getLogger(__name__)

_TRUNK = "image_encoder.trunk."
# Present in SAM 2.1 files only (its no-object spatial embedding and pointer-time projection).
_SAM2_1_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")


def is_sam2_state_dict(state: Mapping[str, Tensor]) -> bool:
    """Whether the tensors are laid out as a SAM 2 model (Hiera trunk / SAM 2 head names)."""
    return any(key.startswith((_TRUNK, "sam_mask_decoder.", "sam_prompt_encoder.")) for key in state)


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not a complete SAM 2 checkpoint: tensor '{key}' is missing")
    return tuple(state[key].shape)


def _infer_trunk(state: Mapping[str, Tensor]) -> str:
    """Name of the released Hiera trunk the tensors fit (window layout is not visible in shapes)."""
    width = _shape(state, _TRUNK + "patch_embed.proj.weight")[0]
    depth = 0
    while any(key.startswith(f"{_TRUNK}blocks.{depth}.") for key in state):
        depth += 1
    if depth == 0:
        raise CheckpointError("not a complete SAM 2 checkpoint: no 'image_encoder.trunk.blocks.*' tensors")
    # a block with a shortcut projection opens a new stage (it widens the channels)
    starts = [i for i in range(1, depth) if f"{_TRUNK}blocks.{i}.proj.weight" in state]
    bounds = [0, *starts, depth]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    background = _shape(state, _TRUNK + "pos_embed")[2:]
    window = _shape(state, _TRUNK + "pos_embed_window")[-1]
    for name, cfg in HIERA_CONFIGS.items():
        if (
            cfg["embed_dim"] == width
            and tuple(cfg["stages"]) == stages
            and tuple(cfg["window_pos_embed_bkg_spatial_size"]) == background
            and cfg.get("window_spec", (8,))[0] == window
        ):
            return name
    raise CheckpointError(
        f"the Hiera trunk (width {width}, stages {stages}, position table {background}) matches no released "
        f"SAM 2 trunk ({', '.join(HIERA_CONFIGS)})"
    )


def infer_sam2_config(state: Mapping[str, Tensor], image_size: int = 1024) -> Sam2Config:
    """Config of a SAM 2 state dict: trunk from tensor shapes, 2.0 vs 2.1 from the keys present.

    The input size leaves no trace in the tensors, so it is ``image_size`` (1024 for Meta's
    releases, 512 for MedSAM2).
    """
    if not is_sam2_state_dict(state):
        raise CheckpointError("not a SAM 2 checkpoint: no 'image_encoder.trunk.*' / 'sam_mask_decoder.*' tensors")
    trunk = _infer_trunk(state)
    found = [key in state for key in _SAM2_1_KEYS]
    if any(found) and not all(found):
        have = [k for k, f in zip(_SAM2_1_KEYS, found) if f]
        raise CheckpointError(
            f"the file mixes the SAM 2.0 and 2.1 layouts: it has {have} but not all of {list(_SAM2_1_KEYS)}"
        )
    return Sam2Config.release(trunk, sam2_1=all(found), image_size=image_size)


def load_sam2_state_dict(
    state: Mapping[str, Tensor], config: Sam2Config | None = None, source: str = "state dict", image_size: int = 1024
) -> Sam2:
    """Build the model for ``state`` and load every tensor (eval mode, CPU).

    ``config`` defaults to the one inferred from the tensors at ``image_size``. Missing,
    unexpected or mis-shaped tensors raise :class:`CheckpointError` naming them (``source``
    starts the message).
    """
    if config is None:
        try:
            config = infer_sam2_config(state, image_size)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
    model = Sam2(config)
    problems = _compare(model.state_dict(), state)
    if problems:
        try:
            actual = infer_sam2_config(state, config.image_size)
        except CheckpointError:
            actual = None
        raise mismatch_error(source, _describe(config), problems, None if actual is None else _describe(actual),
                             same=actual == config)
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s as %s", source, _describe(config))
    return model.eval()


def load_sam2_checkpoint(
    path: str | os.PathLike, config: Sam2Config | None = None, image_size: int | None = None
) -> Sam2:
    """Load a SAM 2 / 2.1 checkpoint file (eval mode, CPU).

    ``config`` defaults to the one inferred from the tensors, at ``image_size`` (default:
    judged by the file name, see :func:`default_image_size`).
    """
    path = Path(path)
    if config is not None and image_size is not None:
        config = config.with_image_size(image_size)
    return load_sam2_state_dict(read_state_dict(path), config, str(path), image_size or default_image_size(path))


def default_image_size(path: str | os.PathLike) -> int:
    """Input size of a SAM 2 file judged by its name: 512 for MedSAM2 files, else 1024.

    MedSAM2 (bowang-lab) publishes every checkpoint (``MedSAM2_latest.pt``, ``MedSAM2_2411.pt``,
    ``MedSAM2_CTLesion.pt``, ...) for its 512 px config ``sam2.1_hiera_t512.yaml``.
    """
    name = Path(path).name.lower()
    return SAM2_CONFIGS["medsam2"].image_size if name.startswith("medsam2") else 1024


def _describe(config: Sam2Config) -> str:
    name = sam2_config_name(config)
    release = "SAM 2.1" if config.sam2_1 else "SAM 2.0"
    shape = f"{release} Hiera-{config.trunk}, {config.image_size} px"
    return f"'{name}' ({shape})" if name else f"custom ({shape})"
