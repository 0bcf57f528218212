"""The model side of SAM fine-tuning: what trains, the trained tensors, and the checkpoint that is written."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor, nn

from biosam.errors import InputError
from biosam.models.config import config_dict, config_name
from biosam.models.lora import add_lora, lora_state_dict, merged_state_dict
from biosam.models.sam import Sam
from biosam.train.finetune_settings import MODULES, FinetuneSettings
from biosam.train.harness import save_atomic

CHECKPOINT_FORMAT = 1
Pair = tuple[Path, Path]


def prepare_for_training(model: Sam, settings: FinetuneSettings) -> list[nn.Parameter]:
    """Add LoRA adapters if asked, choose what trains, and return the trainable parameters.

    With LoRA the image encoder's own weights stay fixed and only its adapters
    train; modules in ``settings.frozen_modules`` stay fixed entirely.
    """
    frozen = settings.frozen_modules
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.lora_rank:
        add_lora(model, settings.lora_rank, settings.lora_alpha, settings.lora_targets)
    for name in MODULES:
        if name in frozen or (name == "image_encoder" and settings.lora_rank):
            continue
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    if settings.lora_rank:
        for key, p in model.image_encoder.named_parameters():
            p.requires_grad_(key.endswith((".lora_a", ".lora_b")))
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def full_precision(model: Sam) -> Iterator[Sam]:
    """Train in fp32 whatever the model runs inference in; the model gets its own precision back however
    training ends (an error or an interruption included)."""
    precision = model.precision
    model.precision = "fp32"
    try:
        yield model
    finally:
        model.precision = precision


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of the parameters that train."""
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Load saved trainable tensors, refused when they are not exactly this run's trainable parameters."""
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    if set(state) != names:
        raise InputError(f"--resume: {source} holds other trainable tensors than this run has; "
                         "use the same --model, --lora and --freeze, or start anew.")
    model.load_state_dict(state, strict=False)


def base_identity(model: Sam) -> dict:
    """The base model a fine-tuned checkpoint (and a resumed run) names: name, weights, architecture, preprocessing."""
    info = model.info
    # a file is named by its absolute path, so an adapter file finds its base from anywhere
    name = info.spec.name if info.spec is not None else str(Path(info.checkpoint).resolve())
    return {"name": name, "checkpoint_hash": info.checkpoint_hash,
            "architecture": config_name(model.config), "preprocessing": info.preprocessing}


def check_same_base(saved: dict, base: dict, path: Path) -> None:
    """Refuse to resume state saved while fine-tuning another model than ``base``."""
    if saved["architecture"] != base["architecture"] or saved["checkpoint_hash"] != base["checkpoint_hash"]:
        raise InputError(
            f"--resume: {path} was saved while fine-tuning {saved['name']} (architecture "
            f"{saved['architecture'] or 'custom'}), but the model given now is {base['name']} (architecture "
            f"{base['architecture'] or 'custom'}{'' if saved['architecture'] != base['architecture'] else ', other weights'}). "
            "Resume with the same --model, or start anew without --resume."
        )


def checkpoint_metadata(base: dict, model: Sam, settings: FinetuneSettings, train_pairs: list[Pair],
                        val_pairs: list[Pair]) -> dict:
    """What a fine-tuned checkpoint records besides its metrics (plain types only: it is read with weights_only)."""
    lora = None
    if settings.lora_rank:
        lora = {"rank": settings.lora_rank, "alpha": float(settings.lora_alpha or settings.lora_rank),
                "targets": list(settings.lora_targets), "merged": not settings.lora_separate}
    return {
        "format": CHECKPOINT_FORMAT, "base_model": base["name"], "base_checkpoint_hash": base["checkpoint_hash"],
        "architecture": base["architecture"], "config": config_dict(model.config), "preprocessing": base["preprocessing"],
        "intensity": settings.intensity, "lora": lora,
        "trained": [m for m in MODULES if m not in settings.frozen_modules],
        "settings": settings.to_dict(),
        "train_images": [str(p[0]) for p in train_pairs], "val_images": [str(p[0]) for p in val_pairs],
    }


def checkpoint_metrics(history: list[dict], best: dict, baseline: dict | None) -> dict:
    """The metrics a checkpoint records: the kept epoch's row, every epoch's, and the scores before training."""
    kept = next(r for r in history if r["epoch"] == best["epoch"])
    return {"best_epoch": best["epoch"], "kept": copy.deepcopy(kept), "history": copy.deepcopy(history),
            "baseline": None if baseline is None else {k: baseline[k] for k in ("box_iou", "point_iou", "objects")}}


def save_finetuned(path: str | os.PathLike, model: Sam, metadata: dict, separate: bool = False) -> Path:
    """Write a fine-tuned model readable by :func:`biosam.load_model`.

    Merged (default): ``{"model": state dict with the base model's key names,
    adapters folded in, "biosam": metadata}``. ``separate``: ``{"adapters": the
    LoRA tensors plus every tensor of the modules trained in full, "biosam":
    metadata with kind "lora_adapters"}``; loading it loads the base model named
    in the metadata and applies them.
    """
    path = Path(path)
    if separate:
        trained = {name for name in MODULES[1:]
                   if any(p.requires_grad for p in getattr(model, name).parameters())}
        tensors = lora_state_dict(model)
        tensors |= {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    if k.split(".", 1)[0] in trained}
        payload = {"adapters": tensors, "biosam": {**metadata, "kind": "lora_adapters"}}
    else:
        payload = {"model": merged_state_dict(model), "biosam": {**metadata, "kind": "model"}}
    return save_atomic(path, payload)
