"""The Wan block's elementwise kernels at the generator's full size, compiled: GB/s against the bytes
they must move (H200 HBM3e: 4.8 TB/s). CUDA only. Usage: python scripts/bench_elementwise.py --out FILE.json"""

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

L, C, FFN = 89600, 5120, 13824


def gelu_sigmoid(x):
    """GELU, tanh form, as x * sigmoid(2z): 0.5 * (1 + tanh(z)) == sigmoid(2z)."""
    xf = x.float()
    z = math.sqrt(2 / math.pi) * (xf + 0.044715 * xf * xf * xf)
    return (xf * torch.sigmoid(2 * z)).type_as(x)


def norm_modulate(x, y, gate, shift, scale):
    """Residual with a gate, then LayerNorm (no affine) and modulation (Wan's attention output path)."""
    h = (x.float() + y.float() * gate).type_as(x)
    n = (F.layer_norm(h.float(), (C,), eps=1e-6) * (1 + scale) + shift).type_as(x)
    return h, n


def timed(fn, *args, reps: int = 20) -> float:
    """Median milliseconds of one call by CUDA events (kernels of ~1 ms, where a host-synchronised wall
    clock as in bench_generator.seconds_per_call adds tens of microseconds), after a compiling call."""
    fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU: it times the generator's kernels on one (torch sees none here)")
    dev, bf = "cuda", torch.bfloat16
    res = {"gpu": torch.cuda.get_device_name()}
    u = torch.randn(L, FFN, device=dev, dtype=bf)
    gb = 2 * u.numel() * 2 / 1e9
    ref = F.gelu(u, approximate="tanh")
    for name, fn in {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu_sigmoid": gelu_sigmoid}.items():
        c = torch.compile(fn)
        ms = timed(c, u)
        res[name] = {
            "ms": round(ms, 3),
            "gb_s": round(gb / ms * 1e3, 0),
            "max_abs_vs_eager_tanh": float((c(u).float() - ref.float()).abs().max()),
        }
    del u, ref
    x, y = (torch.randn(1, L, C, device=dev, dtype=bf) for _ in range(2))
    gate, shift, scale = (torch.randn(1, 1, C, device=dev) for _ in range(3))
    c = torch.compile(norm_modulate)
    ms = timed(c, x, y, gate, shift, scale)
    res["norm_modulate"] = {"ms": round(ms, 3), "gb_s": round(4 * x.numel() * 2 / 1e9 / ms * 1e3, 0)}
    c = torch.compile(lambda a: a * 1.5)
    ms = timed(c, x)
    res["scale_copy"] = {"ms": round(ms, 3), "gb_s": round(2 * x.numel() * 2 / 1e9 / ms * 1e3, 0)}
    print(json.dumps(res))
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
