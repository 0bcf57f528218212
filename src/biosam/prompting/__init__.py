"""Prompted segmentation: preprocessing, prompts, crop-and-zoom and the predictor."""

from biosam.prompting.predictor import Prediction, Predictor
from biosam.prompting.prompts import Prompt, read_prompts
from biosam.prompting.zoom import ZoomSettings

__all__ = ["Prediction", "Predictor", "Prompt", "ZoomSettings", "read_prompts"]
