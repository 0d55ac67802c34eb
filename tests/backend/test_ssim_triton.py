"""The fit's SSIM kernels (backend.ssim_triton) against the torch path, in Triton's interpreter on the CPU.

The kernels run compiled on CUDA in a job; ``TRITON_INTERPRET=1`` runs the same kernel code on CPU tensors
with numpy, slowly, so a tiny batch checks the maps and the gradient here. Triton reads that variable when
it is imported, so the checks run in a child process. scripts/gpu_check_fit.py checks the compiled kernels
on the GPU machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from backend import ssim_triton

REPO = Path(__file__).resolve().parents[2]

CHECKS = textwrap.dedent(
    """
    import pytest, torch
    import torch.nn.functional as F
    from backend import ssim_triton
    from backend.metrics import SSIM_K1, SSIM_K2, gaussian_window, windowed_ssim_conv as windowed_ssim

    def planes(f, c, h, w, seed):
        gen = torch.Generator().manual_seed(seed)
        return [F.pad(torch.rand(f, c, h, w, generator=gen), (5,) * 4, mode="replicate") for _ in range(2)]

    g, c1, c2 = gaussian_window(), SSIM_K1**2, SSIM_K2**2
    # values and the gradient, on the padding's rows and columns too
    x, y = planes(2, 3, 9, 13, seed=0)
    y = y * 0.5 + x * 0.5  # correlated, as a render and its target are
    up = torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_()
    (windowed_ssim(xr, y) * up).sum().backward()
    xt = x.clone().requires_grad_()
    s = ssim_triton.ssim_planes(xt.view(6, 19, 23), y.view(6, 19, 23), g, c1, c2)
    assert s.shape == (6, 9, 13), s.shape
    torch.testing.assert_close(s.view(2, 3, 9, 13), windowed_ssim(x, y), atol=2e-6, rtol=0)
    (s.view(2, 3, 9, 13) * up).sum().backward()
    assert xr.grad.abs().max() > 0.1, xr.grad.abs().max()
    torch.testing.assert_close(xt.grad, xr.grad, atol=1e-5, rtol=0)
    # no gradient asked; an image against itself; bad shapes and a target with a gradient
    x, y = planes(1, 1, 4, 5, seed=2)
    torch.testing.assert_close(ssim_triton.ssim_planes(x[0], y[0], g, c1, c2), windowed_ssim(x, y)[0], atol=2e-6, rtol=0)
    torch.testing.assert_close(ssim_triton.ssim_planes(x[0], x[0], g, c1, c2), torch.ones(1, 4, 5))
    with pytest.raises(ValueError, match=r"one shape \\[P, H \\+ 10, W \\+ 10\\]"):
        ssim_triton.ssim_planes(x[0], y[0, :, :-1], g, c1, c2)
    with pytest.raises(ValueError, match="y must not require a gradient"):
        ssim_triton.ssim_planes(x[0], y[0].requires_grad_(), g, c1, c2)
    print("ssim kernels ok")
    """
)


def test_ssim_kernels_match_the_torch_path_in_triton_interpreter():
    pytest.importorskip("triton", reason="Triton is a dev dependency (pyproject.toml); the kernels need it")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", CHECKS], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ssim kernels ok" in run.stdout


def test_only_cuda_float32_takes_the_kernels():
    assert not ssim_triton.available(torch.zeros(3))  # the CPU: the depthwise convolutions
    assert not ssim_triton.available(torch.zeros(3, dtype=torch.float64))
