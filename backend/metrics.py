"""Image quality: PSNR, SSIM and (where its weights exist on this machine) LPIPS.

Images are float [F, H, W, 3] (or [H, W, 3]) in [0, 1], the loop's layout. SSIM is Wang et al.
(2004): an 11x11 Gaussian window of sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 1; the
per-image score averages the map over the windows that fit inside the image ("valid"), as
TensorFlow's ``tf.image.ssim`` and scikit-image (``gaussian_weights=True``,
``use_sample_covariance=False``) do. :func:`ssim_map` with ``padding="reflect"`` gives a per-pixel
map of the input's size for confidence-weighted losses; it is differentiable.

LPIPS is never downloaded: :func:`load_lpips` returns a scorer only when weights exist locally
(a TorchScript file, or the ``lpips`` package with its backbone already in torch's hub cache), and
None otherwise; callers then report PSNR and SSIM alone (DESIGN.md section 4).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ssim_kernels

SSIM_WINDOW = 11  # Wang et al. 2004
SSIM_SIGMA = 1.5  # Wang et al. 2004
SSIM_K1 = 0.01  # C1 = (K1 L)^2
SSIM_K2 = 0.03  # C2 = (K2 L)^2
DATA_RANGE = 1.0  # L: images are in [0, 1]
SSIM_C1 = (SSIM_K1 * DATA_RANGE) ** 2
SSIM_C2 = (SSIM_K2 * DATA_RANGE) ** 2
MSE_FLOOR = 1e-10  # identical images score 10 log10(1 / 1e-10) = 100 dB instead of inf

# Where LPIPS weights may be found without downloading anything.
LPIPS_ENV = "RECONLOOP_LPIPS"  # an exported LPIPS module (.pt2): f(x, y) on [N, 3, H, W] in [-1, 1] -> [N, ...]
LPIPS_NET = "alex"  # backbone of the ``lpips`` package used when its weights are cached
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}

LpipsFn = Callable[[Tensor, Tensor], Tensor]  # ([F, H, W, 3], [F, H, W, 3]) in [0, 1] -> [F]


def _batched(x: Tensor, name: str) -> Tensor:
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} must be [F, H, W, 3] or [H, W, 3]; got {tuple(x.shape)}")
    return x


def _check_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    pred, target = _batched(pred, "pred"), _batched(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape; got {tuple(pred.shape)} and {tuple(target.shape)}")
    return pred, target


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image, dB, for data range 1.

    Args:
        pred, target: images in [0, 1]. [F, H, W, 3] or [H, W, 3]

    Returns:
        10 log10(1 / MSE) per image (100 dB at most). [F]
    """
    pred, target = _check_pair(pred, target)
    mse = ((pred - target) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(MSE_FLOOR))


def weighted_l1(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Mean absolute error per unit of a per-pixel weight (the fit's confidence), over all images.

    Below the plain mean absolute error where the weight ranks the errors (heavy where they are
    small), above it where it does not.

    Args:
        pred, target: images in [0, 1]. [F, H, W, 3] or [H, W, 3]
        weight: per-pixel weights >= 0, not all zero. [F, H, W] or [H, W]

    Returns:
        sum(weight x |pred - target| averaged over colour) / sum(weight), a scalar.
    """
    pred, target = _check_pair(pred, target)
    weight = weight[None] if weight.ndim == 2 else weight
    if tuple(weight.shape) != tuple(pred.shape[:3]):
        raise ValueError(f"weight must be {list(pred.shape[:3])}; got {list(weight.shape)}")
    if float(weight.sum()) <= 0.0 or float(weight.min()) < 0.0:
        raise ValueError("weight must be >= 0 and not all zero")
    err = (pred - target).abs().mean(-1)
    return (weight * err).sum() / weight.sum()


def tile_means(x: Tensor, block: int) -> Tensor:
    """Mean of a per-pixel map per ``block`` x ``block`` tile (edge tiles are smaller).

    Args:
        x: per-pixel values. [F, H, W]
        block: tile side in pixels, >= 1.

    Returns:
        [F, ceil(H / block), ceil(W / block)]
    """
    if block < 1:
        raise ValueError(f"block must be >= 1; got {block}")
    x = x[:, None]
    total = F.avg_pool2d(x, block, ceil_mode=True, divisor_override=1)
    return (total / F.avg_pool2d(torch.ones_like(x), block, ceil_mode=True, divisor_override=1))[:, 0]


def best_of_blocks(a: Tensor, b: Tensor, target: Tensor, block: int) -> Tensor:
    """Per ``block`` x ``block`` tile, whichever of two images is closer to the target (mean squared
    error; edge tiles are smaller): what the best choice of one source per tile scores, the ceiling of
    region-wise choices between them (a per-pixel blend, such as the refiner's fusion head, may do better
    where both sources are partly right). Ties keep ``a``.

    Args:
        a, b, target: images in [0, 1]. [F, H, W, 3] or [H, W, 3]
        block: tile side in pixels, >= 1.

    Returns:
        the composite. [F, H, W, 3]
    """
    a, target = _check_pair(a, target)
    b, _ = _check_pair(b, target)
    H, W = target.shape[1:3]
    take_b = tile_means(((b - target) ** 2).mean(-1), block) < tile_means(((a - target) ** 2).mean(-1), block)
    take_b = take_b.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :H, :W, None]
    return torch.where(take_b, b, a)


def gaussian_window(
    size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Normalised 1D Gaussian window. [size]"""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    w = torch.exp(-(x**2) / (2.0 * sigma**2))
    return w / w.sum()


def ssim_map(pred: Tensor, target: Tensor, *, padding: str = "reflect") -> Tensor:
    """Per-pixel SSIM (mean over RGB), differentiable.

    Args:
        pred, target: images in [0, 1]. [F, H, W, 3] or [H, W, 3]
        padding: ``"reflect"``: pad the images by reflection, map of the input's size (H, W > 5);
            ``"valid"``: only windows inside the image, map [F, H - 10, W - 10].

    Returns:
        SSIM map. [F, H, W] (reflect) or [F, H - 10, W - 10] (valid)
    """
    pred, target = _check_pair(pred, target)
    half = SSIM_WINDOW // 2
    if padding not in ("reflect", "valid"):
        raise ValueError(f"padding must be 'reflect' or 'valid'; got {padding!r}")
    h, w = pred.shape[1:3]
    if padding == "reflect" and min(h, w) <= half:
        raise ValueError(f"ssim_map with reflect padding needs H, W > {half}; got {h}x{w}")
    if padding == "valid" and min(h, w) < SSIM_WINDOW:
        raise ValueError(f"ssim with valid windows needs H, W >= {SSIM_WINDOW}; got {h}x{w}")
    x = pred.permute(0, 3, 1, 2)  # [F, 3, H, W]
    y = target.permute(0, 3, 1, 2)
    if padding == "reflect":
        x = F.pad(x, (half, half, half, half), mode="reflect")
        y = F.pad(y, (half, half, half, half), mode="reflect")
    return windowed_ssim(x, y).mean(dim=1)


def windowed_ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM per channel and pixel over the valid 11x11 Gaussian windows of two image batches.

    A loss (``x`` with a gradient, ``y`` without: the fit's) runs in :mod:`backend.ssim_kernels`' kernels
    where they run (Triton on CUDA, numba on the CPU); a metric, or a pair the kernels cannot take, in
    :func:`windowed_ssim_conv`, whose float32 sums sit closer to the exact figure (constant images: 1e-5
    against the kernels' 1e-4), so that reported SSIM stays what it was.
    x, y: [F, C, H, W] -> [F, C, H - 10, W - 10]"""
    kernels = ssim_kernels.kernels_for(x) if x.requires_grad and not y.requires_grad else None
    if kernels is None:
        return windowed_ssim_conv(x, y)
    f, channels, hp, wp = x.shape
    g = gaussian_window(dtype=x.dtype, device=x.device)
    planes = ssim_kernels.ssim_planes(x.reshape(-1, hp, wp), y.reshape(-1, hp, wp), g, SSIM_C1, SSIM_C2, kernels)
    return planes.view(f, channels, hp - SSIM_WINDOW + 1, wp - SSIM_WINDOW + 1)


def windowed_ssim_conv(x: Tensor, y: Tensor) -> Tensor:
    """:func:`windowed_ssim` in torch operations: the five statistics blurred by a separable depthwise
    convolution each, differentiable in both. x, y: [F, C, H, W] -> [F, C, H - 10, W - 10]"""
    c1, c2 = SSIM_C1, SSIM_C2
    g = gaussian_window(dtype=x.dtype, device=x.device)
    channels = x.shape[1]
    kx = g.view(1, 1, 1, -1).expand(channels, 1, 1, SSIM_WINDOW)
    ky = g.view(1, 1, -1, 1).expand(channels, 1, SSIM_WINDOW, 1)

    def blur(t: Tensor) -> Tensor:  # separable Gaussian filter, valid
        return F.conv2d(F.conv2d(t, kx, groups=channels), ky, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Structural similarity per image (valid windows, mean over pixels and RGB).

    Args:
        pred, target: images in [0, 1], H and W at least 11. [F, H, W, 3] or [H, W, 3]

    Returns:
        SSIM in [-1, 1] per image. [F]
    """
    return ssim_map(pred, target, padding="valid").flatten(1).mean(dim=1)


def load_lpips(path: str | os.PathLike[str] | None = None, *, device: torch.device | str = "cpu") -> LpipsFn | None:
    """An LPIPS scorer from weights already on this machine, or None. Nothing is downloaded.

    Looks, in order, at ``path``, then the ``RECONLOOP_LPIPS`` environment variable (a module taking
    two [N, 3, H, W] images in [-1, 1]: ``torch.export.save`` of ``lpips.LPIPS(net="alex")`` exported
    with dynamic N, H, W, a ``.pt2`` file; or a TorchScript ``.pt`` file), then the ``lpips`` package
    if it is installed and the AlexNet backbone is already in torch's hub cache.

    Returns:
        f(pred, target) with images [F, H, W, 3] in [0, 1] -> LPIPS per image [F]; or None.
    """
    path = path or os.environ.get(LPIPS_ENV) or None
    if path is not None:
        if not Path(path).is_file():
            return None
        if Path(path).suffix == ".pt2":
            return _lpips_scorer(torch.export.load(str(path)).module().to(device))
        return _lpips_scorer(torch.jit.load(str(path), map_location=device).eval())
    cached = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[LPIPS_NET]
    if not cached.is_file():
        return None
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        return None
    return _lpips_scorer(lpips.LPIPS(net=LPIPS_NET, verbose=False).to(device).eval())


def _lpips_scorer(module: Callable[[Tensor, Tensor], Tensor]) -> LpipsFn:
    def score(pred: Tensor, target: Tensor) -> Tensor:
        pred, target = _check_pair(pred, target)
        x = pred.permute(0, 3, 1, 2) * 2.0 - 1.0  # [F, 3, H, W] in [-1, 1]
        y = target.permute(0, 3, 1, 2) * 2.0 - 1.0
        return module(x, y).reshape(x.shape[0], -1).mean(dim=1)

    return score


@dataclass(frozen=True)
class ImageMetrics:
    """Per-image scores of a set of images against references.

    Attributes:
        psnr: dB per image. F floats
        ssim: per image. F floats
        lpips: per image, or None where no LPIPS weights exist. F floats or None
    """

    psnr: list[float]
    ssim: list[float]
    lpips: list[float] | None = None

    def mean(self) -> dict[str, float]:
        """Means over the images: {"psnr", "ssim"[, "lpips"]}; NaN for an empty set."""
        out = {"psnr": _mean(self.psnr), "ssim": _mean(self.ssim)}
        if self.lpips is not None:
            out["lpips"] = _mean(self.lpips)
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def image_metrics(pred: Tensor, target: Tensor, *, lpips_fn: LpipsFn | None = None) -> ImageMetrics:
    """PSNR, SSIM (and LPIPS when ``lpips_fn`` is given) per image.

    Args:
        pred, target: images in [0, 1]. [F, H, W, 3]
        lpips_fn: from :func:`load_lpips`, or None.

    Example::

        >>> x = torch.rand(2, 32, 32, 3)
        >>> round(image_metrics(x, x).mean()["ssim"], 4)
        1.0
    """
    pred, target = _check_pair(pred, target)
    lp = lpips_fn(pred, target).tolist() if lpips_fn is not None else None
    return ImageMetrics(psnr=psnr(pred, target).tolist(), ssim=ssim(pred, target).tolist(), lpips=lp)
