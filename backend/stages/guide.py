"""Step 1b of the loop (ours): the guide, Gaussians fitted on the captures alone.

The point memory is thin where the captures are far apart; Gaussians fitted on the captures give
the generator dense colour and expected depth there. Wherever the guide is opaque its render
replaces the memory's; elsewhere the memory's render stays. The memory's own render still feeds
retrieval, the memory update and overview.png.

With ``members`` above 1 the guide is a self-ensemble: that many Gaussian sets fitted on the captures
in lockstep with seeds ``seed, seed + 1, ...`` (their frame order and Gaussian dropout differ), rendered
as their mean. Where 3 captures pin the Gaussians down the members agree; where they leave them free
each member errs its own way, and their mean errs less than any one of them: colour a single
captures-only fit does not have, which the loop's fit then takes in through the frames. With
``member_points`` below 1 the members are bagged: each starts from its own random share of M's
points, so they differ by more than their seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..types import ENSEMBLE_SOURCE, GUIDE_SOURCE, Cameras, GeometryMemory, Renders, Views
from .fit import FitConfig, FitViews, Gaussians, fit_gaussians_many, render_gaussians_geometry


@dataclass(frozen=True)
class GuideConfig:
    """The guide's settings.

    Attributes:
        enabled: fit the guide (job setting ``guide``); off: the point render alone, as AnyRecon.
        alpha: Gaussian opacity from which a guide pixel counts as covered.
        members: Gaussian sets in the guide (module docstring); 1: one captures-only fit.
        member_points: the share of M's points each member starts from, its own random subset
            (:func:`member_memory`); 1: all of them.

    A job takes ``members`` and ``member_points`` from its rasterizer (:func:`rasterizer_guide`,
    ``LoopConfig.from_settings``).
    """

    enabled: bool = True
    alpha: float = 0.5
    members: int = 1
    member_points: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"GuideConfig.alpha must be in (0, 1]; got {self.alpha}")
        if self.members < 1:
            raise ValueError(f"GuideConfig.members must be at least 1; got {self.members}")
        if not 0.0 < self.member_points <= 1.0:
            raise ValueError(
                f"GuideConfig.member_points is a share of the memory's points in (0, 1]; got {self.member_points}"
            )


ENSEMBLE_MEMBERS = 3  # the guide's sets where the fit runs on gsplat (CUDA): run 39, docs/benchmarks.md
MEMBER_POINTS = 0.4  # the share of M each of them starts from there: runs 52 and 59, docs/benchmarks.md


def rasterizer_guide(guide: GuideConfig, rasterizer: str) -> GuideConfig:
    """``guide`` with the members a job fitted with ``rasterizer`` takes.

    On gsplat: ``ENSEMBLE_MEMBERS`` sets, fitted in one rasterizer call per step (3 sets took 1.9x one
    set's time at the bench job's 896x512 on the H200, the job 54.5 s; run 40; the loop's Gaussians +0.12
    fern, +0.30 temple, +0.49 door over one set, runs 39-40), each from its own ``MEMBER_POINTS`` of M
    (half of M: the loop's Gaussians +0.19 temple, +0.22 fern, every seed, over members from all of M; run 52
    on an H100, 3000 steps; the members fit faster from fewer points, run 50). 0.4 over 0.5: temple +0.20, fern
    +0.10, door +0.05, every seed of each (run 59). 0.3 splits the scenes (temple +0.12 to +0.15, fern +0.13,
    door -0.16, every seed; runs 53, 57, 58), 0.2 loses (temple -0.24) and 0.7 too (temple -0.03, run 53).
    On the CPU rasterizer: one set from all of M. There each set costs a whole fit: with 3 frames a step,
    3 sets gave the CPU loop +0.27 dB on the fern and -0.26 on the temple for twice a row's time
    (docs/benchmarks.md, "3 frames a step on the CPU"), and a CPU job's time budget would pay for them
    with steps; one set from half of M loses (temple seed 0: -0.36)."""
    if rasterizer == "gsplat":
        return replace(guide, members=ENSEMBLE_MEMBERS, member_points=MEMBER_POINTS)
    return replace(guide, members=1, member_points=1.0)


def member_memory(memory: GeometryMemory, share: float, seed: int) -> GeometryMemory:
    """Member ``seed``'s start: each of M's points kept with probability ``share``, drawn on the CPU from
    ``seed`` (the same subset on every device); all of M at share 1."""
    if share >= 1.0:
        return memory
    gen = torch.Generator().manual_seed(seed)
    return memory.select((torch.rand(len(memory), generator=gen) < share).to(memory.device))


def fit_guide(
    captures: Views,
    memory: GeometryMemory,
    fit_cfg: FitConfig,
    cfg: GuideConfig,
    *,
    device: torch.device | str,
    ready: Sequence[Gaussians] = (),
    progress: Callable[[int, float], None] | None = None,
) -> list[Gaussians]:
    """The guide's ``cfg.members`` Gaussian sets, fitted on the captures alone (confidence 1) from the
    memory M, in lockstep; member k seeded ``fit_cfg.seed + k`` and started from
    :func:`member_memory` with that seed. The ``ready`` ones (members 0, 1, ... fitted so already, e.g.
    an evaluation's captures-only fit where the members start from all of M, or a guide fitted here
    before) are kept and not fitted again."""
    todo = list(range(len(ready), cfg.members))
    if not todo:
        return list(ready[: cfg.members])
    fitted = fit_gaussians_many(
        [FitViews.from_views(captures)] * len(todo),
        [member_memory(memory, cfg.member_points, fit_cfg.seed + k) for k in todo],
        fit_cfg,
        device=device,
        progress=progress,
        seeds=[fit_cfg.seed + k for k in todo],
    )
    return [*ready, *fitted]


def render_guide(
    guide: Sequence[Gaussians], cams: Cameras, fit_cfg: FitConfig, cfg: GuideConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """The guide's colour [C, H, W, 3] (its members' mean), expected depth [C, H, W] (theirs,
    weighted by their opacity), the depth 0 where it is not opaque (the members' mean opacity below
    ``cfg.alpha``), and its members' spread [C, H, W]: the standard deviation of their colours, mean
    over channels (0 with one member). Where 3 captures-only fits disagree, none of them is pinned down
    by the captures: on the CPU's temple and fern (160x120, 2 seeds) the spread's correlation with the
    mean colour's error at held-out views is 0.50-0.65, the error 10-400 times larger in the top
    tenth of the spread than in its lowest quarter. Yet neither as a weight on the frames (run 49) nor
    as a chooser of where the frames beat the guide (``scripts/frames_chooser.py``) did it pay
    (docs/benchmarks.md); the loop takes the colour and the depth."""
    rgb, depth, alpha = (
        torch.stack(parts) for parts in zip(*(render_gaussians_geometry(g, cams, fit_cfg) for g in guide))
    )
    mean_alpha = alpha.mean(0)
    depth = (alpha * depth).sum(0) / alpha.sum(0).clamp_min(1e-6)
    spread = rgb.std(0, correction=0).mean(-1)
    return rgb.mean(0), torch.where(mean_alpha >= cfg.alpha, depth.clamp_min(0.0), torch.zeros_like(depth)), spread


def guided_renders(
    renders: Renders, guide: Sequence[Gaussians], targets: Cameras, fit_cfg: FitConfig, cfg: GuideConfig
) -> Renders:
    """The memory's renders with the guide's colour and expected depth where it is opaque
    (:func:`render_guide`); those pixels have source ``GUIDE_SOURCE``, or ``ENSEMBLE_SOURCE`` where the
    guide has several members (the generator trusts their mean colour more). Where it is transparent and
    the memory empty, the generator's depth guess and reprojection stay: the guide's own colour and a far
    depth there (``empty_far``, docs/benchmarks.md "Where the guide is transparent") lost on the CPU.
    Shapes as :class:`Renders` [C, H, W(, 3)]."""
    rgb, depth, _ = render_guide(guide, targets, fit_cfg, cfg)
    opaque = depth > 0
    code = ENSEMBLE_SOURCE if len(guide) > 1 else GUIDE_SOURCE
    return Renders(
        rgb=torch.where(opaque[..., None], rgb, renders.rgb),
        depth=torch.where(opaque, depth, renders.depth),
        mask=renders.mask | opaque,
        source=torch.where(opaque, torch.full_like(renders.source, code), renders.source),
    )
