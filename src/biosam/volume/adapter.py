"""The propagation adapter: a SAM v1 decoder taught to carry an object from one slice to the next.

LiteMedSAM was trained with box prompts only, so the box around an object's mask
on the last slice is all it can use, and small errors compound from slice to
slice (``benchmarks/volume_quality.py``). The adapter is a copy of the model's
prompt encoder and mask decoder with low-rank adapters on the decoder's
attention and a retrained mask-prompt path and IoU head, trained on labelled
volumes to turn the last slice's mask (a mask prompt) plus its box into this
slice's mask, and into a low predicted IoU where the object has ended. It shares
the model's image encoder, so each slice is still embedded once.
"""

from __future__ import annotations

import copy
import logging
import os
from importlib.resources import files
from pathlib import Path

from torch import Tensor

from biosam.errors import InputError
from biosam.models.checkpoint import read_plain_checkpoint
from biosam.models.lora import DECODER_TARGETS, add_lora, apply_adapters, lora_state_dict
from biosam.models.sam import Sam

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_FORMAT", "SHIPPED_ADAPTERS", "adapter_model", "adapter_state", "propagation_decoder",
           "shipped_adapter_path"]

ADAPTER_FORMAT = "biosam-propagation-adapter"
#: Modules of the copy trained in full besides the decoder's LoRA adapters.
TRAINED = ("prompt_encoder.mask_downscaling", "mask_decoder.iou_prediction_head")
#: Adapters shipped in the package: ``{model name: file in weights/}``.
SHIPPED_ADAPTERS = {"lite_medsam": "lite_medsam_propagation.pt"}


def _decoder_copy(model: Sam) -> Sam:
    """A model sharing ``model``'s image encoder, with its own copies of the prompt encoder and mask decoder."""
    if not isinstance(model, Sam):
        raise InputError(f"propagation adapters are for SAM v1 models; {type(model).__name__} propagates with its "
                         "own memory.")
    out = Sam(model.image_encoder, copy.deepcopy(model.prompt_encoder), copy.deepcopy(model.mask_decoder),
              model.config)
    out.precision, out.info = model.precision, model.info
    return out.eval()


def adapter_model(model: Sam, rank: int = 8) -> Sam:
    """A trainable adapter for ``model``: its decoder copy with rank-``rank`` LoRA layers on the decoder's
    attention; only the adapters and :data:`TRAINED` require gradients."""
    out = _decoder_copy(model)
    for p in (*out.prompt_encoder.parameters(), *out.mask_decoder.parameters()):
        p.requires_grad_(False)
    add_lora(out, rank, targets=DECODER_TARGETS, part="mask_decoder")
    for name in TRAINED:
        out.get_submodule(name).requires_grad_(True)
    return out


def adapter_state(adapter: Sam) -> dict[str, Tensor]:
    """The tensors an adapter file holds: the LoRA matrices and the :data:`TRAINED` modules' tensors."""
    state = lora_state_dict(adapter)
    for name in TRAINED:
        state |= {f"{name}.{k}": v.detach().cpu().clone() for k, v in adapter.get_submodule(name).state_dict().items()}
    return state


def shipped_adapter_path(model_name: str) -> Path | None:
    """The adapter shipped for a zoo model, or None."""
    if model_name not in SHIPPED_ADAPTERS:
        return None
    return Path(str(files("biosam.volume") / "weights" / SHIPPED_ADAPTERS[model_name]))


def propagation_decoder(model, path: str | os.PathLike | None = None) -> Sam | None:
    """The propagation adapter for ``model`` (from ``path``, or the one shipped for it), or None if none ships.

    A file trained on another model's weights is refused with :class:`InputError`;
    the shipped adapter is simply not used then (e.g. fine-tuned weights under the
    same name), with a log message.
    """
    info = getattr(model, "info", None)
    shipped = path is None
    if shipped:
        name = None if info is None or info.spec is None else info.spec.base_name
        path = shipped_adapter_path(name) if isinstance(model, Sam) and name else None
        if path is None:
            return None
    payload = read_plain_checkpoint(path, "propagation adapter")
    meta = payload.get("biosam", {}) if isinstance(payload, dict) else {}
    if meta.get("format") != ADAPTER_FORMAT:
        raise InputError(f"{path}: not a biosam propagation adapter (no '{ADAPTER_FORMAT}' record).")
    mine = None if info is None else info.checkpoint_hash
    if meta.get("base_checkpoint_hash") != mine:
        message = (f"{path}: this propagation adapter was trained on {meta.get('base_model')} with other weights "
                   f"than the model given ({None if info is None else info.name}).")
        if shipped:
            logger.info("%s Propagating with boxes instead.", message)
            return None
        raise InputError(message + " Train one for this model (biosam.train.propagation).")
    out = _decoder_copy(model)
    try:
        apply_adapters(out, payload["adapters"], meta["rank"], meta["alpha"], DECODER_TARGETS, part="mask_decoder")
    except (KeyError, ValueError) as exc:
        raise InputError(f"{path}: the propagation adapter does not fit this model ({exc}).") from exc
    return out.eval()
