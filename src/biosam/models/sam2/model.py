"""The SAM 2 / 2.1 model: image encoder, prompt heads and memory modules under the checkpoint's names.

Single images go through :meth:`Sam2.embed` / :meth:`Sam2.decode`, the interface of
:class:`biosam.models.Sam` that :class:`biosam.Predictor` uses. The remaining public methods
are the steps a video / volume tracker chains per frame (features, prompt heads, memory).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..common import MLP
from ..info import ModelInfo
from ..sam import decode_in_chunks
from .config import Sam2Config
from .hiera import build_hiera
from .image_encoder import FpnNeck, Sam2ImageEncoder
from .mask_decoder import build_sam2_heads
from .memory_attention import MemoryAttention
from .memory_encoder import MemoryEncoder

__all__ = ["DECODE_SIZE", "NO_OBJECT_SCORE", "Sam2", "Sam2HeadOutputs", "Sam2ImageFeatures", "build_sam2"]

#: Side of the logits :meth:`Sam2.decode` exchanges (biosam.prompting's LOW_RES frame).
DECODE_SIZE = 256
#: Mask logit SAM 2 writes where the object-score head says the object is absent.
NO_OBJECT_SCORE = -1024.0
# SAM 2 clamps the low-res logits it hands out to this range; mask prompts are clamped alike.
_MASK_PROMPT_LIMIT = 32.0


class Sam2ImageFeatures(NamedTuple):
    """Image features of one or more frames, for a square grid of side g = image_size / 16.

    ``embedding``: (B, C, g, g) top-level features, without the no-memory embedding.
    ``high_res``: the decoder's skip inputs, (B, C/8, 4g, 4g) after ``conv_s0`` and
    (B, C/4, 2g, 2g) after ``conv_s1``. ``position``: (B, C, g, g) sine position encoding
    of the top level (a shared expanded view: read-only).
    """

    embedding: torch.Tensor
    high_res: tuple[torch.Tensor, torch.Tensor]
    position: torch.Tensor


class Sam2HeadOutputs(NamedTuple):
    """Outputs of the prompt heads for B objects (SAM 2's ``_forward_sam_heads`` order).

    ``low_res_multimasks`` (B, M, 4g, 4g) and ``high_res_multimasks`` (B, M, S, S) logits,
    M = 3 with multimask output else 1, set to :data:`NO_OBJECT_SCORE` where the object
    score is <= 0; ``ious`` (B, M); ``low_res_masks`` / ``high_res_masks`` (B, 1, ...) the
    mask of highest predicted IoU; ``obj_ptr`` (B, C) the object pointer;
    ``object_score_logits`` (B, 1).
    """

    low_res_multimasks: torch.Tensor
    high_res_multimasks: torch.Tensor
    ious: torch.Tensor
    low_res_masks: torch.Tensor
    high_res_masks: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor


def _sine_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(n,) positions -> (n, dim): dim/2 sines then dim/2 cosines of geometric frequencies."""
    half = dim // 2
    freq = torch.arange(half, dtype=torch.float32, device=positions.device)
    freq = temperature ** (2 * torch.div(freq, 2, rounding_mode="floor") / half)
    angles = positions.unsqueeze(-1) / freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Sam2(nn.Module):
    """A SAM 2 / 2.1 model working on preprocessed model-input tensors.

    Attribute names (and so the state dict) are those of sam2's ``SAM2Base``: the original
    checkpoints' ``model`` entry loads with ``strict=True``. Pixel normalisation and resizing
    live in :mod:`biosam.prompting` (preprocessing ``"sam2"``); coordinates given to
    :meth:`decode` are pixels of the ``image_size`` x ``image_size`` model input.
    """

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        self.config = config
        c, m = config.hidden_dim, config.mem_dim
        trunk = build_hiera(config.trunk)
        self.image_encoder = Sam2ImageEncoder(trunk, FpnNeck(c, trunk.channel_list), scalp=1)
        # 4x4 stride-4 conv taking a full-size mask prompt to the decoder's mask-input size
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = MemoryAttention(d_model=c, kv_in_dim=m)
        self.memory_encoder = MemoryEncoder(in_dim=c, out_dim=m)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(config.num_maskmem, 1, 1, m))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, c))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c))
        if config.no_obj_embed_spatial:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, m))
        else:
            self.register_parameter("no_obj_embed_spatial", None)
        # SAM 2's initialisation of these learned tokens (the checkpoint replaces them)
        tokens = (self.maskmem_tpos_enc, self.no_mem_embed, self.no_mem_pos_enc, self.no_obj_ptr, self.no_obj_embed_spatial)
        for p in tokens:
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        self.sam_prompt_encoder, self.sam_mask_decoder = build_sam2_heads(
            config.image_size,
            config.sam2_1,
            dynamic_multimask=config.dynamic_multimask,
            embed_dim=c,
            backbone_stride=config.backbone_stride,
        )
        self.obj_ptr_proj: nn.Module = MLP(c, c, c, 3) if config.use_mlp_for_obj_ptr_proj else nn.Linear(c, c)
        # Without the projection SAM 2 uses an identity, which has no tensors.
        self.obj_ptr_tpos_proj = nn.Linear(c, m) if config.proj_tpos_enc_in_obj_ptrs else None
        # "fp32" or "bf16" (see biosam.models.precision): the image encoder's arithmetic only.
        self.precision = "fp32"
        # Set by biosam.load_model: name, preprocessing and checkpoint; None for a model built in code.
        self.info: ModelInfo | None = None

    # ------------------------------------------------------------------ geometry
    @property
    def image_size(self) -> int:
        """Side length of the square model input."""
        return self.config.image_size

    @property
    def low_res_size(self) -> int:
        """Side of the mask decoder's own logits (4x the feature grid)."""
        return self.config.low_res_size

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    # ------------------------------------------------------------ image features
    def image_features(self, images: torch.Tensor) -> Sam2ImageFeatures:
        """Normalised (B, 3, S, S) images -> fp32 :class:`Sam2ImageFeatures` (encoder in ``self.precision``)."""
        if self.precision == "fp32":
            return self._image_features(images)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            feats = self._image_features(images)
        s0, s1 = feats.high_res
        return Sam2ImageFeatures(feats.embedding.float(), (s0.float(), s1.float()), feats.position.float())

    def _image_features(self, images: torch.Tensor) -> Sam2ImageFeatures:
        features, positions = self.image_encoder(images)
        if len(features) != 3:
            raise RuntimeError(f"expected 3 feature levels from the image encoder, got {len(features)}")
        # Projected once per image here, not on every prompt (as SAM 2's forward_image does).
        s0, s1 = self.sam_mask_decoder.project_high_res_features(features[0], features[1])
        return Sam2ImageFeatures(features[2], (s0, s1), positions[2])

    def pack_features(self, features: Sam2ImageFeatures) -> torch.Tensor:
        """Pack the three levels into one (B, 4C, g, g) tensor (see :meth:`embed`)."""
        s0, s1 = features.high_res
        packed = torch.cat([features.embedding, F.pixel_unshuffle(s1, 2), F.pixel_unshuffle(s0, 4)], dim=1)
        # The encoder's maps are channels-last; a plain layout makes a cached or reloaded embedding
        # decode through the same kernels, and so to the same bits, as a fresh one.
        return packed.contiguous()

    def unpack_features(self, embedding: torch.Tensor) -> Sam2ImageFeatures:
        """Inverse of :meth:`pack_features` (exact: a reordering), with the top level's position encoding."""
        c = self.config.hidden_dim
        expected = self.config.embedding_channels
        g = self.config.image_embedding_size
        if embedding.ndim != 4 or embedding.shape[1] != expected or tuple(embedding.shape[2:]) != (g, g):
            raise ValueError(
                f"expected a packed SAM 2 image embedding of shape (B, {expected}, {g}, {g}) "
                f"(from this model's embed()), got {tuple(embedding.shape)}"
            )
        top = embedding[:, :c]
        s1 = F.pixel_shuffle(embedding[:, c : 2 * c], 2)
        s0 = F.pixel_shuffle(embedding[:, 2 * c :], 4)
        return Sam2ImageFeatures(top, (s0, s1), self.image_encoder.neck.position_encoding(top))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, S, S) images -> fp32 packed image embeddings (B, 4C, g, g).

        One tensor holds the three decoder inputs on the g x g grid, so it can be cached and
        stored like a SAM v1 embedding: channels [0, C) the top-level features, [C, 2C) the
        ``conv_s1`` map pixel-unshuffled by 2, [2C, 4C) the ``conv_s0`` map unshuffled by 4.
        The no-memory embedding is not included (it is added in :meth:`decode`), so the same
        embedding also serves tracking (see :meth:`unpack_features`).
        """
        return self.pack_features(self.image_features(images))

    # -------------------------------------------------------- single-image decoding
    def decode(
        self,
        image_embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for N prompts on one (batch-1, shared) or N packed image embeddings.

        As sam2's ``SAM2ImagePredictor``: point_coords (N, K, 2) (x, y) with point_labels
        (N, K); boxes (N, 4) (x0, y0, x1, y1) go in as two points labelled 2 / 3 ahead of the
        clicks; mask_inputs (N, 1, 256, 256) (or the native low-res size) are logits of an
        earlier call, clamped to +-32 as SAM 2 hands them out. Returns low-res logits
        (N, M, 256, 256) and IoU predictions (N, M), M = 3 if ``multimask`` else 1.

        Logits are exchanged on the 256 px frame of :class:`biosam.Predictor` whatever the
        model size: a 512 px model's 128 px logits are repeated 2x (nearest; every second
        row/column gives them back exactly) and its mask prompts are averaged 2x2.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        native = self.low_res_size
        if DECODE_SIZE % native:
            raise ValueError(
                f"decode() exchanges {DECODE_SIZE} px logits; this model's {native} px logits do not divide "
                f"that (image_size {self.image_size}); use forward_sam_heads() instead"
            )
        features = self.unpack_features(image_embedding)
        embedding = features.embedding
        if self.config.directly_add_no_mem_embed:
            # a single image is a first frame without memories
            embedding = embedding + self.no_mem_embed.view(1, -1, 1, 1)
        prompts = [t for t in (point_coords, boxes, mask_inputs) if t is not None]
        count = max((t.reshape(-1, 4) if t is boxes else t).shape[0] for t in prompts) if prompts else 1
        # batch-1 prompts are shared by all prompts of the others
        return decode_in_chunks(lambda *part: self._decode(embedding, features.high_res, *part, multimask=multimask),
                                embedding, (point_coords, point_labels, boxes, mask_inputs), count)

    def _decode(
        self,
        embedding: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_inputs: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        points = _points_with_box_corners(point_coords, point_labels, boxes)
        masks = None if mask_inputs is None else self._mask_prompt(mask_inputs)
        sparse, dense = self.sam_prompt_encoder(points, None, masks)
        low_res, iou, _, _ = self.sam_mask_decoder(
            embedding,
            self.sam_prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask,
            repeat_image=embedding.shape[0] == 1,
            high_res_features=list(high_res),
        )
        if low_res.shape[-1] != DECODE_SIZE:
            low_res = F.interpolate(low_res, scale_factor=DECODE_SIZE // low_res.shape[-1], mode="nearest")
        return low_res, iou

    def _mask_prompt(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, 1, s, s) logits on the decode frame or the native size -> native-size mask prompt."""
        native = self.low_res_size
        side = masks.shape[-1]
        if masks.ndim != 4 or masks.shape[-2] != side or side not in (native, DECODE_SIZE):
            raise ValueError(
                f"mask prompts must be (N, 1, {DECODE_SIZE}, {DECODE_SIZE}) or (N, 1, {native}, {native}) "
                f"logits, got {tuple(masks.shape)}"
            )
        masks = masks.float().clamp(-_MASK_PROMPT_LIMIT, _MASK_PROMPT_LIMIT)
        if side != native:
            masks = F.avg_pool2d(masks, side // native)
        return masks

    # ------------------------------------------------------------ tracker steps
    def forward_sam_heads(
        self,
        backbone_features: torch.Tensor,
        high_res_features: tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor],
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> Sam2HeadOutputs:
        """Prompt encoder + mask decoder for B objects, as SAM 2 runs them on a tracked frame.

        ``backbone_features`` (B, C, g, g): the frame's top level, memory-conditioned (or plus
        the no-memory embedding on a first frame); ``high_res_features`` batch B (see
        :class:`Sam2ImageFeatures`). point_coords (B, P, 2) model-input pixels with point_labels
        (B, P) (1 fg, 0 bg, 2 / 3 box corners, -1 padding); without points a padding point is
        used. ``mask_inputs`` (B, 1, h, w) logits or probabilities, resized (bilinear,
        antialiased) to the native low-res size when needed.
        """
        b = backbone_features.shape[0]
        device = backbone_features.device
        if point_coords is None:
            point_coords = torch.zeros(b, 1, 2, device=device)
            point_labels = torch.full((b, 1), -1, dtype=torch.long, device=device)
        elif point_labels is None:
            raise ValueError("point_coords need point_labels")
        masks = None
        if mask_inputs is not None:
            size = self.sam_prompt_encoder.mask_input_size
            masks = mask_inputs.float()
            if tuple(masks.shape[-2:]) != tuple(size):
                masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False, antialias=True)
        sparse, dense = self.sam_prompt_encoder((point_coords, point_labels), None, masks)
        low_multi, ious, tokens, object_score_logits = self.sam_mask_decoder(
            backbone_features,
            self.sam_prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask,
            repeat_image=False,
            high_res_features=list(high_res_features),
        )
        appearing = object_score_logits > 0
        # The spatial memory is encoded from a hard object / no-object decision.
        low_multi = torch.where(appearing[:, None, None], low_multi, NO_OBJECT_SCORE).float()
        s = self.image_size
        high_multi = F.interpolate(low_multi, size=(s, s), mode="bilinear", align_corners=False)
        token = tokens[:, 0]
        if multimask:
            rows = torch.arange(b, device=device)
            best = ious.argmax(dim=-1)
            low, high = low_multi[rows, best].unsqueeze(1), high_multi[rows, best].unsqueeze(1)
            if tokens.shape[1] > 1:
                token = tokens[rows, best]
        else:
            low, high = low_multi, high_multi
        obj_ptr = self.object_pointer(token, object_score_logits)
        return Sam2HeadOutputs(low_multi, high_multi, ious, low, high, obj_ptr, object_score_logits)

    def mask_as_output(
        self,
        backbone_features: torch.Tensor,
        high_res_features: tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor],
        mask_inputs: torch.Tensor,
    ) -> Sam2HeadOutputs:
        """Take a given (B, 1, S, S) mask (binary or [0, 1]) as the frame's output, SAM 2 style.

        Logits are +-10 (from ``20 * mask - 10``); the low-res masks are its antialiased 4x
        reduction, IoU is 1, the object counts as present when any pixel is > 0, and the
        object pointer comes from the decoder prompted with the ``mask_downsample``-d mask.
        """
        scale, bias = 20.0, -10.0
        masks = mask_inputs.float()
        high = masks * scale + bias
        low = F.interpolate(
            high, size=(high.shape[-2] // 4, high.shape[-1] // 4), mode="bilinear", align_corners=False, antialias=True
        )
        ious = masks.new_ones(masks.shape[0], 1)
        heads = self.forward_sam_heads(backbone_features, high_res_features, mask_inputs=self.mask_downsample(masks))
        appearing = (masks.flatten(1) > 0).any(dim=1, keepdim=True).float()
        object_score_logits = scale * appearing + bias
        obj_ptr = heads.obj_ptr
        if self.config.fixed_no_obj_ptr:
            obj_ptr = appearing * obj_ptr
        obj_ptr = obj_ptr + (1 - appearing) * self.no_obj_ptr
        return Sam2HeadOutputs(low, high, ious, low, high, obj_ptr, object_score_logits)

    def object_pointer(self, tokens: torch.Tensor, object_score_logits: torch.Tensor) -> torch.Tensor:
        """Decoder output tokens (B, C) -> object pointers (B, C), the no-object pointer mixed in where absent."""
        ptr = self.obj_ptr_proj(tokens)
        if self.config.soft_no_obj_ptr:
            present = object_score_logits.sigmoid()
        else:
            present = (object_score_logits > 0).float()
        if self.config.fixed_no_obj_ptr:
            ptr = present * ptr
        return ptr + (1 - present) * self.no_obj_ptr

    def object_pointer_positions(self, offsets: torch.Tensor, max_offset: int) -> torch.Tensor:
        """Temporal encodings (n, mem_dim) of object pointers ``offsets`` frames away.

        ``max_offset`` normalises the offsets (SAM 2: min(num_frames, max_obj_ptrs_in_encoder) - 1);
        offsets are signed where ``config.use_signed_tpos_enc_to_obj_ptrs``, else absolute.
        Zeros when the release adds no temporal encoding (SAM 2.0).
        """
        m = self.config.mem_dim
        if not self.config.add_tpos_enc_to_obj_ptrs:
            return torch.zeros(offsets.shape[0], m, device=offsets.device)
        dim = self.config.hidden_dim if self.obj_ptr_tpos_proj is not None else m
        pe = _sine_1d(offsets.float() / max_offset, dim)
        return pe if self.obj_ptr_tpos_proj is None else self.obj_ptr_tpos_proj(pe)

    def object_pointer_tokens(
        self, obj_ptrs: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pointers (n, B, C) and their positions (n, B, mem_dim) -> memory tokens (n * C / mem_dim, B, mem_dim).

        Each pointer is cut into C / mem_dim consecutive pieces, each with its pointer's position.
        """
        n, b, c = obj_ptrs.shape
        m = self.config.mem_dim
        if c == m:
            return obj_ptrs, positions
        pieces = obj_ptrs.reshape(n, b, c // m, m).permute(0, 2, 1, 3).flatten(0, 1)
        return pieces, positions.repeat_interleave(c // m, dim=0)

    def attend_to_memory(
        self,
        features: torch.Tensor,
        position: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """Condition (B, C, g, g) top-level features on memory tokens (M, B, mem_dim) -> (B, C, g, g).

        ``memory`` holds whole memory frames (g * g tokens each, positions including the
        ``maskmem_tpos_enc`` temporal term) followed by ``num_obj_ptr_tokens`` pointer tokens.
        """
        b, c, h, w = features.shape
        curr = features.flatten(2).permute(2, 0, 1)
        curr_pos = position.flatten(2).permute(2, 0, 1)
        out = self.memory_attention(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens)
        return out.permute(1, 2, 0).reshape(b, c, h, w)

    def encode_memory(
        self,
        pix_feat: torch.Tensor,
        high_res_masks: torch.Tensor,
        object_score_logits: torch.Tensor,
        binarize: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory of a frame: features (B, mem_dim, g, g) and their position encoding.

        ``pix_feat``: the frame's top-level features (:attr:`Sam2ImageFeatures.embedding`,
        not memory-conditioned); ``high_res_masks`` (B, 1, S, S) logits. The mask enters as
        ``scale * sigmoid(logits) + bias`` (20 / -10), or binarised at 0 with ``binarize``;
        frames whose object score is <= 0 get the no-object embedding added (SAM 2.1).
        """
        if binarize:
            mask = (high_res_masks > 0).float()
        else:
            mask = torch.sigmoid(high_res_masks)
        if self.config.sigmoid_scale_for_mem_enc != 1.0:
            mask = mask * self.config.sigmoid_scale_for_mem_enc
        if self.config.sigmoid_bias_for_mem_enc != 0.0:
            mask = mask + self.config.sigmoid_bias_for_mem_enc
        features, pos = self.memory_encoder(pix_feat, mask, skip_mask_sigmoid=True)
        if self.no_obj_embed_spatial is not None:
            absent = 1 - (object_score_logits > 0).float()
            features = features + absent[..., None, None] * self.no_obj_embed_spatial[..., None, None]
        return features, pos


def _points_with_box_corners(
    point_coords: torch.Tensor | None, point_labels: torch.Tensor | None, boxes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Boxes as two corner points (labels 2, 3) ahead of the clicks, batch-1 prompts broadcast."""
    coords, labels = [], []
    if boxes is not None:
        corners = boxes.reshape(-1, 2, 2).float()
        coords.append(corners)
        labels.append(torch.tensor([[2, 3]], device=corners.device).expand(corners.shape[0], 2))
    if point_coords is not None:
        coords.append(point_coords.float())
        labels.append(point_labels.long())
    if not coords:
        return None
    sizes = {c.shape[0] for c in coords} - {1}
    if len(sizes) > 1:
        raise ValueError(f"prompt batch sizes disagree: {[c.shape[0] for c in coords]}")
    n = sizes.pop() if sizes else 1
    coords = [c.expand(n, -1, -1) for c in coords]
    labels = [lab.expand(n, -1) for lab in labels]
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)


def build_sam2(config: Sam2Config) -> Sam2:
    """Randomly initialised :class:`Sam2` with the architecture ``config`` describes (train mode)."""
    return Sam2(config)
