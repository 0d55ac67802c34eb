"""The default generator: no weights, only geometry (DESIGN.md section 1 step 5).

For each target frame of a segment:

1. keep the pixels the memory rendered (confidence ``rendered_confidence``);
2. fill the rest by reprojecting the retrieved captures (``cond.memory``) and the carried-over frames
   (``cond.carried``) through a depth per pixel: the rendered depth where there is one, elsewhere a
   guess made by push-pull filling the rendered inverse depth. Sources are blended with weights that
   fall off with the angle between the target's ray and the source's ray to the same 3D point
   (confidence from ``inpainted_confidence`` up to ``reprojected_confidence`` with the best weight);
3. inpaint what no source sees with a multi-scale push-pull of the colours around it (confidence
   ``inpainted_confidence``).

Everything is batched torch on the device of the condition tensors; the seed and step count of the
``Generator`` protocol are accepted and unused (the result is deterministic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..stages.types import Cameras, ConditionVideo, Frames, Views
from . import GENERATORS


@dataclass(frozen=True)
class ReprojectConfig:
    """Hyper-parameters of the reprojection generator."""

    rendered_confidence: float = 1.0  # pixels the memory covers are taken as they are
    reprojected_confidence: float = 0.5  # medium: right where the depth guess is right
    inpainted_confidence: float = 0.1  # low: push-pull colours carry no information about the scene
    angle_sigma_deg: float = 10.0  # blending weight exp(-angle^2 / (2 sigma^2)) between target and source rays
    min_angle_weight: float = 1e-3  # a source whose weight is below this counts as not seeing the point
    min_depth: float = 1e-6  # points at or behind a camera's plane (camera z below this) are not visible
    chunk_points: int = 1 << 20  # hole pixels reprojected per batch (bounds memory at large sizes)

    def __post_init__(self) -> None:
        for name in ("rendered_confidence", "reprojected_confidence", "inpainted_confidence"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ReprojectConfig.{name} must be in [0, 1]; got {v}")
        if self.angle_sigma_deg <= 0:
            raise ValueError(f"ReprojectConfig.angle_sigma_deg must be > 0; got {self.angle_sigma_deg}")
        if self.chunk_points < 1:
            raise ValueError(f"ReprojectConfig.chunk_points must be >= 1; got {self.chunk_points}")


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
        up = F.interpolate(filled, size=s.shape[-2:], mode="bilinear", align_corners=False)
        alpha = w.clamp(0.0, 1.0)
        own = s / w.clamp_min(eps)
        filled = alpha * own + (1.0 - alpha) * up
    return filled


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
    """Fill render holes by reprojecting captures and carried frames, then push-pull inpainting.

    Example:
        >>> from backend.stages.types import Cameras, ConditionVideo, Renders, Views
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
        want = {"rgb": (F_, H, W, 3), "depth": (F_, H, W), "mask": (F_, H, W)}
        for name, shape in want.items():
            got = tuple(getattr(r, name).shape)
            if got != shape:
                raise ValueError(f"reproject: cond.renders.{name} must be {list(shape)} for {F_} targets at {W}x{H}; got {list(got)}")
        for name in ("memory", "carried"):
            views: Views = getattr(cond, name)
            if len(views) and tuple(views.images.shape[1:]) != (H, W, 3):
                raise ValueError(
                    f"reproject: cond.{name}.images must be [*, {H}, {W}, 3] (the target size); "
                    f"got {list(views.images.shape)}"
                )

    # -- steps --------------------------------------------------------------------------------

    def guess_depth(self, depth: Tensor, mask: Tensor) -> Tensor:
        """Rendered depth where the memory covers, push-pull filled inverse depth elsewhere.

        Args:
            depth: rendered camera z, 0 where empty. [F, H, W]
            mask: pixels the memory covers. bool [F, H, W]
        Returns:
            camera z for every pixel; where the frame has no rendered pixel at all, 0. [F, H, W]
        """
        valid = mask & (depth > self.config.min_depth)
        inv = torch.where(valid, 1.0 / depth.clamp_min(self.config.min_depth), torch.zeros_like(depth))
        inv_filled = push_pull(inv[:, None], valid[:, None].to(depth.dtype))[:, 0]
        guess = torch.where(inv_filled > 0, 1.0 / inv_filled.clamp_min(self.config.min_depth), torch.zeros_like(depth))
        return torch.where(valid, depth, guess)

    def reproject(self, targets: Cameras, depth: Tensor, holes: Tensor, sources: Views) -> tuple[Tensor, Tensor]:
        """Colour the hole pixels from the source views through the given depth.

        Args:
            targets: target cameras, F of them.
            depth: camera z per target pixel (0: unknown). [F, H, W]
            holes: pixels to colour. bool [F, H, W]
            sources: views to sample (captures and carried frames), S of them, same size as targets.
        Returns:
            (rgb, weight): blended colour [F, H, W, 3] and the best source's angular weight in
            [0, 1], 0 where no source sees the point [F, H, W].
        """
        cfg = self.config
        rgb = torch.zeros(*depth.shape, 3, dtype=depth.dtype, device=depth.device)
        best = torch.zeros_like(depth)
        holes = holes & (depth > cfg.min_depth)
        if len(sources) == 0 or not bool(holes.any()):
            return rgb, best
        fi, yi, xi = torch.nonzero(holes, as_tuple=True)
        rays = _pixel_rays(targets)  # [F, H, W, 3]
        c2w = targets.c2w
        src_w2c = sources.cams.w2c  # [S, 4, 4]
        src_K = sources.cams.K  # [S, 3, 3]
        src_centers = sources.cams.centers  # [S, 3]
        src_img = sources.images.permute(0, 3, 1, 2)  # [S, 3, H, W]
        S, H, W = src_img.shape[0], sources.cams.height, sources.cams.width
        sigma = math.radians(cfg.angle_sigma_deg)
        for start in range(0, fi.numel(), cfg.chunk_points):
            f, y, x = fi[start:start + cfg.chunk_points], yi[start:start + cfg.chunk_points], xi[start:start + cfg.chunk_points]
            p_cam = rays[f, y, x] * depth[f, y, x, None]  # [n, 3]
            R, t = c2w[f, :3, :3], c2w[f, :3, 3]
            X = (R @ p_cam[:, :, None])[..., 0] + t  # [n, 3] world
            Xs = torch.einsum("sij,nj->sni", src_w2c[:, :3, :3], X) + src_w2c[:, None, :3, 3]  # [S, n, 3]
            z = Xs[..., 2]
            uvw = torch.einsum("sij,snj->sni", src_K, Xs)
            u = uvw[..., 0] / z.clamp_min(cfg.min_depth)
            v = uvw[..., 1] / z.clamp_min(cfg.min_depth)
            inside = (z > cfg.min_depth) & (u >= 0) & (u < W) & (v >= 0) & (v < H)  # [S, n]
            ray_t = F.normalize(X - t, dim=-1)  # target camera centre is c2w translation
            ray_s = F.normalize(X[None] - src_centers[:, None], dim=-1)  # [S, n, 3]
            cos = (ray_s * ray_t[None]).sum(-1).clamp(-1.0, 1.0)
            angle = torch.arccos(cos)
            w = torch.exp(-0.5 * (angle / sigma) ** 2) * inside
            w = torch.where(w >= cfg.min_angle_weight, w, torch.zeros_like(w))
            grid = torch.stack([2.0 * u / W - 1.0, 2.0 * v / H - 1.0], dim=-1)[:, None]  # [S, 1, n, 2]
            grid = torch.nan_to_num(grid, nan=2.0, posinf=2.0, neginf=-2.0)
            sampled = F.grid_sample(src_img, grid, mode="bilinear", padding_mode="border", align_corners=False)
            sampled = sampled[:, :, 0].permute(0, 2, 1)  # [S, n, 3]
            wsum = w.sum(0)  # [n]
            col = (sampled * w[..., None]).sum(0) / wsum.clamp_min(cfg.min_angle_weight)[:, None]
            rgb[f, y, x] = col
            best[f, y, x] = w.max(0).values
        return rgb, best

    def generate(self, cond: ConditionVideo, *, num_steps: int = 1, seed: int = 0) -> Frames:
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
        rgb_reproj, weight = self.reproject(cond.targets, depth, ~rendered, sources)
        reprojected = ~rendered & (weight > 0)
        known = rendered | reprojected
        images = torch.where(rendered[..., None], r.rgb, rgb_reproj)
        filled = push_pull(images.permute(0, 3, 1, 2), known[:, None].to(images.dtype)).permute(0, 2, 3, 1)
        images = torch.where(known[..., None], images, filled).clamp(0.0, 1.0)
        confidence = torch.full_like(depth, cfg.inpainted_confidence)
        # reprojected pixels range from medium (source ray along the target ray) down to low
        reproj_conf = cfg.inpainted_confidence + (cfg.reprojected_confidence - cfg.inpainted_confidence) * weight
        confidence = torch.where(reprojected, reproj_conf, confidence)
        confidence = torch.where(rendered, torch.full_like(depth, cfg.rendered_confidence), confidence)
        return Frames(images=images.contiguous(), confidence=confidence.contiguous())


def _cat_views(items: list[Views], like: Cameras) -> Views:
    """Concatenate views (possibly none) on the targets' device."""
    dev = like.device
    if not items:
        empty = Cameras(like.w2c[:0], like.K[:0], like.width, like.height)
        return Views(torch.zeros(0, like.height, like.width, 3, device=dev), empty, [])
    return Views(
        torch.cat([v.images.to(dev) for v in items]),
        Cameras.cat([v.cams.to(dev) for v in items]),
        [i for v in items for i in v.ids],
    )
