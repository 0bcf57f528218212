"""Construct an (untrained) SAM v1 model from a :class:`SamConfig`."""

from __future__ import annotations

from torch import nn

from .config import SamConfig
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer
from .vit import ImageEncoderViT

__all__ = ["build_sam"]


def build_sam(config: SamConfig) -> Sam:
    """Randomly initialised model with the architecture ``config`` describes (train mode).

    Prompt encoder and mask decoder are the same for every SAM v1 variant; only the
    image encoder and the input size differ.
    """
    encoder: nn.Module
    if config.encoder == "vit":
        encoder = ImageEncoderViT(
            img_size=config.image_size,
            patch_size=16,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            out_chans=config.prompt_embed_dim,
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=tuple(config.global_attn_indexes),
        )
    else:
        encoder = TinyViT(
            img_size=config.image_size,
            embed_dims=config.embed_dims,
            depths=config.depths,
            num_heads=config.tiny_num_heads,
            window_sizes=config.window_sizes,
            patch_stride=config.patch_stride,
            out_chans=config.prompt_embed_dim,
        )
    grid = config.image_embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=config.prompt_embed_dim, num_heads=8, mlp_dim=2048),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(encoder, prompt_encoder, mask_decoder, config)
