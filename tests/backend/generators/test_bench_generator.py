"""scripts/bench_generator.py runs on CPU at a tiny size (the GPU command's code path) and reports the
attention modes side by side: density, and the latents compared with stock's and full's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_bench_generator_tiny_reports_modes_compared(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/bench_generator.py", "--tiny", "--device", "cpu", "--out", str(out)]
    cmd += ["--modes", "kernels,stock,full,full_fa4,block,window_ours"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    assert r["layout"]["density"]["full"] == 1.0 and 0 < r["layout"]["density"]["block"] < 1
    assert r["denoise_full"]["vs_stock_max_abs"] < 1e-3  # the same attention: the same latents
    assert r["denoise_block"]["density"] == r["layout"]["density"]["block"]
    assert r["denoise_block"]["vs_full_max_abs"] > 1e-4  # 3 blocks of 8 frames: the pattern matters
    assert "error" in r["denoise_full_fa4"] and "vs_full_max_abs" not in r["denoise_full_fa4"]  # no FA4 on CPU
    assert {"sdpa_full", "split_block", "split_window_ours"} <= set(r["attention_kernels"])
