"""Gaussian fitting on a tiny synthetic scene with the torch_cpu rasterizer (CPU, a few seconds)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from unittest import mock

import pytest
import torch

from backend.metrics import psnr
from backend.progress import Cancelled
from backend.rasterizers import RASTERIZERS
from backend.rasterizers.sh import sh_to_rgb
from backend.scene import look_at
from backend.stages.fit import (
    KNN_MIN_DISTANCE,
    FitConfig,
    FitViews,
    Gaussians,
    _make_strategy,
    _prune_to_cap,
    _Run,
    adam_step,
    confidence_loss,
    default_rasterizer,
    fit_gaussians,
    fit_gaussians_many,
    gaussians_from_arrays,
    gaussians_to_arrays,
    init_gaussians,
    knn_mean_distance,
    mcmc_regularisers,
    render_gaussians,
    render_gaussians_geometry,
    take_rows,
)
from backend.stages.guide import GuideConfig, fit_guide, member_memory, render_guide
from backend.types import Cameras, GeometryMemory, Views
from protocol.ply import read_gaussians_ply, write_gaussians_ply

W, H = 48, 36
FOCAL = 45.0
LR_BOOST = 10  # a 100-step test fit needs larger steps than simple_trainer's 30k-step learning rates


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is several times faster than two fighting over two loaded cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_scene(seed: int = 0, n: int = 40):
    """Coloured Gaussians seen by 3 cameras 3 units away, 20 degrees apart; images by torch_cpu."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=gen) * torch.tensor([1.0, 0.8, 0.4]) - torch.tensor([0.5, 0.4, 0.2])
    colors = torch.rand(n, 3, generator=gen)
    scales = torch.rand(n, 3, generator=gen) * 0.08 + 0.04
    quats = torch.randn(n, 4, generator=gen)
    opacities = torch.full((n,), 0.9)
    angles = (-0.35, 0.0, 0.35)
    w2c = torch.stack(
        [torch.tensor(look_at((3 * math.sin(a), 0.0, -3 * math.cos(a))), dtype=torch.float32) for a in angles]
    )
    K = torch.tensor([[FOCAL, 0.0, W / 2], [0.0, FOCAL, H / 2], [0.0, 0.0, 1.0]]).repeat(len(angles), 1, 1)
    cams = Cameras(w2c, K, W, H)
    images, _, _ = RASTERIZERS.make("torch_cpu").render(means, quats, scales, opacities, colors, w2c, K, W, H)
    noisy = GeometryMemory(
        means + 0.04 * torch.randn(n, 3, generator=gen),
        (colors + 0.2 * torch.randn(n, 3, generator=gen)).clamp(0, 1),
        torch.ones(n),
        torch.zeros(n, dtype=torch.int32),
    )
    return cams, images, noisy


def test_config(**overrides) -> FitConfig:
    base = FitConfig(
        iterations=100,
        rasterizer="torch_cpu",
        strategy="none",
        sh_degree=0,
        dropout_rate=0.0,  # tested in test_fit_regularisers; here it would make the last steps' loss noisy
        progress_every=25,
        means_lr=1.6e-4 * LR_BOOST,
        scales_lr=5e-3 * LR_BOOST / 2,
        quats_lr=1e-3 * LR_BOOST,
        sh0_lr=2.5e-3 * LR_BOOST,
    )
    return replace(base, **overrides)


test_config.__test__ = False  # a helper, not a test


def test_fit_recovers_a_synthetic_scene_from_a_noisy_start():
    cams, images, noisy = make_scene()
    cfg = test_config()
    before = psnr(render_gaussians(init_gaussians(noisy, cfg), cams, cfg), images).mean().item()
    losses: list[tuple[int, float]] = []
    g = fit_gaussians(
        FitViews(images, cams, torch.ones(3, H, W)),
        noisy,
        cfg,
        device="cpu",
        progress=lambda step, loss: losses.append((step, loss)),
    )
    after = psnr(render_gaussians(g, cams, cfg), images).mean().item()
    assert [s for s, _ in losses] == [25, 50, 75, 100]
    assert losses[-1][1] < 0.5 * losses[0][1]
    assert after > before + 8.0, (before, after)
    assert after > 30.0
    assert isinstance(g, Gaussians) and len(g) == len(noisy) and not g.means.requires_grad


def test_seed_sets_dropout_and_random_backgrounds():
    """One frame (its order cannot differ): only the device stream (dropout, backgrounds) follows the seed."""
    cams, images, noisy = make_scene(n=12)
    masks = torch.zeros(1, H, W, dtype=torch.bool)
    masks[:, :, : W // 2] = True
    views = FitViews(images[:1], cams[[0]], torch.ones(1, H, W), masks)
    cfg = test_config(iterations=6, dropout_rate=0.5, has_random_background=True)
    fits = [fit_gaussians(views, noisy, replace(cfg, seed=s), device="cpu") for s in (0, 1, 1)]
    assert not torch.equal(fits[0].means, fits[1].means)
    for field in ("means", "log_scales", "quats", "opacity_logits", "sh"):
        assert torch.equal(getattr(fits[1], field), getattr(fits[2], field))


def test_learning_rates_scale_with_the_frames_a_step_draws():
    """simple_trainer's scaling (learning rates x sqrt, Adam's betas) follows the frames a step draws: a
    set of 3 frames fits the same at batch_size 3 and 6 (every step draws all 3), unlike batch_size 2."""
    cams, images, noisy = make_scene(seed=2, n=24)
    views = FitViews(images, cams, torch.ones(3, H, W))
    fits = {
        bs: fit_gaussians(views, noisy, test_config(iterations=12, batch_size=bs), device="cpu") for bs in (2, 3, 6)
    }
    torch.testing.assert_close(fits[6].means, fits[3].means, rtol=0, atol=0)
    torch.testing.assert_close(fits[6].sh, fits[3].sh, rtol=0, atol=0)
    assert not torch.allclose(fits[2].means, fits[3].means)


def test_a_view_that_sees_no_gaussian_is_skipped():
    """A trajectory frame looking away from every Gaussian gives no gradient; the fit goes on."""
    cams, images, noisy = make_scene(seed=2)
    away = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])) @ cams.w2c[:1]  # turned 180 degrees: all behind it
    views = FitViews(
        torch.cat([images, torch.zeros(1, H, W, 3)]),
        Cameras(torch.cat([cams.w2c, away]), torch.cat([cams.K, cams.K[:1]]), W, H),
        torch.ones(4, H, W),
    )
    cfg = test_config(iterations=40, strategy="default", refine_every=0.25)  # densifies at steps 10 and 20
    before = psnr(render_gaussians(init_gaussians(noisy, cfg), cams, cfg), images).mean().item()
    g = fit_gaussians(views, noisy, cfg, device="cpu")
    assert psnr(render_gaussians(g, cams, cfg), images).mean().item() > before + 3.0


def test_zero_confidence_gets_no_gradient():
    torch.manual_seed(0)
    pred = torch.rand(2, 16, 20, 3, requires_grad=True)
    target = torch.rand(2, 16, 20, 3)
    conf = torch.rand(2, 16, 20)
    conf[0, 4:9, 5:12] = 0.0
    conf[1, :, :3] = 0.0
    confidence_loss(pred, target, conf, FitConfig()).backward()
    grad = pred.grad.abs().sum(dim=-1)
    assert (grad[conf == 0] == 0).all()
    assert (grad[conf > 0] > 0).float().mean() > 0.99
    # Confidence scales the per-pixel loss: halving every C halves the loss.
    full = confidence_loss(pred, target, conf, FitConfig())
    half = confidence_loss(pred, target, conf * 0.5, FitConfig())
    assert half.item() == pytest.approx(0.5 * full.item(), rel=1e-5)


def test_zero_confidence_patch_does_not_pull_the_fit():
    """A blot in one view at confidence 0 changes nothing: the fit equals the fit on clean images."""
    cams, images, noisy = make_scene(seed=1)
    corrupt = images.clone()
    rows, cols = slice(10, 26), slice(14, 34)
    corrupt[1, rows, cols] = torch.tensor([1.0, 0.0, 1.0])  # a magenta blot in the middle view
    distrusted = torch.ones(3, H, W)
    distrusted[1, rows, cols] = 0.0
    cfg = test_config(iterations=30)
    clean_fit = fit_gaussians(FitViews(images, cams, distrusted), noisy, cfg, device="cpu")
    blot_ignored = fit_gaussians(FitViews(corrupt, cams, distrusted), noisy, cfg, device="cpu")
    blot_trusted = fit_gaussians(FitViews(corrupt, cams, torch.ones(3, H, W)), noisy, cfg, device="cpu")
    for field in ("means", "log_scales", "quats", "opacity_logits", "sh"):
        torch.testing.assert_close(getattr(blot_ignored, field), getattr(clean_fit, field), rtol=0, atol=1e-6)
    assert (blot_trusted.sh - clean_fit.sh).abs().max() > 0.05


def test_default_strategy_densifies_with_the_cpu_rasterizer():
    """gsplat's DefaultStrategy reads only the rasterizer's meta, so it runs on CPU as well."""
    cams, images, noisy = make_scene(seed=2, n=25)
    cfg = test_config(
        iterations=40,
        strategy="default",
        refine_start=0.125,  # steps 5 to 35, every 10
        refine_every=0.25,
        refine_stop=0.875,
        grow_grad2d=1e-6,
        sh_degree=1,
        sh_degree_interval=20,
    )
    g = fit_gaussians(FitViews(images, cams, torch.ones(3, H, W)), noisy, cfg, device="cpu")
    assert len(g) > len(noisy)
    assert g.sh.shape == (len(g), 4, 3)
    assert torch.isfinite(g.means).all() and torch.isfinite(g.sh).all()


def test_mcmc_strategy_runs_with_the_cpu_rasterizer():
    """gsplat's MCMCStrategy off CUDA (its two kernels in torch, backend.stages.mcmc_torch): dead
    Gaussians are moved onto live ones, 5 % more are added at each refinement up to the cap, the
    centres get noise, and the set still fits its views."""
    cams, images, noisy = make_scene(seed=2, n=25)
    cfg = test_config(iterations=60, strategy="mcmc", refine_start=0.1, refine_every=1 / 6, refine_stop=0.75)
    assert cfg.refine_steps() == (6, 45, 10)
    views = FitViews(images, cams, torch.ones(3, H, W))
    before = psnr(render_gaussians(init_gaussians(noisy, cfg), cams, cfg), images).mean().item()
    g = fit_gaussians(views, noisy, cfg, device="cpu")
    n = 25
    for _ in range(4):  # refinements at steps 10, 20, 30 and 40, each to int(1.05 n)
        n = int(1.05 * n)
    assert len(g) == n == 29
    assert torch.isfinite(g.means).all() and torch.isfinite(g.log_scales).all()
    assert psnr(render_gaussians(g, cams, cfg), images).mean().item() > before + 3.0
    capped = fit_gaussians(views, noisy, replace(cfg, mcmc_cap=27, mcmc_growth=1.0), device="cpu")
    assert len(capped) == 27


def test_refinement_schedule_is_a_share_of_the_run():
    """The schedule scales with the run: gsplat's steps 500-2000 every 100 at 3000 steps, the same shares
    in a CPU job's 400 (a fixed start at step 500 never densified a fit that short)."""
    assert FitConfig().refine_steps() == (500, 2000, 100)
    assert FitConfig(iterations=600).refine_steps() == (100, 400, 20)
    assert FitConfig(iterations=400).refine_steps() == (67, 267, 13)
    assert FitConfig(iterations=10, refine_every=0.01).refine_steps() == (2, 7, 1)  # at least every step
    with pytest.raises(ValueError, match=r"refine_start and refine_stop are shares of the run, .* got 0.8 and 0.5"):
        FitConfig(refine_start=0.8, refine_stop=0.5)
    with pytest.raises(ValueError, match=r"FitConfig.refine_every is a share of the run in \(0, 1\]; got 0"):
        FitConfig(refine_every=0)


def test_mcmc_relocation_in_torch_is_the_papers_equation():
    """Eq. 9 of 3DGS as MCMC as the paper writes it (a double sum per Gaussian, here in float64 loops)
    against the vectorised torch version; n copies of the new opacity let through the light one did."""
    from gsplat.strategy import MCMCStrategy

    from backend.stages.mcmc_torch import covariance, relocation

    binoms = MCMCStrategy().initialize_state()["binoms"]
    gen = torch.Generator().manual_seed(0)
    opacities = torch.rand(200, generator=gen) * 0.99
    scales = torch.rand(200, 3, generator=gen) + 0.01
    ratios = torch.randint(1, 60, (200,), generator=gen)  # above n_max (51): clamped as gsplat clamps
    new_o, new_s = relocation(opacities, scales, ratios, binoms)
    for o, s, r, o2, s2 in zip(opacities.tolist(), scales.tolist(), ratios.tolist(), new_o.tolist(), new_s.tolist()):
        n = min(max(r, 1), 51)
        want_o = 1.0 - (1.0 - o) ** (1.0 / n)
        denom = sum(
            math.comb(i - 1, k) * (-1) ** k / math.sqrt(k + 1) * want_o ** (k + 1)
            for i in range(1, n + 1)
            for k in range(i)
        )
        assert math.isclose(o2, want_o, rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(1.0 - (1.0 - o2) ** n, o, rel_tol=1e-4, abs_tol=1e-6)
        for a, b in zip(s2, s):
            assert math.isclose(a, o / denom * b, rel_tol=1e-4)
    one = relocation(opacities, scales, torch.ones(200, dtype=torch.int64), binoms)  # one copy: unchanged
    torch.testing.assert_close(one[0], opacities)
    torch.testing.assert_close(one[1], scales)
    # the noise's covariances, as gsplat.quat_scale_to_covar_preci returns them (quaternions unnormalised)
    quats = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])  # identity; 90 degrees about z
    covars, precis = covariance(quats, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), triu=True)
    torch.testing.assert_close(covars, torch.tensor([[1.0, 0.0, 0.0, 4.0, 0.0, 9.0], [4.0, 0.0, 0.0, 1.0, 0.0, 9.0]]))
    torch.testing.assert_close(precis[0], torch.tensor([1.0, 0.0, 0.0, 0.25, 0.0, 1 / 9]))


def test_sets_fitted_in_lockstep_end_where_their_lone_fits_end():
    """fit_gaussians_many draws every set's batch in one rasterizer call (padded to the largest set,
    stacked on a batch dimension) and each set still ends where a lone fit on it ends: with
    densification (DefaultStrategy's clones read each set's own 2D gradients from the stack), dropout
    (each set's own random source) and sets of different sizes and frame counts, also where their
    batches differ in length."""
    scenes = [make_scene(seed=s, n=n) for s, n in ((3, 30), (4, 22), (5, 26))]
    views = [
        FitViews(images[:f], cams[list(range(f))], torch.ones(f, H, W))
        for (cams, images, _), f in zip(scenes, (3, 2, 3))
    ]
    memories = [noisy for _, _, noisy in scenes]
    cfg = test_config(
        iterations=24,
        strategy="default",
        refine_start=5 / 24,
        refine_every=8 / 24,
        refine_stop=20 / 24,
        grow_grad2d=0.01,  # about half of them clone: which ones, each set's own gradients decide
        grow_scale3d=10.0,  # every Gaussian is small: DefaultStrategy clones (no random splits)
        dropout_rate=0.2,
        sh_degree=1,
        sh_degree_interval=12,
    )
    # batch_size 3: the set with 2 frames fills shorter batches, so the sets are drawn each on its own
    for batch_size in (1, 3):
        cfg = replace(cfg, batch_size=batch_size)
        lone = [fit_gaussians(v, m, cfg, device="cpu") for v, m in zip(views, memories)]
        steps: list[int] = []
        together = fit_gaussians_many(views, memories, cfg, device="cpu", progress=lambda step, _: steps.append(step))
        assert steps == [24]
        for g, alone, memory in zip(together, lone, memories):
            assert len(g) == len(alone) > len(memory)
            for field in ("means", "log_scales", "quats", "opacity_logits", "sh"):
                torch.testing.assert_close(getattr(g, field), getattr(alone, field), rtol=0, atol=1e-5)
        assert len({len(g) for g in together}) > 1  # sets of different sizes
    # each set its own seed (frame order, dropout, and the global stream its strategy draws from: MCMC's
    # noise every step and its relocation): set k ends where a lone fit with seed k ends
    seeds = [7, 8, 9]
    for strategy in ("default", "mcmc"):
        cfg = replace(cfg, strategy=strategy)
        lone = [fit_gaussians(v, m, replace(cfg, seed=s), device="cpu") for v, m, s in zip(views, memories, seeds)]
        for g, alone in zip(fit_gaussians_many(views, memories, cfg, device="cpu", seeds=seeds), lone):
            torch.testing.assert_close(g.sh, alone.sh, rtol=0, atol=1e-5)
            torch.testing.assert_close(g.means, alone.means, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one seed per set of views; got 2 for 3"):
        fit_gaussians_many(views, memories, cfg, device="cpu", seeds=seeds[:2])
    cams, images, _ = scenes[0]
    small = replace(cams, width=W // 2, height=H // 2)
    with pytest.raises(ValueError, match=r"must share one image size; got \[\(24, 18\), \(48, 36\)\]"):
        fit_gaussians_many(
            [views[0], FitViews(images[:1, ::2, ::2], small[[0]], torch.ones(1, H // 2, W // 2))],
            memories[:2],
            cfg,
            device="cpu",
        )
    with pytest.raises(ValueError, match="one memory per set of views"):
        fit_gaussians_many(views, memories[:2], cfg, device="cpu")


def test_torch_cpu_rasterizer_draws_leading_batch_dimensions_one_element_at_a_time():
    """``means`` [B, N, 3] with ``viewmats`` [B, C, 4, 4]: each element drawn as on its own."""
    cams, _, noisy = make_scene(seed=6, n=12)
    g = init_gaussians(noisy, test_config())
    rast = RASTERIZERS.make("torch_cpu")
    args = [g.means, g.quats, torch.exp(g.log_scales), torch.sigmoid(g.opacity_logits), sh_to_rgb(g.sh[:, 0])]
    one = [
        rast.render(*(a * (1 + b * 0.1) if i == 2 else a for i, a in enumerate(args)), cams.w2c[:2], cams.K[:2], W, H)
        for b in range(2)
    ]
    batched = rast.render(
        *(torch.stack([a * (1 + b * 0.1) if i == 2 else a for b in range(2)]) for i, a in enumerate(args)),
        torch.stack([cams.w2c[:2]] * 2),
        torch.stack([cams.K[:2]] * 2),
        W,
        H,
    )
    assert batched[0].shape == (2, 2, H, W, 3) and batched[2]["means2d"].shape == (2, 2, 12, 2)
    for b in range(2):
        torch.testing.assert_close(batched[0][b], one[b][0])
        torch.testing.assert_close(batched[2]["radii"][b], one[b][2]["radii"])
    with pytest.raises(ValueError, match=r"quats must share means' batch dimensions \[2\]"):
        rast.render(
            torch.stack([g.means] * 2),
            g.quats,
            *(torch.stack([a] * 2) for a in args[2:]),
            torch.stack([cams.w2c[:2]] * 2),
            torch.stack([cams.K[:2]] * 2),
            W,
            H,
        )


def test_init_gaussians_from_memory():
    grid = torch.stack(torch.meshgrid(*[torch.arange(5.0) * 0.1] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    rgb = torch.rand(len(grid), 3)
    memory = GeometryMemory(grid, rgb, torch.ones(len(grid)), torch.zeros(len(grid), dtype=torch.int32))
    g = init_gaussians(memory, FitConfig(sh_degree=2))
    interior = ((grid > 0.05) & (grid < 0.35)).all(dim=1)
    torch.testing.assert_close(g.log_scales[interior], torch.full((int(interior.sum()), 3), math.log(0.1)))
    torch.testing.assert_close(sh_to_rgb(g.sh[:, 0]), rgb)
    assert g.sh.shape == (125, 9, 3) and (g.sh[:, 1:] == 0).all()
    torch.testing.assert_close(torch.sigmoid(g.opacity_logits), torch.full((125,), 0.1))
    assert (g.quats == torch.tensor([1.0, 0, 0, 0])).all()
    torch.testing.assert_close(
        knn_mean_distance(torch.tensor([[0.0, 0, 0], [3.0, 0, 0], [0, 4.0, 0]]), 1), torch.tensor([3.0, 3.0, 4.0])
    )
    with pytest.raises(ValueError, match="memory is empty"):
        init_gaussians(GeometryMemory.empty(), FitConfig())
    broken = GeometryMemory(grid.clone(), rgb, torch.ones(len(grid)), torch.zeros(len(grid), dtype=torch.int32))
    broken.xyz[7, 1] = float("nan")
    with pytest.raises(ValueError, match="memory.xyz holds 1 of 125 points with a non-finite coordinate"):
        init_gaussians(broken, FitConfig())


@pytest.mark.parametrize("n, k", [(2, 3), (3, 3), (500, 3), (4000, 8)])
def test_knn_mean_distance_is_exact(n: int, k: int) -> None:
    """The k-d tree's neighbours are the exhaustive search's, duplicates and clustered points included."""
    gen = torch.Generator().manual_seed(n)
    xyz = torch.cat([torch.rand(n // 2, 3, generator=gen), 1e-3 * torch.randn(n - n // 2, 3, generator=gen)])
    xyz[-1] = xyz[0]  # a duplicate: its nearest other point is at distance 0
    d = torch.cdist(xyz.double(), xyz.double(), compute_mode="donot_use_mm_for_euclid_dist")
    k_eff = min(k, n - 1)
    want = torch.topk(d, k_eff + 1, dim=1, largest=False).values[:, 1:].mean(dim=1).clamp_min(KNN_MIN_DISTANCE)
    got = knn_mean_distance(xyz, k)
    assert got.shape == (n,) and got.dtype == xyz.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_gaussians_ply_round_trip_renders_the_same(tmp_path):
    cams, _, noisy = make_scene(seed=3, n=15)
    cfg = test_config(sh_degree=2)
    g = init_gaussians(noisy, cfg)
    g.sh[:, 1:] = torch.randn_like(g.sh[:, 1:]) * 0.1
    write_gaussians_ply(tmp_path / "gaussians.ply", gaussians_to_arrays(g))
    back = gaussians_from_arrays(read_gaussians_ply(tmp_path / "gaussians.ply"))
    torch.testing.assert_close(render_gaussians(back, cams, cfg), render_gaussians(g, cams, cfg))


def test_progress_may_cancel():
    cams, images, noisy = make_scene(seed=4, n=10)
    seen = []

    def cancel(step: int, loss: float) -> None:
        seen.append(step)
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        fit_gaussians(
            FitViews(images, cams, torch.ones(3, H, W)),
            noisy,
            test_config(progress_every=3),
            device="cpu",
            progress=cancel,
        )
    assert seen == [3]


def test_inputs_are_checked():
    cams, images, noisy = make_scene(seed=5, n=5)
    cfg = test_config(iterations=1)
    with pytest.raises(ValueError, match=r"FitConfig.rasterizer must be one of gsplat, torch_cpu; got 'opengl'"):
        FitConfig(rasterizer="opengl")
    with pytest.raises(ValueError, match=r"FitConfig.sh_degree must be in 0..3; got 4"):
        FitConfig(sh_degree=4)
    with pytest.raises(ValueError, match=r"confidence must be \[3, 36, 48\]"):
        fit_gaussians(FitViews(images, cams, torch.ones(3, H, W + 1)), noisy, cfg, device="cpu")
    with pytest.raises(ValueError, match=r"confidence must be in \[0, 1\]"):
        fit_gaussians(FitViews(images, cams, torch.full((3, H, W), 2.0)), noisy, cfg, device="cpu")
    with pytest.raises(ValueError, match=r"images must be \[F, 36, 48, 3\]"):
        fit_gaussians(FitViews(images[:, :-1], cams, torch.ones(3, H, W)), noisy, cfg, device="cpu")
    assert default_rasterizer("cpu") == "torch_cpu" and default_rasterizer("cuda:0") == "gsplat"
    with pytest.raises(ValueError, match=r"FitConfig.mcmc_scale_reg must be >= 0; got -1"):
        FitConfig(mcmc_scale_reg=-1)
    with pytest.raises(ValueError, match=r"FitConfig.batch_size must be at most 10 .*; got 11"):
        FitConfig(batch_size=11)
    FitConfig(batch_size=10)  # beta1 0: Adam without momentum, still valid


def test_mcmc_strategy_is_gsplats_with_the_cap_and_its_regularisers(caplog):
    """The strategy ``auto`` resolves to on each rasterizer, the one it builds and the loss terms it adds
    (its CPU fit: test_mcmc_strategy_runs_with_the_cpu_rasterizer)."""
    from gsplat.strategy import DefaultStrategy, MCMCStrategy

    assert isinstance(_make_strategy(FitConfig(rasterizer="torch_cpu"), 100), MCMCStrategy)  # the default on either
    assert isinstance(_make_strategy(FitConfig(strategy="default"), 100), DefaultStrategy)
    with pytest.raises(ValueError, match=r"FitConfig.strategy must be one of default, mcmc, none; got 'auto'"):
        FitConfig(strategy="auto")

    cfg = FitConfig(strategy="mcmc", mcmc_cap=5000, prune_opa=0.01, refine_stop=0.5)
    strategy = _make_strategy(cfg, 1000)
    assert isinstance(strategy, MCMCStrategy)
    assert (strategy.cap_max, strategy.min_opacity, strategy.refine_stop_iter) == (5000, 0.01, 1500)
    assert _make_strategy(replace(cfg, max_gaussians=3000), 1000).cap_max == 3000  # the job's cap wins when smaller
    # a memory above the cap can still grow by mcmc_growth (MCMC adds nothing at or above its cap) ...
    with caplog.at_level(logging.INFO, logger="backend.stages.fit"):
        assert _make_strategy(cfg, 241_000).cap_max == 301_250
    assert "MCMC's Gaussian cap is 301250 (1.25 x the 241000 initial Gaussians" in caplog.text
    assert _make_strategy(replace(cfg, mcmc_growth=1.0), 241_000).cap_max == 241_000  # relocation only, as before
    # ... and the job's cap still wins
    assert _make_strategy(replace(cfg, max_gaussians=250_000), 241_000).cap_max == 250_000
    with pytest.raises(
        ValueError, match=r"FitConfig.mcmc_growth must be >= 1 \(1: a memory above the cap never grows\); got 0.5"
    ):
        FitConfig(mcmc_growth=0.5)
    params = torch.nn.ParameterDict(
        {
            "opacities": torch.nn.Parameter(torch.zeros(4)),
            "scales": torch.nn.Parameter(torch.log(torch.full((4, 3), 2.0))),
        }
    )
    reg = mcmc_regularisers(params, cfg)
    assert math.isclose(float(reg.detach()), 0.01 * 0.5 + 0.01 * 2.0, rel_tol=1e-6)
    reg.backward()  # both terms pull: opacities down, scales down
    assert (params["opacities"].grad > 0).all() and (params["scales"].grad > 0).all()


def test_a_step_that_learns_nothing_keeps_no_gradient_and_the_cap_spares_mcmcs_table():
    """MCMC's regularisers give a gradient even where no Gaussian is seen: a step that does not learn
    drops it (else it piles into the next step that does). The cap cuts per-Gaussian state only, not
    MCMC's binomial table."""
    _, _, noisy = make_scene()
    cfg = test_config(strategy="mcmc")
    run = _Run.start(init_gaussians(noisy, cfg), cfg, scale=1.0, frames=3)
    mcmc_regularisers(run.params, cfg).backward()
    assert run.params["opacities"].grad is not None
    adam_step([run], [False])
    run.after_step(cfg, 0, {}, learn=False)
    assert all(p.grad is None for p in run.params.values())
    table = run.state["binoms"].clone()
    _prune_to_cap(run.params, run.optimizers, run.state, 5)
    assert len(run.params["means"]) == 5 and torch.equal(run.state["binoms"], table)


def test_sets_of_one_size_in_lockstep_end_where_their_lone_fits_end():
    """Sets of one size (the guide's members: MCMC grows them alike) are stacked without pads, and each still ends
    where its lone fit ends."""
    scenes = [make_scene(seed=s, n=24) for s in (3, 4, 5)]
    views = [FitViews(images, cams, torch.ones(len(cams), H, W)) for cams, images, _ in scenes]
    memories = [noisy for _, _, noisy in scenes]
    cfg = test_config(iterations=12, strategy="mcmc", max_gaussians=30, dropout_rate=0.2)
    seeds = [7, 8, 9]
    lone = [fit_gaussians(v, m, replace(cfg, seed=s), device="cpu") for v, m, s in zip(views, memories, seeds)]
    together = fit_gaussians_many(views, memories, cfg, device="cpu", seeds=seeds)
    assert len({len(g) for g in together}) == 1
    for g, alone in zip(together, lone, strict=True):
        for field in ("means", "log_scales", "quats", "opacity_logits", "sh"):
            torch.testing.assert_close(getattr(g, field), getattr(alone, field), rtol=0, atol=1e-5)


def test_the_sets_fused_adam_step_is_adams_bit_for_bit():
    """adam_step's fused calls, one per set of hyperparameters across the sets (3 sets' 18 optimizers in 7 calls),
    give each parameter and its moments what each optimizer's own fused step gives; a set that does not learn keeps
    its parameters, and every gradient is dropped."""
    _, _, noisy = make_scene()
    cfg = test_config(strategy="none", sh_degree=1)
    g0 = init_gaussians(noisy, cfg)

    def runs() -> list[_Run]:
        out = [_Run.start(g0, cfg, scale=scale, frames=3) for scale in (1.0, 2.0, 1.0)]
        for run in out:  # fused, as on CUDA (the CPU has the kernel too)
            run.optimizers = {
                name: torch.optim.Adam(
                    [{"params": opt.param_groups[0]["params"], "lr": opt.param_groups[0]["lr"]}],
                    fused=True,
                    eps=opt.defaults["eps"],
                    betas=opt.defaults["betas"],
                )
                for name, opt in run.optimizers.items()
            }
        return out

    ours, torchs = runs(), runs()
    calls = []
    fused = torch._fused_adam_

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return fused(*args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        learns = [True, step != 1, True]
        for a, b in zip(ours, torchs, strict=True):
            for name in a.params:
                grad = torch.randn(a.params[name].shape, generator=gen)
                a.params[name].grad, b.params[name].grad = grad.clone(), grad.clone()
        learning = [opt for run, learn in zip(ours, learns, strict=True) if learn for opt in run.optimizers.values()]
        calls.clear()
        with mock.patch.object(torch, "_fused_adam_", counted):
            adam_step(ours, learns)
        # one call per learning rate (the sets' means differ by their scene scale), each over all its parameters
        assert len(calls) == len({opt.param_groups[0]["lr"] for opt in learning}) < len(learning)
        assert sum(calls) == len(learning)
        for run, learn in zip(torchs, learns, strict=True):
            for opt in run.optimizers.values():
                if learn:
                    opt.step()
                opt.zero_grad(set_to_none=True)
    for a, b in zip(ours, torchs, strict=True):
        for name in a.params:
            assert a.params[name].grad is None
            assert torch.equal(a.params[name], b.params[name]), name
            sa, sb = a.optimizers[name].state[a.params[name]], b.optimizers[name].state[b.params[name]]
            assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq")), name


def test_geometry_render_gives_the_colour_and_the_depth_of_a_wall():
    """An opaque wall of flat Gaussians at z = 2 in front of a camera: expected depth 2 where it covers."""
    xs = torch.linspace(-1.0, 1.0, 21)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    n = len(grid)
    means = torch.cat([grid, torch.full((n, 1), 2.0)], 1)
    g = Gaussians(
        means,
        torch.log(torch.tensor([0.08, 0.08, 0.01])).repeat(n, 1),
        torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        torch.full((n,), 6.0),
        torch.rand(n, 4, 3, generator=torch.Generator().manual_seed(0)) * 0.3,
    )
    K = torch.tensor([[[FOCAL, 0.0, W / 2], [0.0, FOCAL, H / 2], [0.0, 0.0, 1.0]]])
    cams = Cameras(torch.eye(4)[None], K, W, H)
    cfg = test_config(sh_degree=1, background=(0.2, 0.3, 0.4))
    rgb, depth, alpha = render_gaussians_geometry(g, cams, cfg)
    assert rgb.shape == (1, H, W, 3) and depth.shape == alpha.shape == (1, H, W)
    torch.testing.assert_close(rgb, render_gaussians(g, cams, cfg))  # same colours, same background
    covered = alpha > 0.99
    assert covered.float().mean() > 0.9
    torch.testing.assert_close(depth[covered], torch.full_like(depth[covered], 2.0), atol=1e-3, rtol=0)
    away = Cameras(torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))[None], K, W, H)  # looking away: nothing
    rgb, depth, alpha = render_gaussians_geometry(g, away, cfg)
    assert torch.all(alpha == 0) and torch.all(depth == 0)
    torch.testing.assert_close(rgb, torch.tensor([0.2, 0.3, 0.4]).expand(1, H, W, 3))


def test_guide_members_are_fits_with_the_following_seeds_and_render_as_their_mean():
    """fit_guide keeps the members it is given and fits the rest in lockstep, member k seeded seed + k
    (with dropout, each draws its own); render_guide is their mean colour and opacity-weighted depth,
    and their colours' spread."""
    cams, images, noisy = make_scene(seed=3, n=30)
    captures = Views(images, cams, [0, 1, 2])
    cfg = test_config(iterations=20, dropout_rate=0.3, sh_degree=1, seed=4)
    guide_cfg = GuideConfig(members=3)
    first = fit_gaussians(FitViews.from_views(captures), noisy, cfg, device="cpu")
    members = fit_guide(captures, noisy, cfg, guide_cfg, device="cpu", ready=[first])
    assert len(members) == 3 and members[0] is first
    second = fit_gaussians(FitViews.from_views(captures), noisy, replace(cfg, seed=5), device="cpu")
    torch.testing.assert_close(members[1].sh, second.sh, rtol=0, atol=1e-5)
    assert not torch.allclose(members[1].sh, members[2].sh)  # another seed, another fit
    assert fit_guide(captures, noisy, cfg, GuideConfig(members=2), device="cpu", ready=members) == members[:2]

    rgb, depth, spread = render_guide(members, cams, cfg, guide_cfg)
    parts = [render_gaussians_geometry(g, cams, cfg) for g in members]
    torch.testing.assert_close(rgb, torch.stack([p[0] for p in parts]).mean(0))
    torch.testing.assert_close(spread, torch.stack([p[0] for p in parts]).std(0, correction=0).mean(-1))
    assert spread.shape == depth.shape and spread.max() > 0  # the members differ
    alpha = torch.stack([p[2] for p in parts])
    weighted = (alpha * torch.stack([p[1] for p in parts])).sum(0) / alpha.sum(0)
    opaque = alpha.mean(0) >= guide_cfg.alpha
    assert opaque.any() and (~opaque).any()
    torch.testing.assert_close(depth[opaque], weighted[opaque])
    assert torch.all(depth[~opaque] == 0)
    one_rgb, one_depth, one_spread = render_guide(members[:1], cams, cfg, guide_cfg)  # one member: its own render
    assert torch.all(one_spread == 0)
    torch.testing.assert_close(one_rgb, parts[0][0])
    torch.testing.assert_close(one_depth, torch.where(parts[0][2] >= guide_cfg.alpha, parts[0][1], 0.0))
    with pytest.raises(ValueError, match="GuideConfig.members must be at least 1; got 0"):
        GuideConfig(members=0)


def test_bagged_guide_members_start_from_their_own_share_of_the_memory():
    """member_points < 1: member k starts from its own random subset of M (drawn from seed + k, the same on
    a second call), the members' Gaussians are their subsets' points (no densification here), and bagged
    members fitted before are kept."""
    cams, images, noisy = make_scene(seed=3, n=200)
    captures = Views(images, cams, [0, 1, 2])
    cfg = test_config(iterations=5, seed=4)
    assert member_memory(noisy, 1.0, 7) is noisy
    half = member_memory(noisy, 0.5, 7)
    assert 60 < len(half) < 140 and torch.equal(member_memory(noisy, 0.5, 7).xyz, half.xyz)
    assert not torch.equal(member_memory(noisy, 0.5, 8).xyz[:50], half.xyz[:50])  # another member, another share
    assert torch.isin(half.xyz[:, 0], noisy.xyz[:, 0]).all()  # M's own points
    guide_cfg = GuideConfig(members=3, member_points=0.5)
    bagged = fit_guide(captures, noisy, cfg, guide_cfg, device="cpu")
    assert [len(g) for g in bagged] == [len(member_memory(noisy, 0.5, 4 + k)) for k in range(3)]
    assert all(a is b for a, b in zip(fit_guide(captures, noisy, cfg, guide_cfg, device="cpu", ready=bagged), bagged))
    with pytest.raises(ValueError, match=r"GuideConfig.member_points is a share .* in \(0, 1\]; got 0"):
        GuideConfig(member_points=0)


def test_take_rows_is_indexing_by_slices():
    t = torch.arange(24.0).reshape(6, 2, 2)
    for rows in ([4], [5, 0, 5], [1, 2]):
        got = take_rows(t, rows)
        assert torch.equal(got, t[rows]), rows
    assert take_rows(t, [3]).data_ptr() == t[3].data_ptr()  # one row: a view, nothing copied


def test_the_centres_learning_rate_decays_as_simple_trainers_exponential_schedule():
    """after_step multiplies the centres' learning rate by its decay, as torch's ExponentialLR does, step for step:
    after ``iterations`` steps it is ``means_lr_final_factor`` of its start; the other rates stay."""
    _, _, noisy = make_scene()
    cfg = test_config(iterations=50, means_lr_final_factor=0.01)
    run = _Run.start(init_gaussians(noisy, cfg), cfg, scale=1.0, frames=3)
    start = {name: opt.param_groups[0]["lr"] for name, opt in run.optimizers.items()}
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=start["means"])
    schedule = torch.optim.lr_scheduler.ExponentialLR(probe, gamma=run.means_decay)
    for step in range(cfg.iterations):
        probe.step()
        schedule.step()
        run.after_step(cfg, step, {}, learn=False)
        assert run.optimizers["means"].param_groups[0]["lr"] == probe.param_groups[0]["lr"]
    assert run.optimizers["means"].param_groups[0]["lr"] == pytest.approx(0.01 * start["means"])
    assert all(run.optimizers[n].param_groups[0]["lr"] == lr for n, lr in start.items() if n != "means")
