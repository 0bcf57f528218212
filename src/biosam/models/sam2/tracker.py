"""Propagation of SAM 2 masks through the frames of a video or the slices of a volume.

:class:`Sam2Tracker` chains the per-frame steps of :class:`~biosam.models.sam2.model.Sam2`
the way sam2's ``SAM2VideoPredictor`` does (same memory selection, same numbers), but a
:class:`TrackerState` keeps only what later frames can still read: the memories of the
prompted (conditioning) frames, and a short window of recent frames around the
propagation front and around the frames a pass may start from. Peak memory therefore does
not grow with the number of frames. Image features are computed on demand by a callable
and only the last few are cached.

Coordinates are pixels of the model's ``image_size`` x ``image_size`` input; logits are
the mask decoder's low-resolution ones (``model.low_res_size`` square).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .model import Sam2, Sam2HeadOutputs, Sam2ImageFeatures

__all__ = [
    "FrameMemory",
    "ObjectTrack",
    "PromptResult",
    "Sam2Tracker",
    "TrackedFrame",
    "TrackerState",
    "fill_small_regions",
    "small_components",
]

# sam2 clamps earlier logits to this range before feeding them back as a mask prompt.
_PREV_MASK_LIMIT = 32.0
# Scores written into small background holes / small foreground sprinkles (just past the threshold).
_HOLE_SCORE = 0.1
_SPRINKLE_SCORE = -0.1

FrameSource = Callable[[int], Any]


# ---------------------------------------------------------------------------- small regions
def small_components(region: torch.Tensor, max_area: int | torch.Tensor) -> torch.Tensor:
    """Pixels of ``region`` (B, 1, H, W) bool whose 8-connected component has <= ``max_area`` pixels.

    ``max_area`` is an int or a per-image (B,) tensor. Works on any device with tensor ops:
    labels (pixel indices) spread by 3x3 min-pooling inside the region. A component of at
    most A pixels is spanned by paths of at most A - 1 steps, so A - 1 rounds settle it on
    one label; a label whose pixels touch a differently labelled region pixel belongs to a
    component that has not settled, hence is larger than A.
    """
    b, _, h, w = region.shape
    limits = torch.as_tensor(max_area, device=region.device).reshape(-1).expand(b).long()
    rounds = int(limits.max().item()) - 1 if b else -1
    if rounds < 0 or not bool(region.any()):
        return torch.zeros_like(region)
    n = h * w
    # float labels for max-pooling; float32 holds integers exactly up to 2**24
    dtype = torch.float32 if n < 2**24 else torch.float64
    outside = float(n)
    index = torch.arange(n, dtype=dtype, device=region.device).view(1, 1, h, w)
    labels = torch.where(region, index, outside)
    for _ in range(rounds):
        spread = torch.where(region, -F.max_pool2d(-labels, 3, stride=1, padding=1), outside)
        if torch.equal(spread, labels):
            break
        labels = spread
    low = torch.where(region, -F.max_pool2d(-labels, 3, stride=1, padding=1), outside)
    high = F.max_pool2d(torch.where(region, labels, -1.0), 3, stride=1, padding=1)
    open_pixel = region & ((low < labels) | (high > labels))
    # per (image, label): pixel count and whether any of its pixels is open
    key = (torch.arange(b, device=region.device).view(b, 1, 1, 1) * (n + 1) + labels.long()).reshape(-1)
    inside = region.reshape(-1)
    counts = torch.bincount(key[inside], minlength=b * (n + 1))
    opened = torch.bincount(key[open_pixel.reshape(-1)], minlength=b * (n + 1)) > 0
    limit_per_key = limits.repeat_interleave(n + 1)
    small_key = (counts <= limit_per_key) & ~opened
    return region & small_key[key].view(b, 1, h, w)


def fill_small_regions(logits: torch.Tensor, max_hole_area: int, max_sprinkle_area: int = 0) -> torch.Tensor:
    """Fill small holes in (B, 1, H, W) mask logits and optionally drop small sprinkles.

    Background components (logits <= 0, 8-connected) of at most ``max_hole_area`` pixels
    become foreground with score 0.1, as sam2's ``fill_holes_in_mask_scores`` (which needs a
    CUDA extension and is skipped without it). Then, if ``max_sprinkle_area`` > 0, foreground
    components of at most min(``max_sprinkle_area``, half the image's foreground) pixels become
    background with score -0.1 (the half-area cap keeps a tiny object that is all there is).
    """
    out = logits
    if max_hole_area > 0:
        holes = small_components(out <= 0, max_hole_area)
        out = torch.where(holes, torch.as_tensor(_HOLE_SCORE, dtype=out.dtype, device=out.device), out)
    if max_sprinkle_area > 0:
        fg = out > 0
        cap = torch.div(fg.flatten(1).sum(dim=1), 2, rounding_mode="floor").clamp(max=max_sprinkle_area)
        sprinkles = small_components(fg, cap)
        out = torch.where(sprinkles, torch.as_tensor(_SPRINKLE_SCORE, dtype=out.dtype, device=out.device), out)
    return out


# --------------------------------------------------------------------------------- state
@dataclass
class FrameMemory:
    """What one frame leaves behind for one object.

    ``obj_ptr`` (1, C) and ``object_score_logits`` (1, 1) are small and kept longest;
    ``features`` (1, mem_dim, g, g) is the spatial memory, stored in bfloat16 as sam2 stores
    it (so attention sees the same rounded values), None before it is encoded or once no later
    frame can use it; ``pred_masks`` (1, 1, h, w) are the (hole-filled) low-res logits.
    """

    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor
    pred_masks: torch.Tensor | None
    features: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = (self.obj_ptr, self.object_score_logits, self.pred_masks, self.features)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _FrameRuns:
    """Frame -> flag for the frames tracked so far, stored as runs of equal flags (O(passes), not O(frames))."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []  # sorted, disjoint [first, last, flag]

    def get(self, frame: int) -> bool | None:
        for first, last, flag in self.runs:
            if first <= frame <= last:
                return bool(flag)
        return None

    def set(self, frame: int, flag: bool) -> None:
        if self.get(frame) == flag:
            return
        runs: list[list[int]] = []
        for first, last, old in self.runs:  # cut the frame out of the run holding it
            if first <= frame <= last:
                if first < frame:
                    runs.append([first, frame - 1, old])
                if frame < last:
                    runs.append([frame + 1, last, old])
            else:
                runs.append([first, last, old])
        runs.append([frame, frame, int(flag)])
        runs.sort()
        merged: list[list[int]] = []
        for run in runs:
            if merged and merged[-1][1] + 1 == run[0] and merged[-1][2] == run[2]:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        self.runs = merged


@dataclass
class ObjectTrack:
    """Per-object state: prompts, conditioning memories and the bounded window of recent ones."""

    cond: dict[int, FrameMemory] = field(default_factory=dict)
    recent: dict[int, FrameMemory] = field(default_factory=dict)
    # prompt results not yet encoded into memory (sam2's "temp" outputs), by storage kind
    pending_cond: dict[int, FrameMemory] = field(default_factory=dict)
    pending_recent: dict[int, FrameMemory] = field(default_factory=dict)
    points: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    tracked: _FrameRuns = field(default_factory=_FrameRuns)

    def entries(self) -> int:
        """Number of stored frame memories (conditioning, recent and pending)."""
        return len(self.cond) + len(self.recent) + len(self.pending_cond) + len(self.pending_recent)

    def nbytes(self) -> int:
        stores = (self.cond, self.recent, self.pending_cond, self.pending_recent)
        points = sum(c.numel() * c.element_size() + lab.numel() * lab.element_size() for c, lab in self.points.values())
        return sum(m.nbytes() for store in stores for m in store.values()) + points


class TrackerState:
    """One sequence being tracked: its frames, objects and their memories.

    Made by :meth:`Sam2Tracker.init_state`. ``frame(i)`` gives frame ``i`` as a normalised
    (3, S, S) model-input tensor, a packed embedding (:meth:`Sam2.embed`) or
    :class:`Sam2ImageFeatures`; at most ``cache_size`` frames' features are kept.
    """

    def __init__(self, frame: FrameSource, num_frames: int, cache_size: int = 2) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.frame = frame
        self.num_frames = num_frames
        self.cache_size = max(1, cache_size)
        self.objects: OrderedDict[Any, ObjectTrack] = OrderedDict()
        self.features: OrderedDict[int, Sam2ImageFeatures] = OrderedDict()
        self.memory_position: torch.Tensor | None = None  # (g*g, 1, mem_dim), the same for every memory
        self._stopped: set = set()

    @property
    def object_ids(self) -> list:
        return list(self.objects)

    def stop_object(self, obj_id: Any) -> None:
        """Leave ``obj_id`` out of the rest of the running :meth:`Sam2Tracker.propagate` pass.

        For volumes: stop an object once its score says it is gone. The next pass tracks it again.
        """
        if obj_id not in self.objects:
            raise KeyError(f"unknown object id {obj_id!r}")
        self._stopped.add(obj_id)

    def remove_object(self, obj_id: Any) -> None:
        """Forget an object and all its prompts and memories."""
        del self.objects[obj_id]
        self._stopped.discard(obj_id)

    def memory_entries(self) -> int:
        """Stored frame memories over all objects (bounded by the memory windows, not the frame count)."""
        return sum(track.entries() for track in self.objects.values())

    def nbytes(self) -> int:
        """Bytes held by the objects' memories and prompts (the feature cache not counted)."""
        return sum(track.nbytes() for track in self.objects.values())


class PromptResult(NamedTuple):
    """Low-res logits (1, 1, h, w) and object score logit (1, 1) of a prompted object on its frame."""

    low_res_logits: torch.Tensor
    object_score_logits: torch.Tensor


class TrackedFrame(NamedTuple):
    """One frame of a pass: object ids, their low-res logits (n, 1, h, w) and object scores (n, 1).

    An object score <= 0 means the model sees no object (its logits are then -1024).
    """

    frame_index: int
    object_ids: list
    low_res_logits: torch.Tensor
    object_score_logits: torch.Tensor


@dataclass
class _Memory:
    """Memory tokens of one object for one frame, ready to be batched with others of equal layout."""

    tokens: torch.Tensor  # (M, 1, mem_dim)
    positions: torch.Tensor  # (M, 1, mem_dim)
    num_ptr_tokens: int


# ------------------------------------------------------------------------------- tracker
class Sam2Tracker:
    """SAM 2 video / volume tracking on a :class:`Sam2`, numerically as sam2's ``SAM2VideoPredictor``.

    Defaults are those of sam2's video-predictor builder: masks from clicks enter memory
    binarised and holes up to ``fill_hole_area`` low-res pixels are filled (sam2 skips the
    filling when its CUDA extension is missing; use 0 to match that). ``max_sprinkle_area``
    (off by default) also removes small foreground specks. Spatial memories are stored in
    ``memory_dtype``: bfloat16 as sam2 stores them (half the bytes), float32 to keep them
    exact. Objects with the same memory layout on a frame run as one batch; sam2 runs each
    alone, with the same result up to float rounding.

    Memory is bounded: a recent frame's spatial memory is kept while it is within
    ``(num_maskmem - 2) * stride + 1`` frames behind the front of the running pass and its
    object pointer within ``max_obj_ptrs - 1`` (the farthest a frame reads back), and both
    around conditioning frames and the start of the pass (where a reverse or later pass
    starts reading). A pass or correction that starts elsewhere sees only what was kept,
    where sam2, which keeps every frame, may see more.
    """

    def __init__(
        self,
        model: Sam2,
        fill_hole_area: int = 8,
        max_sprinkle_area: int = 0,
        binarize_prompted_memory: bool = True,
        add_all_frames_to_correct_as_cond: bool = False,
        memory_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        cfg = model.config
        if not cfg.directly_add_no_mem_embed:
            raise ValueError("only SAM 2 configs with directly_add_no_mem_embed=True are supported")
        if cfg.num_maskmem < 1:
            raise ValueError("tracking needs num_maskmem >= 1")
        self.model = model
        self.fill_hole_area = fill_hole_area
        self.max_sprinkle_area = max_sprinkle_area
        self.binarize_prompted_memory = binarize_prompted_memory or cfg.binarize_mask_from_pts_for_mem_enc
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self.memory_dtype = memory_dtype

    # ------------------------------------------------------------------ state
    def init_state(
        self, frames: FrameSource | Sequence | torch.Tensor, num_frames: int | None = None, cache_size: int = 2
    ) -> TrackerState:
        """A new :class:`TrackerState` over ``frames``: a callable ``frame(i)`` (give ``num_frames``) or a sequence."""
        if callable(frames) and not isinstance(frames, torch.Tensor):
            if num_frames is None:
                raise ValueError("num_frames is needed with a frame callable")
            return TrackerState(frames, num_frames, cache_size)
        count = len(frames) if num_frames is None else num_frames
        return TrackerState(frames.__getitem__, count, cache_size)

    def _features(self, state: TrackerState, index: int) -> Sam2ImageFeatures:
        if not 0 <= index < state.num_frames:
            raise IndexError(f"frame {index} is outside the {state.num_frames} frames")
        cached = state.features.get(index)
        if cached is not None:
            state.features.move_to_end(index)
            return cached
        feats = self._to_features(state.frame(index))
        state.features[index] = feats
        while len(state.features) > state.cache_size:
            state.features.popitem(last=False)
        return feats

    def _to_features(self, item: Any) -> Sam2ImageFeatures:
        model, device = self.model, self.model.device
        if isinstance(item, Sam2ImageFeatures):
            s0, s1 = (level.to(device) for level in item.high_res)
            return Sam2ImageFeatures(item.embedding.to(device), (s0, s1), item.position.to(device))
        x = torch.as_tensor(item).to(device)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"a frame must be (3, S, S) or (1, 3, S, S), got {tuple(x.shape)}")
        if x.shape[1] == model.config.embedding_channels:
            return model.unpack_features(x.float())
        if x.shape[1] != 3 or tuple(x.shape[-2:]) != (model.image_size, model.image_size):
            raise ValueError(
                f"a frame must be a normalised (3, {model.image_size}, {model.image_size}) model input "
                f"or a packed embedding, got {tuple(x.shape)}"
            )
        return model.image_features(x.float())

    @staticmethod
    def _track(state: TrackerState, obj_id: Any) -> ObjectTrack:
        track = state.objects.get(obj_id)
        if track is None:
            track = state.objects[obj_id] = ObjectTrack()
        return track

    # ---------------------------------------------------------------- prompts
    @torch.inference_mode()
    def add_prompt(
        self,
        state: TrackerState,
        frame_index: int,
        obj_id: Any,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        clear_old_points: bool = True,
    ) -> PromptResult:
        """Clicks and/or a box for one object on one frame; returns its mask there.

        ``points`` (P, 2) x, y with ``labels`` (P,) (1 fg, 0 bg); ``box`` (4,) x0, y0, x1, y1;
        model-input pixels. With ``clear_old_points=False`` the clicks add to the frame's
        earlier ones (no box then). The previous mask on the frame, if any, is a prompt too.
        """
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if points is None and box is None:
            raise ValueError("give points or a box")
        device = self.model.device
        coords = torch.zeros(1, 0, 2, device=device)
        labs = torch.zeros(1, 0, dtype=torch.long, device=device)
        if points is not None:
            coords = torch.as_tensor(points, dtype=torch.float32, device=device).reshape(1, -1, 2)
            labs = torch.as_tensor(labels, device=device).long().reshape(1, -1)
            if coords.shape[1] != labs.shape[1]:
                raise ValueError(f"{coords.shape[1]} points but {labs.shape[1]} labels")
        if box is not None:
            if not clear_old_points:
                raise ValueError("a box goes before any click: use clear_old_points=True with a box")
            corners = torch.as_tensor(box, dtype=torch.float32, device=device).reshape(1, 2, 2)
            coords = torch.cat([corners, coords], dim=1)
            labs = torch.cat([torch.tensor([[2, 3]], device=device), labs], dim=1)
        track = self._track(state, obj_id)
        if not clear_old_points and frame_index in track.points:
            old_coords, old_labels = track.points[frame_index]
            coords, labs = torch.cat([old_coords, coords], dim=1), torch.cat([old_labels, labs], dim=1)
        track.points[frame_index] = (coords, labs)
        return self._prompt(state, track, frame_index, points=(coords, labs))

    @torch.inference_mode()
    def add_mask(self, state: TrackerState, frame_index: int, obj_id: Any, mask: Any) -> PromptResult:
        """A mask (H, W) for one object on one frame, taken as that frame's output (sam2's mask-as-output).

        A mask of another size is resized to the model input (bilinear, antialiased, >= 0.5).
        """
        s = self.model.image_size
        m = torch.as_tensor(mask, device=self.model.device)
        if m.ndim != 2:
            raise ValueError(f"a mask must be (H, W), got {tuple(m.shape)}")
        m = m.bool().float()[None, None]
        if tuple(m.shape[-2:]) != (s, s):
            m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            m = (m >= 0.5).float()
        track = self._track(state, obj_id)
        track.points.pop(frame_index, None)
        return self._prompt(state, track, frame_index, mask=m)

    def _prompt(
        self,
        state: TrackerState,
        track: ObjectTrack,
        frame: int,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> PromptResult:
        reverse = track.tracked.get(frame)
        initial = reverse is None  # a frame never tracked: segmented from its prompts alone
        as_cond = initial or self.add_all_frames_to_correct_as_cond
        pending = track.pending_cond if as_cond else track.pending_recent
        feats = self._features(state, frame)
        if mask is not None:
            heads = self.model.mask_as_output(feats.embedding, feats.high_res, mask)
        else:
            previous = pending.get(frame) or track.cond.get(frame) or track.recent.get(frame)
            prev_logits = None
            if previous is not None and previous.pred_masks is not None:
                prev_logits = previous.pred_masks.clamp(-_PREV_MASK_LIMIT, _PREV_MASK_LIMIT)
            if initial:
                conditioned = feats.embedding + self.model.no_mem_embed.view(1, -1, 1, 1)
            else:
                memory = self._gather(state, track, frame, bool(reverse))
                conditioned = self._attend(feats, [memory])
            coords, labels = points
            heads = self.model.forward_sam_heads(
                conditioned,
                feats.high_res,
                coords,
                labels,
                mask_inputs=prev_logits,
                multimask=self._multimask(initial, coords.shape[1]),
            )
        low = self._fill(heads.low_res_masks)
        # encoded into memory when a pass starts (as sam2 does, after all prompts are in)
        pending[frame] = FrameMemory(heads.obj_ptr, heads.object_score_logits, low)
        return PromptResult(low, heads.object_score_logits)

    def _multimask(self, initial: bool, num_points: int) -> bool:
        cfg = self.model.config
        return (
            cfg.multimask_output_in_sam
            and (initial or cfg.multimask_output_for_tracking)
            and cfg.multimask_min_pt_num <= num_points <= cfg.multimask_max_pt_num
        )

    def _fill(self, logits: torch.Tensor) -> torch.Tensor:
        if self.fill_hole_area > 0 or self.max_sprinkle_area > 0:
            return fill_small_regions(logits, self.fill_hole_area, self.max_sprinkle_area)
        return logits

    # ----------------------------------------------------------------- memory
    def _encode(
        self, state: TrackerState, feats: Sam2ImageFeatures, high_res_masks: torch.Tensor, scores: torch.Tensor,
        binarize: bool,
    ) -> torch.Tensor:
        """Spatial memories (B, mem_dim, g, g) in ``memory_dtype``."""
        b = high_res_masks.shape[0]
        pix = feats.embedding.expand(b, -1, -1, -1)
        features, position = self.model.encode_memory(pix, high_res_masks, scores, binarize=binarize)
        if state.memory_position is None:
            state.memory_position = position[:1].flatten(2).permute(2, 0, 1).clone()
        return features.to(self.memory_dtype)

    def _consolidate(self, state: TrackerState) -> None:
        """Encode the prompted frames' masks into memory (sam2's propagate preflight)."""
        if not state.objects:
            raise RuntimeError("no object has prompts; add points, a box or a mask first")
        s = self.model.image_size
        for obj_id, track in state.objects.items():
            for pending, store in ((track.pending_recent, track.recent), (track.pending_cond, track.cond)):
                for frame, mem in pending.items():
                    if mem.features is None:
                        high = F.interpolate(mem.pred_masks, size=(s, s), mode="bilinear", align_corners=False)
                        feats = self._features(state, frame)
                        mem.features = self._encode(
                            state, feats, high, mem.object_score_logits, self.binarize_prompted_memory
                        )
                    store[frame] = mem
                pending.clear()
            if not track.cond:
                raise RuntimeError(f"object {obj_id!r} has no prompted frame; add points, a box or a mask first")
            for frame in track.cond:
                track.recent.pop(frame, None)

    def _gather(self, state: TrackerState, track: ObjectTrack, frame: int, reverse: bool) -> _Memory:
        """The memory tokens sam2's track step reads for ``frame`` (conditioning, recent, pointers)."""
        model, cfg = self.model, self.model.config
        nm, stride = cfg.num_maskmem, cfg.memory_temporal_stride_for_eval
        selected, unselected = _select_cond_frames(frame, track.cond, cfg.max_cond_frames_in_attn)
        spatial: list[tuple[int, FrameMemory]] = [(0, mem) for mem in selected.values()]
        for t_pos in range(1, nm):
            source = _spatial_source(frame, nm - t_pos, stride, reverse)
            mem = track.recent.get(source)
            if mem is None:
                # a conditioning frame left out of the selection still counts as a recent frame
                mem = unselected.get(source)
            if mem is not None and mem.features is not None:
                spatial.append((t_pos, mem))
        tokens = [mem.features.float().flatten(2).permute(2, 0, 1) for _, mem in spatial]
        if state.memory_position is None:
            raise RuntimeError("no memory has been encoded yet")
        positions = [state.memory_position + model.maskmem_tpos_enc[nm - t_pos - 1] for t_pos, _ in spatial]

        max_ptrs = min(state.num_frames, cfg.max_obj_ptrs_in_encoder)
        sign = -1 if reverse else 1
        ptr_cond = selected
        if cfg.only_obj_ptrs_in_the_past_for_eval:
            ptr_cond = {t: m for t, m in selected.items() if (t >= frame if reverse else t <= frame)}
        offsets = [(frame - t) * sign if cfg.use_signed_tpos_enc_to_obj_ptrs else abs(frame - t) for t in ptr_cond]
        pointers = [m.obj_ptr for m in ptr_cond.values()]
        for t_diff in range(1, max_ptrs):
            t = frame + t_diff if reverse else frame - t_diff
            if t < 0 or t >= state.num_frames:
                break
            mem = track.recent.get(t, unselected.get(t))
            if mem is not None:
                offsets.append(t_diff)
                pointers.append(mem.obj_ptr)
        num_ptr_tokens = 0
        if pointers:
            device = pointers[0].device
            ptr_pos = model.object_pointer_positions(torch.tensor(offsets, device=device), max_ptrs - 1)
            ptr_tokens, ptr_token_pos = model.object_pointer_tokens(torch.stack(pointers), ptr_pos[:, None])
            tokens.append(ptr_tokens)
            positions.append(ptr_token_pos)
            num_ptr_tokens = ptr_tokens.shape[0]
        return _Memory(torch.cat(tokens), torch.cat(positions), num_ptr_tokens)

    def _attend(self, feats: Sam2ImageFeatures, memories: list[_Memory]) -> torch.Tensor:
        """Condition the frame's features on the memories of B objects (equal layouts) -> (B, C, g, g)."""
        b = len(memories)
        tokens = torch.cat([m.tokens for m in memories], dim=1)
        positions = torch.cat([m.positions for m in memories], dim=1)
        return self.model.attend_to_memory(
            feats.embedding.expand(b, -1, -1, -1),
            feats.position.expand(b, -1, -1, -1),
            tokens,
            positions,
            memories[0].num_ptr_tokens,
        )

    def _reach(self, state: TrackerState) -> tuple[int, int]:
        """How far back (in frames) a frame reads spatial memories and object pointers."""
        cfg = self.model.config
        spatial = max(1, (cfg.num_maskmem - 2) * cfg.memory_temporal_stride_for_eval + 1)
        pointers = max(1, min(state.num_frames, cfg.max_obj_ptrs_in_encoder) - 1)
        return spatial, pointers

    def _prune(self, state: TrackerState, track: ObjectTrack, front: int, reverse: bool, start: int) -> None:
        """Drop recent memories no later step can read (see the class docstring)."""
        spatial_reach, ptr_reach = self._reach(state)
        stride = self.model.config.memory_temporal_stride_for_eval
        anchors = [*track.cond, start]
        for frame in list(track.recent):
            mem = track.recent[frame]
            behind = frame - front if reverse else front - frame
            near = min(abs(frame - a) for a in anchors)
            # off-stride frames are only ever read as the frame right next to the one being tracked
            aligned = frame % stride == 0
            keep_spatial = (0 <= behind <= spatial_reach and (aligned or behind == 0)) or (
                near <= spatial_reach and (aligned or near <= 1)
            )
            keep_pointer = 0 <= behind <= ptr_reach or near <= ptr_reach
            if not keep_spatial:
                mem.features = None
                mem.pred_masks = None
            if not keep_spatial and not keep_pointer:
                del track.recent[frame]

    # ------------------------------------------------------------ propagation
    @torch.inference_mode()
    def propagate(
        self,
        state: TrackerState,
        start_frame: int | None = None,
        reverse: bool = False,
        max_frames: int | None = None,
        object_ids: Iterable | None = None,
    ) -> Iterator[TrackedFrame]:
        """Track the prompted objects frame by frame, yielding a :class:`TrackedFrame` each.

        From ``start_frame`` (default: the first prompted frame) toward the last frame, or
        toward frame 0 with ``reverse``; ``max_frames`` as sam2's ``max_frame_num_to_track``
        (that many frames after the start). ``object_ids`` limits the pass to some objects;
        :meth:`TrackerState.stop_object` ends one during the pass.
        """
        self._consolidate(state)
        ids = list(state.objects) if object_ids is None else list(object_ids)
        for obj_id in ids:
            if obj_id not in state.objects:
                raise KeyError(f"unknown object id {obj_id!r}")
        state._stopped.clear()
        if start_frame is None:
            start_frame = min(t for track in state.objects.values() for t in track.cond)
        count = state.num_frames if max_frames is None else max_frames
        if reverse:
            order: Iterable[int] = range(start_frame, max(start_frame - count, 0) - 1, -1) if start_frame > 0 else ()
        else:
            order = range(start_frame, min(start_frame + count, state.num_frames - 1) + 1)
        for frame in order:
            active = [i for i in ids if i not in state._stopped]
            if not active:
                return
            logits, scores = self._step(state, frame, active, reverse, start_frame)
            yield TrackedFrame(frame, active, torch.cat(logits), torch.cat(scores))

    def _step(
        self, state: TrackerState, frame: int, ids: list, reverse: bool, start: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tracks = [state.objects[i] for i in ids]
        logits: list[torch.Tensor | None] = [None] * len(ids)
        scores: list[torch.Tensor | None] = [None] * len(ids)
        groups: dict[tuple[int, int], list[tuple[int, _Memory]]] = {}
        for k, track in enumerate(tracks):
            stored = track.cond.get(frame)
            if stored is not None:  # a prompted frame: its output is the prompt's
                logits[k], scores[k] = stored.pred_masks, stored.object_score_logits
                continue
            memory = self._gather(state, track, frame, reverse)
            groups.setdefault((memory.tokens.shape[0], memory.num_ptr_tokens), []).append((k, memory))
        if groups:
            feats = self._features(state, frame)
            for members in groups.values():
                heads = self._track_batch(feats, [m for _, m in members])
                spatial = self._encode(state, feats, heads.high_res_masks, heads.object_score_logits, binarize=False)
                low = self._fill(heads.low_res_masks)
                for j, (k, _) in enumerate(members):
                    mem = FrameMemory(
                        heads.obj_ptr[j : j + 1].clone(),
                        heads.object_score_logits[j : j + 1].clone(),
                        low[j : j + 1].clone(),
                        spatial[j : j + 1].clone(),
                    )
                    tracks[k].recent[frame] = mem
                    logits[k], scores[k] = mem.pred_masks, mem.object_score_logits
        for track in tracks:
            track.tracked.set(frame, reverse)
            self._prune(state, track, frame, reverse, start)
        return logits, scores

    def _track_batch(self, feats: Sam2ImageFeatures, memories: list[_Memory]) -> Sam2HeadOutputs:
        b = len(memories)
        conditioned = self._attend(feats, memories)
        high_res = tuple(level.expand(b, -1, -1, -1) for level in feats.high_res)
        return self.model.forward_sam_heads(conditioned, high_res, multimask=self._multimask(False, 0))


def _select_cond_frames(
    frame: int, cond: dict[int, FrameMemory], limit: int
) -> tuple[dict[int, FrameMemory], dict[int, FrameMemory]]:
    """Conditioning frames attended on ``frame``: all, or ``limit`` of them (nearest before, nearest
    at-or-after, then the temporally closest); returns (selected, the rest)."""
    if limit == -1 or len(cond) <= limit:
        return cond, {}
    if limit < 2:
        raise ValueError("max_cond_frames_in_attn must allow at least 2 conditioning frames")
    chosen: dict[int, FrameMemory] = {}
    before = max((t for t in cond if t < frame), default=None)
    if before is not None:
        chosen[before] = cond[before]
    after = min((t for t in cond if t >= frame), default=None)
    if after is not None:
        chosen[after] = cond[after]
    others = sorted((t for t in cond if t not in chosen), key=lambda t: abs(t - frame))
    for t in others[: limit - len(chosen)]:
        chosen[t] = cond[t]
    return chosen, {t: m for t, m in cond.items() if t not in chosen}


def _spatial_source(frame: int, frames_back: int, stride: int, reverse: bool) -> int:
    """Frame whose memory fills the slot ``frames_back`` steps behind ``frame``.

    One step back is the neighbouring frame; further steps walk the multiples of ``stride``,
    starting at the nearest one at least two frames away.
    """
    if frames_back == 1:
        return frame + 1 if reverse else frame - 1
    if reverse:
        return -(-(frame + 2) // stride) * stride + (frames_back - 2) * stride
    return ((frame - 2) // stride) * stride - (frames_back - 2) * stride
