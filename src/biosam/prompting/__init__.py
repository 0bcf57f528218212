"""Prompted segmentation: preprocessing, prompts, crop-and-zoom and the predictor."""

from biosam.prompting.predictor import LabelResult, Prediction, Predictor
from biosam.prompting.prompts import Prompt, read_prompts
from biosam.prompting.zoom import ZoomSettings

__all__ = ["LabelResult", "Prediction", "Predictor", "Prompt", "ZoomSettings", "read_prompts"]
