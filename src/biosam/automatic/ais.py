"""Automatic instance segmentation with a trained decoder (AIS): load a decoder, run it on one image.

A decoder is tied to the image encoder it was trained on: its checkpoint records
the encoder's name and checkpoint hash, and using it with another model is
refused. Images larger than the model input are handled by tiling on top of
:func:`predict_maps` (see :mod:`biosam.automatic.tiling`): tiles of the
``tile`` size recorded in the checkpoint, maps stitched, objects found once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biosam.automatic.decoder import VIT_CONFIG, DecoderConfig, InstanceDecoder
from biosam.automatic.instances import PostProcessing, maps_to_instances
from biosam.errors import InputError
from biosam.models.sam2.model import Sam2
from biosam.prompting.preprocess import Frame

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "biosam-instance-decoder"
CHECKPOINT_VERSION = 1
#: Decoders shipped with biosam, by model name (files in ``biosam/automatic/weights``).
#: Decoders shipped in the package: ``{(model name, what it finds): file in weights/}``.
SHIPPED_DECODERS = {("lite_medsam", "nuclei"): "lite_medsam_nuclei_decoder.pt",
                    ("lite_medsam", "vesicles"): "lite_medsam_vesicle_decoder.pt"}


class DecoderMismatchError(InputError):
    """An instance decoder used with a model whose image encoder it was not trained on."""


def shipped_decoder_path(model_name: str = "lite_medsam", kind: str = "nuclei") -> Path:
    """Path of the decoder shipped for a zoo model that finds ``kind`` (``nuclei`` or ``vesicles``);
    :class:`InputError` if there is none."""
    if (model_name, kind) not in SHIPPED_DECODERS:
        models = sorted({name for name, what in SHIPPED_DECODERS if what == kind})
        raise InputError(
            f"no {kind} decoder ships for model '{model_name}' (only for {', '.join(models)}); "
            "train one (`biosam train decoder --model ...`) and pass it with --decoder."
        )
    return Path(str(files("biosam.automatic") / "weights" / SHIPPED_DECODERS[(model_name, kind)]))


# ------------------------------------------------------------ checkpoints
def decoder_checkpoint(decoder: InstanceDecoder, info: Mapping) -> dict:
    """The dict :func:`save_decoder` writes: weights, architecture and ``info`` (encoder, preprocessing, ...)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": decoder.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()},
        **dict(info),
    }


def save_decoder(path: str | os.PathLike, decoder: InstanceDecoder, info: Mapping) -> Path:
    """Write a decoder checkpoint.

    ``info`` must hold ``encoder`` (``name``, ``checkpoint_hash``,
    ``preprocessing``, ``image_size``) and should hold ``intensity``, ``tile``,
    ``halo`` and ``postprocessing``; anything else (e.g. ``training``) is kept as is.
    """
    from biosam.io.files import atomic_path

    if "encoder" not in info or "checkpoint_hash" not in info["encoder"]:
        raise ValueError("decoder info needs encoder.checkpoint_hash")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(decoder_checkpoint(decoder, info), tmp)
    return path


def encoder_info(model: torch.nn.Module) -> dict:
    """What a decoder records about the model whose embeddings it is trained on."""
    info = model.info
    return {
        "name": info.name,
        "checkpoint_hash": info.checkpoint_hash,
        "preprocessing": info.preprocessing,
        "image_size": int(model.image_size),
    }


def load_decoder(
    source: str | os.PathLike | None = None,
    model: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    kind: str = "nuclei",
) -> InstanceDecoder:
    """Load an instance decoder: a biosam checkpoint, or a micro-sam ``*_decoder`` / full model file.

    ``source=None`` loads the decoder shipped for ``model`` (``lite_medsam`` by
    default) that finds ``kind`` (see :data:`SHIPPED_DECODERS`). With ``model`` given, a decoder trained on another image encoder
    is refused (:class:`DecoderMismatchError`). The decoder is returned in eval
    mode with its record in ``decoder.info``.
    """
    if source is None:
        source = shipped_decoder_path(model.info.name if model is not None else "lite_medsam", kind)
    from biosam.models.checkpoint import read_plain_checkpoint

    path = Path(source)
    data = read_plain_checkpoint(path, "decoder")
    if isinstance(data, Mapping) and data.get("format") == CHECKPOINT_FORMAT:
        if data.get("version", 0) > CHECKPOINT_VERSION:
            raise InputError(f"{path}: decoder checkpoint version {data['version']} is newer than this biosam reads.")
        decoder = InstanceDecoder(DecoderConfig.from_dict(data["config"]))
        decoder.load_state_dict_strict(data["state_dict"], source=str(path))
        decoder.info = {k: v for k, v in data.items() if k not in ("state_dict", "config", "format", "version")}
    elif isinstance(data, Mapping) and isinstance(data.get("decoder_state"), Mapping):
        decoder = _from_micro_sam(path, data["decoder_state"], bundled="model_state" in data)
    else:
        raise InputError(
            f"{path}: not an instance decoder checkpoint (neither a biosam decoder nor a micro-sam file with "
            "'decoder_state')."
        )
    decoder.info["source"] = str(path)
    if model is not None:
        check_compatible(decoder, model)
    if device is not None:
        decoder = decoder.to(device)
    return decoder.eval()


def _from_micro_sam(path: Path, state: Mapping[str, torch.Tensor], bundled: bool) -> InstanceDecoder:
    """A micro-sam decoder; a full micro-sam file holds the SAM weights it was trained with next to it."""
    from biosam.models.info import file_hash

    state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    stages = sum(1 for k in state if k.startswith("deconv") and k.endswith(".block.1.block.weight"))
    config = VIT_CONFIG if stages in (0, 4) else DecoderConfig(features=VIT_CONFIG.features[-stages:])
    decoder = InstanceDecoder(config)
    decoder.load_state_dict_strict(state, source=str(path))
    # A separate ``*_decoder`` file does not say which encoder it belongs to: only its size can be checked.
    checkpoint_hash = file_hash(path) if bundled else None
    decoder.info = {
        "encoder": {
            "name": str(path) if bundled else None,
            "checkpoint_hash": checkpoint_hash,
            "preprocessing": "sam",
            "image_size": 64 * config.upscale,
        },
        "intensity": "auto",
        "tile": 64 * config.upscale,
        "halo": 64 * config.upscale // 8,
        # micro-sam's own defaults: seeds below 0.5 in both distances, distances smoothed with sigma 1.6.
        "postprocessing": PostProcessing(
            foreground_threshold=0.5, center_threshold=0.5, boundary_threshold=0.5, smoothing=1.6, min_size=0,
            fill_holes=False, min_relative_size=0.0,
        ).to_dict(),
    }
    return decoder


def check_compatible(decoder: InstanceDecoder, model: torch.nn.Module) -> None:
    """Refuse a decoder trained on another image encoder than ``model``'s (a fresh decoder passes)."""
    if isinstance(model, Sam2):
        raise DecoderMismatchError(
            f"'{model.info.name if model.info else 'this model'}' is a SAM 2 model; instance decoders read SAM v1 image embeddings. "
            "Use automatic mask generation with SAM 2 models (`biosam auto --mode amg`)."
        )
    expected = (decoder.info or {}).get("encoder")
    if expected is None or expected.get("checkpoint_hash") is None:
        # A fresh decoder, or one whose encoder is not recorded: only its output size can be checked.
        embedding = model.config.image_embedding_size
        if embedding * decoder.config.upscale != model.image_size:
            raise DecoderMismatchError(
                f"this decoder upsamples x{decoder.config.upscale}, so a {embedding} px embedding gives "
                f"{embedding * decoder.config.upscale} px maps, but the model takes {model.image_size} px inputs; "
                f"build it with biosam.automatic.decoder.config_for({model.image_size}, {embedding})."
            )
        if expected is not None:
            logger.warning("the decoder does not record its image encoder; make sure it was trained for %s",
                           model.info.name)
        return
    info = model.info
    if expected.get("checkpoint_hash") != info.checkpoint_hash:
        source = decoder.info.get("source", "the instance decoder")
        raise DecoderMismatchError(
            f"{source} was trained on the image encoder of model '{expected.get('name')}' "
            f"(checkpoint {str(expected.get('checkpoint_hash'))[:12]}), but the model in use is '{info.name}' "
            f"(checkpoint {info.checkpoint_hash[:12]}); a decoder only works with the encoder it was trained on. "
            f"Use --model {expected.get('name')}, or train a decoder for this model with `biosam train decoder`."
        )
    if expected.get("preprocessing", info.preprocessing) != info.preprocessing:
        raise DecoderMismatchError(
            f"the instance decoder was trained with '{expected['preprocessing']}' preprocessing, but the model "
            f"uses '{info.preprocessing}'; load the model with preprocessing='{expected['preprocessing']}'."
        )


def decoder_postprocessing(decoder: InstanceDecoder) -> PostProcessing:
    """The post-processing parameters recorded with a decoder (defaults for a fresh one)."""
    data = (decoder.info or {}).get("postprocessing")
    return PostProcessing.from_dict(data) if data else PostProcessing()


# ----------------------------------------------------------------- running
def maps_from_embedding(decoder: InstanceDecoder, embedding: torch.Tensor, frame: Frame) -> torch.Tensor:
    """Decoder maps ``(B, 3, H, W)`` at image size from embeddings ``(B, 256, h, w)`` of images in ``frame``."""
    param = next(decoder.parameters())
    out = decoder(embedding.to(device=param.device, dtype=param.dtype))
    size = frame.input_size
    if out.shape[-1] != size or out.shape[-2] != size:
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
    out = out[..., : frame.resized[0], : frame.resized[1]]
    if tuple(out.shape[-2:]) != tuple(frame.image_shape):
        out = F.interpolate(out, size=frame.image_shape, mode="bilinear", align_corners=False)
    return out


def predict_maps(
    predictor, decoder: InstanceDecoder, image: np.ndarray | None = None, intensity: str = "auto"
) -> np.ndarray:
    """Foreground, centre-distance and boundary-distance maps ``(3, H, W)`` float32 for one image.

    ``predictor`` is a :class:`biosam.prompting.Predictor`; ``image`` (any 2D
    image, e.g. one tile) is embedded with ``intensity`` normalisation, or the
    predictor's current image is used when ``image`` is None. The maps are
    resampled to image size the way SAM's masks are. The decoder was trained on
    tiles of ``decoder.info["tile"]`` pixels: a smaller image is padded to that
    size, not enlarged, so objects keep the scale the decoder learnt; give larger
    images tile by tile (:func:`biosam.automatic.run.segment_automatic` does).
    """
    check_compatible(decoder, predictor.model)
    if image is not None:
        predictor.set_image(image, intensity, extent=(decoder.info or {}).get("tile"))
    decoder = decoder.to(predictor.device).eval()
    with torch.inference_mode():
        maps = maps_from_embedding(decoder, predictor.embedding, predictor.frame)
    return maps[0].float().cpu().numpy()


def instance_segmentation(
    predictor,
    decoder: InstanceDecoder,
    image: np.ndarray | None = None,
    intensity: str = "auto",
    params: PostProcessing | None = None,
    **overrides,
) -> np.ndarray:
    """Instance labels ``(H, W)`` of one image from the decoder's maps (no tiling).

    Post-processing uses ``params`` or the parameters stored with the decoder;
    keyword overrides (e.g. ``min_size=100``) replace single fields.
    """
    maps = predict_maps(predictor, decoder, image, intensity)
    return maps_to_instances(maps, params or decoder_postprocessing(decoder), **overrides)
