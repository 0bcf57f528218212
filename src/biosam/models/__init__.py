"""SAM v1 model family: architecture modules, configs, building and checkpoint loading."""

from .build import build_sam
from .checkpoint import CheckpointError, infer_config, load_sam_checkpoint, read_state_dict
from .config import CONFIGS, SamConfig
from .sam import Sam

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "Sam",
    "SamConfig",
    "build_sam",
    "infer_config",
    "load_sam_checkpoint",
    "read_state_dict",
]
