"""The fit's weight-free regularisers do what their FitConfig fields say (torch_cpu rasterizer, tiny)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from backend.rasterizers import RASTERIZERS
from backend.scene import look_at
from backend.stages.fit import (
    FitConfig,
    FitViews,
    Gaussians,
    crop_to_masks,
    dropout_opacities,
    fit_gaussians,
)
from backend.types import Cameras
from tests.backend.stages.test_fit import H, W, make_scene

BASE = FitConfig(iterations=6, rasterizer="torch_cpu", strategy="none", sh_degree=1)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def test_dropout_keeps_the_expected_opacity_and_render():
    """Each opacity is dropped with probability r, the kept ones divided by 1 - r: the mean over many
    draws is the opacity, and for Gaussians that do not overlap the mean render is the full render."""
    opacities = torch.tensor([0.1, 0.3, 0.5, 0.6])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([dropout_opacities(opacities, 0.4, gen) for _ in range(4000)])
    assert abs(float((draws == 0).float().mean()) - 0.4) < 0.02
    torch.testing.assert_close(draws.mean(0), opacities, atol=0.02, rtol=0)
    assert torch.equal(dropout_opacities(opacities, 0.0), opacities)
    assert float(dropout_opacities(torch.tensor([0.9]), 0.5, gen).max()) <= 1.0  # capped at 1

    # 4 Gaussians side by side, none overlapping, in front of one camera
    means = torch.tensor([[-0.6, 0.0, 3.0], [-0.2, 0.0, 3.0], [0.2, 0.0, 3.0], [0.6, 0.0, 3.0]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(4, 1)
    scales = torch.full((4, 3), 0.04)
    colors = torch.rand(4, 3, generator=gen)
    w2c, K = torch.eye(4)[None], torch.tensor([[[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]]])
    rast = RASTERIZERS.make("torch_cpu")
    full = rast.render(means, quats, scales, opacities, colors, w2c, K, W, H)[0]
    mean = torch.stack(
        [
            rast.render(means, quats, scales, dropout_opacities(opacities, 0.4, gen), colors, w2c, K, W, H)[0]
            for _ in range(600)
        ]
    ).mean(0)
    assert float((mean - full).abs().max()) < 0.03


def test_dropout_rate_rises_from_zero():
    """At the first step the rate is 0: a 1-step fit is the same with and without dropout; later
    steps drop Gaussians, so a longer fit differs."""
    cams, images, memory = make_scene()
    views = FitViews(images, cams, torch.ones(images.shape[:3]))
    one = [fit_gaussians(views, memory, replace(BASE, iterations=1, dropout_rate=r), device="cpu") for r in (0.0, 0.5)]
    torch.testing.assert_close(one[0].means, one[1].means)
    more = [fit_gaussians(views, memory, replace(BASE, iterations=8, dropout_rate=r), device="cpu") for r in (0.0, 0.5)]
    assert not torch.allclose(more[0].opacity_logits, more[1].opacity_logits)


def test_fit_config_refuses_a_dropout_rate_of_one():
    with pytest.raises(ValueError, match="dropout_rate must be in"):
        FitConfig(dropout_rate=1.0)


def test_sh_degree_is_capped_and_scheduled():
    cams, images, memory = make_scene()
    views = FitViews(images, cams, torch.ones(images.shape[:3]))
    g0 = fit_gaussians(views, memory, replace(BASE, sh_degree=0), device="cpu")
    assert g0.sh.shape[1] == 1 and g0.sh_degree == 0
    # degree 2 fitted, but its rise is scheduled after the last step: the higher bands stay zero
    late = fit_gaussians(views, memory, replace(BASE, sh_degree=2, sh_degree_interval=100), device="cpu")
    assert late.sh.shape[1] == 9 and float(late.sh[:, 1:].abs().max()) == 0.0
    early = fit_gaussians(views, memory, replace(BASE, sh_degree=2, sh_degree_interval=1), device="cpu")
    assert float(early.sh[:, 1:].abs().max()) > 0.0


def test_random_background_makes_the_fit_blind_to_masked_out_pixels():
    """With masks, what the target holds outside them does not change the fit at all (the random
    background replaces it); without the option it does."""
    cams, images, memory = make_scene()
    masks = torch.zeros(images.shape[:3], dtype=torch.bool)
    masks[:, 8:28, 10:38] = True
    other = torch.where(masks[..., None], images, torch.ones_like(images))  # a white backdrop
    fits = {}
    for rb in (True, False):
        cfg = replace(BASE, has_random_background=rb)
        for name, imgs in (("scene", images), ("white", other)):
            fits[rb, name] = fit_gaussians(
                FitViews(imgs, cams, torch.ones(imgs.shape[:3]), masks=masks), memory, cfg, device="cpu"
            )
    torch.testing.assert_close(fits[True, "scene"].sh, fits[True, "white"].sh)
    torch.testing.assert_close(fits[True, "scene"].means, fits[True, "white"].means)
    assert not torch.allclose(fits[False, "scene"].sh, fits[False, "white"].sh)
    with pytest.raises(ValueError, match="views.masks must be bool"):
        fit_gaussians(
            FitViews(images, cams, torch.ones(images.shape[:3]), masks=masks.float()), memory, BASE, device="cpu"
        )


def test_crop_to_masks_keeps_gaussians_inside_the_hull():
    angles = (-0.6, 0.0, 0.6)
    w2c = torch.stack(
        [torch.tensor(look_at((3 * math.sin(a), 0.0, -3 * math.cos(a))), dtype=torch.float32) for a in angles]
    )
    K = torch.tensor([[40.0, 0.0, W / 2], [0.0, 40.0, H / 2], [0.0, 0.0, 1.0]]).repeat(3, 1, 1)
    cams = Cameras(w2c, K, W, H)
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[:, H // 2 - 6 : H // 2 + 6, W // 2 - 6 : W // 2 + 6] = True  # the middle of every view
    means = torch.tensor([[0.0, 0.0, 0.0], [0.05, -0.05, 0.02], [0.0, 1.2, 0.0], [1.5, 0.0, 0.0]])
    n = len(means)
    g = Gaussians(
        means, torch.zeros(n, 3), torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), torch.zeros(n), torch.zeros(n, 1, 3)
    )
    kept = crop_to_masks(g, cams, masks)
    torch.testing.assert_close(kept.means, means[:2])


def test_slow_steps_still_report_progress_every_couple_of_seconds(monkeypatch):
    """A step slower than PROGRESS_INTERVAL_S (a large fit on a CPU) is followed by a progress call, whatever
    progress_every says: the job's bar moves and the service's cancel, read there, is seen."""
    from backend.stages import fit

    cams, images, memory = make_scene()
    views = FitViews(images, cams, torch.ones(images.shape[:3]))

    def reported(iterations: int, every: int) -> list[int]:
        steps = []
        cfg = replace(BASE, iterations=iterations, progress_every=every)
        fit_gaussians(views, memory, cfg, device="cpu", progress=lambda s, _: steps.append(s))
        return steps

    clock = iter(range(0, 1000, 3))  # every reading 3 s after the one before
    monkeypatch.setattr(fit.time, "monotonic", lambda: float(next(clock)))
    assert reported(4, 1000) == [1, 2, 3, 4]
    monkeypatch.setattr(fit.time, "monotonic", lambda: 0.0)  # quick steps: every progress_every and the last
    assert reported(5, 2) == [2, 4, 5]
