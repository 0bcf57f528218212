"""Choosing a model by what the images show and how large a model may be (the GUI's two dropdowns).

Each runnable zoo entry belongs to one domain and one size class. The domain
comes from the entry's description; cryo-ET has no checkpoint of its own, so it
offers the electron-microscopy fine-tunes and SAM 2.1 (which SABER builds on).
Sizes follow the image encoder: ``tiny`` (MobileSAM/LiteMedSAM TinyViT, Hiera
tiny), ``base`` (ViT-B, Hiera small and base+), ``large`` (ViT-L, Hiera large),
``huge`` (ViT-H).
"""

from __future__ import annotations

from .registry import ModelSpec, list_specs

DEFAULT_MODEL = "lite_medsam"
DOMAINS = ("light microscopy", "electron microscopy", "cryo-ET", "medical imaging", "histopathology",
           "natural images")
SIZES = ("tiny", "base", "large", "huge")

_SIZE_OF_ARCHITECTURE = {
    "vit_t": "tiny", "lite_medsam": "tiny", "hiera_tiny": "tiny",
    "vit_b": "base", "hiera_small": "base", "hiera_base_plus": "base",
    "vit_l": "large", "hiera_large": "large",
    "vit_h": "huge",
}


def size_of(spec: ModelSpec) -> str:
    """The size class of a zoo entry (one of :data:`SIZES`)."""
    return _SIZE_OF_ARCHITECTURE[spec.architecture]


def domains_of(spec: ModelSpec) -> tuple[str, ...]:
    """The domains (of :data:`DOMAINS`) a zoo entry is meant for."""
    text = spec.domain.lower()
    for prefix, domain in (("light microscopy", "light microscopy"), ("histopathology", "histopathology"),
                           ("medical", "medical imaging"), ("natural", "natural images")):
        if text.startswith(prefix):
            found = (domain,)
            break
    else:
        found = ("electron microscopy",) if text.startswith("electron microscopy") else ()
    if text.startswith("electron microscopy") or spec.name.startswith("sam2.1_"):
        found += ("cryo-ET",)
    return found


def models_for(domain: str, size: str | None = None) -> list[str]:
    """Names of the runnable zoo models for ``domain`` (and ``size``), the embedded default first when it fits.

    Every version is listed, each model's newest (its plain name) before its older ones (``vit_b_lm:v2``)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if size is not None and size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    names = [s.name for s in list_specs()
             if s.supported and domain in domains_of(s) and (size is None or size_of(s) == size)]
    return sorted(names, key=lambda n: n != DEFAULT_MODEL)
