"""The fit's weight-free regularisers do what their FitConfig fields say (torch_cpu rasterizer, tiny)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from backend.rasterizers import RASTERIZERS
from backend.rasterizers.sh import rgb_to_sh
from backend.scene import look_at
from backend.stages.fit import (
    FitConfig,
    FitViews,
    Gaussians,
    _render,
    captures_and_frames,
    crop_to_masks,
    dropout_opacities,
    fit_gaussians,
    multiview_loss,
    shifted_sideways,
    stereo_loss,
)
from backend.types import Cameras, Views
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


def test_opacity_decay_multiplies_every_step():
    cams, images, memory = make_scene()
    views = FitViews(images, cams, torch.ones(images.shape[:3]))
    cfg = replace(BASE, iterations=5, opacity_decay=0.9, opacities_lr=0.0, init_opacity=0.5)
    g = fit_gaussians(views, memory, cfg, device="cpu")
    torch.testing.assert_close(torch.sigmoid(g.opacity_logits), torch.full((len(g),), 0.5 * 0.9**5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="opacity_decay must be in"):
        FitConfig(opacity_decay=0.0)
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


def textured_plane(depth: float = 2.0, baseline: float = 0.3, size: tuple[int, int] = (64, 48)):
    """A textured plane z = ``depth`` photographed by 3 cameras looking down +z, side by side along x
    (an LLFF-like rig): images by tracing each pixel's ray to the plane. -> cams, images [3, H, W, 3]"""
    w, h = size
    f = 50.0
    K = torch.tensor([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]]).repeat(3, 1, 1)
    centres = torch.tensor([-baseline, 0.0, baseline])
    w2c = torch.eye(4).repeat(3, 1, 1)
    w2c[:, 0, 3] = -centres
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    x = centres[:, None, None] + (u - w / 2) / f * depth  # [3, H, W] where each pixel's ray meets the plane
    y = ((v - h / 2) / f * depth).expand_as(x)
    freqs = torch.tensor([[7.0, 3.0], [4.0, -9.0], [-11.0, 5.0]])  # one pattern per colour channel
    images = torch.stack(
        [0.5 + 0.25 * torch.sin(a * x + b * y) + 0.2 * torch.cos(3 * b * x - a * y) for a, b in freqs], -1
    )
    return Cameras(w2c, K, w, h), images.clamp(0, 1)


def test_multiview_loss_is_least_at_the_true_depth_and_pulls_towards_it():
    """The other captures sampled through the right depth match the capture's photo; a depth 8 %
    off does not, and descending the loss from there walks back to the plane."""
    cams, images = textured_plane()
    h, w = images.shape[1:3]
    ones = torch.ones(h, w)

    def loss_at(scale: Tensor) -> Tensor:
        return multiview_loss(2.0 * scale * ones, ones, images[1], cams[[1]], images[[0, 2]], cams[[0, 2]])

    losses = {s: float(loss_at(torch.tensor(s))) for s in (0.9, 0.96, 1.0, 1.04, 1.1)}
    assert losses[1.0] < 0.01 < min(v for s, v in losses.items() if s != 1.0)
    assert losses[1.0] < losses[0.96] < losses[0.9] and losses[1.0] < losses[1.04] < losses[1.1]

    scale = torch.tensor(1.08, requires_grad=True)
    opt = torch.optim.Adam([scale], lr=0.005)
    for _ in range(60):
        opt.zero_grad()
        loss_at(scale).backward()
        opt.step()
    assert abs(float(scale.detach()) - 1.0) < 0.02

    # nothing to check: a transparent render, or a mask with no pixel
    assert float(multiview_loss(2.0 * ones, 0.4 * ones, images[1], cams[[1]], images[[0]], cams[[0]])) == 0.0
    none = torch.zeros(h, w, dtype=torch.bool)
    assert float(multiview_loss(1.8 * ones, ones, images[1], cams[[1]], images[[0]], cams[[0]], none)) == 0.0


def test_multiview_loss_takes_the_capture_that_sees_the_point():
    """Where one other capture shows something else at a pixel (an occluder), the best-matching one
    counts: the loss stays as low as with that capture alone."""
    cams, images = textured_plane()
    ones = torch.ones(images.shape[1:3])
    hidden = images.clone()
    hidden[0, :, images.shape[2] // 2 :] = 0.0  # a black occluder over the half of capture 0 that 2 sees too
    both = multiview_loss(2.0 * ones, ones, images[1], cams[[1]], hidden[[0, 2]], cams[[0, 2]])
    alone = multiview_loss(2.0 * ones, ones, images[1], cams[[1]], hidden[[0]], cams[[0]])
    assert float(both) < 0.01 < float(alone)


def test_fit_views_number_their_captures():
    """Captures are numbered by view (repeats keep their number), generated frames are -1, and the
    term runs only where there are two captures to compare."""
    cams, images, memory = make_scene()
    captures = FitViews.from_views(Views(images, cams, [4, 5, 6]))
    assert captures.source.tolist() == [4, 5, 6]
    frames = FitViews(images[:2], cams[[0, 1]], torch.full(images[:2].shape[:3], 0.5))
    mixed = captures_and_frames(Views(images, cams, [4, 5, 6]), frames, 0.75)
    assert mixed.source.tolist() == [4, 5, 6, 4, 5, 6, -1, -1]
    with pytest.raises(ValueError, match="views.source must be int64"):
        fit_gaussians(replace(captures, source=captures.source.float()), memory, BASE, device="cpu")

    cfg = replace(BASE, multiview_weight=1.0)
    plain = fit_gaussians(captures, memory, BASE, device="cpu")
    assert not torch.allclose(fit_gaussians(captures, memory, cfg, device="cpu").means, plain.means)
    # no capture numbers, or one capture: nothing to compare, the fit is the plain one
    torch.testing.assert_close(
        fit_gaussians(replace(captures, source=None), memory, cfg, device="cpu").means, plain.means
    )
    one = FitViews.from_views(Views(images[:1], cams[[0]], [0]))
    torch.testing.assert_close(
        fit_gaussians(one, memory, cfg, device="cpu").means, fit_gaussians(one, memory, BASE, device="cpu").means
    )


def wall(z: float, gen: torch.Generator, n: int = 900, opacity: float = 0.95) -> dict[str, Tensor]:
    """Raw fit parameters of a wall of small coloured Gaussians at depth ``z`` in front of the identity camera."""
    xy = (torch.rand(n, 2, generator=gen) * 2 - 1) * torch.tensor([1.3, 1.0]) * z
    return {
        "means": torch.cat([xy, torch.full((n, 1), z)], 1),
        "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
        "scales": torch.full((n, 3), math.log(0.035 * z)),
        "opacities": torch.logit(torch.full((n,), opacity)),
        "sh0": rgb_to_sh(torch.rand(n, 1, 3, generator=gen)),
    }


def test_stereo_loss_sees_layers_that_blend_depths():
    """One opaque wall is consistent with its neighbouring views; two half-transparent walls with
    different colours paint a picture whose expected depth belongs to neither, and the views beside
    the capture disagree with it through that depth."""
    gen = torch.Generator().manual_seed(3)
    cams = Cameras(torch.eye(4)[None], torch.tensor([[[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]]]), W, H)
    rast = RASTERIZERS.make("torch_cpu")
    black = torch.zeros(3)
    front, back = wall(2.0, gen, opacity=0.5), wall(4.0, gen)
    scenes = {"one wall": wall(3.0, gen), "two layers": {k: torch.cat([front[k], back[k]]) for k in front}}
    shifts = torch.tensor([0.08])
    losses = {}
    for name, params in scenes.items():
        opacities = torch.sigmoid(params["opacities"])
        photo, _, depth, alpha = _render(rast, params, cams, 0, black, opacities, with_depth=True)
        losses[name] = float(stereo_loss(rast, params, cams, 0, black, opacities, photo, depth, alpha, shifts))
    assert losses["two layers"] > 3 * losses["one wall"]

    moved = shifted_sideways(cams, torch.tensor([0.5]))
    torch.testing.assert_close(moved.centers, torch.tensor([[0.5, 0.0, 0.0]]))
