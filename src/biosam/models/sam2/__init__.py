"""SAM 2 / 2.1 (Hiera image encoder, memory) written in this project; loads the original checkpoints."""

from .checkpoint import load_sam2_checkpoint
from .config import SAM2_CONFIGS, Sam2Config
from .model import Sam2, build_sam2

__all__ = ["SAM2_CONFIGS", "Sam2", "Sam2Config", "build_sam2", "load_sam2_checkpoint"]
