"""The fit's SSIM kernels (backend.ssim_kernels) against the depthwise convolutions, maps and gradients.

numba's run here as they run in a CPU job. Triton's run compiled on CUDA in a job; ``TRITON_INTERPRET=1``
runs the same kernel code on CPU tensors with numpy, slowly, so the same tiny checks hold them here. Triton
reads that variable when it is imported, so their checks run in a child process. scripts/bench_ssim.py
checks the compiled kernels on the GPU machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backend import ssim_kernels
from backend.metrics import SSIM_C1 as C1
from backend.metrics import SSIM_C2 as C2
from backend.metrics import gaussian_window, windowed_ssim, windowed_ssim_conv
from tests.conftest import require_module

REPO = Path(__file__).resolve().parents[2]


def padded(f: int, c: int, h: int, w: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [F.pad(torch.rand(f, c, h, w, generator=gen), (5,) * 4, mode="replicate") for _ in range(2)]


def check_kernels(kernels: str) -> None:
    """``kernels``' maps and x's gradient against the convolutions', on the padding's rows and columns too;
    without a gradient; an image against itself; bad shapes and a target with a gradient."""
    g = gaussian_window()
    x, y = padded(2, 3, 9, 13, seed=0)
    y = y * 0.5 + x * 0.5  # correlated, as a render and its target are
    up = torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_()
    (windowed_ssim_conv(xr, y) * up).sum().backward()
    xt = x.clone().requires_grad_()
    s = ssim_kernels.ssim_planes(xt.view(6, 19, 23), y.view(6, 19, 23), g, C1, C2, kernels)
    assert s.shape == (6, 9, 13), s.shape
    torch.testing.assert_close(s.view(2, 3, 9, 13), windowed_ssim_conv(x, y), atol=2e-6, rtol=0)
    (s.view(2, 3, 9, 13) * up).sum().backward()
    assert xr.grad.abs().max() > 0.1, xr.grad.abs().max()
    torch.testing.assert_close(xt.grad, xr.grad, atol=1e-5, rtol=0)
    x, y = padded(1, 1, 4, 5, seed=2)
    s = ssim_kernels.ssim_planes(x[0], y[0], g, C1, C2, kernels)
    torch.testing.assert_close(s, windowed_ssim_conv(x, y)[0], atol=2e-6, rtol=0)
    torch.testing.assert_close(ssim_kernels.ssim_planes(x[0], x[0], g, C1, C2, kernels), torch.ones(1, 4, 5))
    with pytest.raises(ValueError, match=r"one shape \[P, H \+ 10, W \+ 10\]"):
        ssim_kernels.ssim_planes(x[0], y[0, :, :-1], g, C1, C2, kernels)
    with pytest.raises(ValueError, match="y must not require a gradient"):
        ssim_kernels.ssim_planes(x[0], y[0].requires_grad_(), g, C1, C2, kernels)


def test_numba_kernels_match_the_convolutions():
    check_kernels("numba")


def test_triton_kernels_match_the_convolutions_in_triton_interpreter():
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("triton is installed on x86-64 Linux only (pyproject.toml)")
    require_module("triton", "a dev dependency (pyproject.toml) on x86-64 Linux; the kernels need it")
    code = "from tests.backend.test_ssim_kernels import check_kernels; check_kernels('triton'); print('ok')"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


def test_the_kernels_each_device_and_dtype_takes():
    assert ssim_kernels.kernels_for(torch.zeros(3)) == "numba"
    assert ssim_kernels.kernels_for(torch.zeros(3, dtype=torch.float64)) is None  # the convolutions
    with pytest.raises(ValueError, match="no kernels 'cuda'"):
        ssim_kernels.ssim_planes(torch.zeros(1, 11, 11), torch.zeros(1, 11, 11), gaussian_window(), C1, C2, "cuda")


def test_a_loss_takes_the_kernels_and_a_metric_the_convolutions():
    x, y = padded(1, 3, 12, 16, seed=3)
    assert torch.equal(windowed_ssim(x, y), windowed_ssim_conv(x, y))  # a metric: as reported before the kernels
    xk = x.clone().requires_grad_()
    loss = windowed_ssim(xk, y)  # the fit's loss: numba
    assert not torch.equal(loss.detach(), windowed_ssim_conv(x, y))  # another order of float32 sums
    loss.sum().backward()
    xc, yc = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref = windowed_ssim(xc, yc)  # the target with a gradient: the convolutions, both differentiated
    ref.sum().backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=2e-6, rtol=0)
    torch.testing.assert_close(xk.grad, xc.grad, atol=1e-5, rtol=0)
    assert yc.grad is not None and yc.grad.abs().max() > 0


def test_kernels_that_fail_their_check_leave_the_fit_to_the_convolutions(monkeypatch, caplog):
    def wrong(x, y, g, c1, c2, grad):  # kernels that compile on a new GPU but compute something else
        s, d = forward(x, y, g, c1, c2, grad)
        return s + 1e-3, d

    forward = ssim_kernels._FORWARD["numba"]
    monkeypatch.setitem(ssim_kernels._FORWARD, "numba", wrong)
    ssim_kernels._checked.cache_clear()
    try:
        assert ssim_kernels.kernels_for(torch.zeros(3)) is None
        assert "fail their check on cpu (they differ from the convolutions by 1.00e-03)" in caplog.text
        x, y = padded(1, 3, 12, 16, seed=4)
        xk = x.clone().requires_grad_()
        torch.testing.assert_close(windowed_ssim(xk, y), windowed_ssim_conv(x, y), atol=0, rtol=0)
    finally:
        ssim_kernels._checked.cache_clear()
