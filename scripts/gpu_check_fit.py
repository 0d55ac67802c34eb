"""GPU check of the Gaussian fitting path: gsplat + DefaultStrategy on CUDA, and torch_cpu vs gsplat.

1. The same random Gaussians (SH degree 3, a background) rendered by ``torch_cpu`` (on CPU) and
   ``gsplat`` (on CUDA) at a small size: max and mean absolute difference of colours and alphas,
   and of the projected means.
2. A synthetic scene: reference Gaussians rendered by gsplat into cameras on an arc at 512x896;
   fitted from a thinned, jittered copy of their centres (the "memory") with the default FitConfig
   (gsplat, DefaultStrategy, 3000 iterations): time per iteration, peak GPU memory, Gaussian
   count, PSNR/SSIM at the training cameras and at held-out cameras between them.

Run on a machine with CUDA and gsplat (kernels compile on first use, about a minute with
``TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16``)::

    python scripts/gpu_check_fit.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from backend.metrics import image_metrics
from backend.rasterizers import RASTERIZERS
from backend.scene import look_at  # noqa: E402
from backend.stages.fit import FitConfig, FitViews, fit_gaussians, render_gaussians
from backend.types import Cameras, GeometryMemory


def arc_cameras(n: int, width: int, height: int, radius: float, spread_rad: float, offset: float = 0.0) -> Cameras:
    angles = [spread_rad * ((i + offset) / max(n - 1, 1) - 0.5) for i in range(n)]
    w2c = torch.stack(
        [
            torch.tensor(
                look_at([radius * math.sin(a), 0.3 * math.sin(3 * a), -radius * math.cos(a)]), dtype=torch.float32
            )
            for a in angles
        ]
    )
    f = 0.9 * width
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]).repeat(n, 1, 1)
    return Cameras(w2c, K, width, height)


def random_gaussians(n: int, sh_degree: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    k = (sh_degree + 1) ** 2
    sh = torch.randn(n, k, 3, generator=gen) * 0.15
    sh[:, 0] = (torch.rand(n, 3, generator=gen) - 0.5) / 0.28209479177387814
    return {
        "means": (torch.rand(n, 3, generator=gen) - 0.5) * torch.tensor([2.0, 1.2, 1.0]),
        "quats": torch.randn(n, 4, generator=gen),
        "scales": torch.exp(torch.rand(n, 3, generator=gen) * 1.5 - 4.5),  # 0.011 .. 0.05
        "opacities": torch.rand(n, generator=gen) * 0.6 + 0.3,
        "sh": sh,
    }


def sync() -> None:
    torch.cuda.synchronize()


def compare_rasterizers(gen: torch.Generator) -> dict:
    """Images, alphas, projections and gradients of torch_cpu (CPU) vs gsplat (CUDA) on the same Gaussians."""
    g = random_gaussians(3000, 3, gen)
    cams = arc_cameras(3, 160, 96, 3.0, 0.8)
    bg = torch.tensor([[0.1, 0.2, 0.3]]).repeat(3, 1)
    weights = torch.rand(3, cams.height, cams.width, 3, generator=gen)
    names = ("means", "quats", "scales", "opacities", "sh")
    out: dict = {"size": [cams.width, cams.height], "gaussians": 3000, "cameras": 3, "sh_degree": 3}
    runs = {}
    for name, device in (("torch_cpu", "cpu"), ("gsplat", "cuda")):
        params = {k: g[k].detach().clone().to(device).requires_grad_() for k in names}
        rgb, alpha, meta = RASTERIZERS.make(name).render(
            *(params[k] for k in names),
            cams.w2c.to(device),
            cams.K.to(device),
            cams.width,
            cams.height,
            sh_degree=3,
            backgrounds=bg.to(device),
        )
        (rgb * weights.to(device)).sum().backward()
        runs[name] = (
            rgb.detach().cpu(),
            alpha.detach().cpu(),
            {k: meta[k].detach().cpu() for k in ("means2d", "radii")},
            {k: params[k].grad.cpu() for k in names},
        )
    (c_rgb, c_a, c_meta, c_grad), (g_rgb, g_a, g_meta, g_grad) = runs["torch_cpu"], runs["gsplat"]
    drawn = (c_meta["radii"] > 0).all(-1) & (g_meta["radii"] > 0).all(-1)
    diff = (c_rgb - g_rgb).abs()
    out.update(
        {
            "rgb_max_abs_diff": float(diff.max()),
            "rgb_mean_abs_diff": float(diff.mean()),
            "rgb_p999_abs_diff": float(diff.flatten().kthvalue(int(0.999 * diff.numel())).values),
            "alpha_max_abs_diff": float((c_a - g_a).abs().max()),
            "means2d_max_abs_diff_px": float((c_meta["means2d"] - g_meta["means2d"])[drawn].abs().max()),
            "radii_equal_fraction": float((c_meta["radii"] == g_meta["radii"].to(torch.int32))[drawn].float().mean()),
            "drawn_both": int(drawn.sum()),
            "grad_relative_error": {
                k: float((c_grad[k] - g_grad[k]).norm() / g_grad[k].norm().clamp_min(1e-12)) for k in names
            },
        }
    )
    return out


def fit_check(gen: torch.Generator, iterations: int, width: int, height: int, n_train: int) -> dict:
    device = torch.device("cuda")
    ref = {k: v.to(device) for k, v in random_gaussians(60_000, 3, gen).items()}
    train = arc_cameras(n_train, width, height, 3.0, 1.2)
    test = arc_cameras(n_train - 1, width, height, 3.0, 1.2 * (n_train - 2) / (n_train - 1), offset=0.5)
    cfg = FitConfig(iterations=iterations, rasterizer="gsplat", strategy="default", progress_every=iterations // 10)
    gt_cfg = replace(cfg, sh_degree=3)

    def render_ref(cams: Cameras) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(len(cams)):
                c = cams[i].to(device)
                rgb, _, _ = RASTERIZERS.make("gsplat").render(
                    ref["means"],
                    ref["quats"],
                    ref["scales"],
                    ref["opacities"],
                    ref["sh"],
                    c.w2c,
                    c.K,
                    c.width,
                    c.height,
                    sh_degree=3,
                )
                out.append(rgb.clamp(0, 1))
        return torch.cat(out)

    train_images, test_images = render_ref(train), render_ref(test)
    # The memory: a quarter of the centres, jittered, with their base colour plus noise.
    keep = torch.randperm(60_000, generator=gen)[:15_000].to(device)
    rgb = (0.5 + 0.28209479177387814 * ref["sh"][keep, 0]).clamp(0, 1)
    memory = GeometryMemory(
        ref["means"][keep] + 0.01 * torch.randn(15_000, 3, device=device),
        (rgb + 0.05 * torch.randn_like(rgb)).clamp(0, 1),
        torch.ones(15_000, device=device),
        torch.zeros(15_000, dtype=torch.int32, device=device),
    )
    views = FitViews(train_images, train.to(device), torch.ones(train_images.shape[:3], device=device))

    stamps: list[tuple[int, float, float]] = []

    def progress(step: int, loss: float) -> None:
        sync()
        stamps.append((step, time.perf_counter(), loss))

    torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    g = fit_gaussians(views, memory, cfg, device=device, progress=progress)
    sync()
    total = time.perf_counter() - start
    per_iter = [(b[1] - a[1]) / (b[0] - a[0]) * 1e3 for a, b in zip(stamps, stamps[1:])]
    m_train = image_metrics(render_gaussians(g, train, gt_cfg), train_images).mean()
    m_test = image_metrics(render_gaussians(g, test, gt_cfg), test_images).mean()
    return {
        "size": [width, height],
        "train_cameras": n_train,
        "test_cameras": len(test),
        "iterations": iterations,
        "reference_gaussians": 60_000,
        "initial_gaussians": 15_000,
        "final_gaussians": len(g),
        "total_s": total,
        "first_progress_s": stamps[0][1] - start,
        "ms_per_iteration_by_tenth": [round(x, 2) for x in per_iter],
        "losses_by_tenth": [round(s[2], 4) for s in stamps],
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        "train": m_train,
        "heldout": m_test,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--train-cameras", type=int, default=24)
    ap.add_argument("--skip-fit", action="store_true", help="only compare the rasterizers")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    warm = RASTERIZERS.make("gsplat").render(  # compiles gsplat's kernels on first use
        torch.zeros(1, 3, device="cuda") + torch.tensor([0, 0, 2.0], device="cuda"),
        torch.tensor([[1.0, 0, 0, 0]], device="cuda"),
        torch.full((1, 3), 0.1, device="cuda"),
        torch.ones(1, device="cuda"),
        torch.ones(1, 3, device="cuda"),
        torch.eye(4, device="cuda")[None],
        torch.tensor([[[10.0, 0, 5], [0, 10, 5], [0, 0, 1]]], device="cuda"),
        10,
        10,
    )
    sync()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "gsplat_load_or_compile_s": time.perf_counter() - t0,
        "warm_alpha_max": float(warm[1].max()),
    }
    print(json.dumps(results), flush=True)
    results["compare"] = compare_rasterizers(gen)
    print(json.dumps(results["compare"]), flush=True)
    if not args.skip_fit:
        results["fit"] = fit_check(gen, args.iterations, args.width, args.height, args.train_cameras)
        print(json.dumps(results["fit"], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
