"""Time the ``torch_cpu`` rasterizer's forward + backward at the loop's sizes; Gaussians x pixels per second.

The Gaussians are ``backend.budget.probe_scene``'s: on a surface in front of the cameras, as a stereo
memory (a depth map lifted to 3D), with scales of the point spacing as ``init_gaussians`` gives them. Each case renders C
cameras of W x H and back-propagates the budget probe's loss (a fixed weighted sum of the image,
``backend.budget.probe_loss_weights``: a dense gradient, as a fit's); the figure is N x W x H x C / seconds.

``--kernels`` times the current rasterizer with each compositing kernel (numba's rows, torch's pairs);
``--against REV`` also times the rasterizer of a git revision (its ``torch_cpu.py`` loaded from ``git
show``). The first is checked against the last (images and gradients) and its speed-up printed.

    python scripts/bench_rasterizer.py --threads 2 --kernels numba,torch --json out.json
    python scripts/bench_rasterizer.py --threads 2 --kernels numba --against HEAD~1
    python scripts/bench_rasterizer.py --tiny          # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.budget import probe_loss_weights, probe_scene  # noqa: E402
from backend.rasterizers.torch_cpu import KERNELS, TorchCpuRasterizer  # noqa: E402

# (Gaussians, width, height, cameras): the guide and final fit at the CPU working sizes.
CASES = [
    (20_000, 192, 144, 1),
    (20_000, 320, 240, 1),
    (60_000, 320, 240, 1),
    (120_000, 192, 144, 1),
    (120_000, 320, 240, 1),
    (60_000, 192, 144, 4),
]
TINY_CASES = [(2_000, 64, 48, 1), (2_000, 48, 32, 2)]


def step(rasterizer, scene: dict) -> tuple[float, float, torch.Tensor, list[torch.Tensor]]:
    """One forward + backward of the budget probe's loss (``probe_loss_weights``: a dense image gradient,
    as a fit's); returns wall and process CPU seconds, the image and the gradients."""
    leaves = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")}
    weights = probe_loss_weights((scene["viewmats"].shape[0], scene["height"], scene["width"], 3))
    t0, c0 = time.perf_counter(), time.process_time()
    img, _, meta = rasterizer.render(
        leaves["means"],
        leaves["quats"],
        leaves["scales"],
        leaves["opacities"],
        leaves["colors"],
        scene["viewmats"],
        scene["Ks"],
        scene["width"],
        scene["height"],
    )
    (img * weights).sum().backward()
    return time.perf_counter() - t0, time.process_time() - c0, img.detach(), [leaves[k].grad for k in leaves]


def time_case(rasterizer, scene: dict, repeats: int) -> tuple[float, float, torch.Tensor, list[torch.Tensor]]:
    """Best wall and CPU seconds of ``repeats`` steps after a warm-up, with the last image and gradients."""
    step(rasterizer, scene)
    best, best_cpu, img, grads = math.inf, math.inf, None, None
    for _ in range(repeats):
        seconds, cpu_seconds, img, grads = step(rasterizer, scene)
        best, best_cpu = min(best, seconds), min(best_cpu, cpu_seconds)
    return best, best_cpu, img, grads


def load_revision(rev: str):
    """The ``TorchCpuRasterizer`` class of ``backend/rasterizers/torch_cpu.py`` at git revision ``rev``.

    Raises:
        ValueError: git has no such revision or file (``--against`` names it).
    """
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:backend/rasterizers/torch_cpu.py"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except subprocess.CalledProcessError as err:
        raise ValueError(f"no backend/rasterizers/torch_cpu.py at {rev!r}: {err.stderr.strip()}") from None
    return load_source(source, re.sub(r"\W", "_", rev))


def load_source(source: str, tag: str):
    """The ``TorchCpuRasterizer`` class of a ``torch_cpu.py`` text, loaded as a module of ``backend.rasterizers``
    (its relative imports resolve there) and not registered a second time."""
    source = re.sub(r"^@RASTERIZERS\.register\(.*\)\n", "", source, flags=re.M)
    with tempfile.TemporaryDirectory(prefix="bench-rasterizer-") as folder:
        path = Path(folder) / "torch_cpu_rev.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"backend.rasterizers._torch_cpu_{tag}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.TorchCpuRasterizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (best is kept)")
    parser.add_argument(
        "--kernels", default="numba,torch", help="comma-separated compositing kernels of the current rasterizer"
    )
    parser.add_argument("--against", default=None, help="git revision whose rasterizer is timed alongside")
    parser.add_argument("--tiny", action="store_true", help="tiny cases only (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    kernels = [k for k in args.kernels.split(",") if k]
    if not kernels or set(kernels) - set(KERNELS):
        parser.error(f"--kernels: comma-separated, of {', '.join(KERNELS)}; got {args.kernels!r}")
    rasterizers = {f"current/{k}": TorchCpuRasterizer(kernel=k) for k in kernels}
    if args.against:
        try:
            rasterizers[args.against] = load_revision(args.against)()
        except ValueError as err:
            parser.error(f"--against: {err}")
    first, base = next(iter(rasterizers)), list(rasterizers)[-1]
    results = []
    for n, width, height, n_cams in TINY_CASES if args.tiny else CASES:
        scene = probe_scene(n, width, height, n_cams)
        row: dict = {"gaussians": n, "width": width, "height": height, "cameras": n_cams}
        outputs = {}
        for name, rasterizer in rasterizers.items():
            seconds, cpu_seconds, img, grads = time_case(rasterizer, scene, args.repeats)
            outputs[name] = (img, grads)
            row[name] = {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "gaussian_pixels_per_s": n * width * height * n_cams / seconds,
            }
        if base != first:
            (img_a, grads_a), (img_b, grads_b) = outputs[first], outputs[base]
            row["max_image_diff"] = float((img_a - img_b).abs().max())
            row["max_grad_rel_diff"] = max(
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(grads_a, grads_b)
            )
            row["speedup"] = row[base]["seconds"] / row[first]["seconds"]
        results.append(row)
        line = f"N={n:>7} {width}x{height} C={n_cams}: " + ", ".join(
            f"{name} {row[name]['seconds']:.3f} s, CPU {row[name]['cpu_seconds']:.3f} s "
            f"({row[name]['gaussian_pixels_per_s']:.3g} G.px/s)"
            for name in rasterizers
        )
        if base != first:
            line += f", {first} x{row['speedup']:.2f} over {base}, image diff {row['max_image_diff']:.1e}"
            line += f", grad rel diff {row['max_grad_rel_diff']:.1e}"
        print(line, flush=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "speedup_of": first,
        "speedup_over": base,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cases": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
