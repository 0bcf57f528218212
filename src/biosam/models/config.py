"""Architecture descriptions of the SAM v1 family (ViT-B/L/H, MobileSAM, LiteMedSAM)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["CONFIGS", "SamConfig", "config_name"]


@dataclass(frozen=True)
class SamConfig:
    """Shape-level description of one SAM v1 model.

    Only the fields of the chosen ``encoder`` are used; the others stay ``None``.
    ViT encoders always use 16 px patches and 14 x 14 attention windows (as every released
    SAM v1 checkpoint does), so those are not fields.

    For TinyViT the first stage is convolutional: ``tiny_num_heads[0]`` and ``window_sizes[0]``
    are never used by the network and only kept so the tuples line up with ``embed_dims``.
    """

    encoder: Literal["vit", "tiny_vit"]
    image_size: int
    # ViT (SAM ViT-B / ViT-L / ViT-H)
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    global_attn_indexes: tuple[int, ...] | None = None
    # TinyViT (MobileSAM, LiteMedSAM)
    embed_dims: tuple[int, ...] | None = None
    depths: tuple[int, ...] | None = None
    tiny_num_heads: tuple[int, ...] | None = None
    window_sizes: tuple[int, ...] | None = None
    patch_stride: int | None = None
    # prompt encoder / mask decoder width
    prompt_embed_dim: int = 256

    def __post_init__(self) -> None:
        if self.encoder == "vit":
            required = ("embed_dim", "depth", "num_heads", "global_attn_indexes")
        elif self.encoder == "tiny_vit":
            required = ("embed_dims", "depths", "tiny_num_heads", "window_sizes", "patch_stride")
        else:
            raise ValueError(f"encoder must be 'vit' or 'tiny_vit', got {self.encoder!r}")
        unset = [name for name in required if getattr(self, name) is None]
        if unset:
            raise ValueError(f"SamConfig(encoder={self.encoder!r}) needs {', '.join(unset)}")
        if self.encoder == "tiny_vit":
            lengths = {len(self.embed_dims), len(self.depths), len(self.tiny_num_heads), len(self.window_sizes)}
            if len(lengths) != 1:
                raise ValueError("embed_dims, depths, tiny_num_heads and window_sizes need equal lengths")

    @property
    def image_embedding_size(self) -> int:
        """Side length of the (square) image embedding grid the encoder produces."""
        if self.encoder == "vit":
            return self.image_size // 16
        # patch embed reduces by patch_stride, then two stride-2 merges (the last one is stride 1)
        return self.image_size // (self.patch_stride * 4)


CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(
        encoder="vit", image_size=1024, embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)
    ),
    "vit_l": SamConfig(
        encoder="vit", image_size=1024, embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": SamConfig(
        encoder="vit", image_size=1024, embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)
    ),
    # MobileSAM: TinyViT-5M at 1024 px with a stride-4 convolutional patch embed
    "vit_t": SamConfig(
        encoder="tiny_vit",
        image_size=1024,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        tiny_num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        patch_stride=4,
    ),
    # LiteMedSAM: the same TinyViT-5M at 256 px with a 1x1 stride-1 patch embed
    "lite_medsam": SamConfig(
        encoder="tiny_vit",
        image_size=256,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        tiny_num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        patch_stride=1,
    ),
}


def config_name(config: SamConfig) -> str | None:
    """Name of the entry in CONFIGS equal to ``config``, or None for a custom architecture."""
    for name, candidate in CONFIGS.items():
        if candidate == config:
            return name
    return None


def config_dict(config: SamConfig) -> dict:
    """``config`` as plain JSON-like values (tuples as lists), as checkpoints' metadata record it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
