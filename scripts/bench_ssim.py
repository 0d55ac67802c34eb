"""Benchmark and check of the fit's SSIM: backend.ssim_kernels' kernels against the depthwise convolutions
(backend.metrics.windowed_ssim_conv), forward and backward at the fit's batches.

The fit's loss takes SSIM over every frame a step draws: 3 frames for one set, 9 for the guide's 3 sets in
lockstep. This times ``ssim_map`` (reflect padding, the mean over RGB, as ``confidence_loss`` calls it) both
ways, medians of ``--repeats`` with the order alternated, and checks that the two agree: the largest
differences of the map and of the gradient against the largest gradient. Exit status 1 when they do not
agree to ``--tolerance``. On CUDA the kernels are Triton's (the job's 896x512), on the CPU numba's (the CPU
job's 160x120 and the fern's bench size, with torch's threads as set).

    python scripts/bench_ssim.py --out $OUT        # the GPU machine: bash scripts/gpu_runs.sh ssim
    OMP_NUM_THREADS=2 python scripts/bench_ssim.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend import ssim_kernels  # noqa: E402
from backend.evaluate_args import size_wxh  # noqa: E402
from backend.metrics import ssim_map  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ssim(pred: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` forward and backward passes (after 2 not counted)."""
    times = []
    for r in range(repeats + 2):
        pred.grad = None
        sync(pred.device)
        t0 = time.perf_counter()
        (ssim_map(pred, target) * upstream).sum().backward()
        sync(pred.device)
        if r >= 2:
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--batches", default=None, help="FRAMESxWxH,... (default: CUDA 3x896x512,9x896x512; CPU 3x160x120,3x504x378)"
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest difference allowed (map; gradient / max)")
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for ssim_<device>.json (ssim_cuda.json, ssim_cpu.json)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    kernels = ssim_kernels.kernels_for(torch.zeros(1, device=device))
    if kernels is None:
        print(f"bench_ssim: no SSIM kernels for {device} (CUDA needs Triton, the CPU numba)", file=sys.stderr)
        return 2
    default = "3x896x512,9x896x512" if device.type == "cuda" else "3x160x120,3x504x378"
    try:
        batches = [
            (int(b.split("x", 1)[0]), *size_wxh(b.split("x", 1)[1])) for b in (args.batches or default).split(",")
        ]
    except (ValueError, argparse.ArgumentTypeError) as err:
        ap.error(f"--batches: FRAMESxWxH,...; {err}")
    chooser = ssim_kernels.kernels_for
    rows, ok = [], True
    for frames, width, height in batches:
        gen = torch.Generator(device=device).manual_seed(frames)
        target = torch.rand(frames, height, width, 3, device=device, generator=gen)
        pred0 = (0.6 * target + 0.4 * torch.rand(frames, height, width, 3, device=device, generator=gen)).contiguous()
        upstream = torch.rand(frames, height, width, device=device, generator=gen)
        seconds: dict[str, list[float]] = {"conv": [], kernels: []}
        results = {}
        for r in range(2):
            for path in ("conv", kernels) if r == 0 else (kernels, "conv"):
                ssim_kernels.kernels_for = chooser if path == kernels else (lambda x: None)
                try:
                    pred = pred0.clone().requires_grad_()
                    m = ssim_map(pred, target)
                    (m * upstream).sum().backward()
                    results[path] = (m.detach(), pred.grad.clone())
                    seconds[path] += timed_ssim(pred, target, upstream, args.repeats // 2)
                finally:
                    ssim_kernels.kernels_for = chooser
        (m_conv, g_conv), (m_k, g_k) = results["conv"], results[kernels]
        map_diff = float((m_conv - m_k).abs().max())
        grad_diff = float((g_conv - g_k).abs().max() / g_conv.abs().max())
        ok &= map_diff <= args.tolerance and grad_diff <= args.tolerance
        med = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
        rows.append(
            {
                "frames": frames,
                "size": [width, height],
                "conv_ms": med["conv"],
                "kernels_ms": med[kernels],
                "speedup": med["conv"] / med[kernels],
                "max_map_diff": map_diff,
                "max_grad_diff_rel": grad_diff,
            }
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; SSIM forward + backward, {kernels}")
    print(
        f"| frames | size | depthwise conv (ms) | {kernels} (ms) | conv / {kernels} | max map diff | max grad diff / max |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['frames']} | {r['size'][0]}x{r['size'][1]} | {r['conv_ms']:.2f} | {r['kernels_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {r['max_map_diff']:.1e} | {r['max_grad_diff_rel']:.1e} |"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"device": name, "kernels": kernels, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        (args.out / f"ssim_{device.type}.json").write_text(json.dumps({**report, "rows": rows}, indent=2))
    if not ok:
        print(f"bench_ssim: the kernels disagree with the convolutions beyond {args.tolerance}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
