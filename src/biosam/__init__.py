"""biosam: Segment Anything models for biomedical images."""

from biosam.load import default_device, load_model
from biosam.models.info import ModelInfo
from biosam.prompting import Prediction, Predictor, Prompt, ZoomSettings, read_prompts

__version__ = "0.1.0"

__all__ = [
    "ModelInfo",
    "Prediction",
    "Predictor",
    "Prompt",
    "ZoomSettings",
    "default_device",
    "load_model",
    "read_prompts",
]
