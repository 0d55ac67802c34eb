"""Benchmark and GPU check of the fit's SSIM: backend.ssim_triton's kernels against the depthwise
convolutions (backend.metrics.windowed_ssim_conv), forward and backward at the fit's batches.

The fit's loss takes SSIM over every frame a step draws: 3 frames of the job's 896x512 for one set, 9 for
the guide's 3 sets in lockstep. On the GPU machine this times ``ssim_map`` (reflect padding, the mean over
RGB, as ``confidence_loss`` calls it) both ways, medians of ``--repeats`` with the order alternated, and
checks that the two agree: the largest differences of the map and of the gradient against the largest
gradient. Exit status 1 when they do not agree to ``--tolerance``.

    python scripts/bench_ssim.py --out $OUT        # (bash scripts/gpu_runs.sh ssim)
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

from backend import ssim_triton  # noqa: E402
from backend.metrics import ssim_map  # noqa: E402


def timed_ssim(pred: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` forward and backward passes (after 3 not counted)."""
    times = []
    for r in range(repeats + 3):
        pred.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (ssim_map(pred, target) * upstream).sum().backward()
        torch.cuda.synchronize()
        if r >= 3:
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", default="3,9", help="comma-separated batch sizes (frames of 896x512)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest difference allowed (map; gradient / max)")
    ap.add_argument("--out", type=Path, default=None, help="folder for ssim.json")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not ssim_triton.available(torch.zeros(1, device="cuda")):
        print("bench_ssim: needs CUDA and Triton", file=sys.stderr)
        return 2
    kernels = ssim_triton.available
    rows, ok = [], True
    for frames in (int(f) for f in args.frames.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(frames)
        target = torch.rand(frames, 512, 896, 3, device="cuda", generator=gen)
        pred0 = (0.6 * target + 0.4 * torch.rand(frames, 512, 896, 3, device="cuda", generator=gen)).contiguous()
        upstream = torch.rand(frames, 512, 896, device="cuda", generator=gen)
        seconds: dict[str, list[float]] = {"conv": [], "triton": []}
        results = {}
        for r in range(2):
            for path in ("conv", "triton") if r == 0 else ("triton", "conv"):
                ssim_triton.available = kernels if path == "triton" else (lambda x: False)
                try:
                    pred = pred0.clone().requires_grad_()
                    m = ssim_map(pred, target)
                    (m * upstream).sum().backward()
                    results[path] = (m.detach(), pred.grad.clone())
                    seconds[path] += timed_ssim(pred, target, upstream, args.repeats // 2)
                finally:
                    ssim_triton.available = kernels
        (m_conv, g_conv), (m_tri, g_tri) = results["conv"], results["triton"]
        map_diff = float((m_conv - m_tri).abs().max())
        grad_diff = float((g_conv - g_tri).abs().max() / g_conv.abs().max())
        ok &= map_diff <= args.tolerance and grad_diff <= args.tolerance
        med = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
        rows.append(
            {
                "frames": frames,
                "conv_ms": med["conv"],
                "triton_ms": med["triton"],
                "speedup": med["conv"] / med["triton"],
                "max_map_diff": map_diff,
                "max_grad_diff_rel": grad_diff,
            }
        )
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; SSIM forward + backward, 896x512")
    print("| frames | depthwise conv (ms) | Triton (ms) | conv / Triton | max map diff | max grad diff / max grad |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['frames']} | {r['conv_ms']:.2f} | {r['triton_ms']:.2f} | {r['speedup']:.2f}x | "
            f"{r['max_map_diff']:.1e} | {r['max_grad_diff_rel']:.1e} |"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
        (args.out / "ssim.json").write_text(json.dumps(report, indent=2))
    if not ok:
        print(f"bench_ssim: the kernels disagree with the convolutions beyond {args.tolerance}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
