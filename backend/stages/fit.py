"""Fit 3D Gaussians to captures and generated frames (DESIGN.md section 1 step 7).

ReconX's confidence-aware fitting on gsplat's training recipe (``examples/simple_trainer.py``):

1. initialise one Gaussian per memory point: centre at the point, isotropic scale from the mean
   distance to its nearest neighbours, colour from the point's rgb (SH band 0), opacity 0.1;
2. each step, render a batch of frames with the named rasterizer (``gsplat`` on CUDA, ``torch_cpu``
   elsewhere) and take the loss per frame ``C * (0.8 L1 + 0.2 (1 - SSIM))`` with C the per-pixel
   confidence (captures 1, generated frames their generator confidence), plus ``0.5 LPIPS``
   weighted by the frame's mean confidence when LPIPS weights exist on this machine;
3. Adam per parameter group with simple_trainer's learning rates (centres scaled by the scene
   size and decayed to 1 %), the SH degree raised every ``sh_degree_interval`` steps;
4. densify and prune by the strategy ``strategy`` names, ``mcmc`` by default on either rasterizer, or
   ``gsplat.strategy.DefaultStrategy`` (``strategy="default"``; its
   running state from ``initialize_state``, hooks around the backward pass) or keep the set
   fixed (``strategy="none"``). The strategy only needs ``meta`` from the rasterizer, which both
   rasterizers give, so it runs on CPU as well. ``strategy="mcmc"`` is gsplat's ``MCMCStrategy``
   (3DGS as MCMC, Kheradmand et al. 2024): no splits or clones by gradient; Gaussians whose opacity
   falls below ``prune_opa`` are moved onto live ones, 5 % more are added at every refinement
   (:meth:`FitConfig.refine_steps`) up to a cap (``mcmc_cap``, or ``mcmc_growth`` x the initial count
   when that is more), every centre gets noise scaled by its transparency and the centres' learning
   rate, and the loss adds
   ``mcmc_opacity_reg x mean opacity + mcmc_scale_reg x mean scale`` (simple_trainer's recipe). Its
   two CUDA kernels have torch versions for sets off CUDA (:mod:`backend.stages.mcmc_torch`).

Regularisers for few views that need no learned weights (each a FitConfig field):

- **Gaussian dropout** (DropGaussian, Park et al. 2025): each training step drops every Gaussian
  with probability r and divides the kept ones' opacities by 1 - r (capped at 1), so the expected
  opacity of each is unchanged; r rises linearly from 0 to ``dropout_rate`` over the run. Renders
  outside training use every Gaussian.
- **SH degree**: ``sh_degree`` caps view-dependent colour (3 views cannot pin it down) and
  ``sh_degree_interval`` schedules its rise.
- **Random background behind masks**: when the views carry masks (``FitViews.masks``) and
  ``has_random_background`` is on, each step draws one random colour per frame, composites the
  render over it and puts it into the target's masked-out pixels: no Gaussian can explain the
  backdrop, so none learns it.

Pixels of zero confidence do not pull the fit: they are out of the L1 term, and inside the SSIM
(and LPIPS) windows both the prediction and the target there are replaced by the current render,
without gradient, so the loss does not depend on their target at all.

Parameters are stored raw (log scales, opacity logits, unnormalised quaternions, SH) under
gsplat's names (``means scales quats opacities sh0 shN``) and activated before rendering.

:func:`fit_gaussians_many` fits several independent sets at once, in lockstep (the refiner's
leave-out guides): one rasterizer call per step draws every set's batch (padded, stacked on a leading
batch dimension), one loss call scores them, and each set keeps its own parameters, optimizers,
strategy state and random sources. :func:`fit_gaussians` is its one-set case.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from protocol.ply import MAX_SH_DEGREE, GaussianArrays

from ..budget import thin_memory
from ..metrics import LpipsFn, load_lpips, ssim_map
from ..progress import PROGRESS_INTERVAL_S
from ..rasterizers import RASTERIZERS, Rasterizer
from ..rasterizers.sh import num_sh_bases, rgb_to_sh, sh_to_colors
from ..types import Cameras, GeometryMemory, Views

log = logging.getLogger(__name__)

STRATEGIES = ("default", "mcmc", "none")
KNN_MIN_DISTANCE = 1e-7  # floor of the neighbour distance (duplicate points), world units
FLANN_KDTREE_SINGLE_INDEX = 4  # cv2.flann's FLANN_INDEX_KDTREE_SINGLE: one k-d tree, exact for low dimensions
FLANN_CHECKS_UNLIMITED = -1  # search every leaf the bounds cannot rule out: exact neighbours
SCENE_SCALE_MARGIN = 1.1  # simple_trainer: scene scale = 1.1 x largest camera distance from their centroid
RENDER_CHUNK = 8  # cameras rendered at once by render_gaussians
IDENTITY_QUAT = (1.0, 0.0, 0.0, 0.0)  # w x y z
ADAM_BETAS = (0.9, 0.999)  # torch defaults, as simple_trainer
MAX_BATCH_SIZE = 10  # frames per step where simple_trainer's scaling of the betas leaves beta1 at 0
ADAM_EPS = 1e-15  # simple_trainer
PAD_SCALE = 1e-6  # axis scale of the stand-ins that pad a lockstep fit's sets to one size (opacity 0: never drawn)


@dataclass(frozen=True)
class FitConfig:
    """Gaussian fitting settings; defaults follow gsplat's simple_trainer unless noted.

    Attributes:
        iterations: optimisation steps (the issue's GPU target: 3000 in under 45 s).
        batch_size: frames per step, 1..:data:`MAX_BATCH_SIZE`, or all of a set's frames where it has
            fewer. Learning rates scale with the square root of the frames a step draws and Adam's moments
            decay faster, as simple_trainer (beta1 = 1 - frames x 0.1, so the rule stops at 10). 3 on
            every rasterizer: on gsplat, which draws them in one call, the loop's Gaussians +0.63 dB on the
            temple, +0.47 on the door and +0.19 on the fern over one frame a step (runs 46-47, 3 seeds);
            on the CPU, with its compositing in numba, +1.77 (temple) and +1.05 dB (fern), 3 seeds, at 2.3-2.9 times
            a row's time, and ``make demo`` 29.5 dB against 26.1 in its 3-minute budget
            (docs/benchmarks.md, "3 frames a step on the CPU").
        sh_degree: highest SH degree fitted, 0..3.
        sh_degree_interval: the SH degree used rises by one every this many steps.
        rasterizer: ``gsplat`` (CUDA) or ``torch_cpu`` (see backend.rasterizers).
        strategy: ``default`` (gsplat's DefaultStrategy: clone, split, prune), ``mcmc`` (gsplat's
            MCMCStrategy, module docstring; the default) or ``none``. With Gaussian dropout 0.1, ``mcmc``
            beat ``default`` on every scene's loop by +0.42 to +0.70 dB on the H200 (docs/benchmarks.md,
            run 21), and on the CPU rasterizer too ("MCMC on the CPU"), where it was ``default`` before.
        mcmc_cap, mcmc_noise_lr, mcmc_opacity_reg, mcmc_scale_reg: ``mcmc``'s Gaussian count at most
            (also at most ``max_gaussians`` when that is set), its noise scale and its two
            regularisers' weights (simple_trainer's values but the cap).
        mcmc_growth: ``mcmc``'s cap is at least this x the initial Gaussians, so a memory larger than
            ``mcmc_cap`` can still grow (MCMC only adds below its cap): the door's plane-sweep memory
            starts with 241k points, and a cap of 300k there gave the loop +0.25 dB over 100k (3 seeds,
            docs/benchmarks.md run 43; the fern's 65k and the rings' 21-25k stay under the cap with
            growth as well as without). 1: a memory above the cap never grows.
        means_lr: centre learning rate, times the scene scale; decays exponentially to
            ``means_lr_final_factor`` of it over the run.
        scales_lr, quats_lr, opacities_lr, sh0_lr, shN_lr: the other groups' learning rates.
        init_opacity: opacity of every initial Gaussian.
        init_scale: initial scale = this x the mean distance to the ``knn`` nearest points.
        knn: neighbours averaged for the initial scale.
        l1_weight, ssim_weight, lpips_weight: ReconX's loss weights 0.8 / 0.2 / 0.5; LPIPS only
            when :func:`backend.metrics.load_lpips` finds weights (``lpips_path`` or the
            ``RECONLOOP_LPIPS`` environment variable).
        refine_start, refine_stop, refine_every: the densification schedule (both strategies) as shares
            of the run's ``iterations`` (:meth:`refine_steps`): from step 500 to 2000 every 100 in a
            3000-step fit, and the same shares in a shorter one (a CPU job's 400 steps: 67 to 267
            every 13; counted from a fixed step 500 a fit under 600 steps never densified, and on the
            CPU MCMC on these shares gave the loop +0.65 dB (temple) and +1.17 (fern) over that:
            docs/benchmarks.md, "MCMC on the CPU").
            gsplat's defaults are for 30k steps (refine until 15k); ours stop at two thirds so that the
            fit keeps a third of its steps for the final set.
        reset_every, grow_grad2d, grow_scale3d, prune_opa, prune_scale3d: DefaultStrategy's opacity
            reset (in steps) and thresholds. ``grow_grad2d`` is 5x
            gsplat's 0.0002: with 3 captures fewer clones and splits fit better on every scene
            but the door, which stays level (docs/benchmarks.md, run 19: the loop +0.18 to +0.40 dB).
            ``reset_every`` (opacity reset) lies past the refinement's stop, so it never fires (nor
            would it in gsplat 1.5.3 at all: a bitwise ``&`` in its condition, fixed upstream by PR 776).
        background: colour behind the Gaussians, RGB in [0, 1].
        capture_share: when captures are fitted together with generated frames
            (:func:`captures_and_frames`), about this fraction of the steps draw a capture: a few
            captures beside many frames would otherwise be seen rarely, and they are the only views
            known to be right.
        dropout_rate: Gaussian dropout's final rate (module docstring); 0 = off. 0.1 won on every
            scene's loop with either strategy (run 21; DropGaussian's own rate for LLFF), 0.2 beat
            0.1 on the fern (+0.16 dB) and temple (+0.24) in every seed, 0.3 no further (run 22).
        has_random_background: with masks, masked-out pixels see a random colour (module docstring).
        max_gaussians: cap on the Gaussians, 0 for none: the memory is thinned to it on a voxel grid
            before the fit (backend.budget.thin_memory) and densification prunes the least opaque
            beyond it. Set from the time budget (backend.budget.plan_budget).
        seed: seeds the frame order and DefaultStrategy's splits.
        progress_every: the progress callback is called every this many steps (and at the end), and after
            any step that ends ``PROGRESS_INTERVAL_S`` after the last call (slow steps: large fits on a CPU).
    """

    iterations: int = 3000
    batch_size: int = 3
    sh_degree: int = 3
    sh_degree_interval: int = 1000
    rasterizer: str = "gsplat"
    strategy: str = "mcmc"
    mcmc_cap: int = 100_000
    mcmc_growth: float = 1.25
    mcmc_noise_lr: float = 5e5
    mcmc_opacity_reg: float = 0.01
    mcmc_scale_reg: float = 0.01
    means_lr: float = 1.6e-4
    means_lr_final_factor: float = 0.01
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    init_opacity: float = 0.1
    init_scale: float = 1.0
    knn: int = 3
    l1_weight: float = 0.8  # ReconX
    ssim_weight: float = 0.2  # ReconX; simple_trainer's ssim_lambda is 0.2 too
    lpips_weight: float = 0.5  # ReconX
    lpips_path: str | None = None
    refine_start: float = 500 / 3000
    refine_stop: float = 2000 / 3000
    refine_every: float = 100 / 3000
    reset_every: int = 3000
    grow_grad2d: float = 0.001
    grow_scale3d: float = 0.01
    prune_opa: float = 0.005
    prune_scale3d: float = 0.1
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    capture_share: float = 0.5
    dropout_rate: float = 0.2
    has_random_background: bool = True
    max_gaussians: int = 0
    seed: int = 0
    progress_every: int = 50

    def __post_init__(self) -> None:
        positive = (
            "iterations",
            "batch_size",
            "sh_degree_interval",
            "knn",
            "reset_every",
            "progress_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ValueError(
                f"FitConfig.batch_size must be at most {MAX_BATCH_SIZE} (Adam's first beta, "
                f"1 - batch_size x {1 - ADAM_BETAS[0]:.1f} as simple_trainer scales it, would be negative); "
                f"got {self.batch_size}"
            )
        if not 0 <= self.sh_degree <= MAX_SH_DEGREE:
            raise ValueError(f"FitConfig.sh_degree must be in 0..{MAX_SH_DEGREE}; got {self.sh_degree}")
        if self.rasterizer not in RASTERIZERS.names():
            raise ValueError(
                f"FitConfig.rasterizer must be one of {', '.join(RASTERIZERS.names())}; got {self.rasterizer!r}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"FitConfig.strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if not 0.0 <= self.refine_start <= self.refine_stop <= 1.0:
            raise ValueError(
                "FitConfig.refine_start and refine_stop are shares of the run, 0 <= start <= stop <= 1; "
                f"got {self.refine_start} and {self.refine_stop}"
            )
        if not 0.0 < self.refine_every <= 1.0:
            raise ValueError(f"FitConfig.refine_every is a share of the run in (0, 1]; got {self.refine_every}")
        if self.mcmc_cap < 1:
            raise ValueError(f"FitConfig.mcmc_cap must be >= 1; got {self.mcmc_cap}")
        if not self.mcmc_growth >= 1.0:
            raise ValueError(
                f"FitConfig.mcmc_growth must be >= 1 (1: a memory above the cap never grows); got {self.mcmc_growth}"
            )
        if not 0.0 <= self.capture_share < 1.0:
            raise ValueError(f"FitConfig.capture_share must be in [0, 1); got {self.capture_share}")
        if self.max_gaussians < 0:
            raise ValueError(f"FitConfig.max_gaussians must be >= 0 (0: no cap); got {self.max_gaussians}")
        if not 0.0 < self.init_opacity < 1.0:
            raise ValueError(f"FitConfig.init_opacity must be in (0, 1); got {self.init_opacity}")
        for f in fields(self):
            if f.name.endswith(("_lr", "_weight", "_reg")) or f.name == "init_scale":
                if getattr(self, f.name) < 0:
                    raise ValueError(f"FitConfig.{f.name} must be >= 0; got {getattr(self, f.name)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"FitConfig.dropout_rate must be in [0, 1); got {self.dropout_rate}")
        if len(self.background) != 3:
            raise ValueError(f"FitConfig.background must be 3 floats; got {self.background!r}")

    def refine_steps(self) -> tuple[int, int, int]:
        """The densification schedule in steps of this run: (start, stop, every), every >= 1."""
        n = self.iterations
        return round(self.refine_start * n), round(self.refine_stop * n), max(1, round(self.refine_every * n))


def default_rasterizer(device: torch.device | str) -> str:
    """The rasterizer name for a device, for entry points that pick the device: gsplat on CUDA."""
    return "gsplat" if torch.device(device).type == "cuda" else "torch_cpu"


@dataclass
class Gaussians:
    """3D Gaussians, raw parameters (activated before rendering).

    Attributes:
        means: centres, world. float32 [N, 3]
        log_scales: natural logs of the axis scales. float32 [N, 3]
        quats: rotations w x y z, not necessarily unit. float32 [N, 4]
        opacity_logits: logits of the opacities. float32 [N]
        sh: SH coefficients; ``sh[:, 0]`` is the base colour's (rgb = 0.5 + SH_C0 sh[:, 0]). float32 [N, K, 3]
    """

    means: Tensor
    log_scales: Tensor
    quats: Tensor
    opacity_logits: Tensor
    sh: Tensor

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def sh_degree(self) -> int:
        return int(round(math.sqrt(self.sh.shape[1]))) - 1

    def to(self, device: torch.device | str) -> Gaussians:
        return Gaussians(*(getattr(self, f.name).to(device) for f in fields(self)))

    def detach(self) -> Gaussians:
        return Gaussians(*(getattr(self, f.name).detach() for f in fields(self)))

    def select(self, keep: Tensor) -> Gaussians:
        """The Gaussians where ``keep`` (bool [N] or indices) holds."""
        return Gaussians(*(getattr(self, f.name)[keep] for f in fields(self)))


@dataclass
class FitViews:
    """What the Gaussians are fitted to: images, their cameras and per-pixel confidence.

    Attributes:
        images: colours in [0, 1]. float32 [F, H, W, 3]
        cams: their cameras (width, height match the images).
        confidence: per-pixel weight in [0, 1]; 1 for captures. float32 [F, H, W]
        masks: True where a pixel is the object (or what to keep); masked-out pixels see a random
            background (``FitConfig.has_random_background``); None: every pixel. bool [F, H, W]
    """

    images: Tensor
    cams: Cameras
    confidence: Tensor
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @staticmethod
    def from_views(views: Views, confidence: Tensor | None = None) -> FitViews:
        """Views with a confidence map (default: ones, as for captures)."""
        if confidence is None:
            confidence = torch.ones(views.images.shape[:3], dtype=views.images.dtype, device=views.images.device)
        return FitViews(views.images, views.cams, confidence, masks=views.masks)

    @staticmethod
    def cat(items: Sequence[FitViews]) -> FitViews:
        masks = None
        if any(v.masks is not None for v in items):
            masks = torch.cat(
                [
                    torch.ones(v.images.shape[:3], dtype=torch.bool, device=v.images.device)
                    if v.masks is None
                    else v.masks
                    for v in items
                ]
            )
        return FitViews(
            torch.cat([v.images for v in items]),
            Cameras.cat([v.cams for v in items]),
            torch.cat([v.confidence for v in items]),
            masks,
        )

    def check(self) -> None:
        f = len(self)
        h, w = self.cams.height, self.cams.width
        if self.images.ndim != 4 or tuple(self.images.shape[1:]) != (h, w, 3):
            raise ValueError(
                f"fit: views.images must be [F, {h}, {w}, 3] (the cameras' size); got {tuple(self.images.shape)}"
            )
        if len(self.cams) != f:
            raise ValueError(f"fit: views has {f} images but {len(self.cams)} cameras")
        if tuple(self.confidence.shape) != (f, h, w):
            raise ValueError(f"fit: views.confidence must be [{f}, {h}, {w}]; got {tuple(self.confidence.shape)}")
        if f == 0:
            raise ValueError("fit: views has no images")
        lo, hi = float(self.confidence.min()), float(self.confidence.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"fit: views.confidence must be in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
        if self.masks is not None and (self.masks.dtype != torch.bool or tuple(self.masks.shape) != (f, h, w)):
            raise ValueError(
                f"fit: views.masks must be bool [{f}, {h}, {w}]; got {self.masks.dtype} {tuple(self.masks.shape)}"
            )


def captures_and_frames(captures: Views, frames: FitViews, capture_share: float) -> FitViews:
    """Captures (confidence 1), repeated so that about ``capture_share`` of the list are captures,
    followed by the generated frames. [C * repeats + F]"""
    C, F_ = len(captures), len(frames)
    repeats = 1
    if capture_share > 0:
        repeats = max(1, math.ceil(capture_share / (1.0 - capture_share) * F_ / max(C, 1)))
    return FitViews.cat([FitViews.from_views(captures)] * repeats + [frames])


def knn_mean_distance(xyz: Tensor, k: int) -> Tensor:
    """Mean distance of each point to its k nearest other points: an exact k-d tree search on the host
    (OpenCV's FLANN, a single k-d tree searched without a limit on the leaves checked). The fern's 65k
    memory points take 0.04 s on 2 CPU cores, where the exhaustive float32 ``torch.cdist`` search before
    it took 8-11 s and erred by up to 12 % (``scripts/bench_knn.py``; docs/benchmarks.md).

    Args:
        xyz: points, world. [N, 3]
        k: neighbours (fewer when N <= k).

    Returns:
        mean distance, at least KNN_MIN_DISTANCE, on ``xyz``'s device. [N]
    """
    import cv2

    n = xyz.shape[0]
    k_eff = min(k, n - 1)
    if k_eff < 1:
        return torch.ones(n, dtype=xyz.dtype, device=xyz.device)
    points = np.ascontiguousarray(xyz.detach().to("cpu", torch.float32).numpy())
    index = cv2.flann_Index(points, {"algorithm": FLANN_KDTREE_SINGLE_INDEX, "leaf_max_size": 10})
    _, dist2 = index.knnSearch(points, k_eff + 1, params={"checks": FLANN_CHECKS_UNLIMITED})
    # the first neighbour is the point itself (or a duplicate of it: the same distance, 0)
    nearest = torch.from_numpy(np.sqrt(np.maximum(dist2[:, 1:], 0.0)).mean(axis=1))
    return nearest.to(device=xyz.device, dtype=xyz.dtype).clamp_min(KNN_MIN_DISTANCE)


def init_gaussians(memory: GeometryMemory, cfg: FitConfig) -> Gaussians:
    """One Gaussian per memory point: isotropic k-NN scale, SH band 0 from rgb, ``init_opacity``.

    Args:
        memory: the geometry memory (xyz [N, 3], rgb [N, 3] in [0, 1]); its device is used.
        cfg: fitting settings (``sh_degree``, ``init_scale``, ``knn``, ``init_opacity``).

    Returns:
        Gaussians with sh [N, (sh_degree + 1)^2, 3], higher bands zero.
    """
    n = len(memory)
    if n == 0:
        raise ValueError("fit: the geometry memory is empty; there is nothing to start the Gaussians from")
    xyz = memory.xyz.float()
    bad = int((~torch.isfinite(xyz).all(dim=1)).sum())
    if bad:
        raise ValueError(f"fit: memory.xyz holds {bad} of {n} points with a non-finite coordinate")
    dist = knn_mean_distance(xyz, cfg.knn)  # [N]
    log_scales = torch.log(dist * cfg.init_scale).unsqueeze(-1).repeat(1, 3)
    quats = torch.tensor(IDENTITY_QUAT, device=xyz.device).repeat(n, 1)
    opacity_logits = torch.full((n,), math.log(cfg.init_opacity / (1.0 - cfg.init_opacity)), device=xyz.device)
    sh = torch.zeros(n, num_sh_bases(cfg.sh_degree), 3, device=xyz.device)
    sh[:, 0] = rgb_to_sh(memory.rgb.float().clamp(0.0, 1.0))
    return Gaussians(xyz.clone(), log_scales, quats, opacity_logits, sh)


def gaussians_to_arrays(g: Gaussians) -> GaussianArrays:
    """The .ply arrays of ``g`` (float32 numpy, raw parameters; protocol.ply's layout)."""

    def np32(t: Tensor):
        return t.detach().float().cpu().numpy()

    return GaussianArrays(
        means=np32(g.means),
        log_scales=np32(g.log_scales),
        quats=np32(g.quats),
        opacity_logits=np32(g.opacity_logits),
        sh=np32(g.sh),
    )


def gaussians_from_arrays(a: GaussianArrays, device: torch.device | str = "cpu") -> Gaussians:
    """Gaussians from .ply arrays (the inverse of :func:`gaussians_to_arrays`)."""

    def t(x) -> Tensor:
        return torch.as_tensor(x, dtype=torch.float32, device=device)

    return Gaussians(t(a.means), t(a.log_scales), t(a.quats), t(a.opacity_logits), t(a.sh))


def _render(
    rasterizer: Rasterizer,
    params: dict[str, Tensor],
    cams: Cameras,
    sh_degree: int,
    background: Tensor,
    opacities: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Activate raw parameters and render over ``background`` ([3] or one per camera [C, 3]), with
    ``opacities`` [N] in place of the parameters' when given. -> colours [C, H, W, 3], meta"""
    sh = torch.cat([params["sh0"], params["shN"]], dim=1) if "shN" in params else params["sh0"]
    colors, _, meta = rasterizer.render(
        params["means"],
        params["quats"],
        torch.exp(params["scales"]),
        torch.sigmoid(params["opacities"]) if opacities is None else opacities,
        sh,
        cams.w2c,
        cams.K,
        cams.width,
        cams.height,
        sh_degree=sh_degree,
        backgrounds=background.expand(len(cams), 3).contiguous(),
    )
    return colors, meta


def dropout_opacities(opacities: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """DropGaussian: each opacity is 0 with probability ``rate``, else divided by 1 - rate (at most 1),
    so that its expectation is unchanged wherever opacity / (1 - rate) <= 1.

    Args:
        opacities: activated opacities in [0, 1]. [N]
        rate: drop probability in [0, 1).
        generator: random source on the opacities' device (None: torch's global one).
    Returns:
        opacities for one training step, differentiable in the kept ones. [N]
    """
    if rate <= 0.0:
        return opacities
    keep = torch.rand(opacities.shape, device=opacities.device, generator=generator) >= rate
    return torch.where(keep, (opacities / (1.0 - rate)).clamp(max=1.0), torch.zeros_like(opacities))


def crop_to_masks(g: Gaussians, cams: Cameras, masks: Tensor) -> Gaussians:
    """The Gaussians whose centres every camera that sees them sees inside its mask (the visual hull
    of the masks). cams: C cameras at the masks' size; masks: bool [C, H, W]."""
    from ..estimators.hull import inside_masks

    return g.select(inside_masks(g.means, cams.to(g.device), masks.to(g.device)))


def render_gaussians(g: Gaussians, cams: Cameras, cfg: FitConfig) -> Tensor:
    """Render Gaussians into cameras with ``cfg.rasterizer`` (no gradients), at their full SH degree.

    Args:
        g: the Gaussians; rendered on their device (cams are moved there).
        cams: C cameras.
        cfg: names the rasterizer and the background.

    Returns:
        images in [0, 1]. float32 [C, H, W, 3]
    """
    return render_gaussians_geometry(g, cams, cfg)[0]


def render_gaussians_geometry(g: Gaussians, cams: Cameras, cfg: FitConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Colour, expected depth and opacity of Gaussians in cameras (no gradients).

    The view-dependent colours (full SH degree) and each Gaussian's camera z are rendered together
    as four features, so depth is alpha-composited like colour; expected depth = that / alpha.

    Args:
        g: the Gaussians; rendered on their device (cams are moved there).
        cams: C cameras.
        cfg: names the rasterizer and the background.

    Returns:
        (rgb, depth, alpha): colour in [0, 1] over ``cfg.background`` [C, H, W, 3], expected camera
        z (0 where alpha is 0) [C, H, W], accumulated opacity in [0, 1] [C, H, W].
    """
    rasterizer = RASTERIZERS.make(cfg.rasterizer)
    background = torch.tensor(cfg.background, dtype=torch.float32, device=g.device)
    cams = cams.to(g.device)
    rgb, depth, alpha = [], [], []
    with torch.no_grad():
        for start in range(0, len(cams), RENDER_CHUNK):
            chunk = cams[list(range(start, min(start + RENDER_CHUNK, len(cams))))]
            colors = sh_to_colors(g.sh_degree, g.means, g.sh, chunk.w2c)  # [c, N, 3]
            z = torch.einsum("cj,nj->cn", chunk.w2c[:, 2, :3], g.means) + chunk.w2c[:, 2, 3, None]  # [c, N]
            feats, alphas, _ = rasterizer.render(
                g.means,
                g.quats,
                torch.exp(g.log_scales),
                torch.sigmoid(g.opacity_logits),
                torch.cat([colors, z[..., None]], dim=-1),
                chunk.w2c,
                chunk.K,
                chunk.width,
                chunk.height,
                backgrounds=torch.zeros(len(chunk), 4, device=g.device),
            )
            a = alphas[..., 0].clamp(0.0, 1.0)
            rgb.append((feats[..., :3] + (1.0 - a[..., None]) * background).clamp(0.0, 1.0))
            depth.append(torch.where(a > 0, feats[..., 3] / a.clamp_min(1e-8), torch.zeros_like(a)))
            alpha.append(a)
    return torch.cat(rgb), torch.cat(depth), torch.cat(alpha)


def confidence_loss(
    pred: Tensor, target: Tensor, confidence: Tensor, cfg: FitConfig, lpips_fn: LpipsFn | None = None
) -> Tensor:
    """ReconX's loss: mean over frames and pixels of C * (0.8 L1 + 0.2 (1 - SSIM)) [+ 0.5 C LPIPS].

    Args:
        pred: rendered colours. [B, H, W, 3]
        target: frames, colours in [0, 1]. [B, H, W, 3]
        confidence: per-pixel confidence in [0, 1]. [B, H, W]
        cfg: the loss weights.
        lpips_fn: LPIPS scorer, or None (then the term is left out).

    Returns:
        the loss, a scalar. It neither depends on the target at zero-confidence pixels nor sends
        them gradient (module docstring).
    """
    is_trusted = confidence.unsqueeze(-1) > 0  # [B, H, W, 1]
    l1 = (pred - target).abs().mean(dim=-1)  # [B, H, W]
    # Windowed terms see the current render (without gradient) on both sides at zero-confidence
    # pixels: those pixels neither pull the fit nor carry their target into neighbouring windows.
    still = pred.detach()
    pred_w = torch.where(is_trusted, pred, still)
    target_w = torch.where(is_trusted, target, still)
    d_ssim = 1.0 - ssim_map(pred_w, target_w)  # [B, H, W]
    loss = (confidence * (cfg.l1_weight * l1 + cfg.ssim_weight * d_ssim)).mean()
    if lpips_fn is not None and cfg.lpips_weight > 0:
        frame_conf = confidence.flatten(1).mean(dim=1)  # [B]
        loss = loss + cfg.lpips_weight * (frame_conf * lpips_fn(pred_w, target_w)).mean()
    return loss


def scene_scale(cams: Cameras, points: Tensor) -> float:
    """simple_trainer's scene scale: 1.1 x the largest camera distance from the cameras' centroid;
    with one camera (or all at one place), the points' median distance from their centroid."""
    centers = cams.centers
    spread = float((centers - centers.mean(dim=0)).norm(dim=1).max())
    if spread <= KNN_MIN_DISTANCE:
        spread = float((points - points.mean(dim=0)).norm(dim=1).median()) if len(points) else 1.0
    return SCENE_SCALE_MARGIN * max(spread, KNN_MIN_DISTANCE)


def _make_optimizers(
    params: torch.nn.ParameterDict, cfg: FitConfig, scale: float, frames: int
) -> dict[str, torch.optim.Optimizer]:
    # simple_trainer scales the learning rates by sqrt(batch size) and the Adam moments' decay by it; by the
    # frames a step draws (a set of 3 captures draws 3 at any batch_size above), so that a larger batch_size
    # changes only the fits with more frames than that
    bs = min(cfg.batch_size, frames)
    lrs = {
        "means": cfg.means_lr * scale,
        "scales": cfg.scales_lr,
        "quats": cfg.quats_lr,
        "opacities": cfg.opacities_lr,
        "sh0": cfg.sh0_lr,
        "shN": cfg.shN_lr,
    }
    betas = (1.0 - bs * (1.0 - ADAM_BETAS[0]), 1.0 - bs * (1.0 - ADAM_BETAS[1]))
    # On CUDA one fused kernel per step and parameter: a fit of a few thousand Gaussians is bound by the
    # host launching kernels, and the unfused Adam launches about ten per parameter (run 40)
    return {
        name: torch.optim.Adam(
            [{"params": p, "lr": lrs[name] * math.sqrt(bs), "name": name}],
            eps=ADAM_EPS / math.sqrt(bs),
            betas=betas,
            fused=p.is_cuda,
        )
        for name, p in params.items()
    }


def adam_step(runs: Sequence[_Run], learns: Sequence[bool]) -> None:
    """The optimizers' step of every set whose step had a gradient (``learns``), then every gradient dropped (also
    without a step: MCMC's regularisers give a gradient where no Gaussian is seen, which must not pile up into the
    next step that learns).

    Fused (CUDA) optimizers of equal hyperparameters step in one ``torch._fused_adam_`` call, the kernel
    ``Adam(fused=True).step`` launches for each of its parameter groups, over the same state (``exp_avg``,
    ``exp_avg_sq`` and ``step`` in each optimizer's ``state``, where gsplat's strategies grow, prune and relocate
    it): the sets' quaternions, colours, opacities and scales share theirs. A lockstep fit of 3 sets made 18
    ``Optimizer.step`` calls a step, a quarter of the host time of a fit bound by it (docs/benchmarks.md, run 77);
    the update of each element is Adam's, bit for bit. Other optimizers (the CPU's) step as they are.
    """
    batches: dict[tuple[Any, ...], list[list[Tensor]]] = {}
    for run, learn in zip(runs, learns, strict=True):
        if not learn:
            continue
        for opt in run.optimizers.values():
            (group,) = opt.param_groups
            plain = not (
                group["amsgrad"] or group["maximize"] or group["capturable"] or group.get("decoupled_weight_decay")
            )
            if not (group["fused"] and plain):  # the CPU's, or not plain Adam: its own step
                opt.step()
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = opt.state[p]
                if not state:  # as Adam's _init_group makes it for a fused step
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                b1, b2 = group["betas"]
                key = (group["lr"], b1, b2, group["eps"], group["weight_decay"], p.device, p.dtype)
                lists = batches.setdefault(key, [[], [], [], [], []])
                for out, t in zip(
                    lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]), strict=True
                ):
                    out.append(t)
    for (lr, b1, b2, eps, decay, _, _), (ps, grads, exp_avgs, exp_avg_sqs, steps) in batches.items():
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            ps,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=lr,
            beta1=b1,
            beta2=b2,
            weight_decay=decay,
            eps=eps,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )
    for run in runs:
        for p in run.params.values():
            p.grad = None


def _prune_to_cap(params: torch.nn.ParameterDict, optimizers: dict, state: dict[str, Any], cap: int) -> None:
    """Remove the least opaque Gaussians beyond ``cap`` (after densification), with their optimizer
    moments and per-Gaussian strategy state (gsplat's ``remove`` op). gsplat's ``remove`` cuts every
    tensor of the state it is given, so only the per-Gaussian ones go to it: MCMC's state is its
    binomial table (``binoms`` [n_max, n_max]), which no Gaussian owns."""
    from gsplat.strategy.ops import remove

    n = len(params["means"])
    drop = torch.zeros(n, dtype=torch.bool, device=params["means"].device)
    drop[torch.topk(params["opacities"].detach(), n - cap, largest=False).indices] = True
    per_gaussian = {k: v for k, v in state.items() if isinstance(v, Tensor) and k != "binoms" and len(v) == n}
    remove(params=params, optimizers=optimizers, state=per_gaussian, mask=drop)
    state.update(per_gaussian)


def mcmc_regularisers(params: torch.nn.ParameterDict, cfg: FitConfig) -> Tensor:
    """``mcmc``'s loss terms: mean opacity and mean axis scale, weighted (simple_trainer's recipe:
    they let unneeded Gaussians fade to the relocation threshold and keep the others small). Scalar."""
    opacity = torch.sigmoid(params["opacities"]).mean()
    scale = torch.exp(params["scales"]).mean()
    return cfg.mcmc_opacity_reg * opacity + cfg.mcmc_scale_reg * scale


def mcmc_cap_for(cfg: FitConfig, initial: int) -> int:
    """``mcmc``'s Gaussian cap for a fit that starts from ``initial`` Gaussians: ``mcmc_cap``, raised to
    ``mcmc_growth`` x ``initial`` when that is more, and never above ``max_gaussians`` when that is set."""
    cap = max(cfg.mcmc_cap, math.ceil(cfg.mcmc_growth * initial))
    return min(cap, cfg.max_gaussians) if cfg.max_gaussians else cap


def _make_strategy(cfg: FitConfig, initial: int) -> Any:
    if cfg.strategy == "none":
        return None
    try:
        from gsplat.strategy import DefaultStrategy, MCMCStrategy
    except ImportError as err:
        raise ImportError(
            f"FitConfig.strategy {cfg.strategy!r} needs the gsplat package ({err}), a dependency of reconloop: "
            "pip install gsplat"
        ) from err
    start, stop, every = cfg.refine_steps()
    if cfg.strategy == "mcmc":
        from . import mcmc_torch

        mcmc_torch.install()  # its two CUDA kernels in torch for sets off CUDA
        cap = mcmc_cap_for(cfg, initial)
        if cap > cfg.mcmc_cap:
            log.info(
                f"MCMC's Gaussian cap is {cap} ({cfg.mcmc_growth} x the {initial} initial Gaussians, "
                f"above FitConfig.mcmc_cap {cfg.mcmc_cap})"
            )
        return MCMCStrategy(
            cap_max=cap,
            noise_lr=cfg.mcmc_noise_lr,
            refine_start_iter=start,
            refine_stop_iter=stop,
            refine_every=every,
            min_opacity=cfg.prune_opa,
        )
    return DefaultStrategy(
        prune_opa=cfg.prune_opa,
        grow_grad2d=cfg.grow_grad2d,
        grow_scale3d=cfg.grow_scale3d,
        prune_scale3d=cfg.prune_scale3d,
        refine_start_iter=start,
        refine_stop_iter=stop,
        reset_every=cfg.reset_every,
        refine_every=every,
    )


@dataclass
class _Run:
    """One set of Gaussians being fitted: raw parameters (gsplat's names), their optimizers, the
    centres' learning-rate decay a step (simple_trainer's ExponentialLR, applied by ``after_step``: torch's scheduler
    warns when its optimizer's ``step`` was not called, and :func:`adam_step` steps the optimizers' state instead),
    the densification strategy and its running state."""

    params: torch.nn.ParameterDict
    optimizers: dict[str, torch.optim.Optimizer]
    means_decay: float
    strategy: Any
    state: dict[str, Any]

    @classmethod
    def start(cls, g0: Gaussians, cfg: FitConfig, scale: float, frames: int) -> _Run:
        """Parameters copied from ``g0``; optimizers, schedule and strategy from ``cfg``, the optimizers'
        scaling by the frames a step draws from a set of ``frames``."""
        params = torch.nn.ParameterDict(
            {
                "means": g0.means.clone(),
                "scales": g0.log_scales.clone(),
                "quats": g0.quats.clone(),
                "opacities": g0.opacity_logits.clone(),
                "sh0": g0.sh[:, :1].contiguous().clone(),
            }
        )
        if cfg.sh_degree > 0:
            params["shN"] = g0.sh[:, 1:].contiguous().clone()
        optimizers = _make_optimizers(params, cfg, scale, frames)
        means_decay = cfg.means_lr_final_factor ** (1.0 / cfg.iterations)
        strategy = _make_strategy(cfg, len(g0.means))
        state: dict[str, Any] = {}
        if strategy is not None:
            strategy.check_sanity(params, optimizers)
            state = strategy.initialize_state(**({} if cfg.strategy == "mcmc" else {"scene_scale": scale}))
        return cls(params, optimizers, means_decay, strategy, state)

    def before_backward(self, cfg: FitConfig, step: int, meta: dict[str, Any]) -> None:
        if self.strategy is not None and cfg.strategy == "default":
            self.strategy.step_pre_backward(self.params, self.optimizers, self.state, step, meta)

    def after_step(self, cfg: FitConfig, step: int, meta: dict[str, Any], learn: bool) -> None:
        """After the optimizers' step (:func:`adam_step`): the schedule, then densification (as simple_trainer)."""
        self.optimizers["means"].param_groups[0]["lr"] *= self.means_decay  # ExponentialLR's step
        if learn and self.strategy is not None:
            if cfg.strategy == "mcmc":  # noise scaled by the centres' learning rate of this step
                lr = self.optimizers["means"].param_groups[0]["lr"]
                self.strategy.step_post_backward(self.params, self.optimizers, self.state, step, meta, lr=lr)
            else:
                self.strategy.step_post_backward(self.params, self.optimizers, self.state, step, meta, packed=False)
            if cfg.max_gaussians and len(self.params["means"]) > cfg.max_gaussians:
                _prune_to_cap(self.params, self.optimizers, self.state, cfg.max_gaussians)

    def gaussians(self) -> Gaussians:
        p = self.params
        sh = torch.cat([p["sh0"], p["shN"]], dim=1) if "shN" in p else p["sh0"]
        return Gaussians(p["means"], p["scales"], p["quats"], p["opacities"], sh).detach()


@dataclass
class _Fit:
    """One set of a lockstep fit: its views on the device, its run, its frame order and its random
    sources (frame order on the host, dropout and backgrounds on the device; both seeded ``seed``)."""

    images: Tensor  # [F, H, W, 3]
    masks: Tensor | None  # [F, H, W], None: no random background
    confidence: Tensor  # [F, H, W]
    cams: Cameras
    run: _Run
    gen: torch.Generator
    gen_device: torch.Generator
    order: list[int] = field(default_factory=list)  # frames left in this pass

    @classmethod
    def start(cls, views: FitViews, init: GeometryMemory, cfg: FitConfig, device: torch.device, seed: int) -> _Fit:
        views.check()
        cams = views.cams.to(device)
        if cfg.max_gaussians:
            thinned = thin_memory(init, cfg.max_gaussians)
            if thinned.dropped:
                log.info(thinned.note)
            init = thinned.memory
        g0 = init_gaussians(init.to(device), cfg)
        return cls(
            images=views.images.to(device, torch.float32),
            masks=views.masks.to(device) if views.masks is not None and cfg.has_random_background else None,
            confidence=views.confidence.to(device, torch.float32),
            cams=cams,
            run=_Run.start(g0, cfg, scene_scale(cams, g0.means), len(views.images)),
            gen=torch.Generator().manual_seed(seed),
            gen_device=torch.Generator(device=device).manual_seed(seed),
        )

    def next_batch(self, size: int) -> list[int]:
        """The next ``size`` frames (at most all of them) of the shuffled passes."""
        batch: list[int] = []
        while len(batch) < min(size, len(self.images)):
            if not self.order:
                self.order = torch.randperm(len(self.images), generator=self.gen).tolist()
            batch.append(self.order.pop())
        return batch

    def take(self, batch: list[int]) -> tuple[Tensor, Tensor | None, Tensor, Cameras]:
        """The batch's images [b, H, W, 3], masks [b, H, W] (or None), confidence [b, H, W] and cameras,
        cut by :func:`take_rows`."""
        cams = Cameras(
            take_rows(self.cams.w2c, batch), take_rows(self.cams.K, batch), self.cams.width, self.cams.height
        )
        masks = None if self.masks is None else take_rows(self.masks, batch)
        return take_rows(self.images, batch), masks, take_rows(self.confidence, batch), cams


def take_rows(t: Tensor, rows: Sequence[int]) -> Tensor:
    """``t[rows]`` [len(rows), ...] as slices: indexing a CUDA tensor with a list of ints copies the list
    to the device and waits for the GPU to finish its queue, several times a step in a fit of a few
    thousand Gaussians, whose speed is the host's running ahead of the GPU (run 40)."""
    parts = [t[i : i + 1] for i in rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class _SetsRender:
    """One rasterizer call for every set of a lockstep fit and what each set's strategy reads of it.

    Several sets are padded to the largest with stand-ins of opacity 0 (culled before they reach a
    pixel) and stacked on a leading batch dimension: ``preds[k]`` [b, H, W, 3] and, after the backward
    pass, ``meta(k)`` cut back to set k's Gaussians from ``stacked_meta``. One set, or sets whose
    batches differ in length (a set with fewer frames than ``batch_size``), are drawn each on its own
    (``own_metas``)."""

    preds: list[Tensor]
    sizes: list[int]
    stacked_meta: dict[str, Any] | None = None
    own_metas: list[dict[str, Any]] | None = None

    @classmethod
    def draw(
        cls,
        rasterizer: Rasterizer,
        params: Sequence[torch.nn.ParameterDict],
        cams: Sequence[Cameras],
        sh_degree: int,
        backgrounds: Sequence[Tensor],
        opacities: Sequence[Tensor],
    ) -> _SetsRender:
        sizes = [len(p["means"]) for p in params]
        if len(params) == 1 or len({len(c) for c in cams}) > 1:
            drawn = [
                _render(rasterizer, p, c, sh_degree, bg, o) for p, c, bg, o in zip(params, cams, backgrounds, opacities)
            ]
            return cls([pred for pred, _ in drawn], sizes, own_metas=[meta for _, meta in drawn])
        n = max(sizes)

        def stacked(items: Sequence[Tensor], fill: Sequence[float] | float) -> Tensor:
            if all(len(t) == n for t in items):  # sets of one size (MCMC's grow alike): one copy, no pads
                return torch.stack(list(items))
            # the pads filled on the device: a fill made on the host and copied would wait for the GPU
            rows = [t.new_empty(n - len(t), *t.shape[1:]) for t in items]
            for pad in rows:
                if isinstance(fill, float):
                    pad.fill_(fill)
                else:
                    for j, value in enumerate(fill):
                        pad[:, j] = value
            return torch.stack([torch.cat([t, pad]) for t, pad in zip(items, rows)])

        sh = [torch.cat([p["sh0"], p["shN"]], dim=1) if "shN" in p else p["sh0"] for p in params]
        colors, _, meta = rasterizer.render(
            stacked([p["means"] for p in params], 0.0),
            stacked([p["quats"] for p in params], IDENTITY_QUAT),
            stacked([torch.exp(p["scales"]) for p in params], PAD_SCALE),
            stacked(opacities, 0.0),
            stacked(sh, 0.0),
            torch.stack([c.w2c for c in cams]),
            torch.stack([c.K for c in cams]),
            cams[0].width,
            cams[0].height,
            sh_degree=sh_degree,
            backgrounds=torch.stack(list(backgrounds)),
        )
        return cls(list(colors.unbind(0)), sizes, stacked_meta=meta)

    def before_backward(self, runs: Sequence[_Run], cfg: FitConfig, step: int) -> None:
        """DefaultStrategy's hook (it keeps the 2D centres' gradient); for stacked sets, on the stack."""
        if self.own_metas is not None:
            for run, meta in zip(runs, self.own_metas):
                run.before_backward(cfg, step, meta)
        elif cfg.strategy == "default":
            self.stacked_meta["means2d"].retain_grad()

    def meta(self, k: int) -> dict[str, Any]:
        """What set k's strategy reads: the 2D centres (with their gradient) and radii of its
        Gaussians, the image size and its cameras."""
        if self.own_metas is not None:
            return self.own_metas[k]
        stack, n = self.stacked_meta, self.sizes[k]
        means2d = stack["means2d"][k, :, :n].detach()
        grad = stack["means2d"].grad if stack["means2d"].retains_grad else None
        if grad is not None:
            means2d.grad = grad[k, :, :n]
        return {
            "means2d": means2d,
            "radii": stack["radii"][k, :, :n],
            "width": stack["width"],
            "height": stack["height"],
            "n_cameras": means2d.shape[0],
            "gaussian_ids": None,
        }


def fit_gaussians(
    views: FitViews,
    init: GeometryMemory,
    cfg: FitConfig,
    *,
    device: torch.device | str,
    progress: Callable[[int, float], None] | None = None,
) -> Gaussians:
    """Fit Gaussians to views, starting from the geometry memory (module docstring).

    Args:
        views: images [F, H, W, 3], cameras, confidence [F, H, W] (moved to ``device``).
        init: the geometry memory the Gaussians start from (moved to ``device``).
        cfg: fitting settings; ``cfg.rasterizer`` must suit ``device`` (gsplat: CUDA).
        device: where to fit.
        progress: called as ``progress(step, loss)`` every ``cfg.progress_every`` steps, after a step that
            ends ``PROGRESS_INTERVAL_S`` after the last call, and after the last (step counts from 1); it may
            raise (e.g. ``backend.progress.Cancelled``) to stop.

    Returns:
        the fitted Gaussians (detached, on ``device``).

    Example::

        >>> from backend.types import Cameras, GeometryMemory
        >>> cams = Cameras(torch.eye(4)[None], torch.tensor([[[20.0, 0, 12], [0, 20, 8], [0, 0, 1]]]), 24, 16)
        >>> memory = GeometryMemory(torch.randn(50, 3) * 0.2 + torch.tensor([0, 0, 2.0]), torch.rand(50, 3),
        ...                         torch.ones(50), torch.zeros(50, dtype=torch.int32))
        >>> views = FitViews(torch.rand(1, 16, 24, 3), cams, torch.ones(1, 16, 24))
        >>> cfg = FitConfig(iterations=5, rasterizer="torch_cpu", strategy="none", sh_degree=1)
        >>> len(fit_gaussians(views, memory, cfg, device="cpu"))
        50
    """
    return fit_gaussians_many([views], [init], cfg, device=device, progress=progress)[0]


class _GlobalStream:
    """A random stream of torch's global generators (the CPU's and, for a CUDA fit, the device's) that a
    ``with`` block draws from and advances, the global state around it left as it was."""

    def __init__(self, cpu: Tensor, cuda: Tensor | None, device: torch.device) -> None:
        self.cpu, self.cuda, self.device = cpu, cuda, device

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> _GlobalStream:
        """The stream :func:`torch.manual_seed` (``seed``) starts."""
        on_cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if on_cuda else []):
            torch.manual_seed(seed)
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None, device)

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[self.device] if self.cuda is not None else [])
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def __exit__(self, *exc: object) -> None:
        self.cpu = torch.get_rng_state()
        if self.cuda is not None:
            self.cuda = torch.cuda.get_rng_state(self.device)
        self._fork.__exit__(*exc)


def fit_gaussians_many(
    views: Sequence[FitViews],
    inits: Sequence[GeometryMemory],
    cfg: FitConfig,
    *,
    device: torch.device | str,
    progress: Callable[[int, float], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Gaussians]:
    """Fit K independent sets of Gaussians in lockstep, set k to ``views[k]`` from ``inits[k]``, with
    the same settings: each step renders every set's batch in one rasterizer call (the sets padded to
    one size and stacked on a leading batch dimension, which gsplat rasterizes in one launch), and each
    set keeps its own parameters, optimizers, strategy state, frame order and random sources (seeded
    ``seeds[k]``, so set k draws what a lone :func:`fit_gaussians` with that seed would). Short fits of
    small sets leave the GPU mostly idle one at a time; K of them at once take little longer than one.

    Args:
        views: K sets of views, all at one image size.
        inits: K geometry memories, one per set.
        cfg: fitting settings shared by every set (``batch_size`` frames per set and step).
        device: where to fit.
        progress: as :func:`fit_gaussians`'s, with the sets' mean loss.
        seeds: set k's frame order, dropout and backgrounds (default ``cfg.seed`` for every set), and
            the global generators' stream that set k's strategy draws from (DefaultStrategy's splits,
            MCMC's relocation and noise: gsplat draws from torch's global generators, so each set's
            strategy step runs on its own stream, :class:`_GlobalStream`).

    Returns:
        K fitted Gaussian sets (detached, on ``device``), in the order of ``views``.
    """
    if len(views) != len(inits) or not views:
        raise ValueError(
            f"fit: needs one memory per set of views and at least one set; got {len(views)} and {len(inits)}"
        )
    sizes = {(v.cams.width, v.cams.height) for v in views}
    if len(sizes) > 1:
        raise ValueError(f"fit: the sets of a lockstep fit must share one image size; got {sorted(sizes)}")
    seeds = [cfg.seed] * len(views) if seeds is None else list(seeds)
    if len(seeds) != len(views):
        raise ValueError(f"fit: seeds needs one seed per set of views; got {len(seeds)} for {len(views)}")
    device = torch.device(device)
    fits = [_Fit.start(v, m, cfg, device, seed) for v, m, seed in zip(views, inits, seeds)]
    rasterizer = RASTERIZERS.make(cfg.rasterizer)
    lpips_fn = load_lpips(cfg.lpips_path, device=device) if cfg.lpips_weight > 0 else None
    background = torch.tensor(cfg.background, dtype=torch.float32, device=device)
    # gsplat's strategies draw from torch's global generators: one set draws from them as seeded; several
    # each from its own stream, swapped in around its strategy's step
    torch.manual_seed(seeds[0])
    streams = [_GlobalStream.seeded(seed, device) for seed in seeds] if len(fits) > 1 else None

    # The loop: per set, a shuffled pass over its frames per epoch, batch_size frames per step.
    said = time.monotonic()  # the last progress call (or the start)
    for step in range(cfg.iterations):
        sh_degree = min(step // cfg.sh_degree_interval, cfg.sh_degree)
        rate = cfg.dropout_rate * step / max(cfg.iterations - 1, 1)
        batches = [f.next_batch(cfg.batch_size) for f in fits]
        targets, backgrounds, opacities = [], [], []
        cams, confidences = [], []
        for f, batch in zip(fits, batches):
            target, masks, confidence, batch_cams = f.take(batch)
            bg = background
            if masks is not None:  # one random colour per frame, behind the render and in the masked-out target
                bg = torch.rand(len(batch), 3, device=device, generator=f.gen_device)
                target = torch.where(masks[..., None], target, bg[:, None, None, :])
            targets.append(target)
            backgrounds.append(bg.expand(len(batch), 3))
            opacities.append(dropout_opacities(torch.sigmoid(f.run.params["opacities"]), rate, f.gen_device))
            cams.append(batch_cams)
            confidences.append(confidence)
        drawn = _SetsRender.draw(rasterizer, [f.run.params for f in fits], cams, sh_degree, backgrounds, opacities)
        # False where no Gaussian of a set is in view of its batch (the CPU rasterizer cuts the graph)
        learns = [pred.requires_grad for pred in drawn.preds]
        if len(fits) == 1:
            loss = confidence_loss(drawn.preds[0], targets[0], confidences[0], cfg, lpips_fn)
        elif len({len(batch) for batch in batches}) == 1:  # the sets' mean losses, summed, in one call
            cat = torch.cat
            loss = len(fits) * confidence_loss(cat(drawn.preds), cat(targets), cat(confidences), cfg, lpips_fn)
        else:
            loss = sum(confidence_loss(*parts, cfg, lpips_fn) for parts in zip(drawn.preds, targets, confidences))
        if cfg.strategy == "mcmc":
            loss = loss + sum(mcmc_regularisers(f.run.params, cfg) for f in fits)
        if loss.requires_grad:
            drawn.before_backward([f.run for f in fits], cfg, step)
            loss.backward()
        adam_step([f.run for f in fits], learns)
        for k, (f, learn) in enumerate(zip(fits, learns)):
            if streams is None:
                f.run.after_step(cfg, step, drawn.meta(k), learn)
            else:
                with streams[k]:
                    f.run.after_step(cfg, step, drawn.meta(k), learn)
        if progress is not None and (
            (step + 1) % cfg.progress_every == 0
            or step + 1 == cfg.iterations
            or time.monotonic() - said >= PROGRESS_INTERVAL_S
        ):
            progress(step + 1, float(loss.detach()) / len(fits))
            said = time.monotonic()

    return [f.run.gaussians() for f in fits]
