"""Architecture and behaviour settings of the released SAM 2 / SAM 2.1 models (and MedSAM2)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .hiera import HIERA_CONFIGS

__all__ = ["SAM2_CONFIGS", "Sam2Config", "sam2_config_name"]


@dataclass(frozen=True)
class Sam2Config:
    """One SAM 2 model: its Hiera trunk, input size, and the flags of its release.

    Only ``trunk`` and ``image_size`` change the tensors' use in single images; the image
    size is not visible in a checkpoint's tensors (every table is resized to the input), so
    it comes from the model's name (MedSAM2: 512). The flags after ``backbone_stride`` are
    those of sam2's ``SAM2Base`` as every released yaml sets them: 2.0 and 2.1 differ only
    in the four object-pointer / no-object flags (2.1 sets all of them, 2.0 none), and the
    tracker reads the rest. ``dynamic_multimask`` is the single-mask fallback that sam2's
    builders switch on (``apply_postprocessing``); ``binarize_mask_from_pts_for_mem_enc`` is
    off in ``SAM2Base`` and switched on by sam2's video-predictor builder.
    """

    trunk: str
    image_size: int = 1024
    sam2_1: bool = True
    hidden_dim: int = 256
    mem_dim: int = 64
    num_maskmem: int = 7
    backbone_stride: int = 16
    # the releases differ in these four (values here: SAM 2.1)
    no_obj_embed_spatial: bool = True
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True
    use_signed_tpos_enc_to_obj_ptrs: bool = True
    # shared by every release
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    use_mask_input_as_output_without_sam: bool = True
    directly_add_no_mem_embed: bool = True
    multimask_output_in_sam: bool = True
    multimask_output_for_tracking: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    use_obj_ptrs_in_encoder: bool = True
    max_obj_ptrs_in_encoder: int = 16
    only_obj_ptrs_in_the_past_for_eval: bool = True
    fixed_no_obj_ptr: bool = True
    soft_no_obj_ptr: bool = False
    use_mlp_for_obj_ptr_proj: bool = True
    max_cond_frames_in_attn: int = -1
    memory_temporal_stride_for_eval: int = 1
    non_overlap_masks_for_mem_enc: bool = False
    binarize_mask_from_pts_for_mem_enc: bool = False
    dynamic_multimask: bool = True

    def __post_init__(self) -> None:
        if self.trunk not in HIERA_CONFIGS:
            raise ValueError(f"unknown Hiera trunk {self.trunk!r}; expected one of {', '.join(HIERA_CONFIGS)}")
        # Hiera pools its stride-4 tokens three times and tiles them with 8 px position windows.
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        if self.proj_tpos_enc_in_obj_ptrs and not self.add_tpos_enc_to_obj_ptrs:
            raise ValueError("proj_tpos_enc_in_obj_ptrs needs add_tpos_enc_to_obj_ptrs")
        if not self.use_obj_ptrs_in_encoder:
            # every release has it; the model always holds obj_ptr_proj / no_obj_ptr / mask_downsample
            raise ValueError("only configs with use_obj_ptrs_in_encoder=True are supported")

    @classmethod
    def release(cls, trunk: str, sam2_1: bool = True, image_size: int = 1024) -> Sam2Config:
        """The config of a released SAM 2.1 (``sam2_1``) or SAM 2.0 model with this trunk."""
        return cls(
            trunk=trunk,
            image_size=image_size,
            sam2_1=sam2_1,
            no_obj_embed_spatial=sam2_1,
            add_tpos_enc_to_obj_ptrs=sam2_1,
            proj_tpos_enc_in_obj_ptrs=sam2_1,
            use_signed_tpos_enc_to_obj_ptrs=sam2_1,
        )

    def with_image_size(self, image_size: int) -> Sam2Config:
        """The same model run at another input size (e.g. a fine-tune at 512 px)."""
        return replace(self, image_size=image_size)

    @property
    def image_embedding_size(self) -> int:
        """Side of the top-level feature grid (64 at 1024 px)."""
        return self.image_size // self.backbone_stride

    @property
    def low_res_size(self) -> int:
        """Side of the mask decoder's logits: 4x the grid (256 at 1024 px, 128 at 512 px)."""
        return 4 * self.image_embedding_size

    @property
    def embedding_channels(self) -> int:
        """Channels of :meth:`Sam2.embed`'s packed embedding on the grid.

        The top level (C), the 2x level after ``conv_s1`` (C/4 channels, 4 pixels per grid
        cell) and the 4x level after ``conv_s0`` (C/8 channels, 16 pixels per cell): 4C.
        """
        c = self.hidden_dim
        return c + (c // 4) * 4 + (c // 8) * 16

    @property
    def prompt_embed_dim(self) -> int:
        """Same as :attr:`embedding_channels`.

        Named like :class:`biosam.models.config.SamConfig`'s field because code that sizes
        image-embedding buffers from ``model.config`` (the embedding store) reads this name;
        the prompt encoder itself is ``hidden_dim`` wide.
        """
        return self.embedding_channels


def _build() -> dict[str, Sam2Config]:
    configs: dict[str, Sam2Config] = {}
    for version, sam2_1 in (("sam2.1", True), ("sam2", False)):
        for trunk in HIERA_CONFIGS:
            configs[f"{version}_hiera_{trunk}"] = Sam2Config.release(trunk, sam2_1)
    # MedSAM2 (bowang-lab): SAM 2.1 tiny fine-tuned at 512 px (its sam2.1_hiera_t512.yaml)
    configs["medsam2"] = Sam2Config.release("tiny", True, image_size=512)
    return configs


#: Configs of the released models, keyed by their biosam zoo names.
SAM2_CONFIGS: dict[str, Sam2Config] = _build()


def sam2_config_name(config: Sam2Config) -> str | None:
    """Zoo name whose config equals ``config`` (the first, for shared configs), or None."""
    for name, candidate in SAM2_CONFIGS.items():
        if candidate == config:
            return name
    return None
