"""Automatic instance segmentation of a whole 2D image of any size, by either method, tiled.

The image is normalised once as a whole (so every tile sees the same contrast)
and kept as 8-bit, then cut into tiles of the model's scale:

- ``ais``: the trained decoder's maps are stitched over the whole image and
  instances are found once on them (see :mod:`biosam.automatic.tiling`);
- ``amg``: grid-prompted mask generation per tile, objects assigned to the tile
  that holds their centre.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from biosam.automatic.ais import decoder_postprocessing, load_decoder, predict_maps
from biosam.automatic.amg import AmgSettings, automatic_mask_generation
from biosam.automatic.decoder import InstanceDecoder
from biosam.automatic.instances import maps_to_instances
from biosam.automatic.labels import relabel
from biosam.automatic.resample import resize_image, resize_labels, resize_maps, scaled_shape
from biosam.automatic.tiling import check_tiles, merge_instance_tiles, stitch_maps, tiles_rule
from biosam.errors import InputError
from biosam.prompting.intensity import INTENSITY_PRESETS, normalize_intensity
from biosam.settings import check, choice, positive, rule, whole, within

logger = logging.getLogger(__name__)

MODES = ("ais", "amg")
# Grid prompting needs enough objects per tile to be placed well; on nuclei LiteMedSAM's box grid reached
# F1@0.5 ~0.6 on 512-1344 px images but 0.16-0.44 on 256 px tiles.
AMG_TILE = 1024
MIN_SCALE, MAX_SCALE = 0.05, 4.0


@dataclass
class AutoSettings:
    """How :func:`segment_automatic` runs.

    ``tile`` defaults to the decoder's training tile (``ais``) or 1024 px
    (``amg``, at least the model input); ``halo`` to an eighth of the tile. ``decoder`` is a
    loaded :class:`InstanceDecoder`, a checkpoint path, or None for the one
    shipped with the model.

    ``scale`` resizes the image before segmenting (0.5 halves it) and the labels
    come back at the original size; ``object_size`` (``ais``) sets it from the
    typical object diameter in pixels instead, as ``decoder object size /
    object_size``, where the decoder records the diameter it segments best.
    With neither (``ais``), the object size is estimated from the image
    (:func:`biosam.automatic.size.estimate_object_size`).
    """

    mode: str = "ais"
    decoder: InstanceDecoder | str | None = None
    tile: int | None = None
    halo: int | None = None
    amg: AmgSettings | None = None  # None: the model's defaults (see amg_settings_for)
    intensity: str = "auto"
    scale: float | None = None
    object_size: float | None = None

    def __post_init__(self) -> None:
        rules = [choice("mode", self.mode, MODES), choice("intensity", self.intensity, INTENSITY_PRESETS),
                 rule(self.scale is None or self.object_size is None, "give either scale or object_size, not both")]
        if self.tile is not None:
            rules.append(tiles_rule(self.tile, self.tile // 8 if self.halo is None else self.halo))
        if self.halo is not None:
            rules.append(whole("halo", self.halo, 0))
        if self.scale is not None:
            rules.append(within("scale", self.scale, MIN_SCALE, MAX_SCALE))
        if self.object_size is not None:
            rules += [positive("object_size (a diameter in pixels)", self.object_size),
                      rule(self.mode == "ais", "object_size needs the instance decoder (mode 'ais'); "
                                               "use scale with mode 'amg'")]
        check("automatic segmentation settings", rules)


def amg_settings_for(model, **overrides) -> AmgSettings:
    """Mask-generation settings for ``model``: the zoo's per-model defaults, then ``overrides`` (None ignored).

    ``model``: a loaded model, or its zoo entry (a ``ModelSpec``; None for a file outside the zoo), which
    gives the same settings without loading the model.
    """
    if isinstance(model, torch.nn.Module):
        model = model.info.spec if model.info is not None else None
    spec = model
    values = dict(spec.defaults.get("amg", {})) if spec is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return AmgSettings(**values)


def to_uint8(image: np.ndarray, intensity: str = "auto") -> np.ndarray:
    """Normalise a whole 2D image once: ``(H, W)`` uint8 for gray input, ``(H, W, 3)`` for colour."""
    rgb = normalize_intensity(np.asarray(image), intensity)
    gray = np.asarray(image).ndim == 2 or bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    out = rgb[..., 0] if gray else rgb
    return np.rint(out).astype(np.uint8)


def working_scale(settings: AutoSettings, decoder: InstanceDecoder | None = None) -> float:
    """The resize factor ``settings`` ask for (1.0 when neither ``scale`` nor ``object_size`` is set).

    Checks the settings, so a bad value is refused before any work.
    """
    if settings.object_size is not None:
        if decoder is None:
            raise InputError("object_size needs the instance decoder (mode 'ais'); use scale with mode 'amg'.")
        preferred = (decoder.info or {}).get("object_size")
        if not preferred:
            raise InputError("this decoder does not record the object size it works best at; use scale instead.")
        scale = float(preferred) / settings.object_size
    else:
        scale = 1.0 if settings.scale is None else float(settings.scale)
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise InputError(f"scale {scale:.3g} is outside [{MIN_SCALE}, {MAX_SCALE}]; check scale / object_size.")
    return scale


def estimated_scale(predictor, decoder: InstanceDecoder, pixels: np.ndarray, info: dict | None = None) -> float:
    """The resize factor that gives the objects of ``pixels`` the decoder's size, from an estimate of their size.

    1.0 when the decoder does not record its object size or no objects are seen.
    ``info`` (a dict) receives ``object_size`` (the estimate, pixels or None) and ``scale``.
    """
    from biosam.automatic.size import estimate_object_size

    preferred = (decoder.info or {}).get("object_size")
    scale, diameter = 1.0, None
    if preferred:
        tile = int((decoder.info or {}).get("tile") or predictor.input_size)
        estimate = estimate_object_size(lambda t: predict_maps(predictor, decoder, t, intensity="none"), pixels,
                                        tile, float(preferred), decoder_postprocessing(decoder))
        diameter = estimate.diameter
        if diameter:
            scale = float(np.clip(float(preferred) / diameter, MIN_SCALE, MAX_SCALE))
        logger.info("estimated object size: %s px (%d objects), scale %.3g", diameter, estimate.objects, scale)
    if info is not None:
        info.update(object_size=diameter, scale=scale)
    return scale


def resolve_decoder(predictor, decoder: InstanceDecoder | str | None) -> InstanceDecoder:
    """A loaded decoder for ``predictor``'s model: the given one, a checkpoint path, or the shipped one."""
    if isinstance(decoder, InstanceDecoder):
        return decoder
    return load_decoder(decoder, model=predictor.model)


def decoder_maps(predictor, decoder: InstanceDecoder, pixels: np.ndarray, tile: int | None = None,
                 halo: int | None = None, progress: bool = False) -> np.ndarray:
    """The decoder's maps ``(3, H, W)`` of a normalised 8-bit image of any size, tiled and blended.

    ``tile`` defaults to the decoder's training tile, ``halo`` to an eighth of it.
    """
    tile = tile or int((decoder.info or {}).get("tile") or predictor.input_size)
    halo = tile // 8 if halo is None else halo
    return stitch_maps(pixels, lambda t: predict_maps(predictor, decoder, t, intensity="none"), tile, halo,
                       channels=3, progress=progress)


def segment_automatic(predictor, image: np.ndarray, settings: AutoSettings | None = None,
                      progress: bool = False, info: dict | None = None) -> np.ndarray:
    """Instance labels ``(H, W)`` (contiguous ids, uint16 or uint32) of a 2D image of any size.

    ``predictor`` is a :class:`biosam.Predictor`; its current image is replaced.
    An empty or constant image gives an all-zero label image. ``info`` (a dict)
    receives the ``scale`` used and, when it was estimated, the ``object_size``.
    """
    settings = settings or AutoSettings()
    image = np.asarray(image)
    decoder = resolve_decoder(predictor, settings.decoder) if settings.mode == "ais" else None
    scale = working_scale(settings, decoder)
    if settings.tile is not None:
        tile = settings.tile
    elif decoder is not None:
        tile = int((decoder.info or {}).get("tile") or predictor.input_size)
    else:
        tile = max(AMG_TILE, predictor.input_size)
    halo = tile // 8 if settings.halo is None else settings.halo
    check_tiles(tile, halo)
    if image.size == 0 or image.min() == image.max():
        return np.zeros(image.shape[:2], dtype=np.uint16)
    pixels = to_uint8(image, settings.intensity)
    if decoder is not None and settings.scale is None and settings.object_size is None:
        scale = estimated_scale(predictor, decoder, pixels, info)
    elif info is not None:
        info.update(scale=scale)
    shape = pixels.shape[:2]
    if scale != 1.0:
        pixels = resize_image(pixels, scaled_shape(shape, scale))
    if decoder is not None:
        maps = decoder_maps(predictor, decoder, pixels, tile, halo, progress)
        params = decoder_postprocessing(decoder)
        if scale != 1.0:
            # Objects are found at the original size, so the pixel-valued parameters follow the resize.
            maps = resize_maps(maps, shape)
            params = params.replace(smoothing=params.smoothing / scale, min_size=round(params.min_size / scale**2))
        return maps_to_instances(maps, params)
    amg = settings.amg or amg_settings_for(predictor.model)
    labels = merge_instance_tiles(
        pixels, lambda t: automatic_mask_generation(predictor, t, amg, intensity="none"), tile, halo,
        progress=progress,
    )
    return labels if scale == 1.0 else relabel(resize_labels(labels, shape))
