"""The modules that are exported: image encoder, prompt encoder + mask decoder, instance decoder.

Each wraps our own model parts with the inputs and outputs of the SAM ONNX convention, so that the
ONNX and the TorchScript files compute the same graph (see :mod:`biosam.export.onnx` for the
convention). Traced once with example inputs (:class:`Graph`); nothing here depends on onnx.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from biosam.automatic.decoder import InstanceDecoder
from biosam.errors import InputError
from biosam.models.sam import Sam
from biosam.models.sam2.model import Sam2
from biosam.prompting.preprocess import Frame

# Names of the inputs and outputs, as the common SAM / SAM 2 ONNX tools call them.
SAM_ENCODER_OUTPUTS = ("image_embeddings",)
SAM2_ENCODER_OUTPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1")
PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
INSTANCE_INPUTS = ("image_embeddings",)
INSTANCE_OUTPUTS = ("maps",)
# SAM 2 hands out low-res logits clamped to this range and takes mask prompts alike (see Sam2.decode).
_SAM2_MASK_LIMIT = 32.0


@dataclass
class Graph:
    """A module to trace, example inputs, and the names and dynamic axes of its inputs and outputs."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    output_shapes: dict[str, tuple[int | str, ...]] = field(default_factory=dict)


def check_model(model: object) -> Sam | Sam2:
    """The model, or :class:`InputError` if it is not a SAM v1 family or SAM 2 model."""
    if not isinstance(model, (Sam, Sam2)):
        raise InputError(f"cannot export a {type(model).__name__}: only SAM v1 family models (SAM, MobileSAM, "
                         "LiteMedSAM) and SAM 2 / MedSAM2 models (biosam.load_model) can be exported.")
    return model


def preprocessing_of(model: Sam | Sam2) -> str:
    """The model's preprocessing (from ``model.info``; SAM's or SAM 2's for a model built in code)."""
    if model.info is not None:
        return model.info.preprocessing
    return "sam2" if isinstance(model, Sam2) else "sam"


def is_square(preprocessing: str, image_size: int) -> bool:
    """Whether the preprocessing stretches images to the square input (else it keeps the aspect ratio and pads)."""
    return Frame.create((1, 2), image_size, preprocessing).resized == (image_size, image_size)


@contextlib.contextmanager
def fp32(model: Sam | Sam2) -> Iterator[None]:
    """Run the image encoder in fp32 while tracing (exported files always compute in fp32)."""
    old = model.precision
    model.precision = "fp32"
    try:
        yield
    finally:
        model.precision = old


def _example(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ image encoders
class SamEncoder(nn.Module):
    """Normalised, padded image (1, 3, S, S) -> image embeddings (1, 256, h, w), as ``Sam.embed``."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.embed(image)


class Sam2Encoder(nn.Module):
    """Normalised image (1, 3, S, S) -> image_embed (no-memory embedding added), high_res_feats_0 / _1.

    The decoder inputs of a single image, as :meth:`Sam2.decode` forms them from the packed embedding.
    """

    def __init__(self, model: Sam2) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.model.image_features(image)
        embed = feats.embedding
        if self.model.config.directly_add_no_mem_embed:
            embed = embed + self.model.no_mem_embed.view(1, -1, 1, 1)
        return embed, feats.high_res[0], feats.high_res[1]


def encoder_graph(model: Sam | Sam2) -> Graph:
    """The image encoder of ``model`` with an example input (call under :func:`fp32`)."""
    check_model(model)
    s = model.image_size
    if isinstance(model, Sam2):
        return Graph(Sam2Encoder(model).eval(), (_example(1, 3, s, s),), ("image",), SAM2_ENCODER_OUTPUTS)
    return Graph(SamEncoder(model).eval(), (_example(1, 3, s, s),), ("image",), SAM_ENCODER_OUTPUTS)


# ------------------------------------------------------------------ prompt decoders
def image_logits(low_res: torch.Tensor, orig_im_size: torch.Tensor, image_size: int, square: bool) -> torch.Tensor:
    """(1, K, l, l) low-res logits -> (1, K, H, W) logits of the original image, ``orig_im_size`` = (H, W) float.

    The graph form of :func:`biosam.prompting.preprocess.logits_to_image` (sizes are tensors here,
    so that one file serves every image size): up to the model input, the padding cropped off,
    then to the image; or, for preprocessings that stretch the image, straight to the image.
    """
    size = orig_im_size.to(torch.float64)
    h, w = size[0].to(torch.int64), size[1].to(torch.int64)
    if square:
        return F.interpolate(low_res, size=(h, w), mode="bilinear", align_corners=False)
    # Frame.create's rounding, int(side * S / long_side + 0.5) (at least 1), in float64 as Python computes it.
    resized = torch.clamp(torch.floor(size * (image_size / size.max()) + 0.5), min=1.0).to(torch.int64)
    x = F.interpolate(low_res, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : resized[0], : resized[1]]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def _dense_prompt(encoder: nn.Module, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
    # has_mask_input is 0 or 1, so the blend is exactly one of the two (x * 1 + w * 0 == x).
    has = has_mask_input.view(-1, 1, 1, 1)
    no_mask = encoder.no_mask_embed.weight.view(1, -1, 1, 1)
    return has * encoder._embed_masks(mask_input) + (1 - has) * no_mask


class SamDecoder(nn.Module):
    """SAM v1 prompt encoder + mask decoder with the SAM ONNX inputs and outputs (see :func:`decoder_graph`)."""

    def __init__(self, model: Sam, multimask: bool, square: bool) -> None:
        super().__init__()
        self.model, self.multimask, self.square = model, multimask, square

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        encoder = self.model.prompt_encoder
        # Boxes arrive as corner points labelled 2 / 3, padding as -1: all one kind of token.
        sparse = encoder._embed_points(point_coords, point_labels, pad=False)
        dense = _dense_prompt(encoder, mask_input, has_mask_input)
        low, iou = self.model.mask_decoder(image_embeddings, encoder.get_dense_pe(), sparse, dense, self.multimask)
        masks = image_logits(low, orig_im_size, self.model.image_size, self.square)
        return masks, iou, low


class Sam2Decoder(nn.Module):
    """SAM 2 prompt encoder + mask decoder with the SAM 2 ONNX inputs and outputs (see :func:`decoder_graph`)."""

    def __init__(self, model: Sam2, multimask: bool, square: bool) -> None:
        super().__init__()
        self.model, self.multimask, self.square = model, multimask, square

    def forward(self, image_embed, high_res_feats_0, high_res_feats_1, point_coords, point_labels, mask_input,
                has_mask_input, orig_im_size):
        encoder = self.model.sam_prompt_encoder
        sparse = encoder._embed_points(point_coords, point_labels, pad=False)
        mask_input = mask_input.clamp(-_SAM2_MASK_LIMIT, _SAM2_MASK_LIMIT)
        dense = _dense_prompt(encoder, mask_input, has_mask_input)
        low, iou, _, _ = self.model.sam_mask_decoder(
            image_embed, encoder.get_dense_pe(), sparse, dense, self.multimask, repeat_image=True,
            high_res_features=[high_res_feats_0, high_res_feats_1])
        masks = image_logits(low, orig_im_size, self.model.image_size, self.square)
        return masks, iou, low


def decoder_graph(model: Sam | Sam2, multimask: bool = False) -> Graph:
    """Prompt encoder + mask decoder of ``model`` with example inputs; K = 3 masks with ``multimask``, else 1."""
    check_model(model)
    square = is_square(preprocessing_of(model), model.image_size)
    coords = torch.tensor([[[10.0, 12.0], [30.0, 40.0], [0.0, 0.0]]])
    labels = torch.tensor([[1.0, 0.0, -1.0]])
    orig = torch.tensor([300.0, 400.0])
    has = torch.tensor([1.0])
    if isinstance(model, Sam2):
        g, c = model.config.image_embedding_size, model.config.hidden_dim
        module: nn.Module = Sam2Decoder(model, multimask, square)
        embeddings = (_example(1, c, g, g), _example(1, c // 8, 4 * g, 4 * g, seed=1),
                      _example(1, c // 4, 2 * g, 2 * g, seed=2))
        names = SAM2_ENCODER_OUTPUTS
    else:
        g, c = model.config.image_embedding_size, model.config.prompt_embed_dim
        module = SamDecoder(model, multimask, square)
        embeddings, names = (_example(1, c, g, g),), SAM_ENCODER_OUTPUTS
    args = (*embeddings, coords, labels, _example(1, 1, 4 * g, 4 * g, seed=3), has, orig)
    axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
            "masks": {2: "height", 3: "width"}}
    k, low = 3 if multimask else 1, 4 * g
    shapes = {"masks": (1, k, "height", "width"), "iou_predictions": (1, k), "low_res_masks": (1, k, low, low)}
    return Graph(module.eval(), args, (*names, *PROMPT_INPUTS), DECODER_OUTPUTS, axes, shapes)


# ------------------------------------------------------------------ instance decoder
def instance_decoder_graph(decoder: InstanceDecoder, embedding_size: int | None = None) -> Graph:
    """The instance decoder: image_embeddings (B, 256, h, w) -> maps (B, 3, 2^N h, 2^N w) in [0, 1]
    (foreground, centre distance, boundary distance at model-input resolution)."""
    if not isinstance(decoder, InstanceDecoder):
        raise InputError(f"cannot export a {type(decoder).__name__} as an instance decoder: load one with "
                         "biosam.automatic.ais.load_decoder.")
    g = embedding_size or 64
    example = _example(1, decoder.config.embed_dim, g, g)
    axes = {"image_embeddings": {0: "batch"}, "maps": {0: "batch"}}
    return Graph(decoder.eval(), (example,), INSTANCE_INPUTS, INSTANCE_OUTPUTS, axes)
