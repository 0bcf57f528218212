"""The instance decoder: a UNETR-style convolutional decoder on a frozen SAM image embedding.

It predicts three maps at model-input resolution: foreground probability, the
distance to the object centre and the distance to the object boundary (both
normalised per object, 0 at the centre / innermost point, 1 at the boundary and
in the background). :mod:`biosam.automatic.instances` turns them into objects.

The module tree reproduces, key for key, the decoder part of torch_em's
``UNETR`` as micro-sam builds it for its ``*_decoder`` checkpoints (no skip
connections from the encoder, transposed-convolution upsampling): ``base``,
``decoder.blocks.*`` / ``decoder.samplers.*``, ``deconv1..N``, ``deconv_out``,
``decoder_head`` and ``out_conv``. A decoder with ``N`` stages upsamples the
embedding ``2**N`` times: 4 stages for 1024 px SAM models (64 -> 1024 px), 2 for
LiteMedSAM (64 -> 256 px).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from biosam.errors import InputError

logger = logging.getLogger(__name__)

UPSAMPLERS = ("transpose", "bilinear")


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of an instance decoder.

    ``features`` are the channels of the ``N`` upsampling stages, each half the
    previous one (the decoder concatenates an upsampled map with a skip map of the
    same width). ``upsampler`` is ``"transpose"`` (2x2 stride-2 transposed
    convolutions, as micro-sam's decoders) or ``"bilinear"`` (bilinear resize and
    a 1x1 convolution).
    """

    embed_dim: int = 256
    features: tuple[int, ...] = (512, 256, 128, 64)
    out_channels: int = 3
    upsampler: str = "transpose"

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if not self.features:
            raise ValueError("DecoderConfig.features needs at least one stage")
        for wide, narrow in zip(self.features[:-1], self.features[1:]):
            if wide != 2 * narrow:
                raise ValueError(f"DecoderConfig.features must halve at each stage, got {self.features}")
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(f"DecoderConfig.upsampler must be one of {UPSAMPLERS}, got {self.upsampler!r}")

    @property
    def upscale(self) -> int:
        """Factor from the embedding grid to the output maps."""
        return 2 ** len(self.features)

    def to_dict(self) -> dict:
        return {**asdict(self), "features": list(self.features)}

    @classmethod
    def from_dict(cls, data: Mapping) -> DecoderConfig:
        return cls(**{**data, "features": tuple(data["features"])})


#: micro-sam's decoder for 1024 px SAM models (64 x 64 embedding -> 1024 x 1024 maps).
VIT_CONFIG = DecoderConfig()
#: The default decoder for LiteMedSAM (64 x 64 embedding -> 256 x 256 maps), 0.37 M parameters: narrow
#: full-resolution stages keep CPU training affordable.
LITE_CONFIG = DecoderConfig(features=(64, 32))


def config_for(image_size: int, embedding_size: int, features: tuple[int, ...] | None = None) -> DecoderConfig:
    """A decoder config whose output matches a model's input size.

    ``features`` default to micro-sam's widths (512, 256, 128, 64) for 4
    stages; with fewer stages (LiteMedSAM: 2) the widths end at 32 channels,
    e.g. (64, 32).
    """
    ratio = image_size / embedding_size
    stages = round(math.log2(ratio)) if ratio >= 2 else 0
    if stages < 1 or 2**stages != ratio:
        raise InputError(
            f"cannot build an instance decoder from a {embedding_size} px embedding to a {image_size} px input: "
            "the sizes must differ by a power of two."
        )
    if features is None:
        features = VIT_CONFIG.features if stages == 4 else tuple(32 * 2**i for i in range(stages))[::-1]
    if len(features) != stages:
        raise InputError(f"an instance decoder for this model needs {stages} feature widths, got {tuple(features)}.")
    return DecoderConfig(features=tuple(features))


# ----------------------------------------------------------------- blocks
class _ConvBlock(nn.Module):
    """Two (instance norm, 3x3 conv, ReLU) steps; norm without affine terms, so only the convs hold weights."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.InstanceNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.InstanceNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _TransposeUp(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _BilinearUp(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def _upsampler(kind: str, in_channels: int, out_channels: int) -> nn.Module:
    return _TransposeUp(in_channels, out_channels) if kind == "transpose" else _BilinearUp(in_channels, out_channels)


class _Conv3x3(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _UpBlock(nn.Module):
    """Upsample x2, 3x3 conv, batch norm, ReLU."""

    def __init__(self, kind: str, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _upsampler(kind, in_channels, out_channels),
            _Conv3x3(out_channels),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Decoder(nn.Module):
    def __init__(self, kind: str, features: tuple[int, ...]) -> None:
        super().__init__()
        pairs = list(zip(features[:-1], features[1:]))
        self.blocks = nn.ModuleList([_ConvBlock(a, b) for a, b in pairs])
        self.samplers = nn.ModuleList([_upsampler(kind, a, b) for a, b in pairs])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block, sampler, skip in zip(self.blocks, self.samplers, skips):
            x = sampler(x)
            # The skip maps are twice as wide as the upsampled map; micro-sam's weights were
            # trained on their central channels, so the same channels are used here.
            start = (skip.shape[1] - x.shape[1]) // 2
            x = block(torch.cat([x, skip[:, start : start + x.shape[1]]], dim=1))
        return x


# ----------------------------------------------------------------- decoder
class InstanceDecoder(nn.Module):
    """Image embedding ``(B, 256, h, w)`` -> maps ``(B, 3, h * 2**N, w * 2**N)`` in [0, 1].

    Channels: foreground probability, centre distance, boundary distance.
    ``info`` carries what the decoder was trained with (see
    :func:`biosam.automatic.ais.load_decoder`); ``None`` for a fresh decoder.
    """

    def __init__(self, config: DecoderConfig = LITE_CONFIG) -> None:
        super().__init__()
        self.config = config
        self.info: dict | None = None
        f, kind = config.features, config.upsampler
        self.base = _ConvBlock(config.embed_dim, f[0])
        self.decoder = _Decoder(kind, f)
        # deconv1 .. deconvN: a chain of upsampling blocks from the embedding, one per stage.
        widths = (config.embed_dim, *f)
        for i in range(len(f)):
            setattr(self, f"deconv{i + 1}", _UpBlock(kind, widths[i], widths[i + 1]))
        self.deconv_out = _upsampler(kind, f[-1], f[-1])
        self.decoder_head = _ConvBlock(2 * f[-1], f[-1])
        self.out_conv = nn.Conv2d(f[-1], config.out_channels, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(embedding))

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """The maps before the final sigmoid (for numerically stable training losses)."""
        chain = []
        z = embedding
        for i in range(len(self.config.features)):
            z = getattr(self, f"deconv{i + 1}")(z)
            chain.append(z)
        x = self.decoder(self.base(embedding), chain[:-1])
        x = self.decoder_head(torch.cat([self.deconv_out(x), chain[-1]], dim=1))
        return self.out_conv(x)

    def load_state_dict_strict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load weights, refusing any missing, unexpected or differently shaped tensor.

        The error names every offending key with both shapes, so a decoder for
        another architecture (e.g. ViT vs LiteMedSAM widths) is never half-loaded.
        """
        check_state_dict(self.state_dict(), state, source)
        self.load_state_dict(state, strict=True)


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`InputError` listing the keys and shapes where ``found`` differs from ``expected``."""
    problems = []
    for key, tensor in expected.items():
        if key not in found:
            problems.append(f"missing key '{key}' (expected shape {tuple(tensor.shape)})")
        elif tuple(found[key].shape) != tuple(tensor.shape):
            problems.append(
                f"key '{key}' has shape {tuple(found[key].shape)} in the {source}, "
                f"but this decoder expects {tuple(tensor.shape)}"
            )
    problems += [f"unexpected key '{key}' with shape {tuple(found[key].shape)}" for key in found if key not in expected]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise InputError(f"{source}: the decoder weights do not fit this decoder architecture: {shown}.")


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
