"""Training what sits on top of a frozen SAM image encoder (the instance decoder)."""

from biosam.train.decoder import TrainResult, TrainSettings, train_decoder

__all__ = ["TrainResult", "TrainSettings", "train_decoder"]
