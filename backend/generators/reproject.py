"""The default generator: no weights, only geometry (DESIGN.md section 1 step 5).

For each target frame of a segment:

1. take a depth per pixel: the memory's rendered depth where it covers the frame, elsewhere a guess
   made by push-pull filling the rendered inverse depth, refined by a small photo-consistency search
   (the depth where the two nearest captures agree best);
2. colour every pixel by reprojecting the retrieved captures (``cond.memory``) and the carried-over
   frames (``cond.carried``) through that depth, blended with weights that fall off with the angle
   between the target's ray and the source's ray to the same 3D point. A source that comes with a
   depth map (``Views.depth``) does not colour points hidden behind its own surface. Where the
   render covers, ``render_blend`` of its colour is mixed in: the reprojection is sharp but breaks
   where the depth is off, a Gaussian render (the loop's guide) is smooth but right there
   (``guide_blend`` of a one-fit guide's colour, ``ensemble_blend`` of the mean of several fits'); pixels
   no source sees keep the render;
3. inpaint what no source and no render covers with a multi-scale push-pull of the colours around it.

Confidence is what the Gaussian fit weights each pixel by, so it follows the error measured at
held-out views (docs/benchmarks.md): reprojected pixels whose sources agree are far more often right
than those whose sources disagree or that one source alone sees. So a pixel's confidence is its
ceiling (``rendered_confidence`` on the memory's depth, ``reprojected_confidence`` on a guessed depth)
times the best source's angular weight, times ``exp(-var / (2 agreement_std^2))`` of the sources'
colours, times ``single_source_factor`` when one source alone sees it; point-splat and inpainted
pixels get ``inpainted_confidence``. With ``ensemble_angle_free`` (on), a pixel that takes a guide ensemble's
colour alone keeps the agreement and drops the angular weight: the angle says how far a reprojected
colour can be trusted, and that pixel's colour is not reprojected (3 views 120 degrees apart leave
every trajectory frame tens of degrees from its nearest capture, and its guide pixels at a tenth of
their weight; docs/benchmarks.md, "The ensemble's pixels without the angle").

Everything is batched torch on the device of the condition tensors; the seed and step count of the
``Generator`` protocol are accepted and unused (the result is deterministic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import ENSEMBLE_SOURCE, GUIDE_SOURCE, Cameras, ConditionVideo, Frames, Views
from . import GENERATORS, GenerateProgress


@dataclass(frozen=True)
class ReprojectConfig:
    """Hyper-parameters of the reprojection generator."""

    rendered_confidence: float = 1.0  # ceiling where the memory gives the depth
    reprojected_confidence: float = 0.5  # ceiling where the depth is a guess: right only where the guess is
    inpainted_confidence: float = 0.1  # low: point splats no source sees, and push-pull colours
    single_source_factor: float = 0.5  # a colour only one source sees cannot be checked against another
    angle_sigma_deg: float = 15.0  # blending weight exp(-angle^2 / (2 sigma^2)) between target and source rays
    min_angle_weight: float = 1e-4  # below this a source counts as not seeing the point (about 65 degrees)
    min_depth: float = 1e-6  # points at or behind a camera's plane (camera z below this) are not visible
    occlusion_tolerance: float = 0.03  # a source with a depth map does not see points this much (relative) behind it
    # depth search: relative steps in inverse depth around the guess (0 = the guess itself)
    depth_offsets: tuple[float, ...] = tuple(round(-0.4 + i / 10, 4) for i in range(9))
    cost_window_px: int = 5  # colour-variance cost is averaged over this window (odd)
    depth_change_cost: float = 0.002  # penalty per unit of offset: ties go to the guess
    no_evidence_cost: float = 0.6  # cost (1 - ZNCC) where the search has no evidence: ZNCC must beat 0.4
    min_texture_std: float = 0.02  # windows with grey std below this (0..1) are untextured: no evidence
    min_seen_fraction: float = 0.5  # share of a window both capture views must see
    agreement_std: float = 0.03  # sources whose colours spread by this std (0..1) lower the confidence by e^-0.5
    render_blend: float = 0.5  # where the memory's render covers, this share of its colour is mixed in
    guide_blend: float = 0.75  # the same where a one-fit guide's render covers (Renders.source GUIDE_SOURCE; run 39)
    # ... and where a guide of several fits covers (ENSEMBLE_SOURCE): their mean colour alone. Run 54 (an H100,
    # 3 seeds, gsplat's bagged guide): the loop +0.16 temple, +0.23 door, -0.06 fern over 0.75; a one-fit guide's
    # colour alone lost on the CPU (temple -0.16, fern -0.13; docs/benchmarks.md, "The guide ensemble's colour alone")
    ensemble_blend: float = 1.0
    # where the pixel takes the ensemble's colour alone (ensemble_blend 1): confidence without the angular weight
    # (module docstring). Run 61 (an H100, 3 seeds, gsplat's guide): the loop +0.37 temple-ring and +0.16
    # dino-ring over the angle's weight (every seed), +0.01 temple, +0.03 fern, -0.01 door (bench row
    # `ensemble angle weighted`, the default until then)
    ensemble_angle_free: bool = True
    max_sources: int = 6  # nearest sources (camera centre) used per chunk of frames
    chunk_pixels: int = 1 << 21  # target pixels processed at once (bounds memory at large sizes)

    def __post_init__(self) -> None:
        for name in (
            "rendered_confidence",
            "reprojected_confidence",
            "inpainted_confidence",
            "single_source_factor",
            "render_blend",
            "guide_blend",
            "ensemble_blend",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ReprojectConfig.{name} must be in [0, 1]; got {v}")
        if self.angle_sigma_deg <= 0:
            raise ValueError(f"ReprojectConfig.angle_sigma_deg must be > 0; got {self.angle_sigma_deg}")
        if self.agreement_std <= 0:
            raise ValueError(f"ReprojectConfig.agreement_std must be > 0; got {self.agreement_std}")
        if self.chunk_pixels < 1:
            raise ValueError(f"ReprojectConfig.chunk_pixels must be >= 1; got {self.chunk_pixels}")
        if self.cost_window_px < 1 or self.cost_window_px % 2 == 0:
            raise ValueError(f"ReprojectConfig.cost_window_px must be odd and >= 1; got {self.cost_window_px}")
        if not self.depth_offsets or min(self.depth_offsets) <= -1.0:
            raise ValueError(f"ReprojectConfig.depth_offsets must be non-empty and > -1; got {self.depth_offsets}")
        if self.max_sources < 1:
            raise ValueError(f"ReprojectConfig.max_sources must be >= 1; got {self.max_sources}")


def push_pull(values: Tensor, weights: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Fill low-weight pixels from a multi-scale pyramid of weighted averages (push-pull).

    Push: halve the image repeatedly, summing weighted values and weights over overlapping 4x4
    binomial windows (stride 2, so that information crosses block borders). Pull: from
    the coarsest level down, each pixel keeps its own weighted average in proportion to its weight
    (clamped to 1) and takes the upsampled coarser level for the rest.

    Args:
        values: what to fill, any channels. float32 [B, D, H, W]
        weights: per-pixel weight in [0, 1] (0: unknown, 1: known). float32 [B, 1, H, W]
    Returns:
        filled values; pixels of weight 1 keep their value. float32 [B, D, H, W]

    Example:
        >>> v = torch.rand(1, 3, 16, 16); w = (torch.rand(1, 1, 16, 16) > 0.5).float()
        >>> push_pull(v, w).shape
        torch.Size([1, 3, 16, 16])
    """
    if values.ndim != 4 or weights.shape != (values.shape[0], 1, *values.shape[2:]):
        raise ValueError(
            f"push_pull: values must be [B, D, H, W] and weights [B, 1, H, W]; "
            f"got {tuple(values.shape)} and {tuple(weights.shape)}"
        )
    sums = [values * weights]
    wsums = [weights]
    while sums[-1].shape[-1] > 1 or sums[-1].shape[-2] > 1:
        sums.append(_reduce(sums[-1]))
        wsums.append(_reduce(wsums[-1]))
    filled = sums[-1] / wsums[-1].clamp_min(eps)
    for s, w in zip(reversed(sums[:-1]), reversed(wsums[:-1])):
        # coarse pixel j covers fine pixels 2j and 2j+1 (an odd size padded on the far side): upsample by
        # exactly 2 and crop, so that each coarse centre lands between its two fine pixels (resizing to the
        # odd size would stretch the grid by W / ceil(W / 2) and move the filled values by up to half a pixel)
        up = F.interpolate(filled, scale_factor=2.0, mode="bilinear", align_corners=False)[
            ..., : s.shape[-2], : s.shape[-1]
        ]
        alpha = w.clamp(0.0, 1.0)
        own = s / w.clamp_min(eps)
        filled = alpha * own + (1.0 - alpha) * up
    return filled


PAIR = 2  # the depth search correlates the two captures nearest the targets
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of the grey image the search correlates
GREY_OFFSET = 0.5  # subtracted before box filtering (ZNCC ignores offsets; keeps sums small)

# Binomial 4x4 window of the push step, scaled to sum to 4 like a 2x2 box sum.
_PUSH_TAPS = (1.0, 3.0, 3.0, 1.0)


def _reduce(x: Tensor) -> Tensor:
    """Halve an image with the binomial window (zero outside the image). [B, D, H, W] -> [B, D, ceil(H/2), ceil(W/2)]"""
    B, D, H, W = x.shape
    taps = torch.tensor(_PUSH_TAPS, dtype=x.dtype, device=x.device)
    kernel = taps[:, None] * taps[None, :]
    kernel = (kernel * (4.0 / kernel.sum()))[None, None]
    x = F.pad(x.reshape(B * D, 1, H, W), (1, 1 + W % 2, 1, 1 + H % 2))
    return F.conv2d(x, kernel, stride=2).reshape(B, D, (H + 1) // 2, (W + 1) // 2)


def _pixel_rays(cams: Cameras) -> Tensor:
    """Camera-frame rays with z = 1 through every pixel centre. [C, H, W, 3]"""
    dev, dt = cams.K.device, cams.K.dtype
    v, u = torch.meshgrid(
        torch.arange(cams.height, device=dev, dtype=dt) + 0.5,
        torch.arange(cams.width, device=dev, dtype=dt) + 0.5,
        indexing="ij",
    )
    fx, fy = cams.K[:, 0, 0, None, None], cams.K[:, 1, 1, None, None]
    cx, cy = cams.K[:, 0, 2, None, None], cams.K[:, 1, 2, None, None]
    x = (u[None] - cx) / fx
    y = (v[None] - cy) / fy
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


@GENERATORS.register("reproject")
class ReprojectGenerator:
    """Colour target frames by reprojecting captures and carried frames through the memory's depth.

    Example:
        >>> from backend.types import Cameras, ConditionVideo, Renders, Views
        >>> eye = torch.eye(4)[None]; K = torch.tensor([[[8.0, 0, 8], [0, 8, 8], [0, 0, 1]]])
        >>> cams = Cameras(eye, K, 16, 16)
        >>> r = Renders(torch.rand(1, 16, 16, 3), torch.ones(1, 16, 16), torch.rand(1, 16, 16) > 0.5,
        ...             torch.zeros(1, 16, 16, dtype=torch.int32))
        >>> views = Views(torch.rand(1, 16, 16, 3), cams, [0])
        >>> empty = Views(torch.zeros(0, 16, 16, 3), Cameras(eye[:0], K[:0], 16, 16), [])
        >>> out = ReprojectGenerator().generate(ConditionVideo(cams, r, views, empty), num_steps=1, seed=0)
        >>> out.images.shape, out.confidence.shape
        (torch.Size([1, 16, 16, 3]), torch.Size([1, 16, 16]))
    """

    def __init__(self, config: ReprojectConfig | None = None) -> None:
        self.config = config or ReprojectConfig()

    # -- inputs -------------------------------------------------------------------------------

    @staticmethod
    def check_inputs(cond: ConditionVideo) -> None:
        t, r = cond.targets, cond.renders
        F_, H, W = len(t), t.height, t.width
        want = {"rgb": (F_, H, W, 3), "depth": (F_, H, W), "mask": (F_, H, W), "source": (F_, H, W)}
        for name, shape in want.items():
            got = tuple(getattr(r, name).shape)
            if got != shape:
                raise ValueError(
                    f"reproject: cond.renders.{name} must be {list(shape)} for {F_} targets at {W}x{H}; got {list(got)}"
                )
        for name in ("memory", "carried"):
            views: Views = getattr(cond, name)
            if len(views) and tuple(views.images.shape[1:]) != (H, W, 3):
                raise ValueError(
                    f"reproject: cond.{name}.images must be [*, {H}, {W}, 3] (the target size); "
                    f"got {list(views.images.shape)}"
                )
            if views.depth is not None and tuple(views.depth.shape) != (len(views), H, W):
                raise ValueError(
                    f"reproject: cond.{name}.depth must be {[len(views), H, W]} (a depth per pixel of each view); "
                    f"got {list(views.depth.shape)}"
                )

    # -- steps --------------------------------------------------------------------------------

    def guess_depth(self, depth: Tensor, mask: Tensor) -> Tensor:
        """Rendered depth where the memory covers, push-pull filled inverse depth elsewhere.

        Args:
            depth: rendered camera z, 0 where empty. [F, H, W]
            mask: pixels the memory covers. bool [F, H, W]
        Returns:
            camera z for every pixel. A frame with no rendered pixel at all (the memory behind it, or out of
            its view) takes the median rendered depth of the other frames, which the photo-consistency
            search then refines; 0 only where no frame has a rendered pixel. [F, H, W]
        """
        valid = mask & (depth > self.config.min_depth)
        inv = torch.where(valid, 1.0 / depth.clamp_min(self.config.min_depth), torch.zeros_like(depth))
        inv_filled = push_pull(inv[:, None], valid[:, None].to(depth.dtype))[:, 0]
        guess = torch.where(inv_filled > 0, 1.0 / inv_filled.clamp_min(self.config.min_depth), torch.zeros_like(depth))
        empty = ~valid.flatten(1).any(dim=1)  # [F]
        if bool(empty.any()) and not bool(empty.all()):
            guess[empty] = depth[valid].median()
        return torch.where(valid, depth, guess)

    def reproject(
        self,
        targets: Cameras,
        depth: Tensor,
        holes: Tensor,
        sources: Views,
        captures: Views | None = None,
        search: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Colour pixels from the source views, refining guessed depths by photo-consistency.

        For each pixel, depths around the guess (``depth_offsets``, relative steps in inverse depth)
        are tried. At each, the two captures nearest the targets are sampled where the 3D point
        projects and compared by ZNCC over ``cost_window_px`` windows (in the target's pixels);
        the depth with the best correlation wins, with a small penalty for leaving the guess.
        Where either window is untextured (the black backdrop of a studio scan, the sky) there is
        no evidence and the guess stands. The colour is the angle-weighted mean of all sources.

        Args:
            targets: target cameras, F of them.
            depth: camera z guess per target pixel (0: unknown). [F, H, W]
            holes: pixels to colour. bool [F, H, W]
            sources: views to sample (captures and carried frames), S of them, same size as targets.
            captures: the views the depth search matches (default: ``sources``).
            search: pixels whose depth is searched (default: all of ``holes``); the others keep
                ``depth`` as it is (the memory's rendered depth). bool [F, H, W]
        Returns:
            (rgb, weight, agreement): colour [F, H, W, 3] (0 outside holes); the best source's
            angular weight times the agreement, in [0, 1], 0 where no source sees the point
            [F, H, W]; and the agreement alone: exp(-var / (2 agreement_std^2)) of the sources'
            colours, times ``single_source_factor`` where fewer than two sources see the point
            (none included), 0 outside holes [F, H, W].
        """
        cfg = self.config
        F_, H, W = depth.shape
        rgb = torch.zeros(F_, H, W, 3, dtype=depth.dtype, device=depth.device)
        best_w = torch.zeros_like(depth)
        agree = torch.zeros_like(depth)
        holes = holes & (depth > cfg.min_depth)
        if len(sources) == 0 or not bool(holes.any()):
            return rgb, best_w, agree
        captures = sources if captures is None else captures
        search = holes if search is None else search & holes
        rays = _pixel_rays(targets)  # [F, H, W, 3]
        c2w = targets.c2w
        offsets = torch.tensor(cfg.depth_offsets, dtype=depth.dtype, device=depth.device)
        per_chunk = max(1, cfg.chunk_pixels // (H * W))
        for f0 in range(0, F_, per_chunk):
            fs = slice(f0, min(f0 + per_chunk, F_))
            if not bool(holes[fs].any()):
                continue
            chunk_targets = targets[list(range(fs.start, fs.stop))]
            src = self._nearest_sources(sources, chunk_targets, cfg.max_sources)
            pair = self._nearest_sources(captures, chunk_targets, PAIR) if len(captures) >= PAIR else None
            R, t = c2w[fs, :3, :3], c2w[fs, :3, 3]  # [f, 3, 3], [f, 3]
            ray_w = torch.einsum("fij,fhwj->fhwi", R, rays[fs])  # world ray directions (z = 1 in camera)
            ray_dir = F.normalize(ray_w, dim=-1)
            # search: the offset whose capture pair correlates best (only where there is evidence)
            best_cost = torch.full(depth[fs].shape, float("inf"), dtype=depth.dtype, device=depth.device)
            best_off = torch.zeros_like(best_cost)
            for o in offsets if pair is not None else offsets[offsets == 0]:
                z = depth[fs] / (1.0 + o)  # inverse depth scaled by (1 + o)
                X = t[:, None, None, :] + ray_w * z[..., None]  # [f, H, W, 3]
                cost = self._pair_cost(X, ray_dir, pair, z.shape) + cfg.depth_change_cost * o.abs()
                better = cost < best_cost
                best_cost = torch.where(better, cost, best_cost)
                best_off = torch.where(better, o, best_off)
            # colour: the angle-weighted mean of all sources at the chosen depth
            z = depth[fs] / (1.0 + torch.where(search[fs], best_off, torch.zeros_like(best_off)))
            X = t[:, None, None, :] + ray_w * z[..., None]
            cols, w = self._sample(X.reshape(-1, 3), ray_dir.reshape(-1, 3), src)  # [S, n, 3], [S, n]
            wsum = w.sum(0)
            mean = (cols * w[..., None]).sum(0) / wsum.clamp_min(cfg.min_angle_weight)[:, None]  # [n, 3]
            var = (w * ((cols - mean[None]) ** 2).mean(-1)).sum(0) / wsum.clamp_min(cfg.min_angle_weight)  # [n]
            agreement = torch.exp(-0.5 * var / cfg.agreement_std**2)  # 1 for one source or full agreement
            agreement = torch.where((w > 0).sum(0) >= 2, agreement, agreement * cfg.single_source_factor)
            rgb[fs] = mean.view(*z.shape, 3)
            best_w[fs] = (w.max(0).values * agreement).view(z.shape)
            agree[fs] = agreement.view(z.shape)
        rgb = rgb * holes[..., None]
        return rgb, best_w * holes, agree * holes

    def _pair_cost(self, X: Tensor, ray_dir: Tensor, pair: Views | None, shape: torch.Size) -> Tensor:
        """1 - ZNCC of the two capture views over windows at the points X; ``no_evidence_cost``
        where there is no pair, a point is not seen by both, or a window is untextured. [f, H, W]"""
        cfg = self.config
        no_evidence = torch.full(shape, cfg.no_evidence_cost, dtype=X.dtype, device=X.device)
        if pair is None:
            return no_evidence
        cols, w = self._sample(X.reshape(-1, 3), ray_dir.reshape(-1, 3), pair)  # [2, n, 3], [2, n]
        luma = torch.tensor(LUMA, dtype=X.dtype, device=X.device)
        g = (cols @ luma).view(PAIR, *shape) - GREY_OFFSET  # [2, f, H, W]
        seen = (w > 0).all(0).view(shape).to(X.dtype)

        def box(x: Tensor) -> Tensor:
            return F.avg_pool2d(
                x[:, None], cfg.cost_window_px, stride=1, padding=cfg.cost_window_px // 2, count_include_pad=False
            )[:, 0]

        m1, m2 = box(g[0]), box(g[1])
        v1 = (box(g[0] * g[0]) - m1 * m1).clamp_min(0)
        v2 = (box(g[1] * g[1]) - m2 * m2).clamp_min(0)
        cov = box(g[0] * g[1]) - m1 * m2
        ncc = cov / torch.sqrt(v1 * v2 + cfg.min_texture_std**4)
        textured = (v1 > cfg.min_texture_std**2) & (v2 > cfg.min_texture_std**2) & (box(seen) > cfg.min_seen_fraction)
        return torch.where(textured, 1.0 - ncc, no_evidence)

    @staticmethod
    def _nearest_sources(sources: Views, targets: Cameras, count: int) -> Views:
        """At most ``count`` views, nearest (camera centre) to the targets' mean centre."""
        if len(sources) <= count:
            return sources
        d = (sources.cams.centers - targets.centers.mean(0)).norm(dim=-1)
        keep = torch.argsort(d)[:count].tolist()
        return Views(
            sources.images[keep],
            sources.cams[keep],
            [sources.ids[i] for i in keep],
            None if sources.depth is None else sources.depth[keep],
        )

    def _sample(self, X: Tensor, ray_dir: Tensor, sources: Views) -> tuple[Tensor, Tensor]:
        """Colours of world points in every source and their angular weights.

        Args:
            X: world points. [n, 3]
            ray_dir: unit direction of the target's ray through each point. [n, 3]
            sources: S views.
        Returns:
            (cols, w): sampled colours [S, n, 3]; weights in [0, 1], 0 where a source does not see
            the point (behind it, outside its image, or at too steep an angle) [S, n].
        """
        cfg = self.config
        H, W = sources.cams.height, sources.cams.width
        w2c, K = sources.cams.w2c, sources.cams.K
        Xs = torch.einsum("sij,nj->sni", w2c[:, :3, :3], X) + w2c[:, None, :3, 3]  # [S, n, 3]
        z = Xs[..., 2]
        uvw = torch.einsum("sij,snj->sni", K, Xs)
        u = uvw[..., 0] / z.clamp_min(cfg.min_depth)
        v = uvw[..., 1] / z.clamp_min(cfg.min_depth)
        inside = (z > cfg.min_depth) & (u >= 0) & (u < W) & (v >= 0) & (v < H)  # [S, n]
        if sources.depth is not None:  # occlusion test: the source's surface lies in front of the point
            ui = u.nan_to_num(0.0).long().clamp(0, W - 1)
            vi = v.nan_to_num(0.0).long().clamp(0, H - 1)
            surface = sources.depth.reshape(len(sources), -1).gather(1, vi * W + ui)  # [S, n]
            inside = inside & ~((surface > cfg.min_depth) & (z > surface * (1.0 + cfg.occlusion_tolerance)))
        ray_s = F.normalize(X[None] - sources.cams.centers[:, None], dim=-1)  # [S, n, 3]
        cos = (ray_s * ray_dir[None]).sum(-1).clamp(-1.0, 1.0)
        sigma = math.radians(cfg.angle_sigma_deg)
        w = torch.exp(-0.5 * (torch.arccos(cos) / sigma) ** 2) * inside
        w = torch.where(w >= cfg.min_angle_weight, w, torch.zeros_like(w))
        grid = torch.stack([2.0 * u / W - 1.0, 2.0 * v / H - 1.0], dim=-1)[:, None]  # [S, 1, n, 2]
        grid = torch.nan_to_num(grid, nan=2.0, posinf=2.0, neginf=-2.0)
        img = sources.images.permute(0, 3, 1, 2)  # [S, 3, H, W]
        cols = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return cols[:, :, 0].permute(0, 2, 1), w

    def generate(
        self, cond: ConditionVideo, *, num_steps: int = 1, seed: int = 0, progress: GenerateProgress | None = None
    ) -> Frames:
        """Frames at the target cameras with per-pixel confidence.

        Args:
            cond: the segment's condition (targets, renders, retrieved captures, carried frames).
            num_steps, seed: accepted for the Generator protocol; this generator is deterministic.
        Returns:
            Frames: images float32 [F, H, W, 3] in [0, 1], confidence float32 [F, H, W].
        """
        self.check_inputs(cond)
        cfg = self.config
        r = cond.renders
        rendered = r.mask
        depth = self.guess_depth(r.depth, rendered)
        sources = _cat_views([v for v in (cond.memory, cond.carried) if len(v)], cond.targets)
        captures = cond.memory if len(cond.memory) else None
        rgb, weight, agreement = self.reproject(
            cond.targets, depth, depth > cfg.min_depth, sources, captures, search=~rendered
        )
        reprojected = weight > 0
        known = rendered | reprojected
        blend = torch.where(r.source == GUIDE_SOURCE, cfg.guide_blend, cfg.render_blend)
        blend = torch.where(r.source == ENSEMBLE_SOURCE, cfg.ensemble_blend, blend).to(rgb)[..., None]
        mixed = torch.where(rendered[..., None], torch.lerp(rgb, r.rgb, blend), rgb)
        images = torch.where(reprojected[..., None], mixed, r.rgb)  # the render alone where no source sees
        filled = push_pull(images.permute(0, 3, 1, 2), known[:, None].to(images.dtype)).permute(0, 2, 3, 1)
        images = torch.where(known[..., None], images, filled).clamp(0.0, 1.0)
        ceiling = torch.where(rendered, cfg.rendered_confidence, cfg.reprojected_confidence).to(depth)
        confidence = torch.where(reprojected, ceiling * weight, cfg.inpainted_confidence)
        if cfg.ensemble_angle_free and cfg.ensemble_blend >= 1.0:
            alone = rendered & (r.source == ENSEMBLE_SOURCE) & (agreement > 0)
            confidence = torch.where(alone, ceiling * agreement, confidence)
        return Frames(images=images.contiguous(), confidence=confidence.contiguous())


def _cat_views(items: list[Views], like: Cameras) -> Views:
    """Concatenate views (possibly none) on the targets' device."""
    dev = like.device
    if not items:
        empty = Cameras(like.w2c[:0], like.K[:0], like.width, like.height)
        return Views(torch.zeros(0, like.height, like.width, 3, device=dev), empty, [])
    depth = None
    if any(v.depth is not None for v in items):  # views without a depth map get 0 (no occlusion test)
        depth = torch.cat(
            [(v.depth if v.depth is not None else torch.zeros(v.images.shape[:3], device=dev)).to(dev) for v in items]
        )
    return Views(
        torch.cat([v.images.to(dev) for v in items]),
        Cameras.cat([v.cams.to(dev) for v in items]),
        [i for v in items for i in v.ids],
        depth,
    )
