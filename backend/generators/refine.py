"""The refine generator: the guide's render corrected with the weight-free reprojection by a small
U-Net that the job trains on the scene's own captures (DESIGN.md section 1 step 5). Nothing is
downloaded or kept between jobs.

Before the segments, the loop calls :meth:`RefineGenerator.prepare` once:

1. leave-out subsets: every capture left out once; with more than 3 captures, also pairs of captures
   left out together (wider gaps, as the trajectory has), at most ``max_fits`` subsets;
2. for each subset, the loop's own steps with the left-out captures gone: a memory built from the
   kept captures alone (the job's estimator: a left-out photo must not shape or colour a single
   point, as the memory's points of kept captures would have done through matching, fusion or
   carving), a guide fit on the kept captures (``fit_share`` of the job's fit steps, a fifth by
   default) from those points (every subset's guide fitted at once, in lockstep: :func:`leave_out_guides`, one
   rasterizer call per step for all of them), the memory and guide rendered at the left-out
   cameras, retrieval among the kept captures, and the ``reproject`` generator. Each left-out
   capture gives one training pair: the degraded inputs at its camera (reprojection, its
   confidence, the guide's render, its coverage) and its photo, the truth;
3. one capture's pairs are set aside for validation (:func:`split_validation`: the capture is
   picked from the seed; they are never trained on). When every pair shows the same capture
   (``max_fits`` 1) there is nothing else to train on: it trains on them and validates on them too,
   and the job's note says so (a gate that then only catches a network worse on its own data);
4. the U-Net learns, per pixel, a weight in [0, 1] that moves the base towards the reprojection
   (:func:`apply_network`: every refined pixel lies between its two sources, so the network can
   choose between what the guide and the captures show but cannot paint new colour; L1 against the
   photo) and, on a second output, the L1 error it still makes, for ``seconds`` of wall time, on
   random crops with flips and photometric jitter (one random gain, gamma and offset per channel for
   inputs and truth alike). The base
   (:func:`base_frames`) is the guided render where it covers and the reprojection elsewhere: the
   render scores 0.4-0.7 dB above the reprojection at held-out views on the H200, so the network
   has to learn where the captures' reprojected pixels beat it (docs/benchmarks.md, Refiner: on
   the render against on the reprojection, 3 seeds, the loop's Gaussians +0.06 / -0.03 / +0.63 dB
   on temple / fern / door);
5. the gate (:func:`choose_strength`): on the validation pairs' full images (the photo is the truth
   at every pixel), the strength ``alpha`` among ``strengths`` whose frames
   ``base + alpha * (refined - base)`` have the least mean L1 error against the photo; ties go to
   the smaller strength, so a network that changes nothing leaves the base. Where the reprojection
   itself (the weight-free frames) scores below every blend, or the best blend's gain over it is
   inside the validation's noise (``gate_z`` standard errors over 16-px tiles, :func:`gain_standard_error`),
   the refiner declines (``declined``): the reprojection and its confidence pass through, so the
   gate never picks frames worse than the weight-free generator's on its validation pairs, nor
   frames whose gain it could not tell from chance. The choice and its
   figures go to the job's notes (``refiner: validation L1 ...``) and stay on the generator
   (``strength``, ``declined``, ``validation``).

Then ``generate`` runs ``reproject`` on the segment and, unless the refiner declined, the network
on its output and the guided render, and returns the base moved ``alpha`` of the way to the
refined frame (the network's reprojection mixes a one-fit guide's share of the guide's colour also
where the job's guide is an ensemble, as in its training pairs; where the refiner does not act, the
frames are the ``reproject`` generator's own, with an ensemble's share); per segment the strength
drops where the frames would move further than the validation frames did (the trust region,
:meth:`RefineGenerator.trusted_strength`). Its confidence
is ``exp(-predicted error / confidence_error)``, the network's
prediction for the fully refined frame, also when ``alpha < 1`` (a choice: the blend's error is not
predicted; on the H200 the gate kept 1 or declined in 7 of 9 runs, run 26).

Channels of the network's input (:func:`network_inputs`), [B, 8, H, W]: reprojection rgb - 0.5,
render rgb - 0.5, reprojection confidence, render coverage.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import tile_means
from ..progress import WorkProgress
from ..stages.fit import FitViews, Gaussians, fit_gaussians_many
from ..stages.guide import guided_renders, render_guide
from ..stages.memory import build_memory
from ..stages.render import render_memory
from ..stages.retrieval import retrieve_views
from ..types import ENSEMBLE_SOURCE, ConditionVideo, Frames, GeometryMemory, Renders, Views
from . import GENERATORS, GenerateProgress
from .reproject import ReprojectConfig, ReprojectGenerator

if TYPE_CHECKING:
    from ..loop import LoopConfig
    from . import GeneratorConfig

IN_CHANNELS = 8  # reprojection rgb, render rgb, reprojection confidence, render coverage
OUT_CHANNELS = 2  # the reprojection's weight (a logit), L1 error
COLOR_CENTER = 0.5  # colours enter the network centred
GROUPS = 8  # GroupNorm groups (fewer when a block is narrower)
INFERENCE_CHUNK = 4  # frames refined at once
LOSS_SYNC_EVERY = 10  # training steps between reading the loss on the host (and checking the clock)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineConfig:
    """Hyper-parameters of the refiner (ours; no seed paper trains per scene).

    Attributes:
        seconds: wall-clock training budget (``Settings.refine_seconds``).
        max_steps: stop after this many steps even within ``seconds`` (0: the clock alone). A fixed
            count makes a run repeatable.
        fit_share: the leave-out guide fits run this share of the job's fit steps (at least 1). At
            1 the training pairs' guides are as sharp as the trajectory's guide, and at CPU size on
            the temple no seed lost any more (docs/benchmarks.md, Refiner); on the H200 it did not
            help (temple, 3 seeds: the loop's Gaussians -1.58 dB against -0.17 with 0.2) and cost
            48 s of a 130-s job (82 s with 0.2, issue 15's target 90 s), so 0.2 it is.
        max_fits: leave-out subsets (one guide fit each) at most.
        widths: channels per U-Net level; 2 convolutions per level, (32, 64, 128, 256) is 1.9M
            parameters.
        crop_px: side of the random training crops (smaller images: their shorter side).
        batch_size: crops per step.
        lr, lr_final_factor, weight_decay: AdamW, cosine decay to ``lr * lr_final_factor`` over
            the budget.
        gain_jitter, gamma_jitter, offset_jitter: photometric augmentation per channel: gain in
            [1 - g, 1 + g], gamma exp(U(-g, g)), offset in [-o, o].
        confidence_error: a predicted mean absolute error of this much gives confidence e^-1.
        strengths: the gate's choices of ``alpha`` (module docstring, step 5), each in [0, 1]; with
            0 among them the gate can keep the base; with ``(1.0,)`` it can only apply the network at
            full strength or decline.
        gate_z: the gate's noise floor: the chosen blend must beat the reprojection on the validation
            pairs by at least this many standard errors of its gain, taken over 16-px tiles
            (:func:`gain_standard_error`), or the refiner declines. A gain inside the validation's noise is
            no evidence: on the CPU's temple (docs/benchmarks.md, Refiner) a gate that passed the
            network on 0.0002 of L1 (0.2 %) cost the loop 1.05 dB. 0 keeps any gain.
        max_change_ratio: the trust region (:meth:`RefineGenerator.trusted_strength`): a segment's frames may
            move from the reprojection at most this many times as far (mean absolute change) as the
            validation frames did at the gate's strength; beyond it the strength drops to the
            largest that stays within, or the reprojection passes through. 0 switches it off.
        seed: crops, flips, jitter, the network's initial weights and the validation capture.
    """

    seconds: float = 10.0
    max_steps: int = 0
    fit_share: float = 0.2
    max_fits: int = 6
    widths: tuple[int, ...] = (32, 64, 128, 256)
    crop_px: int = 128
    batch_size: int = 8
    lr: float = 1e-3
    lr_final_factor: float = 0.05
    weight_decay: float = 1e-4
    gain_jitter: float = 0.15
    gamma_jitter: float = 0.2
    offset_jitter: float = 0.05
    confidence_error: float = 0.05
    strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    gate_z: float = 2.0
    max_change_ratio: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"RefineConfig.seconds must be > 0; got {self.seconds}")
        for name in ("max_steps",):
            if getattr(self, name) < 0:
                raise ValueError(f"RefineConfig.{name} must be >= 0; got {getattr(self, name)}")
        for name in ("max_fits", "crop_px", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RefineConfig.{name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 < self.fit_share <= 1.0:
            raise ValueError(f"RefineConfig.fit_share must be in (0, 1]; got {self.fit_share}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"RefineConfig.widths must be non-empty and positive; got {self.widths}")
        for name in ("lr", "confidence_error"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RefineConfig.{name} must be > 0; got {getattr(self, name)}")
        for name in (
            "lr_final_factor",
            "weight_decay",
            "gain_jitter",
            "gamma_jitter",
            "offset_jitter",
            "gate_z",
            "max_change_ratio",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"RefineConfig.{name} must be >= 0; got {getattr(self, name)}")
        if not self.strengths or not all(0.0 <= a <= 1.0 for a in self.strengths):
            raise ValueError(f"RefineConfig.strengths must be non-empty, each in [0, 1]; got {self.strengths}")


# ----------------------------------------------------------------------------------------------
# The network


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by GroupNorm and SiLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        groups = math.gcd(GROUPS, c_out)
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
        )


class UNet(nn.Module):
    """A plain U-Net: ``len(widths)`` levels, average-pool down, bilinear up, skip concatenation.

    Any input size works: the input is padded (replicate) to a multiple of 2^(levels-1) and the
    output cropped back. The 1x1 head starts at zero.

    Example:
        >>> net = UNet(8, 2, (8, 16))
        >>> net(torch.rand(2, 8, 15, 21)).shape
        torch.Size([2, 2, 15, 21])
    """

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        widths = list(widths)
        self.down = nn.ModuleList(
            [ConvBlock(in_channels, widths[0])] + [ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.up = nn.ModuleList([ConvBlock(b + a, a) for a, b in zip(widths[:-1], widths[1:])])
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H, W]"""
        H, W = x.shape[-2:]
        m = 1 << (len(self.down) - 1)
        x = F.pad(x, (0, -W % m, 0, -H % m), mode="replicate")
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(reversed(self.up), reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)[..., :H, :W]


def network_inputs(frames: Tensor, confidence: Tensor, render_rgb: Tensor, coverage: Tensor) -> Tensor:
    """The refiner's input channels.

    Args:
        frames: the reprojection's colours in [0, 1]. [B, H, W, 3]
        confidence: its confidence in [0, 1]. [B, H, W]
        render_rgb: the (guided) render's colours in [0, 1]. [B, H, W, 3]
        coverage: pixels the render covers. bool or float [B, H, W]
    Returns:
        float32 [B, 8, H, W]
    """
    return torch.cat(
        [
            frames.permute(0, 3, 1, 2) - COLOR_CENTER,
            render_rgb.permute(0, 3, 1, 2) - COLOR_CENTER,
            confidence[:, None],
            coverage[:, None].to(frames.dtype),
        ],
        dim=1,
    )


def base_frames(frames: Tensor, render_rgb: Tensor, coverage: Tensor) -> Tensor:
    """The colours the network weighs against the reprojection: the render where it covers, the
    reprojection elsewhere.

    Args:
        frames: the reprojection's colours. [B, H, W, 3]
        render_rgb: the (guided) render's colours. [B, H, W, 3]
        coverage: pixels the render covers. bool or float [B, H, W]
    Returns:
        [B, H, W, 3]
    """
    return torch.where(coverage[..., None].bool(), render_rgb, frames)


def apply_network(net: UNet, inputs: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
    """(refined colours in [0, 1] [B, H, W, 3], predicted mean absolute error >= 0 [B, H, W]) for
    inputs [B, 8, H, W] and the ``base`` colours [B, H, W, 3] (:func:`base_frames`) of the same frames.

    Each pixel of the base moves towards the reprojection by a weight in [0, 1] (sigmoid of channel
    0), so the refined frame never leaves the colours its two sources show. A head that added free
    colour to the base (until run 26) painted the temple's far side and lost 2.1 dB there on the
    H200; this one gained on every scene (docs/benchmarks.md, Refiner, run 26)."""
    out = net(inputs)
    reprojection = inputs[:, :3].permute(0, 2, 3, 1) + COLOR_CENTER
    refined = torch.lerp(base, reprojection, torch.sigmoid(out[:, :1]).permute(0, 2, 3, 1))
    return refined, F.softplus(out[:, 1])


# ----------------------------------------------------------------------------------------------
# Training pairs from the captures


@dataclass
class TrainingPairs:
    """Degraded inputs at left-out capture cameras and the photos taken there.

    Attributes:
        target_ids: the capture each pair shows (index into the captures). list of P ints
        kept_ids: the captures each pair's inputs were made from (never its target). list of P tuples
        frames: the reprojection's colours. float32 [P, H, W, 3]
        confidence: its confidence. float32 [P, H, W]
        render_rgb: the guided render's colours. float32 [P, H, W, 3]
        coverage: pixels the render covers. bool [P, H, W]
        truth: the left-out photos. float32 [P, H, W, 3]
    """

    target_ids: list[int]
    kept_ids: list[tuple[int, ...]]
    frames: Tensor
    confidence: Tensor
    render_rgb: Tensor
    coverage: Tensor
    truth: Tensor

    def __len__(self) -> int:
        return len(self.target_ids)

    def select(self, idx: Sequence[int]) -> TrainingPairs:
        """The pairs at positions ``idx``."""
        idx = list(idx)
        return TrainingPairs(
            target_ids=[self.target_ids[i] for i in idx],
            kept_ids=[self.kept_ids[i] for i in idx],
            frames=self.frames[idx],
            confidence=self.confidence[idx],
            render_rgb=self.render_rgb[idx],
            coverage=self.coverage[idx],
            truth=self.truth[idx],
        )


def split_validation(pairs: TrainingPairs, seed: int) -> tuple[TrainingPairs, TrainingPairs, bool]:
    """Set one capture's pairs aside for validation.

    The capture is the ``seed % n``-th of the n captures the pairs show (sorted), and all its pairs
    (with more than 3 captures it can be left out alone and with another) go to validation, so that
    no training pair has its photo as the truth.

    Returns:
        (training, validation, held_out): ``held_out`` is False when every pair shows that capture;
        then training is all the pairs and validation is those same pairs.
    """
    shown = sorted(set(pairs.target_ids))
    target = shown[seed % len(shown)]
    val = [i for i, t in enumerate(pairs.target_ids) if t == target]
    train = [i for i, t in enumerate(pairs.target_ids) if t != target]
    if not train:
        return pairs, pairs.select(val), False
    return pairs.select(train), pairs.select(val), True


def leave_out_subsets(num_captures: int, max_fits: int) -> list[tuple[int, ...]]:
    """Captures to leave out per guide fit: each capture alone, and with more than 3 captures also
    pairs half the set apart, interleaved, at most ``max_fits`` subsets.

    Example:
        >>> leave_out_subsets(3, 6)
        [(0,), (1,), (2,)]
        >>> leave_out_subsets(6, 4)
        [(0,), (0, 3), (1,), (1, 4)]
    """
    if num_captures < 2:
        raise ValueError(f"refine: needs at least 2 captures to leave one out; got {num_captures}")
    singles = [(i,) for i in range(num_captures)]
    if num_captures <= 3:
        return singles[:max_fits]
    half = num_captures // 2
    pairs = [(i, i + half) for i in range(half)]
    order = [s for k in range(num_captures) for s in ([singles[k]] + ([pairs[k]] if k < len(pairs) else []))]
    return order[:max_fits]


@dataclass(frozen=True)
class LeaveOut:
    """The captures a leave-out subset keeps and the memory they make.

    Attributes:
        left_out: indices of the captures left out.
        kept: indices of the captures kept (at least one).
        views: the kept captures (images [K, H, W, 3], cameras, ids, masks when the captures have them).
        memory: a memory built from the kept captures alone, by the job's estimator: the job's memory
            cannot be cut to the kept captures' points, which were matched against, fused with or
            carved by the left-out ones (and coloured by them, on the visual hull).
    """

    left_out: tuple[int, ...]
    kept: list[int]
    views: Views
    memory: GeometryMemory

    @classmethod
    def of(cls, captures: Views, left_out: Sequence[int], cfg: LoopConfig, notes: list[str] | None = None) -> LeaveOut:
        """The subset of ``captures`` without ``left_out``, its memory built by ``cfg``'s estimator; a
        fallback of that build (fewer captures find less) is said in ``notes``, naming the subset."""
        gone = set(left_out)
        kept = [i for i in range(len(captures)) if i not in gone]
        if not kept or not gone:
            raise ValueError(
                f"refine: left_out must leave out some and keep some of {len(captures)} captures; got {left_out}"
            )
        masks = captures.masks[kept] if captures.masks is not None else None
        views = Views(captures.images[kept], captures.cams[kept], [captures.ids[i] for i in kept], masks=masks)
        built: list[str] = []
        memory = build_memory(views, cfg.memory, estimator=cfg.estimator, notes=built)
        if notes is not None:
            notes.extend(f"refiner, without capture(s) {list(left_out)}: {line}" for line in built)
        if len(memory) == 0:
            raise ValueError(f"refine: the captures kept when leaving out {list(left_out)} make no memory point")
        return cls(tuple(left_out), kept, views, memory)


def leave_out_guides(
    subsets: Sequence[LeaveOut],
    cfg: LoopConfig,
    fit_iterations: int,
    *,
    device: torch.device | str,
    progress: Callable[[int, float], None] | None = None,
) -> list[Gaussians | None]:
    """The subsets' guides (when ``cfg.guide`` is on): ``fit_iterations`` steps on each subset's kept
    captures from its memory, all subsets fitted in lockstep (:func:`fit_gaussians_many`: one
    rasterizer call per step for all of them). None per subset when the loop has no guide."""
    if not (cfg.guide.enabled and cfg.has_fit):
        return [None] * len(subsets)
    fit_cfg = replace(cfg.fit, iterations=fit_iterations)
    views = [FitViews.from_views(s.views) for s in subsets]
    return fit_gaussians_many(views, [s.memory for s in subsets], fit_cfg, device=device, progress=progress)


def degraded_inputs(
    captures: Views,
    subset: LeaveOut,
    guide: Gaussians | None,
    cfg: LoopConfig,
    reproject: ReprojectGenerator,
) -> tuple[Frames, Renders]:
    """What the loop would give the generator at the left-out captures' cameras had they not been
    taken: guide (fitted on the kept captures, :func:`leave_out_guides`), memory render, retrieval and
    reprojection from the rest.

    Args:
        captures: all captures (images [C, H, W, 3], cameras, ids = 0..C-1).
        subset: the captures left out and kept, and the memory the kept ones made.
        guide: Gaussians fitted on the kept captures only, or None (no guide).
        cfg: the loop's config (guide, fit, render, retrieval, occlusion test).
        reproject: the weight-free generator.
    Returns:
        (frames, renders): the reprojection [L, H, W(, 3)] and the guided renders at the left-out
        cameras [L, H, W(, 3)].
    """
    kept_views, sub_memory = subset.views, subset.memory
    targets = captures.cams[list(subset.left_out)]
    renders = render_memory(sub_memory, targets, cfg.render)
    picked = retrieve_views(sub_memory, targets, kept_views.cams, cfg.retrieval, capture_ids=kept_views.ids)
    depth = None
    if picked:
        depth = render_memory(sub_memory, kept_views.cams[picked], cfg.render).depth
        if guide is not None:
            guide_depth = render_guide([guide], kept_views.cams[picked], cfg.fit, cfg.guide)[1]
            depth = torch.where(guide_depth > 0, guide_depth, depth)
    retrieved = Views(kept_views.images[picked], kept_views.cams[picked], [kept_views.ids[i] for i in picked], depth)
    if guide is not None:
        renders = guided_renders(renders, [guide], targets, cfg.fit, cfg.guide)
    none = Views(captures.images[:0], captures.cams[[]], [])
    cond = ConditionVideo(targets=targets, renders=renders, memory=retrieved, carried=none, prompt=cfg.prompt)
    return reproject.generate(cond), renders


def make_pairs(
    captures: Views,
    cfg: LoopConfig,
    refine_cfg: RefineConfig,
    reproject: ReprojectGenerator,
    *,
    device: torch.device | str,
    progress: WorkProgress | None = None,
    notes: list[str] | None = None,
) -> TrainingPairs:
    """One training pair per left-out capture of every subset of :func:`leave_out_subsets`.

    ``progress(fraction, message)`` is called after each subset's memory, as the subsets' guides fit
    (they take the time) and after each subset's inputs (it may raise to cancel). A subset's memory
    that fell back is said in ``notes``."""
    left_outs = leave_out_subsets(len(captures), refine_cfg.max_fits)
    subsets = []
    for k, left_out in enumerate(left_outs):
        subsets.append(LeaveOut.of(captures, left_out, cfg, notes))
        if progress is not None:
            progress(0.1 * (k + 1) / len(left_outs), f"refiner: memory without capture(s) {list(left_out)}")
    iterations = max(1, round(cfg.fit.iterations * refine_cfg.fit_share))
    gone = ", ".join(str(list(s.left_out)) for s in subsets)

    def on_fit_step(step: int, loss: float) -> None:
        if progress is not None:
            progress(
                0.1 + 0.8 * step / iterations,
                f"refiner: {len(subsets)} guides without capture(s) {gone}, step {step}/{iterations}",
            )

    guides = leave_out_guides(subsets, cfg, iterations, device=device, progress=on_fit_step)
    parts: list[tuple[Frames, Renders]] = []
    for k, (subset, guide) in enumerate(zip(subsets, guides)):
        parts.append(degraded_inputs(captures, subset, guide, cfg, reproject))
        if progress is not None:
            progress(
                0.9 + 0.1 * (k + 1) / len(subsets),
                f"refiner: inputs without capture(s) {list(subset.left_out)} ({k + 1}/{len(subsets)})",
            )
    target_ids = [i for s in subsets for i in s.left_out]
    return TrainingPairs(
        target_ids=target_ids,
        kept_ids=[tuple(s.kept) for s in subsets for _ in s.left_out],
        frames=torch.cat([f.images for f, _ in parts]),
        confidence=torch.cat([f.confidence for f, _ in parts]),
        render_rgb=torch.cat([r.rgb for _, r in parts]),
        coverage=torch.cat([r.mask for _, r in parts]),
        truth=captures.images[target_ids],
    )


# ----------------------------------------------------------------------------------------------
# Training


def augmented_batch(pairs: TrainingPairs, cfg: RefineConfig, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A batch of random crops with flips and photometric jitter.

    Returns:
        (inputs [B, 8, h, w], base [B, h, w, 3] (:func:`base_frames`), truth [B, h, w, 3]), on the
        pairs' device.
    """
    P, H, W = pairs.confidence.shape
    ch, cw = min(cfg.crop_px, H), min(cfg.crop_px, W)
    dev = pairs.frames.device
    B = cfg.batch_size
    idx = torch.randint(P, (B,), generator=gen).tolist()
    ys = torch.randint(H - ch + 1, (B,), generator=gen).tolist()
    xs = torch.randint(W - cw + 1, (B,), generator=gen).tolist()

    def crop(t: Tensor) -> Tensor:
        return torch.stack([t[p, y : y + ch, x : x + cw] for p, y, x in zip(idx, ys, xs)])

    frames, conf, rgb, cover, truth = (
        crop(t) for t in (pairs.frames, pairs.confidence, pairs.render_rgb, pairs.coverage, pairs.truth)
    )
    # one colour transform per crop, the same for inputs and truth (a different exposure of the scene)
    gain = 1.0 + cfg.gain_jitter * (2.0 * torch.rand(B, 1, 1, 3, generator=gen) - 1.0)
    gamma = torch.exp(cfg.gamma_jitter * (2.0 * torch.rand(B, 1, 1, 3, generator=gen) - 1.0))
    offset = cfg.offset_jitter * (2.0 * torch.rand(B, 1, 1, 3, generator=gen) - 1.0)
    gain, gamma, offset = gain.to(dev), gamma.to(dev), offset.to(dev)

    def jitter(x: Tensor) -> Tensor:
        return (gain * x.clamp_min(0.0) ** gamma + offset).clamp(0.0, 1.0)

    frames, truth = jitter(frames), jitter(truth)
    rgb = torch.where(cover[..., None], jitter(rgb), rgb)  # uncovered render pixels stay black
    flips = torch.rand(B, 2, generator=gen) < 0.5
    out = []
    for t in (frames, conf, rgb, cover, truth):
        t = torch.stack([x.flip(1) if fx else x for x, fx in zip(t, flips[:, 0].tolist())])  # horizontal
        t = torch.stack([x.flip(0) if fy else x for x, fy in zip(t, flips[:, 1].tolist())])  # vertical
        out.append(t)
    frames, conf, rgb, cover, truth = out
    return network_inputs(frames, conf, rgb, cover), base_frames(frames, rgb, cover), truth


def train_refiner(
    net: UNet,
    pairs: TrainingPairs,
    cfg: RefineConfig,
    *,
    progress: WorkProgress | None = None,
) -> list[float]:
    """Train ``net`` on augmented crops of ``pairs`` until ``cfg.seconds`` (or ``cfg.max_steps``).

    Loss: mean L1 of the refined colours against the truth, plus the L1 between the predicted
    error and the (detached) error made. ``progress(fraction, message)`` is called about every
    ``LOSS_SYNC_EVERY`` steps.

    Returns:
        the loss every ``LOSS_SYNC_EVERY`` steps (and the last step's).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net.train()
    losses: list[float] = []
    start = time.perf_counter()
    step, done = 0, 0.0
    while done < 1.0:
        lr = cfg.lr * (cfg.lr_final_factor + (1.0 - cfg.lr_final_factor) * 0.5 * (1.0 + math.cos(math.pi * done)))
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, base, truth = augmented_batch(pairs, cfg, gen)
        refined, error = apply_network(net, inputs, base)
        made = (refined - truth).abs().mean(-1)  # [B, h, w]
        loss = made.mean() + (error - made.detach()).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        by_steps = step / cfg.max_steps if cfg.max_steps else 0.0
        if step % LOSS_SYNC_EVERY == 0 or by_steps >= 1.0:
            losses.append(float(loss.detach()))  # waits for the device: the clock below is honest
            if progress is not None:
                progress(done, f"refiner: step {step}, loss {losses[-1]:.4f}")
        done = max((time.perf_counter() - start) / cfg.seconds, by_steps)
    if step % LOSS_SYNC_EVERY != 0 and not (cfg.max_steps and step >= cfg.max_steps):
        losses.append(float(loss.detach()))
    net.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# The gate


def predict(
    net: nn.Module, frames: Tensor, confidence: Tensor, render_rgb: Tensor, coverage: Tensor
) -> tuple[Tensor, Tensor]:
    """The network on whole frames, ``INFERENCE_CHUNK`` at a time, without gradients.

    Args:
        frames: the reprojection's colours. [F, H, W, 3]
        confidence: its confidence. [F, H, W]
        render_rgb: the (guided) render's colours. [F, H, W, 3]
        coverage: pixels the render covers. [F, H, W]
    Returns:
        (refined colours [F, H, W, 3], predicted mean absolute error [F, H, W])
    """
    refined, error = [], []
    with torch.no_grad():
        for s in range(0, len(frames), INFERENCE_CHUNK):
            sl = slice(s, s + INFERENCE_CHUNK)
            inputs = network_inputs(frames[sl], confidence[sl], render_rgb[sl], coverage[sl])
            out = apply_network(net, inputs, base_frames(frames[sl], render_rgb[sl], coverage[sl]))
            refined.append(out[0])
            error.append(out[1])
    return torch.cat(refined), torch.cat(error)


def choose_strength(
    frames: Tensor, refined: Tensor, truth: Tensor, strengths: Sequence[float]
) -> tuple[float, list[float]]:
    """The strength whose blend ``frames + strength * (refined - frames)`` has the least mean L1
    error against ``truth``.

    Args:
        frames: the base (:func:`base_frames`). [P, H, W, 3]
        refined: the network's frames. [P, H, W, 3]
        truth: the photos, valid at every pixel. [P, H, W, 3]
        strengths: the choices, in [0, 1].
    Returns:
        (strength, mean L1 error per strength in the order given). Ties go to the smaller strength.

    Example:
        >>> x, y = torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3)
        >>> choose_strength(x, y, y, (0.0, 0.5, 1.0))
        (1.0, [1.0, 0.5, 0.0])
    """
    l1 = [float((torch.lerp(frames, refined, a) - truth).abs().mean()) for a in strengths]
    best = min(range(len(strengths)), key=lambda i: (l1[i], strengths[i]))
    return float(strengths[best]), l1


GATE_TILE_PX = 16  # the gate's noise is taken over tiles of this side (gain_standard_error)


def gain_standard_error(frames: Tensor, chosen: Tensor, truth: Tensor, block: int = GATE_TILE_PX) -> float:
    """The standard error of the drop in mean absolute error against ``truth`` from ``frames`` to
    ``chosen``, over ``block`` x ``block`` tiles (neighbouring pixels' errors are correlated, tiles
    less so: a tile is the unit of evidence).

    Args:
        frames: the reprojection. [P, H, W, 3]
        chosen: the frames the gate would return. [P, H, W, 3]
        truth: the photos. [P, H, W, 3]
        block: tile side in pixels.
    Returns:
        the per-tile drops' standard deviation over the square root of their count (0 with a single
        tile, or where every tile gains the same).

    Example:
        >>> truth = torch.zeros(1, 32, 32, 3)
        >>> gain_standard_error(torch.full_like(truth, 0.2), torch.full_like(truth, 0.1), truth)
        0.0
    """
    drop = tile_means((frames - truth).abs().mean(-1), block) - tile_means((chosen - truth).abs().mean(-1), block)
    drop = drop.flatten().cpu().double()  # on the CPU: Apple's mps has no float64
    # rounded so that tiles that all gain the same give 0 exactly, not float32 noise from the tile means
    return round(float(drop.std() / math.sqrt(drop.numel())), 12) if drop.numel() > 1 else 0.0


@dataclass(frozen=True)
class Validation:
    """What the gate measured and chose.

    Attributes:
        target_ids: the capture the validation pairs show (one capture, one or more pairs).
        held_out: whether those pairs were kept out of training (False: too few pairs, module
            docstring step 3).
        train_pairs: how many pairs the network trained on.
        l1_input: mean absolute error of the reprojection (the weight-free frames) against the photos.
        strengths: the strengths tried.
        l1: the mean absolute error at each of ``strengths``.
        strength: the chosen strength (0: the base passes through).
        change: mean absolute change the frames ``refine`` returns make to the reprojection on the
            validation pairs (colour units per channel and pixel): how far the gate was seen to move them.
        noise: the least gain over the reprojection the gate accepted: ``RefineConfig.gate_z``
            standard errors of the best blend's gain (:func:`gain_standard_error`).
        declined: the best blend's gain over the reprojection was less than ``noise`` (or
            negative: the reprojection scored below every blend): the refiner declines and the
            reprojection passes through (``strength`` is then unused).
    """

    target_ids: list[int]
    held_out: bool
    train_pairs: int
    l1_input: float
    strengths: tuple[float, ...]
    l1: tuple[float, ...]
    strength: float
    change: float = 0.0
    noise: float = 0.0
    declined: bool = False

    @property
    def l1_chosen(self) -> float:
        """The validation error of the frames ``refine`` returns."""
        return self.l1_input if self.declined else self.l1[self.strengths.index(self.strength)]

    @property
    def note(self) -> str:
        """One line for the job's notes."""
        where = f"capture {self.target_ids[0]}"
        if self.held_out:
            where += f", held out of training ({self.train_pairs} training pairs)"
        else:
            where += f", also trained on (only {self.train_pairs} pair(s) of one capture: an optimistic check)"
        if self.declined:
            top = self.strengths.index(max(self.strengths))
            return (
                f"refiner declined: validation L1 {self.l1_input:.4f} reprojected, best blend "
                f"{min(self.l1):.4f} (a gain of at least {self.noise:.4f} needed: the validation's noise), "
                f"refined {self.l1[top]:.4f} at strength {self.strengths[top]:g}; the "
                f"reprojection passes through (validated on {where})"
            )
        base = " (the guide's render passes through)" if self.strength == 0.0 else ""
        return (
            f"refiner: validation L1 {self.l1_input:.4f} reprojected -> {self.l1_chosen:.4f}, strength "
            f"{self.strength:g}{base} (validated on {where})"
        )


def validate(
    net: nn.Module, pairs: TrainingPairs, cfg: RefineConfig
) -> tuple[float, bool, float, list[float], float, float]:
    """The gate on validation ``pairs`` with ``cfg.strengths``.

    Returns:
        (chosen strength, declined (the best blend beats the reprojection by less than the noise,
        or loses to it), L1 of the reprojection, L1 per strength, mean absolute change the returned frames
        make to the reprojection, the noise: ``cfg.gate_z`` standard errors of the gain).
    """
    refined, _ = predict(net, pairs.frames, pairs.confidence, pairs.render_rgb, pairs.coverage)
    base = base_frames(pairs.frames, pairs.render_rgb, pairs.coverage)
    strength, l1 = choose_strength(base, refined, pairs.truth, cfg.strengths)
    l1_input = float((pairs.frames - pairs.truth).abs().mean())
    chosen = torch.lerp(base, refined, strength)
    noise = cfg.gate_z * gain_standard_error(pairs.frames, chosen, pairs.truth)
    declined = l1_input - min(l1) < noise  # with no noise floor: a loss to the reprojection
    change = 0.0 if declined else float((chosen - pairs.frames).abs().mean())
    return strength, declined, l1_input, l1, change, noise


# ----------------------------------------------------------------------------------------------
# The generator


@GENERATORS.register("refine")
class RefineGenerator:
    """The guide's render and ``reproject``'s frames, refined by a U-Net trained on the scene's
    captures (module docstring).

    :meth:`prepare` must run before :meth:`generate` (``run_loop`` calls it once, before the
    segments).

    Example::

        >>> gen = RefineGenerator(RefineConfig(seconds=5))
        >>> gen.prepare(captures, loop_cfg, device="cpu")   # doctest: +SKIP
        >>> frames = gen.generate(cond, num_steps=1, seed=0)          # doctest: +SKIP
    """

    min_captures = 2  # one left out, one kept at least (``run_loop`` checks it before any work)

    def __init__(self, config: RefineConfig | None = None, reproject: ReprojectConfig | None = None) -> None:
        self.config = config or RefineConfig()
        reproject = reproject or ReprojectConfig()
        # The network weighs the render against a reprojection that mixed in a one-fit guide's share of its colour,
        # as in its training pairs (each leave-out guide is one fit): an ensemble's share (``ensemble_blend`` 1.0)
        # would leave the two the same where the guide covers. Where the refiner does not act, the frames are the
        # weight-free generator's own (``weight_free``).
        self.reproject = ReprojectGenerator(replace(reproject, ensemble_blend=reproject.guide_blend))
        self.weight_free = ReprojectGenerator(reproject)
        self.net: UNet | None = None
        self.losses: list[float] = []
        self.strength = 1.0  # the gate's choice, set by prepare (0: the base passes through)
        self.declined = False  # set by prepare: the reprojection passes through
        self.segment_strengths: list[float | None] = []  # per refine call: the trusted strength (None: reprojection)
        self.validation: Validation | None = None

    @classmethod
    def from_config(cls, config: GeneratorConfig) -> RefineGenerator:
        """The refiner a job's generator config asks for (``refine_seconds``; the seed comes with ``prepare``)."""
        return cls(RefineConfig(seconds=float(config.refine_seconds)))

    @classmethod
    def preparation_cost(
        cls, config: GeneratorConfig, num_captures: int | None, *, has_guide: bool
    ) -> tuple[float, float]:
        """What :meth:`prepare` adds to a job, for the time budget (``backend.budget``): the leave-out
        guides in lengths of the job's fit (``fit_share`` each; every set's steps counted, as a CPU
        spends them even in lockstep; none without a guide) and the training's seconds.
        ``num_captures`` None: as many subsets as ``max_fits`` allows. The subsets' memories, like the
        job's own, fall in the budget's share outside the fits (with ``patchmatch``, one COLMAP run each).

        Example:
            >>> from backend.generators import GeneratorConfig
            >>> fits, seconds = RefineGenerator.preparation_cost(GeneratorConfig("refine"), 3, has_guide=True)
            >>> round(fits, 3), seconds  # 3 leave-out guides of a fifth of the fit, 10 s of training
            (0.6, 10.0)
        """
        rc = cls.from_config(config).config
        subsets = rc.max_fits if num_captures is None else len(leave_out_subsets(max(num_captures, 2), rc.max_fits))
        return (subsets * rc.fit_share if has_guide else 0.0), rc.seconds

    def prepare(
        self,
        captures: Views,
        cfg: LoopConfig,
        *,
        device: torch.device | str,
        progress: WorkProgress | None = None,
        notes: list[str] | None = None,
    ) -> None:
        """Build the leave-out pairs, train a fresh network on them and choose its strength.

        Args:
            captures: the captures at the working size (images [C, H, W, 3], cameras, ids 0..C-1,
                masks when they have them).
            cfg: the loop's config (its estimator, memory, guide, fit, render and retrieval settings
                are mirrored; each subset builds its own memory, so the job's is not needed).
            device: where the fits and the network run.
            progress: ``progress(fraction, message)``, fraction of this preparation in [0, 1]; it
                may raise (e.g. ``backend.progress.Cancelled``) to stop.
            notes: the job's notes; the gate's line (:attr:`Validation.note`) is appended, and a line for
                a leave-out subset whose memory fell back.
        """
        device = torch.device(device)

        def part(lo: float, hi: float) -> WorkProgress | None:
            if progress is None:
                return None
            return lambda f, msg: progress(lo + (hi - lo) * f, msg)

        self.config = replace(self.config, seed=cfg.seed)
        self.net, self.strength, self.declined, self.validation, self.losses = None, 1.0, False, None, []
        self.segment_strengths = []
        pairs = make_pairs(
            captures, cfg, self.config, self.reproject, device=device, progress=part(0.0, 0.5), notes=notes
        )
        training, validation, held_out = split_validation(pairs, self.config.seed)
        torch.manual_seed(self.config.seed)
        net = UNet(IN_CHANNELS, OUT_CHANNELS, self.config.widths).to(device)
        with torch.no_grad():  # the error output starts at confidence_error (confidence e^-1)
            net.head.bias[1] = math.log(math.expm1(self.config.confidence_error))
        self.losses = train_refiner(net, training, self.config, progress=part(0.5, 1.0))
        strength, declined, l1_input, l1, change, noise = validate(net, validation, self.config)
        self.net, self.strength, self.declined = net, strength, declined
        self.validation = Validation(
            target_ids=sorted(set(validation.target_ids)),
            held_out=held_out,
            train_pairs=len(training),
            l1_input=l1_input,
            strengths=tuple(float(a) for a in self.config.strengths),
            l1=tuple(l1),
            strength=strength,
            change=change,
            noise=noise,
            declined=declined,
        )
        note = self.validation.note
        log.info(note)
        if notes is not None:
            notes.append(note)
        if progress is not None:
            progress(1.0, note)

    def refine(self, frames: Frames, renders: Renders) -> Frames:
        """The network on the reprojection and the (guided) render, at the gate's ``strength``.

        Args:
            frames: the reprojection: images [F, H, W, 3], confidence [F, H, W].
            renders: the render it was made from (rgb [F, H, W, 3], mask [F, H, W]).
        Returns:
            Frames: images float32 [F, H, W, 3] in [0, 1], ``base + strength * (refined - base)``
            (:func:`base_frames`), with the network's confidence float32 [F, H, W] (module docstring).
        """
        if self.net is None:
            raise RuntimeError("refine: the network is not trained; call prepare(captures, cfg) first")
        if self.declined:
            self.segment_strengths.append(None)
            return Frames(images=frames.images, confidence=frames.confidence)
        refined, error = predict(self.net, frames.images, frames.confidence, renders.rgb, renders.mask)
        base = base_frames(frames.images, renders.rgb, renders.mask)
        strength = self.trusted_strength(frames.images, base, refined)
        self.segment_strengths.append(strength)
        if strength is None:
            return Frames(images=frames.images, confidence=frames.confidence)
        images = torch.lerp(base, refined, strength)
        confidence = torch.exp(-error / self.config.confidence_error)
        return Frames(images=images.contiguous(), confidence=confidence.contiguous())

    def trusted_strength(self, frames: Tensor, base: Tensor, refined: Tensor) -> float | None:
        """The gate's strength, or less where the segment's frames would move further from the
        reprojection than the validation frames did (``RefineConfig.max_change_ratio``).

        The validation pair is made from fewer captures and a shorter guide than the trajectory's
        frames, so it vouches only for corrections of the size it saw: on the H200 (run 24) the
        temple's trajectory frames moved 2.0-2.4 times as far as their validation frames and lost
        3.7-4.4 dB, where the fern's and the door's moved 0.7-1.0 times as far and gained. In run 25
        it lowered one temple run of three (1 -> 0.75) and let through one that moved 1.46 times as far
        and lost 3.2 dB: it bounds the damage of an oversized correction, not a wrong one of the
        validated size. Without a validation (a network set by hand) or with the ratio 0, the gate's
        strength stands.

        Args:
            frames: the reprojection. [F, H, W, 3]
            base: :func:`base_frames`. [F, H, W, 3]
            refined: the network's frames. [F, H, W, 3]
        Returns:
            the largest of ``strengths`` up to the gate's whose blend stays within the trust region,
            or None: even the base leaves it, and the reprojection passes through.
        """
        cfg, v = self.config, self.validation
        if v is None or cfg.max_change_ratio == 0.0:
            return self.strength
        limit = cfg.max_change_ratio * v.change
        for a in sorted((a for a in cfg.strengths if a <= self.strength), reverse=True):
            change = float((torch.lerp(base, refined, a) - frames).abs().mean())
            if change <= limit:
                if a < self.strength:
                    log.info(
                        "refiner: strength %g -> %g in a segment (change %.4f, validated %.4f)",
                        self.strength,
                        a,
                        change,
                        v.change,
                    )
                return float(a)
        log.info("refiner: the reprojection passes through a segment (the base changes it beyond %.4f)", limit)
        return None

    @property
    def segments_note(self) -> str | None:
        """One line for the job's notes after the segments: where the trust region lowered the gate's
        strength (None where every segment kept it, or the refiner declined)."""
        if self.declined:
            return None
        lowered = [a for a in self.segment_strengths if a != self.strength]
        if not lowered:
            return None
        what = ", ".join("the reprojection passed through" if a is None else f"{a:g}" for a in lowered)
        return (
            f"refiner: the trust region lowered strength {self.strength:g} in {len(lowered)} of "
            f"{len(self.segment_strengths)} segments ({what}): their frames moved further from the "
            f"reprojection than {self.config.max_change_ratio:g} times the validation frames did"
        )

    def generate(
        self, cond: ConditionVideo, *, num_steps: int = 1, seed: int = 0, progress: GenerateProgress | None = None
    ) -> Frames:
        """Reproject, then refine; where the refiner does not act (it declined, or the trust region passes
        the segment through) the weight-free generator's frames (``num_steps`` and ``seed`` are unused:
        deterministic)."""
        if self.declined:
            self.segment_strengths.append(None)
            return self.weight_free.generate(cond)
        out = self.refine(self.reproject.generate(cond), cond.renders)
        # passed through: the two reprojections differ only where an ensemble guide covers
        if self.segment_strengths[-1] is None and bool((cond.renders.source == ENSEMBLE_SOURCE).any()):
            return self.weight_free.generate(cond)
        return out

    def save(self, path: Path) -> None:
        """Write the trained network's weights, config and gate strength (a torch dict) to ``path``."""
        if self.net is None:
            raise RuntimeError("refine: nothing to save; the network is not trained")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "config": self.config.__dict__,
                "strength": self.strength,
                "declined": self.declined,
                "state_dict": self.net.state_dict(),
            },
            path,
        )
