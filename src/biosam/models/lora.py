"""Low-rank adapters (LoRA) on attention projections: the image encoder's (fine-tuning) or the mask decoder's
(the propagation adapter).

A wrapped projection computes ``W x + b + (alpha / rank) * B (A x)`` with ``W`` and
``b`` frozen and only the small matrices ``A`` (rank x in) and ``B`` (out x rank)
trained. ``B`` starts at zero, so a freshly wrapped model computes exactly what the
base model does. Merging adds ``(alpha / rank) * B A`` into ``W`` and gives back
plain :class:`torch.nn.Linear` layers, so a merged model has the base model's
parameter names and loads like any SAM checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DECODER_TARGETS",
    "DEFAULT_TARGETS",
    "LoRALinear",
    "add_lora",
    "apply_adapters",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
]

#: The linear layers of ViT (``attn.qkv``, ``attn.proj``) and TinyViT attention blocks that get adapters.
DEFAULT_TARGETS = ("qkv", "proj")
#: The linear layers of the mask decoder's two-way transformer attention blocks.
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a frozen weight and bias plus a trainable low-rank update.

    Subclassing ``nn.Linear`` keeps the ``weight`` / ``bias`` names and attributes that
    the attention code reads (ViT pads windows with ``qkv.bias``).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, **factory)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        # A as nn.Linear initialises its weight; with B = 0 the update starts at exactly zero
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """The weight update ``(alpha / rank) * B A`` (out x in)."""
        return (self.lora_b @ self.lora_a) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        # two thin products instead of forming B A: cheaper and exact at initialisation
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.delta())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: Iterable[str] = DEFAULT_TARGETS, part: str = "image_encoder") -> list[str]:
    """Wrap the attention projections named in ``targets`` of ``model.<part>`` with :class:`LoRALinear`.

    Works on SAM's ViT (``blocks.N.attn.qkv`` / ``.proj``) and TinyViT
    (``layers.N.blocks.M.attn.qkv`` / ``.proj``) encoders, and on the mask
    decoder (``part="mask_decoder"``, :data:`DECODER_TARGETS`); only linear
    layers inside a module whose name contains ``attn`` are touched, never the
    MLPs. ``alpha`` defaults to ``rank`` (scale 1). Returns the wrapped layers'
    names (model-level, e.g. ``image_encoder.blocks.0.attn.qkv``); raises
    ``ValueError`` when nothing matched.
    """
    targets = tuple(targets)
    alpha = float(rank if alpha is None else alpha)
    adapted = getattr(model, part, None)
    if adapted is None:
        raise TypeError(f"{type(model).__name__} has no {part} to adapt")
    wrapped = []
    for name, module in list(adapted.named_modules()):
        if "attn" not in name.split(".")[-1]:
            continue
        for target in targets:
            child = getattr(module, target, None)
            if isinstance(child, LoRALinear):
                raise ValueError(f"{part}.{name}.{target} already has LoRA adapters")
            if isinstance(child, nn.Linear):
                setattr(module, target, LoRALinear(child, rank, alpha))
                wrapped.append(f"{part}.{name}.{target}")
    if not wrapped:
        raise ValueError(f"no attention projections named {targets} found in the {part}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The wrapped layers of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (``*.lora_a``, ``*.lora_b``), detached CPU copies."""
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()
            if key.endswith(_ADAPTER_SUFFIXES)}


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the merged model without changing ``model``: base key names, adapters folded in."""
    layers = lora_modules(model)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(_ADAPTER_SUFFIXES):
            continue
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in layers:
            with torch.no_grad():
                value = value + layers[owner].delta()
        state[key] = value.detach().cpu().clone()
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` in ``model`` by its merged ``nn.Linear`` (in place); returns ``model``."""
    for name, layer in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged())
    return model


def apply_adapters(model: nn.Module, tensors: Mapping[str, Tensor], rank: int, alpha: float,
                   targets: Iterable[str] = DEFAULT_TARGETS, merge: bool = True, part: str = "image_encoder") -> nn.Module:
    """Load an adapter file's tensors into a base model: add LoRA layers, load, and (by default) merge.

    ``tensors`` holds the ``*.lora_a`` / ``*.lora_b`` adapters and any base tensors
    that were trained in full (e.g. the mask decoder). Missing adapters, unknown
    names or wrong shapes raise ``ValueError`` naming them; nothing is loaded partially.
    """
    add_lora(model, rank, alpha, targets, part)
    expected = model.state_dict()
    adapters = {k for k in expected if k.endswith(_ADAPTER_SUFFIXES)}
    missing = sorted(adapters - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k, v in tensors.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} adapter tensor(s) missing (first: {missing[0]})")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) the model does not have (first: {unknown[0]})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensor(s) of another shape (first: {k}: {tuple(tensors[k].shape)} "
                        f"instead of {tuple(expected[k].shape)})")
    if problems:
        raise ValueError("; ".join(problems))
    model.load_state_dict({**expected, **tensors}, strict=True)
    return merge_lora(model) if merge else model
