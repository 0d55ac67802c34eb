"""PSNR and SSIM against closed forms and a direct (loop) evaluation of Wang et al.'s formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.metrics import (
    ImageMetrics,
    best_of_blocks,
    image_metrics,
    load_lpips,
    psnr,
    ssim,
    ssim_map,
    tile_means,
    weighted_l1,
)


def test_psnr_known_values():
    target = torch.zeros(2, 8, 8, 3)
    pred = torch.stack([torch.full((8, 8, 3), 0.1), torch.full((8, 8, 3), 0.01)])
    torch.testing.assert_close(psnr(pred, target), torch.tensor([20.0, 40.0]))
    assert psnr(target[0], target[0]).item() == pytest.approx(100.0)  # floored, not inf


def test_tile_means_average_whole_and_partial_tiles() -> None:
    x = torch.arange(5 * 3, dtype=torch.float32).reshape(1, 5, 3)  # 2x2 tiles: the last row and column partial
    expected = torch.tensor(
        [[[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7 + 9 + 10) / 4, (8 + 11) / 2], [(12 + 13) / 2, 14]]]
    )
    assert torch.allclose(tile_means(x, 2), expected)
    with pytest.raises(ValueError, match="block must be >= 1"):
        tile_means(x, 0)


def test_best_of_blocks_takes_the_closer_image_per_tile() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 21, 35, 3, generator=g)  # tiles of 8: the last row and column of tiles are partial
    a, b = target.clone(), target.clone()
    a[:, :8, :8] += 0.3  # a is wrong in the first tile, b in the last (partial) one
    b[:, 16:, 32:] -= 0.3
    both = best_of_blocks(a, b, target, 8)
    assert torch.equal(both[:, :8, :8], b[:, :8, :8]) and torch.equal(both[:, 16:, 32:], a[:, 16:, 32:])
    assert torch.equal(both, target)  # each tile from the image that is right there
    noisy = (target + 0.05 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    other = (target + 0.05 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    best = psnr(best_of_blocks(noisy, other, target, 4), target)
    assert (best >= torch.maximum(psnr(noisy, target), psnr(other, target))).all()
    assert torch.equal(best_of_blocks(a, a.clone(), target, 8), a)  # ties keep the first
    assert best_of_blocks(a[0], b[0], target[0], 8).shape == (1, 21, 35, 3)
    with pytest.raises(ValueError, match="block must be >= 1"):
        best_of_blocks(a, b, target, 0)
    with pytest.raises(ValueError, match="one shape"):
        best_of_blocks(a, b[:, :20], target, 8)


def test_best_of_blocks_ties_in_error_keep_a_even_where_the_pixels_differ() -> None:
    target = torch.full((1, 8, 8, 3), 0.5)
    a, b = target + 0.25, target - 0.25  # equal squared error (exact in float32), different pixels
    assert torch.equal(best_of_blocks(a, b, target, 4), a)


def test_weighted_l1_is_the_error_per_unit_of_weight():
    target = torch.zeros(2, 2, 3, 3)
    pred = target.clone()
    pred[:, 0] = 0.4  # the top row of each image is wrong by 0.4, the bottom row right
    flat = torch.ones(2, 2, 3)
    assert float(weighted_l1(pred, target, flat)) == pytest.approx(0.2)  # the plain mean
    ranks = flat.clone()
    ranks[:, 0] = 0.25  # less weight where the error is: below the plain mean
    assert float(weighted_l1(pred, target, ranks)) == pytest.approx(0.4 * 0.25 / 1.25)
    assert float(weighted_l1(pred, target, 1.0 - ranks + 0.25)) > 0.2  # weight on the wrong pixels: above
    assert float(weighted_l1(pred[0], target[0], ranks[0])) == pytest.approx(0.08)  # one image [H, W, 3]
    with pytest.raises(ValueError, match=r"weight must be \[2, 2, 3\]; got \[2, 2, 2\]"):
        weighted_l1(pred, target, ranks[..., :2])
    with pytest.raises(ValueError, match="weight must be >= 0 and not all zero"):
        weighted_l1(pred, target, torch.zeros(2, 2, 3))


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.3, 0.7
    c1 = 0.01**2
    got = ssim(torch.full((16, 16, 3), a), torch.full((16, 16, 3), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    x = torch.rand(1, 20, 24, 3)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004, valid windows, evaluated window by window in float64."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    h, wd, _ = x.shape
    vals = []
    for c in range(3):
        for i in range(h - 10):
            for j in range(wd - 10):
                px, py = x[i : i + 11, j : j + 11, c], y[i : i + 11, j : j + 11, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
                cov = (w * px * py).sum() - mx * my
                vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_window_by_window_reference():
    rng = np.random.default_rng(0)
    x = rng.random((18, 21, 3))
    y = np.clip(x + rng.normal(0, 0.1, size=x.shape), 0, 1)
    got = ssim(torch.tensor(y), torch.tensor(x)).item()
    assert got == pytest.approx(reference_ssim(y, x), abs=1e-9)
    assert 0.3 < got < 0.95


def test_ssim_map_reflect_keeps_size_and_is_differentiable():
    x = torch.rand(2, 12, 14, 3, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 12, 14, 3, dtype=torch.float64)
    m = ssim_map(x, y)
    assert m.shape == (2, 12, 14)
    # The interior of the reflect map equals the valid map.
    torch.testing.assert_close(m[:, 5:-5, 5:-5], ssim_map(x, y, padding="valid"))
    m.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(torch.rand(8, 8, 3), torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.rand(8, 8, 3), torch.rand(8, 9, 3))


def test_image_metrics_means_and_lpips_hook(tmp_path, monkeypatch):
    monkeypatch.delenv("RECONLOOP_LPIPS", raising=False)
    assert load_lpips(tmp_path / "absent.pt") is None  # never downloads, just reports absence

    class MeanAbs(torch.nn.Module):  # stands in for an exported LPIPS network (same calling convention)
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    path = tmp_path / "lpips.pt2"
    x = torch.rand(2, 3, 16, 16)
    dims = {0: torch.export.Dim("n"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}
    torch.export.save(torch.export.export(MeanAbs(), (x, x.clone()), dynamic_shapes={"x": dims, "y": dims}), str(path))
    monkeypatch.setenv("RECONLOOP_LPIPS", str(path))
    fn = load_lpips()
    target = torch.zeros(2, 16, 16, 3)
    pred = torch.stack([torch.full((16, 16, 3), 0.1), torch.zeros(16, 16, 3)])
    m = image_metrics(pred, target, lpips_fn=fn)
    assert isinstance(m, ImageMetrics)
    assert m.lpips == pytest.approx([0.2, 0.0])  # inputs reach the module in [-1, 1]
    assert m.psnr[0] == pytest.approx(20.0) and m.psnr[1] == pytest.approx(100.0)
    means = m.mean()
    assert means["psnr"] == pytest.approx(60.0) and means["lpips"] == pytest.approx(0.1)
    assert math.isnan(ImageMetrics([], []).mean()["psnr"])
