"""``torch_cpu``: a small differentiable EWA splatting rasterizer in plain torch.

It draws the same Gaussians as ``gsplat.rasterization`` (classic mode, not packed) with the same
conventions, so that fitting runs and is tested where no CUDA exists. Steps, per camera:

1. project: world -> camera (``viewmats``), 3D covariance R S S^T R^T -> 2D covariance J W S W^T J^T
   through the Jacobian of the pinhole projection (view angle clamped to the frustum widened by
   30 % of tan(fov), as gsplat does) plus ``eps2d`` px^2 of blur; cull behind ``near_plane``,
   beyond ``far_plane`` and outside the image;
2. sort the Gaussians by camera depth and list (Gaussian, pixel) pairs for the pixel centres
   (i + 0.5) inside each Gaussian's box: as far as alpha can reach 1/255, at most 3.33 sigma
   (gsplat's opacity-aware box);
3. per pair, alpha = min(0.999, opacity * exp(-d^T conic d / 2)), dropped below 1/255; per pixel,
   composite front to back: T_i = prod_{j<i} (1 - alpha_j) (a segmented cumulative sum of
   log(1 - alpha) in float64, float32 on ``mps``), colour = sum_i alpha_i T_i c_i. A pixel stops once T would fall
   below 1e-4 (gsplat's rule), so the Gaussian that would cross it is not drawn.

Steps 2-3 have two kernels (``kernel``). On CPU tensors, :mod:`backend.rasterizers.cpu_kernel`
(numba) draws rows of pixels in parallel and stores no pair: 4-11x the torch kernel's step
(docs/benchmarks.md, "CPU rasterizer"). The torch kernel, below, runs on any device (Apple ``mps``)
and is the tests' reference: its work is proportional to the pairs, not to Gaussians x pixels, and
its memory is bounded by drawing a camera in bands of rows holding at most ``max_pairs`` pairs each.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ALPHA_MAX, ALPHA_MIN, RASTERIZERS, TRANSMITTANCE_MIN, cpu_kernel
from .sh import sh_to_colors

NEAR_PLANE = 0.01  # gsplat.rasterization default
FAR_PLANE = 1e10  # gsplat.rasterization default
EPS2D = 0.3  # px^2 added to every 2D covariance (gsplat's eps2d: minimum footprint, anti-aliasing)
TILE_SIZE = 16  # pixels per tile side (gsplat's default tile size; used by the gsplat rasterizer)
MAX_PAIRS = 1 << 22  # (Gaussian, pixel) pairs drawn at once: bounds memory (about 0.5 GB with gradients)
FRUSTUM_MARGIN = 0.3  # Jacobian uses x/z, y/z clamped to the frustum widened by this times tan(fov)
# Box half-size in standard deviations: alpha = o exp(-m^2 / 2) falls below ALPHA_MIN beyond
# m = sqrt(2 ln(o / ALPHA_MIN)), at most sqrt(2 ln 255) = 3.33 (gsplat's opacity-aware box).
RADIUS_SIGMAS = math.sqrt(2.0 * math.log(1.0 / ALPHA_MIN))
SMALL_BOX = 8  # boxes up to this many pixels wide get a width class each; wider ones share classes
DET_MIN = 1e-10  # smallest 2D covariance determinant treated as a proper ellipse
KERNELS = ("auto", "numba", "torch")  # steps 2-3: numba's rows on CPU tensors (``auto``), or torch's pairs


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices of quaternions w x y z (normalised here). [N, 4] -> [N, 3, 3]"""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quats.shape[:-1], 3, 3)


def covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """3D covariances R S S^T R^T from rotations and axis scales. [N, 4], [N, 3] -> [N, 3, 3]"""
    M = quat_to_rotmat(quats) * scales[:, None, :]  # R @ diag(s)
    return M @ M.transpose(-1, -2)


def project_gaussians(
    means: Tensor,  # [N, 3]
    covars: Tensor,  # [N, 3, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    near_plane: float = NEAR_PLANE,
    far_plane: float = FAR_PLANE,
    eps2d: float = EPS2D,
    opacities: Tensor | None = None,  # [N]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of 3D Gaussians into C pinhole cameras.

    Args:
        means: centres, world. [N, 3]
        covars: 3D covariances, world. [N, 3, 3]
        viewmats: world-to-camera, OpenCV. [C, 4, 4]
        Ks: intrinsics, pixels (pixel i spans [i, i+1]). [C, 3, 3]
        width, height: image size in pixels.
        opacities: when given, the box shrinks to where alpha can reach 1/255, and Gaussians of
            opacity below 1/255 are culled (as gsplat). [N]

    Returns:
        means2d: projected centres, pixels. [C, N, 2]
        conics: inverse 2D covariances (a, b, c) of [[a, b], [b, c]]. [C, N, 3]
        depths: camera z. [C, N]
        radii: half extents of the box (at most 3.33 sigma) in whole pixels, 0 where culled. int32 [C, N, 2]
    """
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C, N, 3]
    covars_c = R[:, None] @ covars[None] @ R.transpose(-1, -2)[:, None]  # [C, N, 3, 3]
    tx, ty, tz = means_c.unbind(-1)  # [C, N]
    is_in_depth = (tz > near_plane) & (tz < far_plane)
    z = torch.where(is_in_depth, tz, torch.ones_like(tz))  # no inf/NaN from culled Gaussians

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    u = torch.clamp(
        tx / z, min=-(cx / fx + FRUSTUM_MARGIN * tan_fovx), max=(width - cx) / fx + FRUSTUM_MARGIN * tan_fovx
    )
    v = torch.clamp(
        ty / z, min=-(cy / fy + FRUSTUM_MARGIN * tan_fovy), max=(height - cy) / fy + FRUSTUM_MARGIN * tan_fovy
    )
    zeros = torch.zeros_like(z)
    J = torch.stack([fx / z, zeros, -fx * u / z, zeros, fy / z, -fy * v / z], dim=-1).reshape(*z.shape, 2, 3)
    cov2d = J @ covars_c @ J.transpose(-1, -2)  # [C, N, 2, 2]
    a = cov2d[..., 0, 0] + eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    is_proper = det > DET_MIN
    det_safe = torch.where(is_proper, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)  # [C, N, 3]
    means2d = torch.stack([fx * tx / z + cx, fy * ty / z + cy], dim=-1)  # [C, N, 2]

    with torch.no_grad():
        extent = torch.full_like(z, RADIUS_SIGMAS)  # [C, N]
        is_visible = torch.ones_like(is_in_depth)
        if opacities is not None:
            o = opacities.detach()[None, :].expand_as(z)
            is_visible = o >= ALPHA_MIN
            extent = torch.sqrt(2.0 * torch.log(o.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(RADIUS_SIGMAS)
        radii = torch.ceil(extent[..., None] * torch.sqrt(torch.stack([a, c], dim=-1).clamp_min(0)))  # [C, N, 2]
        is_inside = (
            (means2d[..., 0] + radii[..., 0] > 0)
            & (means2d[..., 0] - radii[..., 0] < width)
            & (means2d[..., 1] + radii[..., 1] > 0)
            & (means2d[..., 1] - radii[..., 1] < height)
        )
        is_drawn = is_in_depth & is_proper & is_inside & is_visible & (radii > 0).any(dim=-1)
        radii = torch.where(is_drawn[..., None], radii, torch.zeros_like(radii)).to(torch.int32)
    return means2d, conics, tz, radii


def _check_inputs(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    sh_degree: int | None,
    backgrounds: Tensor | None,
) -> None:
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"render: means must be [N, 3]; got {tuple(means.shape)}")
    n = means.shape[0]
    for name, value, shape in (("quats", quats, (n, 4)), ("scales", scales, (n, 3)), ("opacities", opacities, (n,))):
        if tuple(value.shape) != shape:
            raise ValueError(f"render: {name} must be {list(shape)}; got {tuple(value.shape)}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"render: viewmats must be [C, 4, 4]; got {tuple(viewmats.shape)}")
    c = viewmats.shape[0]
    if tuple(Ks.shape) != (c, 3, 3):
        raise ValueError(f"render: Ks must be [{c}, 3, 3]; got {tuple(Ks.shape)}")
    per_gaussian = 3 if sh_degree is not None else 2  # [N, K, 3] or [N, D]
    ok = colors.ndim in (per_gaussian, per_gaussian + 1) and colors.shape[colors.ndim - per_gaussian] == n
    if ok and colors.ndim == per_gaussian + 1:
        ok = colors.shape[0] == c
    if sh_degree is not None:
        ok = ok and colors.shape[-1] == 3 and colors.shape[-2] >= (sh_degree + 1) ** 2
    if not ok:
        want = f"[(C,) N, K>={(sh_degree + 1) ** 2}, 3]" if sh_degree is not None else "[(C,) N, D]"
        raise ValueError(f"render: colors must be {want} with N={n}, C={c}; got {tuple(colors.shape)}")
    if backgrounds is not None and backgrounds.shape[0] != c:
        raise ValueError(f"render: backgrounds must be [{c}, D]; got {tuple(backgrounds.shape)}")


@RASTERIZERS.register("torch_cpu")
class TorchCpuRasterizer:
    """EWA splatting in plain torch (see module docstring); differentiable in every input.

    Args:
        near_plane, far_plane: depth range drawn, camera units.
        eps2d: blur added to the 2D covariances, px^2.
        max_pairs: (Gaussian, pixel) pairs drawn at once by the torch path; bounds its memory.
        kernel: steps 2-3 by ``numba`` (:mod:`backend.rasterizers.cpu_kernel`: rows of pixels in
            parallel, no pair stored; CPU tensors only) or ``torch`` (the pairs listed and composited
            as tensors, any device); ``auto``: numba for CPU tensors where it imports, else torch.

    Example::

        >>> r = TorchCpuRasterizer()
        >>> N = 100
        >>> means, quats = torch.randn(N, 3) + torch.tensor([0, 0, 5.0]), torch.randn(N, 4)
        >>> scales, opacities, colors = torch.rand(N, 3) * 0.1, torch.rand(N), torch.rand(N, 3)
        >>> viewmats, Ks = torch.eye(4)[None], torch.tensor([[[40.0, 0, 32], [0, 40, 24], [0, 0, 1]]])
        >>> img, alpha, meta = r.render(means, quats, scales, opacities, colors, viewmats, Ks, 64, 48)
        >>> img.shape, alpha.shape
        (torch.Size([1, 48, 64, 3]), torch.Size([1, 48, 64, 1]))
    """

    def __init__(
        self,
        *,
        near_plane: float = NEAR_PLANE,
        far_plane: float = FAR_PLANE,
        eps2d: float = EPS2D,
        max_pairs: int = MAX_PAIRS,
        kernel: str = "auto",
    ) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1; got {max_pairs}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
        if kernel == "numba" and not cpu_kernel.AVAILABLE:
            raise ValueError("kernel 'numba' needs the numba package (pip install numba)")
        self.kernel = kernel
        self.near_plane = near_plane
        self.far_plane = far_plane
        self.eps2d = eps2d
        self.max_pairs = max_pairs

    def render(
        self,
        means: Tensor,  # [N, 3]
        quats: Tensor,  # [N, 4]
        scales: Tensor,  # [N, 3]
        opacities: Tensor,  # [N]
        colors: Tensor,  # [(C,) N, D] or [(C,) N, K, 3]
        viewmats: Tensor,  # [C, 4, 4]
        Ks: Tensor,  # [C, 3, 3]
        width: int,
        height: int,
        *,
        sh_degree: int | None = None,
        backgrounds: Tensor | None = None,  # [C, D]
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Render; arguments and returns as :meth:`backend.rasterizers.Rasterizer.render`. Leading
        batch dimensions (``means`` [..., N, 3], ``viewmats`` [..., C, 4, 4], and so on: one Gaussian
        set and its cameras per batch element) are drawn one element after another and stacked."""
        if means.ndim > 2:
            return self._render_batch(
                means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds
            )
        _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, sh_degree, backgrounds)
        means2d, rest = self._project(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree)
        return self._draw(means2d, *rest, opacities, width, height, backgrounds)

    def _project(
        self,
        means: Tensor,
        quats: Tensor,
        scales: Tensor,
        opacities: Tensor,
        colors: Tensor,
        viewmats: Tensor,
        Ks: Tensor,
        width: int,
        height: int,
        sh_degree: int | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Step 1 for C cameras: 2D centres [C, N, 2] and (conics [C, N, 3], depths [C, N], radii
        [C, N, 2], features [C, N, D])."""
        means2d, conics, depths, radii = project_gaussians(
            means,
            covariances(quats, scales),
            viewmats,
            Ks,
            width,
            height,
            near_plane=self.near_plane,
            far_plane=self.far_plane,
            eps2d=self.eps2d,
            opacities=opacities,
        )
        if sh_degree is not None:
            feats = sh_to_colors(sh_degree, means, colors, viewmats)  # [C, N, 3]
        else:
            n_cams = viewmats.shape[0]
            feats = colors if colors.ndim == 3 else colors[None].expand(n_cams, *colors.shape)  # [C, N, D]
        return means2d, (conics, depths, radii, feats)

    def _draw(
        self,
        means2d: Tensor,
        conics: Tensor,
        depths: Tensor,
        radii: Tensor,
        feats: Tensor,
        opacities: Tensor,
        width: int,
        height: int,
        backgrounds: Tensor | None,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Steps 2-3 for the C cameras of :meth:`_project`: colours, alphas and ``meta``."""
        n_cams = means2d.shape[0]
        images, alphas = [], []
        for cam in range(n_cams):
            image, alpha = self._render_one(
                means2d[cam], conics[cam], depths[cam], radii[cam], opacities, feats[cam], width, height
            )
            images.append(image)
            alphas.append(alpha)
        render_colors = torch.stack(images)  # [C, H, W, D]
        render_alphas = torch.stack(alphas)[..., None]  # [C, H, W, 1]
        if backgrounds is not None:
            render_colors = render_colors + backgrounds[:, None, None, :] * (1.0 - render_alphas)
        meta = {
            "means2d": means2d,
            "conics": conics,
            "depths": depths,
            "radii": radii,
            "opacities": opacities[None].expand(n_cams, -1),
            "width": width,
            "height": height,
            "n_cameras": n_cams,
            "gaussian_ids": None,
            "n_features": feats.shape[-1],
        }
        return render_colors, render_alphas, meta

    def _render_batch(
        self,
        means: Tensor,  # [..., N, 3]
        quats: Tensor,  # [..., N, 4]
        scales: Tensor,  # [..., N, 3]
        opacities: Tensor,  # [..., N]
        colors: Tensor,  # [..., (C,) N, D] or [..., (C,) N, K, 3]
        viewmats: Tensor,  # [..., C, 4, 4]
        Ks: Tensor,  # [..., C, 3, 3]
        width: int,
        height: int,
        sh_degree: int | None,
        backgrounds: Tensor | None,  # [..., C, D]
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """:meth:`render` per element of the leading batch dimensions, outputs and ``meta``'s tensors
        stacked like the images ([..., C, N, 2] and so on). The elements are drawn from the stacked 2D
        centres, so ``meta["means2d"]``'s gradient (DefaultStrategy's) is every element's."""
        batch = means.shape[:-2]
        for name, value in (("quats", quats), ("scales", scales), ("opacities", opacities), ("viewmats", viewmats)):
            if value.shape[: len(batch)] != batch:
                raise ValueError(
                    f"render: {name} must share means' batch dimensions {list(batch)}; got {tuple(value.shape)}"
                )
        flat = [
            None if t is None else t.reshape(-1, *t.shape[len(batch) :])
            for t in (means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
        ]
        n_elements = flat[0].shape[0]
        projected = []
        for b in range(n_elements):
            args = [t[b] for t in flat[:7]]
            background = None if flat[7] is None else flat[7][b]
            _check_inputs(*args, sh_degree, background)
            projected.append(self._project(*args, width, height, sh_degree))
        means2d = torch.stack([m for m, _ in projected]).reshape(*batch, *projected[0][0].shape)  # [..., C, N, 2]
        flat_means2d = means2d.reshape(n_elements, *means2d.shape[len(batch) :])  # drawn from: on the gradient path
        outs = [
            self._draw(flat_means2d[b], *rest, flat[3][b], width, height, None if flat[7] is None else flat[7][b])
            for b, (_, rest) in enumerate(projected)
        ]

        def stacked(items: list[Tensor]) -> Tensor:
            return torch.stack(items).reshape(*batch, *items[0].shape)

        meta = {
            key: stacked([o[2][key] for o in outs]) if isinstance(value, Tensor) else value
            for key, value in outs[0][2].items()
        }
        meta["means2d"] = means2d
        return stacked([o[0] for o in outs]), stacked([o[1] for o in outs]), meta

    def _uses_numba(self, device: torch.device) -> bool:
        """Whether steps 2-3 run in :mod:`backend.rasterizers.cpu_kernel` for tensors on ``device``."""
        if self.kernel == "auto":
            return device.type == "cpu" and cpu_kernel.AVAILABLE
        if self.kernel == "numba" and device.type != "cpu":
            raise ValueError(f"kernel 'numba' draws CPU tensors only; got tensors on {device}")
        return self.kernel == "numba"

    def _render_one(
        self,
        means2d: Tensor,
        conics: Tensor,
        depths: Tensor,
        radii: Tensor,
        opacities: Tensor,
        feats: Tensor,
        width: int,
        height: int,
    ) -> tuple[Tensor, Tensor]:
        """One camera: [N, 2], [N, 3], [N], [N, 2], [N], [N, D] -> colour [H, W, D], alpha [H, W]."""
        device, dtype = means2d.device, means2d.dtype
        drawn = torch.nonzero((radii > 0).all(dim=-1)).squeeze(-1)
        ids = drawn[torch.argsort(depths[drawn].detach(), stable=True)]  # nearest first
        # One gather of all a pair reads: centre 2, conic 3, opacity 1, features D.
        packed = torch.cat([means2d, conics, opacities[:, None], feats], dim=-1)[ids]  # [M, 6 + D]
        with torch.no_grad():
            # Pixels whose centre (i + 0.5) lies in the box [mean - radius, mean + radius].
            centre, box = packed[:, :2], radii[ids].to(dtype)
            lo = torch.ceil(centre - box - 0.5).long()  # [M, 2]
            hi = torch.floor(centre + box - 0.5).long()
            lo[:, 0].clamp_(0, width - 1), lo[:, 1].clamp_(0, height - 1)
            hi[:, 0].clamp_(-1, width - 1), hi[:, 1].clamp_(-1, height - 1)
        if self._uses_numba(device):
            boxes = torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], dim=-1)  # [M, 4]
            image, alpha = cpu_kernel.RowComposite.apply(packed, boxes, width, height)
            return image.reshape(height, width, -1), alpha.reshape(height, width)
        with torch.no_grad():
            n_x = (hi[:, 0] - lo[:, 0] + 1).clamp_min(0)  # [M]
            has_rows = hi[:, 1] >= lo[:, 1]
            rows_diff = torch.zeros(height + 1, dtype=torch.long, device=device)
            rows_diff.index_add_(0, lo[has_rows, 1], n_x[has_rows])
            rows_diff.index_add_(0, hi[has_rows, 1] + 1, -n_x[has_rows])
            pairs_per_row = torch.cumsum(rows_diff, dim=0)[:height].tolist()

        image = torch.zeros(height * width, feats.shape[-1], device=device, dtype=dtype)
        alpha = torch.zeros(height * width, device=device, dtype=dtype)
        for y0, y1 in _row_bands(pairs_per_row, self.max_pairs):
            with torch.no_grad():
                sel = torch.nonzero(has_rows & (n_x > 0) & (hi[:, 1] >= y0) & (lo[:, 1] < y1)).squeeze(-1)
                if sel.numel() == 0:
                    continue
                pixel_ids, gauss, alpha_raw = _list_pairs(
                    packed.detach(), sel, lo, n_x, lo[sel, 1].clamp_min(y0), hi[sel, 1].clamp_max(y1 - 1), width
                )
            band_image, band_alpha = _Composite.apply(packed, pixel_ids, gauss, alpha_raw, width, height)
            image = image + band_image
            alpha = alpha + band_alpha
        return image.reshape(height, width, -1), alpha.reshape(height, width)


def _list_pairs(
    packed: Tensor, sel: Tensor, lo: Tensor, n_x: Tensor, row_lo: Tensor, row_hi: Tensor, width: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The (Gaussian, pixel) pairs of some Gaussians' boxes where alpha reaches 1/255, by pixel then depth.

    Each (Gaussian, row) of the boxes is a unit; units of similar box width are laid out as one
    [units, width class] grid, so that alpha is computed by broadcasting instead of per-pair gathers.

    Args:
        packed: Gaussians by depth, nearest first: centre 2, conic 3, opacity 1, features. [M, 6 + D]
        sel: the Gaussians drawn in these rows. int64 [S]
        lo: boxes' first pixel column and row. int64 [M, 2]
        n_x: boxes' widths in pixels. int64 [M]
        row_lo, row_hi: first and last row drawn of each selected Gaussian. int64 [S]
        width: image width.

    Returns:
        pixel_ids (row * width + column) [P], Gaussian indices into ``packed`` [P] and alpha before the
        0.999 clamp [P], sorted by pixel and, within a pixel, nearest Gaussian first.
    """
    device = packed.device
    n_rows = row_hi - row_lo + 1  # [S]
    unit_gauss = torch.repeat_interleave(sel, n_rows)  # [U]
    unit_first = torch.repeat_interleave(torch.cumsum(n_rows, 0) - n_rows, n_rows)
    unit_row = torch.repeat_interleave(row_lo, n_rows) + torch.arange(unit_gauss.numel(), device=device) - unit_first
    unit_width = n_x[unit_gauss]
    pieces = []
    lower = 0
    for upper in _width_classes(int(unit_width.max())):
        is_in = torch.nonzero((unit_width > lower) & (unit_width <= upper)).squeeze(-1)
        lower = upper
        if is_in.numel() == 0:
            continue
        g, row = unit_gauss[is_in], unit_row[is_in]
        rows = packed[g]  # [U', 6 + D]
        cols = lo[g, 0][:, None] + torch.arange(upper, device=device)  # [U', upper]
        dx = cols.to(packed.dtype) + 0.5 - rows[:, :1]
        dy = (row.to(packed.dtype) + 0.5 - rows[:, 1])[:, None]
        sigma = 0.5 * (rows[:, 2:3] * dx * dx + rows[:, 4:5] * dy * dy) + rows[:, 3:4] * dx * dy
        alpha = rows[:, 5:6] * torch.exp(-sigma)
        is_pair = (
            (cols < (lo[g, 0] + n_x[g])[:, None]) & (sigma >= 0) & (torch.clamp_max(alpha, ALPHA_MAX) >= ALPHA_MIN)
        )
        unit, _ = torch.nonzero(is_pair, as_tuple=True)
        pieces.append((row[unit] * width + cols[is_pair], g[unit], alpha[is_pair]))
    pixel_ids, gauss, alpha_raw = (torch.cat(parts) for parts in zip(*pieces))
    # Gaussians are numbered nearest first, so one sort by (pixel, Gaussian) gives the drawing order.
    order = _argsort(pixel_ids * packed.shape[0] + gauss)
    return pixel_ids[order], gauss[order], alpha_raw[order]


def _width_classes(widest: int) -> list[int]:
    """Box-width classes 1..8, then steps of a quarter, up to ``widest`` (little padding per class)."""
    classes = list(range(1, min(widest, SMALL_BOX) + 1))
    while classes[-1] < widest:
        classes.append(min(widest, classes[-1] + max(1, classes[-1] // 4)))
    return classes


def _segment_starts(pixel_ids: Tensor) -> tuple[Tensor, Tensor]:
    """For pairs grouped by pixel: whether each opens its pixel's run, and the run index. bool [P], int64 [P]"""
    is_first = torch.ones_like(pixel_ids, dtype=torch.bool)
    is_first[1:] = pixel_ids[1:] != pixel_ids[:-1]
    return is_first, torch.cumsum(is_first, dim=0) - 1


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for the long running sums, float32 where the device has no float64 (Apple ``mps``)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _exclusive_segment_cumsum(values: Tensor, is_first: Tensor, segment: Tensor) -> Tensor:
    """Per run of equal pixels, the sum of the values before each pair. [P]

    One cumulative sum over all pairs, in :func:`_accumulation_dtype`; a run's first value has the
    previous run's total subtracted, so the running sum restarts near 0 at every pixel and its
    rounding stays that of one pixel's sum (what makes float32 usable on ``mps``).
    """
    acc = values.to(_accumulation_dtype(values.device))
    totals = acc.new_zeros(int(segment[-1]) + 1 if segment.numel() else 0).index_add_(0, segment, acc)
    restarted = acc.clone()
    restarted[is_first] -= torch.cat([totals.new_zeros(1), totals[:-1]])[segment[is_first]]
    return torch.cumsum(restarted, dim=0) - acc


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of sorted (Gaussian, pixel) pairs with a hand-written backward.

    Forward: per pair, alpha_i = min(0.999, o exp(-sigma_i)); T_i = prod_{j<i} (1 - alpha_j) over the
    pixel's earlier pairs; the pixel stops before T would fall below 1e-4; colour = sum_i alpha_i T_i c_i
    and alpha = sum_i alpha_i T_i. Backward (3DGS's, vectorised): with q_i = c_i . dL/dC + dL/dA and
    S_i = sum_{k>i} alpha_k T_k q_k, dL/dalpha_i = T_i q_i - S_i / (1 - alpha_i); S is a reversed
    segmented cumulative sum. Only the drawn pairs are kept for the backward.
    """

    @staticmethod
    def forward(ctx, packed: Tensor, pixel_ids: Tensor, gauss: Tensor, alpha_raw: Tensor, width: int, height: int):
        """packed [M, 6 + D] (see _render_one); pixel_ids, gauss int64 [P] and alpha_raw [P] from
        :func:`_list_pairs` -> colour [H W, D] and alpha [H W]."""
        alpha = torch.clamp_max(alpha_raw, ALPHA_MAX)
        is_first, segment = _segment_starts(pixel_ids)
        log_keep = torch.log1p(-alpha.to(_accumulation_dtype(alpha.device)))
        log_t_before = _exclusive_segment_cumsum(log_keep, is_first, segment)
        # A pixel is finished before the Gaussian that would take T below TRANSMITTANCE_MIN; the kept
        # pairs are a prefix of each pixel's list, so their T is unchanged by the cut.
        kept = torch.nonzero(log_t_before + log_keep > math.log(TRANSMITTANCE_MIN)).squeeze(-1)
        pixel_ids, gauss, alpha, alpha_raw = pixel_ids[kept], gauss[kept], alpha[kept], alpha_raw[kept]
        transmittance = torch.exp(log_t_before[kept]).to(packed.dtype)
        weights = alpha * transmittance  # [K]
        n_pixels = width * height
        colors = packed[:, 6:].index_select(0, gauss)
        image = packed.new_zeros(n_pixels, packed.shape[1] - 6).index_add_(0, pixel_ids, weights[:, None] * colors)
        alphas = packed.new_zeros(n_pixels).index_add_(0, pixel_ids, weights)
        ctx.save_for_backward(packed, pixel_ids, gauss, alpha, alpha_raw, transmittance)
        ctx.width = width
        return image, alphas

    @staticmethod
    def backward(ctx, grad_image: Tensor, grad_alpha: Tensor):
        packed, pixel_ids, gauss, alpha, alpha_raw, transmittance = ctx.saved_tensors
        rows = packed.index_select(0, gauss)
        g_img = grad_image.index_select(0, pixel_ids)  # [K, D]
        weights = alpha * transmittance
        q = (rows[:, 6:] * g_img).sum(-1) + grad_alpha.index_select(0, pixel_ids)  # dL/dweight [K]
        is_first, segment = _segment_starts(pixel_ids)
        wq = weights * q
        before = _exclusive_segment_cumsum(wq, is_first, segment)
        totals = before.new_zeros(int(segment[-1]) + 1 if segment.numel() else 0).index_add_(0, segment, wq.to(before))
        after = (totals[segment] - before - wq).to(wq.dtype)  # S_i: what the pixel draws behind pair i
        grad_alpha_pair = transmittance * q - after / (1.0 - alpha)
        grad_raw = torch.where(alpha_raw <= ALPHA_MAX, grad_alpha_pair, torch.zeros_like(grad_alpha_pair))
        grad_sigma = -alpha_raw * grad_raw  # alpha_raw = o exp(-sigma)
        grad_opacity = alpha_raw / rows[:, 5] * grad_raw
        dx = (pixel_ids % ctx.width).to(rows.dtype) + 0.5 - rows[:, 0]
        dy = torch.div(pixel_ids, ctx.width, rounding_mode="floor").to(rows.dtype) + 0.5 - rows[:, 1]
        ca, cb, cc = rows[:, 2], rows[:, 3], rows[:, 4]
        grad_rows = torch.empty_like(rows)  # [K, 6 + D], written column by column (no stacking copies)
        sigma_dx, sigma_dy = dx * grad_sigma, dy * grad_sigma
        torch.mul(ca, sigma_dx, out=grad_rows[:, 0]).addcmul_(cb, sigma_dy).neg_()  # d sigma / d mean = -(conic d)
        torch.mul(cb, sigma_dx, out=grad_rows[:, 1]).addcmul_(cc, sigma_dy).neg_()
        torch.mul(dx, sigma_dx, out=grad_rows[:, 2]).mul_(0.5)
        torch.mul(dx, sigma_dy, out=grad_rows[:, 3])
        torch.mul(dy, sigma_dy, out=grad_rows[:, 4]).mul_(0.5)
        grad_rows[:, 5] = grad_opacity
        torch.mul(weights[:, None], g_img, out=grad_rows[:, 6:])
        grad_packed = torch.zeros_like(packed).index_add_(0, gauss, grad_rows)
        return grad_packed, None, None, None, None, None


def _argsort(keys: Tensor) -> Tensor:
    """Argsort of distinct int64 keys."""
    return torch.sort(keys).indices


def _row_bands(pairs_per_row: list[int], max_pairs: int) -> list[tuple[int, int]]:
    """Split rows into consecutive bands [y0, y1) of at most ``max_pairs`` pairs (a row at least)."""
    bands, start, total = [], 0, 0
    for y, count in enumerate(pairs_per_row):
        if total and total + count > max_pairs:
            bands.append((start, y))
            start, total = y, 0
        total += count
    if total:
        bands.append((start, len(pairs_per_row)))
    return bands
