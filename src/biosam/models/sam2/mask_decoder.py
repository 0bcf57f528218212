"""SAM 2 mask decoder: SAM's two-way decoder plus object-score token and high-res skip features.

The prompt encoder of SAM 2 is SAM v1's (same keys, same label handling, point labels 2 / 3
for box corners), so :func:`build_sam2_heads` reuses :class:`biosam.models.prompt_encoder.PromptEncoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common import MLP, LayerNorm2d, gelu
from ..mask_decoder import _raster, _transposed_conv_2x2
from ..prompt_encoder import PromptEncoder
from ..transformer import TwoWayTransformer

__all__ = ["Sam2MaskDecoder", "build_sam2_heads", "sam2_two_way_transformer"]


def sam2_two_way_transformer(
    depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048
) -> TwoWayTransformer:
    """SAM v1's two-way transformer with the token MLP stored under SAM 2's key names.

    The math is identical (Linear -> ReLU -> Linear); SAM 2 checkpoints name the two layers
    ``mlp.layers.0`` / ``mlp.layers.1`` instead of v1's ``mlp.lin1`` / ``mlp.lin2``.
    """
    transformer = TwoWayTransformer(depth=depth, embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim)
    for block in transformer.layers:
        block.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, 2)
    return transformer


class Sam2MaskDecoder(nn.Module):
    """Predicts mask logits, IoU scores, output tokens and an object score from prompt embeddings.

    Token layout (SAM 2 order): [object score (if ``pred_obj_scores``), IoU, 4 mask tokens,
    sparse prompts]. Mask token 0 gives the single-mask output, tokens 1-3 the multimask outputs.
    Many prompts may share one image: pass the image with batch 1 and ``repeat_image=True``;
    it is then broadcast rather than copied per prompt.
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer if transformer is not None else sam2_two_way_transformer(
            embedding_dim=transformer_dim
        )
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            # Applied by the model to the stride-4 / stride-8 backbone levels (see
            # :meth:`project_high_res_features`); they live here in the checkpoint.
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        self.iou_prediction_use_sigmoid = iou_prediction_use_sigmoid
        if pred_obj_scores:
            self.pred_obj_score_head: nn.Module = (
                MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(transformer_dim, 1)
            )
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def project_high_res_features(
        self, feat_s0: torch.Tensor, feat_s1: torch.Tensor
    ) -> list[torch.Tensor]:
        """Backbone levels at 4x / 2x the embedding grid (C channels) -> the decoder's skip inputs."""
        if not self.use_high_res_features:
            raise RuntimeError("this decoder was built without high-resolution features")
        return [self.conv_s0(feat_s0), self.conv_s1(feat_s1)]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return masks (N, M, 4h, 4w) logits, IoU (N, M), tokens (N, T, C), object logits (N, 1).

        M is 3 with ``multimask_output`` else 1. For a single mask at eval time with dynamic
        selection on, an unstable single-mask output is replaced by the multimask output of
        highest predicted IoU. T is 3 (the multimask tokens) when ``multimask_output`` and
        ``use_multimask_token_for_obj_ptr``, else 1 (the single-mask token, also when the
        dynamic selection picked another mask).

        ``image_embeddings`` has batch 1 with ``repeat_image`` (shared by all N prompts), else
        N; ``dense_prompt_embeddings`` and the high-res features may have batch 1 or N.
        """
        n = sparse_prompt_embeddings.shape[0]
        expected = 1 if repeat_image else n
        if image_embeddings.shape[0] != expected:
            raise ValueError(
                f"image_embeddings batch {image_embeddings.shape[0]} should be {expected} "
                f"(repeat_image={repeat_image}, {n} prompts)"
            )
        if image_pe.shape[0] != 1:
            raise ValueError("image_pe must have batch 1 (the prompt encoder's get_dense_pe())")
        dense = dense_prompt_embeddings
        if dense.shape[0] not in (1, n):
            raise ValueError(f"dense prompt batch {dense.shape[0]} does not match {n} prompts")
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            # The expanded no-mask embedding: keep the image side at batch 1 so the first
            # attention layer projects the image tokens once rather than once per prompt.
            dense = dense[:1]
        src = image_embeddings + dense

        hs, keys = self.transformer(src, image_pe, self._tokens(sparse_prompt_embeddings))
        first = 1 if self.pred_obj_scores else 0
        iou_pred = self.iou_prediction_head(hs[:, first])
        if self.iou_prediction_use_sigmoid:
            iou_pred = iou_pred.sigmoid()
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens]
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0])
        else:
            # No score head: the object is taken as present (sigmoid(10) ~ 1).
            object_score_logits = iou_pred.new_full((n, 1), 10.0)

        c, h, w = src.shape[1:]
        upscaled = self._upscale(keys.reshape(n, h * w, c), high_res_features, h, w)
        dynamic = not multimask_output and self.dynamic_multimask_via_stability and not self.training
        if multimask_output:
            masks = self._masks(mask_tokens_out, range(1, self.num_mask_tokens), upscaled)
            iou_pred = iou_pred[:, 1:]
        elif dynamic:
            masks, iou_pred = self._dynamic_single_mask(mask_tokens_out, iou_pred, upscaled)
        else:
            masks = self._masks(mask_tokens_out, range(1), upscaled)
            iou_pred = iou_pred[:, :1]

        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            # SAM 2 was trained to track from the single-mask token, so it is the object
            # pointer token even when the returned mask came from a multimask token.
            sam_tokens_out = mask_tokens_out[:, :1]
        return _raster(masks, h, w), iou_pred, sam_tokens_out, object_score_logits

    def _tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """Output tokens followed by the prompt tokens, (N, T + k, C)."""
        weights = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            weights.insert(0, self.obj_score_token.weight)
        output_tokens = torch.cat(weights, dim=0).unsqueeze(0).expand(sparse.shape[0], -1, -1)
        return torch.cat([output_tokens, sparse], dim=1)

    def _upscale(
        self, tokens: torch.Tensor, high_res: list[torch.Tensor] | None, h: int, w: int
    ) -> torch.Tensor:
        """(N, h*w, C) image tokens -> (N, h*w*16, C/8) features in block order (see ``_transposed_conv_2x2``).

        The skip features are put into the same block order instead (one copy of maps that are
        usually batch 1, shared by all prompts), so the per-prompt feature maps are never shuffled.
        """
        up1, norm, _, up2, _ = self.output_upscaling
        n = tokens.shape[0]
        skip_s0 = skip_s1 = None
        if self.use_high_res_features:
            if high_res is None or len(high_res) != 2:
                raise ValueError("this decoder needs high_res_features [stride-4 map, stride-8 map]")
            skip_s0, skip_s1 = (_to_blocks(f, h, w, levels) for f, levels in zip(high_res, (2, 1)))
        x = _transposed_conv_2x2(tokens, up1).view(n, -1, up1.out_channels)
        # In place: the per-prompt maps are the largest tensors here (autograd allows it, as
        # the transposed convolution does not keep its output for backward).
        if skip_s1 is not None:
            x.add_(skip_s1)
        x = gelu(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        x = _transposed_conv_2x2(x, up2).view(n, -1, up2.out_channels)
        if skip_s0 is not None:
            x.add_(skip_s0)
        return gelu(x)

    def _hyper(self, mask_tokens: torch.Tensor, index: int) -> torch.Tensor:
        return self.output_hypernetworks_mlps[index](mask_tokens[:, index])

    def _masks(self, mask_tokens: torch.Tensor, indices: range, upscaled: torch.Tensor) -> torch.Tensor:
        """Block-order mask logits (N, K, h*w*16) of the mask tokens ``indices`` only."""
        hyper_in = torch.stack([self._hyper(mask_tokens, i) for i in indices], dim=1)
        return hyper_in @ upscaled.transpose(1, 2)

    def _dynamic_single_mask(
        self, mask_tokens: torch.Tensor, iou_pred: torch.Tensor, upscaled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The single-mask output where stable, else the multimask output with the best IoU.

        Only two masks per prompt are computed: token 0's and the best multimask token's
        (chosen from the IoU predictions, which do not depend on the masks).
        """
        n = mask_tokens.shape[0]
        rows = torch.arange(n, device=iou_pred.device)
        best = iou_pred[:, 1:].argmax(dim=-1)
        multi_hyper = torch.stack([self._hyper(mask_tokens, i) for i in range(1, self.num_mask_tokens)], dim=1)
        hyper_in = torch.stack([self._hyper(mask_tokens, 0), multi_hyper[rows, best]], dim=1)
        pair = hyper_in @ upscaled.transpose(1, 2)  # (N, 2, P): single, best multimask
        single = pair[:, 0]
        delta = self.dynamic_multimask_stability_delta
        area_i = (single > delta).sum(dim=-1).float()
        area_u = (single > -delta).sum(dim=-1).float()
        stability = torch.where(area_u > 0, area_i / area_u, 1.0)
        stable = stability >= self.dynamic_multimask_stability_thresh
        masks = torch.where(stable[:, None], single, pair[:, 1]).unsqueeze(1)
        ious = torch.where(stable, iou_pred[:, 0], iou_pred[rows, best + 1]).unsqueeze(1)
        return masks, ious


def _to_blocks(feature: torch.Tensor, h: int, w: int, levels: int) -> torch.Tensor:
    """(B, C, h*2^L, w*2^L) map -> (B, h*w*4^L, C) pixels in the upscaler's block order."""
    b, c = feature.shape[:2]
    if tuple(feature.shape[2:]) != (h << levels, w << levels):
        raise ValueError(
            f"high-res feature of shape {tuple(feature.shape)} does not match a "
            f"{h}x{w} embedding upscaled {1 << levels}x"
        )
    if levels == 1:
        blocks = feature.view(b, c, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1)  # (i, j, dy, dx, c)
    else:  # levels == 2: rows are (i, dy1, dy2), columns (j, dx1, dx2)
        blocks = feature.view(b, c, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1)
    return blocks.reshape(b, -1, c)


def build_sam2_heads(
    image_size: int = 1024,
    sam2_1: bool = True,
    *,
    dynamic_multimask: bool = True,
    embed_dim: int = 256,
    backbone_stride: int = 16,
) -> tuple[PromptEncoder, Sam2MaskDecoder]:
    """Prompt encoder and mask decoder as SAM 2 / 2.1 builds them (random weights, train mode).

    Every released SAM 2.0 and 2.1 config uses the same head flags (high-res features, sigmoid
    IoU, MLP object-score head, multimask tokens for the object pointer), so ``sam2_1`` does
    not change the heads. ``dynamic_multimask`` matches sam2's ``apply_postprocessing=True``
    (the default of its builders): fall back to a multimask output when the single mask is
    unstable (delta 0.05, threshold 0.98).
    """
    del sam2_1  # same heads for both releases; kept so callers can pass their config uniformly
    grid = image_size // backbone_stride
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    decoder = Sam2MaskDecoder(
        transformer_dim=embed_dim,
        transformer=sam2_two_way_transformer(depth=2, embedding_dim=embed_dim, num_heads=8, mlp_dim=2048),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        dynamic_multimask_via_stability=dynamic_multimask,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
    )
    return prompt_encoder, decoder
