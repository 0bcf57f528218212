"""Sam container: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .info import ModelInfo
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

if TYPE_CHECKING:
    from .config import SamConfig


# Prompts decoded together on a CPU (see Sam.decode); measured fastest per prompt in benchmarks/speed.py.
_CPU_PROMPT_CHUNK = 8


def decode_in_chunks(
    decode: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    image_embedding: torch.Tensor,
    prompts: tuple[torch.Tensor | None, ...],
    count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode(*prompts)`` for ``count`` prompts on one embedding, in CPU-cache-sized groups on a CPU.

    On a CPU the per-prompt image-token activations (4 MB each) of a few prompts stay in cache; a
    large batch streams them through memory and decodes slower per prompt. Prompt tensors whose
    first dimension is not ``count`` are shared by all prompts and passed whole to every group.
    """
    chunk = _CPU_PROMPT_CHUNK if image_embedding.device.type == "cpu" and image_embedding.shape[0] == 1 else count
    parts = [
        decode(*(t if t is None or t.shape[0] != count else t[i : i + chunk] for t in prompts))
        for i in range(0, max(count, 1), max(chunk, 1))
    ]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class Sam(nn.Module):
    """A SAM v1 model working on preprocessed model-input tensors.

    Pixel normalisation, resizing and padding live in `biosam.prompting`; coordinates given
    to `decode` are pixels of the padded `image_size` x `image_size` model input.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        config: SamConfig,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config
        # "fp32" or "bf16" (see biosam.models.precision); only the image encoder runs in bf16,
        # the small decoder stays fp32 so mask logits keep their resolution.
        self.precision = "fp32"
        # Set by biosam.load_model: name, preprocessing and checkpoint; None for a model built in code.
        self.info: ModelInfo | None = None

    @property
    def image_size(self) -> int:
        """Side length of the square model input."""
        return self.config.image_size

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised, padded images (B, 3, S, S) -> fp32 image embeddings (B, 256, h, w)."""
        if self.precision == "fp32":
            return self.image_encoder(images)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return self.image_encoder(images).float()

    def decode(
        self,
        image_embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for B prompts on one (batch-1) or B image embeddings.

        point_coords (B, K, 2) as (x, y) with point_labels (B, K); boxes (B, 4) as
        (x0, y0, x1, y1); mask_inputs (B, 1, 4h, 4w) low-res logits of an earlier call.
        Returns low-res logits (B, C, 4h, 4w) and IoU predictions (B, C), C = 3 if multimask.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        prompts = [t for t in (point_coords, boxes, mask_inputs) if t is not None]
        count = prompts[0].shape[0] if prompts else 1
        return decode_in_chunks(lambda *part: self._decode(image_embedding, *part, multimask=multimask),
                                image_embedding, (point_coords, point_labels, boxes, mask_inputs), count)

    def _decode(self, image_embedding, point_coords, point_labels, boxes, mask_inputs, multimask):
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)
        return self.mask_decoder(
            image_embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask
        )
