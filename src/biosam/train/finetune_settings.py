"""How SAM is fine-tuned: :class:`FinetuneSettings` and the names it chooses from."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from biosam.models.lora import DEFAULT_TARGETS
from biosam.prompting.intensity import resolve_preset
from biosam.settings import check, choice, positive, rule, whole, within
from biosam.train.harness import optional

#: The parts of a SAM v1 model that can be trained or frozen.
MODULES = ("image_encoder", "prompt_encoder", "mask_decoder")
#: ``sam``: boxes or points, then corrective rounds (focal + Dice); ``medsam``: jittered boxes only (BCE + Dice).
RECIPES = ("sam", "medsam")
MASK_LOSSES = ("focal", "bce")


@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune.

    ``recipe``: ``"sam"`` (boxes or points first, then ``prompt_iterations`` - 1
    corrective rounds; focal + Dice) or ``"medsam"`` (jittered boxes only, one
    round, BCE + Dice, prompt encoder frozen). ``lora_rank`` 0 trains the image
    encoder in full; above 0 its attention projections (``lora_targets``) get
    adapters of that rank (scale ``lora_alpha / lora_rank``) and only those train
    there. ``freeze`` names modules kept fixed (default: none for ``sam``, the
    prompt encoder for ``medsam``). ``minutes``: time budget; training stops
    after the epoch that reaches it. ``steps_per_epoch`` defaults to one view of
    every training image. ``batch_size``: objects decoded per step (one image).
    ``max_zoom`` above 1 also trains on random parts of the images enlarged up to
    that factor (for objects that ``zoom="auto"`` segments in crops).
    ``lora_separate`` writes only the adapters (and fully trained modules) with
    the base model's name instead of the merged model.
    """

    recipe: str = "sam"
    epochs: int = 10
    minutes: float | None = None
    steps_per_epoch: int | None = None
    batch_size: int = 8
    prompt_iterations: int = 3
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    clip_grad: float = 1.0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_separate: bool = False
    freeze: tuple[str, ...] | None = None
    mask_loss: str | None = None
    focal_weight: float = 1.0
    box_probability: float = 0.5
    box_jitter: float = 0.1
    max_zoom: float = 1.0
    flips: bool = True
    min_area: int = 16
    intensity: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        freeze = self.freeze
        if isinstance(freeze, str):
            freeze = tuple(f.strip() for f in freeze.split(",") if f.strip())
        if freeze is not None:
            object.__setattr__(self, "freeze", tuple(dict.fromkeys(freeze)))  # in order, without repeats
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        frozen = self.frozen_modules
        check("fine-tuning settings", [
            choice("recipe", self.recipe, RECIPES),
            whole("epochs", self.epochs, 1),
            optional(self.minutes, positive("minutes", self.minutes)),
            optional(self.steps_per_epoch, whole("steps_per_epoch", self.steps_per_epoch, 1)),
            whole("batch_size", self.batch_size, 1),
            rule(whole("prompt_iterations", self.prompt_iterations, 1)[0] and self.prompt_iterations <= 32,
                 f"prompt_iterations must be a whole number from 1 to 32, got {self.prompt_iterations!r}"),
            positive("lr", self.lr),
            within("weight_decay", self.weight_decay, 0.0, float("inf")),
            whole("warmup_steps", self.warmup_steps, 0),
            within("clip_grad", self.clip_grad, 0.0, float("inf")),  # 0 turns clipping off
            whole("lora_rank", self.lora_rank, 0),  # 0: full fine-tuning
            optional(self.lora_alpha, positive("lora_alpha", self.lora_alpha)),
            rule(len(self.lora_targets) > 0, "lora_targets needs at least one layer name (e.g. qkv)"),
            rule(not self.lora_separate or self.lora_rank > 0, "lora_separate needs LoRA: give a lora_rank above 0"),
            rule(set(frozen) <= set(MODULES), f"freeze takes {', '.join(MODULES)}; got {', '.join(frozen)}"),
            rule(len(set(frozen)) < len(MODULES), "every module is frozen: nothing would be trained"),
            rule(not (self.lora_rank and "image_encoder" in frozen),
                 "LoRA adapts the image encoder: do not freeze image_encoder together with lora_rank > 0"),
            optional(self.mask_loss, choice("mask_loss", self.mask_loss, MASK_LOSSES)),
            within("focal_weight", self.focal_weight, 0.0, float("inf")),
            within("box_probability", self.box_probability, 0.0, 1.0),
            rule(within("box_jitter", self.box_jitter, 0.0, 1.0)[0] and self.box_jitter < 1,
                 f"box_jitter must lie in [0, 1) (a fraction of the box side), got {self.box_jitter!r}"),
            within("max_zoom", self.max_zoom, 1.0, float("inf")),
            whole("min_area", self.min_area, 1),
        ])
        resolve_preset(self.intensity, np.dtype(np.uint16))  # validates the preset name

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        """Modules kept fixed: ``freeze``, or the recipe's default."""
        if self.freeze is not None:
            return self.freeze
        return ("prompt_encoder",) if self.recipe == "medsam" else ()

    @property
    def loss_kind(self) -> str:
        """The mask loss besides Dice: ``focal`` (SAM) or ``bce`` (MedSAM), unless ``mask_loss`` says."""
        return self.mask_loss or ("bce" if self.recipe == "medsam" else "focal")

    @property
    def rounds(self) -> int:
        """Decoder rounds per step (MedSAM: one box prompt)."""
        return 1 if self.recipe == "medsam" else self.prompt_iterations

    @property
    def box_share(self) -> float:
        """The chance that a step's first prompt is a box (MedSAM: always)."""
        return 1.0 if self.recipe == "medsam" else self.box_probability

    def to_dict(self) -> dict:
        """The settings as plain types (tuples as lists), as checkpoints record them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
