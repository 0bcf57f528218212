"""SAM 2 tracking through frames / slices (biosam.models.sam2.tracker) against sam2's SAM2VideoPredictor.

The reference predictors are built from sam2's yamls (hydra, as sam2's video builder does) with
seeded random weights, copied into ours with strict=True. Frames are consecutive serial EM
sections (ISBI 2012). sam2 stores spatial memories in bfloat16, which turns fp32 differences of
1e-6 between two implementations into whole bf16 steps; the 1e-4 comparisons therefore run both
sides with fp32 memories (sam2's module sees a ``torch`` whose ``bfloat16`` is float32), and the
bf16 default is compared by its masks. For the same reason prompted masks enter memory unbinarised
on both sides (a logit 1e-6 from 0 may binarise either way); the binarising itself is checked on
shared inputs. sam2 fills holes only with its CUDA extension: the
comparisons use ``fill_hole_area=0`` on both sides (one run plugs our filler into sam2), and the
filler itself is checked against scipy.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from biosam.models.sam2.config import SAM2_CONFIGS, Sam2Config
from biosam.models.sam2.model import Sam2, Sam2ImageFeatures
from biosam.models.sam2.tracker import Sam2Tracker, _FrameRuns, fill_small_regions, small_components

from conftest import reference
sam2 = reference("sam2")
import sam2.sam2_video_predictor as video_module  # noqa: E402
from sam2.build_sam import build_sam2_video_predictor  # noqa: E402

from conftest import shared_file  # noqa: E402

TOL = 1e-4
_LONG = 48  # frames of the long run: a plateau of kept memories well past both windows
_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
# windows small enough that a few frames wrap them: 2 recent memories at stride 2, 4 pointers, 2 prompted frames
_SMALL_WINDOWS = dict(num_maskmem=3, memory_temporal_stride_for_eval=2, max_obj_ptrs_in_encoder=4,
                      max_cond_frames_in_attn=2)


def _reference(config: Sam2Config, seed: int = 0) -> torch.nn.Module:
    """sam2's SAM2VideoPredictor for ``config`` (2.1 tiny), random weights, objects mostly present."""
    torch.manual_seed(seed)
    overrides = [f"++model.image_size={config.image_size}"]
    base = SAM2_CONFIGS["sam2.1_hiera_tiny"]
    for name in _SMALL_WINDOWS:
        if getattr(config, name) != getattr(base, name):
            overrides.append(f"++model.{name}={getattr(config, name)}")
    ref = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
                                     hydra_overrides_extra=overrides)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in ref.state_dict().items():
            scale = 0.03 if name.startswith("image_encoder.") else 0.1
            tensor.add_(scale * torch.randn(tensor.shape, generator=gen))
        for mlp in ref.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(0.25)
            mlp.layers[-1].bias.mul_(0.25)
        # random weights call most objects absent; shift the score so that most are present
        ref.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(4.0)
    ref.fill_hole_area = 0  # what sam2 does without its CUDA extension
    # a prompted mask enters memory binarised at 0, where logits 1e-6 apart can fall on either side
    ref.binarize_mask_from_pts_for_mem_enc = False
    return ref.eval()


def _tracker(model: Sam2, **kwargs) -> Sam2Tracker:
    """Our tracker set up as the reference: no hole filling, fp32 memories, no binarising."""
    options = dict(fill_hole_area=0, memory_dtype=torch.float32, binarize_prompted_memory=False)
    return Sam2Tracker(model, **{**options, **kwargs})


def _ours(ref: torch.nn.Module, config: Sam2Config) -> Sam2:
    model = Sam2(config)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()


class _Fp32Torch(types.ModuleType):
    """``torch`` for sam2's video-predictor module, with float32 where it stores memories in bfloat16."""

    def __getattr__(self, name):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


@pytest.fixture
def fp32_reference_memory(monkeypatch):
    monkeypatch.setattr(video_module, "torch", _Fp32Torch("torch"))


def _em_frames(indices, size: int) -> torch.Tensor:
    """Serial EM sections as normalised (T, 3, size, size) model inputs."""
    import imageio.v3 as iio

    frames = []
    for i in indices:
        image = iio.imread(shared_file("isbi2012_em_membranes", "images", f"{i}.png")).astype(np.float32) / 255
        x = torch.from_numpy(image)[None, None]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        frames.append((x[0].expand(3, -1, -1) - _MEAN) / _STD)
    return torch.stack(frames)


def _em_cell(index: int, xy: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the labelled cell interior at pixel ``xy`` of section ``index`` (512 px)."""
    import imageio.v3 as iio
    from scipy import ndimage

    labels, _ = ndimage.label(iio.imread(shared_file("isbi2012_em_membranes", "labels", f"{index}.png")) > 127)
    cell = labels == labels[xy[1], xy[0]]
    assert labels[xy[1], xy[0]] > 0 and 500 < cell.sum() < 20000
    return cell


class _IndexFrames:
    """Stand-in video for sam2: frame i is a tiny image holding i (read by an injected forward_image)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((3, 1, 1), float(i))


def _inject(ref, features: list[Sam2ImageFeatures]) -> None:
    """Make sam2 use the given (identical to ours) image features instead of running its encoder."""

    def forward_image(image):
        f = features[int(image.flatten()[0].item())]
        s0, s1 = f.high_res
        return {
            "vision_features": f.embedding,
            "vision_pos_enc": [torch.zeros(1, 1, *s0.shape[-2:]), torch.zeros(1, 1, *s1.shape[-2:]), f.position],
            "backbone_fpn": [s0, s1, f.embedding],
        }

    ref.forward_image = forward_image


def _run_reference(ref, video, low: int, prompts, passes, monkeypatch):
    """sam2: prompts, then propagation passes; returns prompt outputs and [(frame, logits, scores)]."""
    # the video is given at the low-res size, so its masks come out unresized and its
    # coordinates (model pixels / 4, normalised by that size) reach the model unchanged
    monkeypatch.setattr(video_module, "load_video_frames", lambda **kwargs: (video, low, low))
    state = ref.init_state("frames")
    prompt_out = []
    for kind, frame, obj, value in prompts:
        if kind == "box":
            _, ids, masks = ref.add_new_points_or_box(state, frame, obj, box=value / 4)
        elif kind == "points":
            _, ids, masks = ref.add_new_points_or_box(state, frame, obj, points=value[0] / 4, labels=value[1])
        else:
            _, ids, masks = ref.add_new_mask(state, frame, obj, value)
        prompt_out.append(masks[ids.index(obj)][None].clone())
    results = []
    for reverse in passes:
        for frame, ids, masks in ref.propagate_in_video(state, reverse=reverse):
            scores = []
            for obj_idx in range(len(ids)):
                outputs = state["output_dict_per_obj"][obj_idx]
                out = outputs["cond_frame_outputs"].get(frame) or outputs["non_cond_frame_outputs"][frame]
                scores.append(out["object_score_logits"])
            results.append((frame, ids, masks.clone(), torch.cat(scores)))
    return prompt_out, results


def _run_ours(tracker: Sam2Tracker, frames, prompts, passes, check=None):
    state = tracker.init_state(frames)
    prompt_out = []
    for kind, frame, obj, value in prompts:
        if kind == "box":
            result = tracker.add_prompt(state, frame, obj, box=value)
        elif kind == "points":
            result = tracker.add_prompt(state, frame, obj, points=value[0], labels=value[1])
        else:
            result = tracker.add_mask(state, frame, obj, value)
        prompt_out.append(result.low_res_logits)
    results = []
    for reverse in passes:
        for out in tracker.propagate(state, reverse=reverse):
            results.append((out.frame_index, out.object_ids, out.low_res_logits, out.object_score_logits))
            if check is not None:
                check(state, out)
    return prompt_out, results, state


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _compare(ours, ref, tol: float = TOL) -> float:
    """Per-frame logits and object scores agree; returns the largest logit difference."""
    (our_prompts, our_frames), (ref_prompts, ref_frames) = ours, ref
    worst = 0.0
    for a, b in zip(our_prompts, ref_prompts, strict=True):
        worst = max(worst, _max_diff(a, b))
    assert [f[:2] for f in our_frames] == [f[:2] for f in ref_frames]
    present = 0
    for (frame, _, logits, scores), (_, _, ref_logits, ref_scores) in zip(our_frames, ref_frames):
        worst = max(worst, _max_diff(logits, ref_logits))
        assert _max_diff(scores, ref_scores) <= tol, frame
        present += int((ref_scores > 0).sum())
        # real masks: some pixels in, some out, for the objects that are present
        for logit, score in zip(ref_logits, ref_scores):
            if score > 0:
                assert 0.01 < (logit > 0).float().mean() < 0.99
    assert present >= len(our_frames)  # most objects are present on most frames
    assert worst <= tol
    return worst


# ---------------------------------------------------------------------------- fidelity
def test_three_em_sections_box_and_click_match_sam2(fp32_reference_memory, monkeypatch):
    """End to end at 512 px (sam2 runs its own image encoder): two objects prompted on frame 0."""
    config = SAM2_CONFIGS["medsam2"]
    ref = _reference(config)
    tracker = _tracker(_ours(ref, config))
    images = _em_frames(range(3), 512)
    prompts = [("box", 0, 1, np.array([200.0, 180.0, 300.0, 290.0])),
               ("points", 0, 7, (np.array([[380.0, 120.0]]), np.array([1])))]
    ref_run = _run_reference(ref, images, config.low_res_size, prompts, [False], monkeypatch)
    our_prompts, our_frames, state = _run_ours(tracker, images, prompts, [False])
    assert [f[0] for f in our_frames] == [0, 1, 2] and our_frames[1][1] == [1, 7]
    _compare((our_prompts, our_frames), ref_run)
    assert state.memory_entries() == 6


@pytest.fixture(scope="module")
def small_windows():
    """SAM 2.1 tiny at 512 px with small memory windows, and our features of six EM sections."""
    config = dataclasses.replace(SAM2_CONFIGS["medsam2"], **_SMALL_WINDOWS)
    ref = _reference(config, seed=3)
    model = _ours(ref, config)
    with torch.inference_mode():
        features = [model.image_features(x[None]) for x in _em_frames(range(6), 512)]
    return ref, model, features


def test_windows_wrap_with_mask_prompts_and_reverse_pass(small_windows, fp32_reference_memory, monkeypatch):
    """Six frames, three recent memories at stride 2, four pointers, two of three prompted frames attended.

    Object 2 is prompted on frames 1, 3 (a real cell mask) and 5; both passes start at frame 1,
    the reverse one reads memories the forward pass left.
    """
    ref, model, features = small_windows
    _inject(ref, features)
    prompts = [
        ("box", 1, 1, np.array([0.0, 70.0, 74.0, 257.0])),
        ("points", 1, 2, (np.array([[197.0, 123.0], [450.0, 450.0]]), np.array([1, 0]))),
        ("mask", 3, 2, _em_cell(3, (203, 129))),
        ("points", 5, 2, (np.array([[203.0, 134.0]]), np.array([1]))),
    ]
    ref_run = _run_reference(ref, _IndexFrames(6), model.low_res_size, prompts, [False, True], monkeypatch)
    tracker = _tracker(model)
    our_prompts, our_frames, _ = _run_ours(tracker, features, prompts, [False, True])
    assert [f[0] for f in our_frames] == [1, 2, 3, 4, 5, 1, 0]
    _compare((our_prompts, our_frames), ref_run)
    # the mask prompt is the object's output on its frame
    cell = F.avg_pool2d(torch.as_tensor(_em_cell(3, (203, 129))).float()[None, None], 4) > 0.5
    inside = our_frames[2][2][1:2] > 0
    assert (inside & cell).sum() / (inside | cell).sum() > 0.9


@pytest.fixture(scope="module")
def long_run():
    """SAM 2.1 tiny (release windows: 7 memories, 16 pointers) at 256 px over 48 frames (5 EM sections, cycled)."""
    config = SAM2_CONFIGS["sam2.1_hiera_tiny"].with_image_size(256)
    ref = _reference(config, seed=7)
    model = _ours(ref, config)
    with torch.inference_mode():
        distinct = [model.image_features(x[None]) for x in _em_frames(range(5), 256)]
    return ref, model, [distinct[i % 5] for i in range(_LONG)]


def _bounded_check(limit: int, counts: list):
    def check(state, out):
        counts.append(state.memory_entries())
        assert state.memory_entries() <= limit
        assert len(state.features) <= state.cache_size
    return check


def test_long_run_keeps_bounded_memory_and_matches_sam2(long_run, fp32_reference_memory, monkeypatch):
    """48 frames, prompt on frame 6: forward to the end and back to 0 with a bounded number of memories."""
    ref, model, features = long_run
    _inject(ref, features)
    prompts = [("box", 6, 1, np.array([60.0, 80.0, 120.0, 150.0]))]
    ref_run = _run_reference(ref, _IndexFrames(_LONG), model.low_res_size, prompts, [False, True], monkeypatch)
    tracker = _tracker(model)
    # reach: 6 frames back for spatial memories, 15 for pointers; kept behind the front and around
    # the prompted frame (which is also where both passes start)
    spatial, pointers = 6, 15
    limit = 1 + (pointers + 1) + 2 * pointers
    counts: list[int] = []
    our_prompts, our_frames, state = _run_ours(tracker, features, prompts, [False, True],
                                               check=_bounded_check(limit, counts))
    assert [f[0] for f in our_frames] == list(range(6, _LONG)) + list(range(6, -1, -1))
    _compare((our_prompts, our_frames), ref_run)
    # the count stops growing once the front is a pointer window past the prompt's window
    plateau = counts[6 + 2 * pointers + 1 - 6 : _LONG - 6]
    assert len(plateau) >= 10 and len(set(plateau)) == 1 and plateau[0] < limit
    track = state.objects[1]
    with_features = [t for t, m in track.recent.items() if m.features is not None]
    assert len(with_features) <= 2 * spatial and all(abs(t - 6) <= spatial for t in with_features)
    assert state.nbytes() <= (2 * spatial + 2) * track.cond[6].nbytes()


def test_bf16_memories_like_sam2_give_the_same_masks(long_run, monkeypatch):
    """sam2's own bf16 memories: rounding can flip, so masks agree (not logits to 1e-4)."""
    ref, model, features = long_run
    _inject(ref, features)
    prompts = [("points", 2, 1, (np.array([[90.0, 110.0]]), np.array([1])))]
    frames = features[:8]
    _, ref_frames = _run_reference(ref, _IndexFrames(8), model.low_res_size, prompts, [False], monkeypatch)
    _, our_frames, state = _run_ours(_tracker(model, memory_dtype=torch.bfloat16), frames, prompts, [False])
    assert state.objects[1].cond[2].features.dtype == torch.bfloat16
    for (_, _, logits, scores), (_, _, ref_logits, ref_scores) in zip(our_frames, ref_frames, strict=True):
        assert torch.equal(scores > 0, ref_scores > 0)
        agree = ((logits > 0) == (ref_logits > 0)).float().mean().item()
        assert agree >= 0.995
        assert _max_diff(logits, ref_logits) <= 0.5


def test_hole_filling_matches_sam2_with_our_filler(long_run, fp32_reference_memory, monkeypatch):
    """sam2 with its hole filler replaced by ours: filled masks in outputs and memories the same."""
    ref, model, features = long_run
    _inject(ref, features)
    filled = []

    def filler(mask, max_area):
        out = fill_small_regions(mask, max_area)
        filled.append(int((out != mask).sum()))
        return out

    monkeypatch.setattr(video_module, "fill_holes_in_mask_scores", filler)
    monkeypatch.setattr(ref, "fill_hole_area", 40)
    prompts = [("box", 0, 1, np.array([140.0, 30.0, 230.0, 120.0]))]
    ref_run = _run_reference(ref, _IndexFrames(4), model.low_res_size, prompts, [False], monkeypatch)
    tracker = _tracker(model, fill_hole_area=40)
    ours = _run_ours(tracker, features[:4], prompts, [False])[:2]
    _compare(ours, ref_run)
    assert sum(filled) > 0  # the test masks do have small holes


def test_1024_px_two_frames_match_sam2(fp32_reference_memory, monkeypatch):
    """The release size (64 px grid, 256 px logits), one object over two frames.

    For speed the features are those of the 512 px section, upsampled 2x, and the second frame
    is the first moved by one grid cell (encoder fidelity at 1024 px is tested elsewhere).
    """
    config = SAM2_CONFIGS["sam2.1_hiera_tiny"]
    ref = _reference(config, seed=11)
    model = _ours(ref, config)
    with torch.inference_mode():
        half = model.image_features(_em_frames([0], 512))
    top, s0, s1 = (F.interpolate(x, scale_factor=2.0, mode="nearest") for x in (half.embedding, *half.high_res))
    position = model.image_encoder.neck.position_encoding(top)
    f0 = Sam2ImageFeatures(top, (s0, s1), position)
    f1 = Sam2ImageFeatures(top.roll(1, dims=-1), (s0.roll(4, dims=-1), s1.roll(2, dims=-1)), position)
    _inject(ref, [f0, f1])
    prompts = [("box", 0, 1, np.array([400.0, 360.0, 600.0, 580.0]))]
    ref_run = _run_reference(ref, _IndexFrames(2), config.low_res_size, prompts, [False], monkeypatch)
    tracker = _tracker(model)
    ours = _run_ours(tracker, [f0, f1], prompts, [False])[:2]
    assert ours[1][1][2].shape == (1, 1, 256, 256)
    _compare(ours, ref_run)


def test_corrections_on_tracked_frames_match_sam2(long_run, fp32_reference_memory, monkeypatch):
    """A click on an already tracked frame is conditioned on memory; here it also becomes a prompted frame."""
    ref, model, features = long_run
    _inject(ref, features)
    monkeypatch.setattr(ref, "add_all_frames_to_correct_as_cond", True)
    box = np.array([60.0, 80.0, 120.0, 150.0])
    click = (np.array([[100.0, 120.0]]), np.array([0]))
    monkeypatch.setattr(video_module, "load_video_frames", lambda **kwargs: (_IndexFrames(6), 64, 64))
    state = ref.init_state("frames")
    ref.add_new_points_or_box(state, 0, 1, box=box / 4)
    ref_first = [m.clone() for _, _, m in ref.propagate_in_video(state)]
    _, _, ref_fix = ref.add_new_points_or_box(state, 3, 1, points=click[0] / 4, labels=click[1])
    ref_second = [m.clone() for _, _, m in ref.propagate_in_video(state)]

    tracker = _tracker(model, add_all_frames_to_correct_as_cond=True)
    ours = tracker.init_state(features[:6])
    tracker.add_prompt(ours, 0, 1, box=box)
    first = [f.low_res_logits for f in tracker.propagate(ours)]
    fix = tracker.add_prompt(ours, 3, 1, points=click[0], labels=click[1])
    assert set(ours.objects[1].pending_cond) == {3}
    second = [f.low_res_logits for f in tracker.propagate(ours)]
    assert set(ours.objects[1].cond) == {0, 3}
    assert _max_diff(fix.low_res_logits, ref_fix) <= TOL
    for a, b in zip(first + second, ref_first + ref_second, strict=True):
        assert _max_diff(a, b) <= TOL
    # the correction changed the mask on its frame and the frames after it
    assert (fix.low_res_logits > 0).ne(first[3] > 0).sum() > 20
    assert _max_diff(second[4], first[4]) > 0.1


def test_prompted_frames_enter_memory_binarised_like_sam2(long_run, monkeypatch):
    """By default (sam2's video builder) a clicked mask enters memory binarised, a tracked one does not."""
    ref, model, features = long_run
    monkeypatch.setattr(ref, "binarize_mask_from_pts_for_mem_enc", True)
    tracker = Sam2Tracker(model, fill_hole_area=0, memory_dtype=torch.float32)
    state = tracker.init_state(features[:2])
    prompt = tracker.add_prompt(state, 0, 1, points=[[90.0, 110.0]], labels=[1])
    tracked = list(tracker.propagate(state))[1]
    f = features[0]
    high = F.interpolate(prompt.low_res_logits, size=(256, 256), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        expected, _ = ref._encode_new_memory([f.embedding.flatten(2).permute(2, 0, 1)], [(16, 16)], high,
                                             prompt.object_score_logits, is_mask_from_pts=True)
        soft, _ = ref._encode_new_memory([f.embedding.flatten(2).permute(2, 0, 1)], [(16, 16)], high,
                                         prompt.object_score_logits, is_mask_from_pts=False)
    memory = state.objects[1].cond[0].features
    assert _max_diff(memory, expected) <= TOL and _max_diff(memory, soft) > 0.01
    # the tracked frame: its own high-res logits through the sigmoid
    f1 = features[1]
    with torch.inference_mode():
        mem_high = F.interpolate(tracked.low_res_logits, size=(256, 256), mode="bilinear", align_corners=False)
        expected1, _ = model.encode_memory(f1.embedding, mem_high, tracked.object_score_logits)
    assert _max_diff(state.objects[1].recent[1].features, expected1) <= TOL


# ------------------------------------------------------------------------ our behaviour
def test_objects_batch_stop_and_restrict(long_run):
    """Batched objects equal lone ones; a stopped object leaves the pass; passes can be limited."""
    _, model, features = long_run
    tracker = Sam2Tracker(model, memory_dtype=torch.float32)
    boxes = {1: [60.0, 80.0, 120.0, 150.0], 2: [150.0, 40.0, 220.0, 110.0]}

    def run(ids, stop_at=None, **kwargs):
        state = tracker.init_state(lambda i: features[i], num_frames=6)
        for obj in ids:
            tracker.add_prompt(state, 1, obj, box=boxes[obj])
        out = []
        for frame in tracker.propagate(state, **kwargs):
            out.append(frame)
            if stop_at is not None and frame.frame_index == stop_at:
                state.stop_object(2)
        return out, state

    both, _ = run([1, 2])
    alone = {obj: run([obj])[0] for obj in (1, 2)}
    for k, frame in enumerate(both):
        assert frame.object_ids == [1, 2]
        for j, obj in enumerate((1, 2)):
            assert _max_diff(frame.low_res_logits[j : j + 1], alone[obj][k].low_res_logits) <= TOL
            assert _max_diff(frame.object_score_logits[j : j + 1], alone[obj][k].object_score_logits) <= TOL
    stopped, state = run([1, 2], stop_at=3)
    assert [f.object_ids for f in stopped] == [[1, 2], [1, 2], [1, 2], [1], [1]]
    assert 4 not in state.objects[2].recent and 4 in state.objects[1].recent
    for a, b in zip(stopped, both):
        assert _max_diff(a.low_res_logits[:1], b.low_res_logits[:1]) <= TOL
    limited, _ = run([1, 2], object_ids=[2], max_frames=2)
    assert [(f.frame_index, f.object_ids) for f in limited] == [(1, [2]), (2, [2]), (3, [2])]
    backwards, _ = run([1], reverse=True)
    assert [f.frame_index for f in backwards] == [1, 0]


def test_errors_name_the_problem(long_run):
    _, model, features = long_run
    tracker = Sam2Tracker(model)
    state = tracker.init_state(features[:3])
    with pytest.raises(RuntimeError, match="no object has prompts"):
        next(tracker.propagate(state))
    with pytest.raises(ValueError, match="points or a box"):
        tracker.add_prompt(state, 0, 1)
    with pytest.raises(ValueError, match="box goes before any click"):
        tracker.add_prompt(state, 0, 1, box=[0, 0, 9, 9], clear_old_points=False)
    with pytest.raises(IndexError, match="outside the 3 frames"):
        tracker.add_prompt(state, 3, 1, points=[[5, 5]], labels=[1])
    with pytest.raises(ValueError, match="model input"):
        tracker.add_prompt(tracker.init_state([torch.zeros(3, 100, 100)]), 0, 1, points=[[5, 5]], labels=[1])


def test_clicks_accumulate_and_feed_back_the_previous_mask(long_run):
    _, model, features = long_run
    tracker = Sam2Tracker(model, memory_dtype=torch.float32)
    state = tracker.init_state(features[:3])
    first = tracker.add_prompt(state, 0, 1, points=[[90, 110]], labels=[1])
    second = tracker.add_prompt(state, 0, 1, points=[[30, 30]], labels=[0], clear_old_points=False)
    coords, labels = state.objects[1].points[0]
    assert coords.shape == (1, 2, 2) and labels.tolist() == [[1, 0]]
    # the same two clicks from scratch, with the first click's mask as extra prompt
    feats = features[0]
    with torch.inference_mode():
        direct = model.forward_sam_heads(feats.embedding + model.no_mem_embed.view(1, -1, 1, 1), feats.high_res,
                                         coords, labels, mask_inputs=first.low_res_logits.clamp(-32, 32))
    assert _max_diff(fill_small_regions(direct.low_res_masks, 8), second.low_res_logits) <= 1e-5


# ------------------------------------------------------------------------- small regions
def _scipy_fill(logits: np.ndarray, hole: int, sprinkle: int) -> np.ndarray:
    """The straightforward version: scipy 8-connected labels, per image."""
    from scipy import ndimage

    out = logits.copy()
    eight = np.ones((3, 3), dtype=bool)
    for img in out[:, 0]:
        if hole > 0:
            labels, _ = ndimage.label(img <= 0, structure=eight)
            areas = np.bincount(labels.ravel())
            small = (labels > 0) & (areas[labels] <= hole)
            img[small] = 0.1
        if sprinkle > 0:
            fg = img > 0
            cap = min(sprinkle, int(fg.sum()) // 2)
            labels, _ = ndimage.label(fg, structure=eight)
            areas = np.bincount(labels.ravel())
            small = (labels > 0) & (areas[labels] <= cap)
            img[small] = -0.1
    return out


@pytest.mark.parametrize("hole,sprinkle", [(8, 0), (1, 0), (30, 0), (8, 8), (0, 20), (200, 50)])
def test_fill_small_regions_matches_scipy(hole, sprinkle):
    gen = torch.Generator().manual_seed(hole * 100 + sprinkle)
    # blobs of every size: smoothed noise thresholded, plus salt-and-pepper specks
    noise = F.avg_pool2d(torch.randn(6, 1, 70, 90, generator=gen), 5, stride=1, padding=2)
    logits = noise + 0.4 * (torch.rand(6, 1, 70, 90, generator=gen) > 0.97).float()
    logits -= 0.4 * (torch.rand(6, 1, 70, 90, generator=gen) > 0.97).float()
    logits[5] = 1.0  # an image with no background at all
    logits[4, :, 30:33, 40:42] = -2.0  # a 6-pixel hole
    expected = _scipy_fill(logits.numpy(), hole, sprinkle)
    got = fill_small_regions(logits, hole, sprinkle)
    assert torch.equal(got, torch.from_numpy(expected))
    assert (got != logits).sum() > 0 or (hole == 0 and sprinkle == 0)


def test_small_components_handles_snakes_and_per_image_limits():
    # a long 1-pixel snake (area 41) needs many rounds to settle; it is not small at 40
    region = torch.zeros(2, 1, 12, 12, dtype=torch.bool)
    region[0, 0, 1, 1:11] = True
    region[0, 0, 1:11, 10] = True
    region[0, 0, 10, 0:11] = True
    region[0, 0, 3:10, 0] = True
    region[0, 0, 3, 1:8] = True
    area = int(region[0].sum())
    region[1, 0, 5, 5] = True
    assert not small_components(region[:1], area - 1).any()
    assert torch.equal(small_components(region[:1], area), region[:1])
    per_image = small_components(region, torch.tensor([area - 1, 1]))
    assert not per_image[0].any() and torch.equal(per_image[1], region[1])
    assert not small_components(torch.zeros(1, 1, 4, 4, dtype=torch.bool), 5).any()


def test_frame_runs_record_each_frames_direction():
    runs = _FrameRuns()
    for f in range(5, 12):
        runs.set(f, False)
    for f in range(5, 0, -1):
        runs.set(f, True)
    assert runs.runs == [[1, 5, 1], [6, 11, 0]]
    runs.set(8, True)
    assert runs.get(8) is True and runs.get(7) is False and runs.get(0) is None
    assert len(runs.runs) == 4
