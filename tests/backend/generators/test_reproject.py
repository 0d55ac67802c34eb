"""The reprojection generator on an analytic scene: a textured plane z = PLANE_Z seen by pinholes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backend.generators import GENERATORS, Generator
from backend.generators.reproject import ReprojectConfig, ReprojectGenerator, push_pull
from backend.types import ENSEMBLE_SOURCE, GUIDE_SOURCE, Cameras, ConditionVideo, Renders, Views

W, H = 48, 32
FOCAL = 40.0
PLANE_Z = 5.0


def _cams(xs: list[float]) -> Cameras:
    """Cameras looking down +z from (x, 0, 0): w2c = [I | -c]."""
    w2c = torch.eye(4).repeat(len(xs), 1, 1)
    w2c[:, 0, 3] = -torch.tensor(xs, dtype=torch.float32)
    K = torch.tensor([[FOCAL, 0.0, W / 2], [0.0, FOCAL, H / 2], [0.0, 0.0, 1.0]]).repeat(len(xs), 1, 1)
    return Cameras(w2c, K, W, H)


def _texture(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """A smooth colour on the plane. [..., 3]"""
    return torch.stack(
        [0.5 + 0.4 * torch.sin(1.3 * X), 0.5 + 0.4 * torch.cos(1.7 * Y), 0.5 + 0.2 * torch.sin(X + Y)], -1
    )


def _images(cams: Cameras) -> torch.Tensor:
    """Exact images of the plane. [C, H, W, 3]"""
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    out = []
    for i in range(len(cams)):
        cx = -float(cams.w2c[i, 0, 3])
        X = (u - W / 2) / FOCAL * PLANE_Z + cx
        Y = (v - H / 2) / FOCAL * PLANE_Z
        out.append(_texture(X, Y))
    return torch.stack(out) if out else torch.zeros(0, H, W, 3)


def _empty(like: Cameras) -> Views:
    return Views(torch.zeros(0, H, W, 3), Cameras(like.w2c[:0], like.K[:0], W, H), [])


def _cond(target_xs: list[float], capture_xs: list[float], mask: torch.Tensor) -> tuple[ConditionVideo, torch.Tensor]:
    targets = _cams(target_xs)
    truth = _images(targets)
    renders = Renders(
        rgb=truth * mask[..., None],
        depth=torch.full((len(targets), H, W), PLANE_Z) * mask,
        mask=mask,
        source=torch.where(mask, 0, -1).to(torch.int32),
    )
    caps = _cams(capture_xs)
    memory = Views(_images(caps), caps, list(range(len(caps))))
    return ConditionVideo(targets=targets, renders=renders, memory=memory, carried=_empty(targets)), truth


def test_registered_and_protocol() -> None:
    assert GENERATORS.get("reproject") is ReprojectGenerator
    assert isinstance(ReprojectGenerator(), Generator)


def test_colours_from_captures_with_confidence_levels() -> None:
    cfg = ReprojectConfig()
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[:, :, : W // 2] = True  # the memory covers the left half only
    cond, truth = _cond([0.4, 0.6], [0.0], mask)
    out = ReprojectGenerator(cfg).generate(cond, num_steps=4, seed=0)
    assert out.images.shape == (2, H, W, 3) and out.confidence.shape == (2, H, W)
    assert out.images.dtype == torch.float32 and out.confidence.dtype == torch.float32
    # every pixel the capture sees is its colour through the depth (bilinear sampling error only),
    # on the memory's depth (left) and on the searched guess (right)
    seen = out.confidence > cfg.inpainted_confidence
    assert seen[mask].all() and seen[~mask].float().mean() > 0.5
    err = (out.images[seen] - truth[seen]).abs()
    assert err.mean() < 0.01, float(err.mean())
    # one source alone: the ceiling x the angular weight (rays within ~8 degrees: > 0.85) x single_source_factor
    for pixels, ceiling in (
        (out.confidence[mask], cfg.rendered_confidence),
        (out.confidence[~mask & seen], cfg.reprojected_confidence),
    ):
        top = ceiling * cfg.single_source_factor
        assert torch.all(pixels <= top + 1e-6) and torch.all(pixels > 0.85 * top), (float(pixels.min()), top)
    # the capture (at x=0) cannot see the far right of the targets: those are inpainted, low
    assert torch.all(out.confidence[:, :, -1] == cfg.inpainted_confidence)
    assert torch.all((out.images >= 0) & (out.images <= 1))


def test_a_frame_the_memory_misses_takes_its_depth_from_the_others() -> None:
    """A frame with no rendered pixel (the memory behind its camera) still takes the captures' colours: its
    depth starts at the other frames' median and the photo-consistency search refines it (it came out black)."""
    cfg = ReprojectConfig()
    mask = torch.ones(2, H, W, dtype=torch.bool)
    mask[1] = False  # the second frame sees none of the memory
    cond, truth = _cond([0.4, 0.5], [0.0, 0.9], mask)
    out = ReprojectGenerator(cfg).generate(cond, num_steps=2, seed=0)
    seen = out.confidence[1] > cfg.inpainted_confidence
    assert seen.float().mean() > 0.8, float(seen.float().mean())
    err = (out.images[1][seen] - truth[1][seen]).abs().mean()
    assert err < 0.01, float(err)


def test_confidence_follows_agreement_of_sources() -> None:
    cfg = ReprojectConfig()
    mask = torch.ones(1, H, W, dtype=torch.bool)
    cond, truth = _cond([0.3], [0.2, 0.4], mask)
    both = (ReprojectGenerator(cfg).generate(cond, num_steps=1, seed=0).confidence > 0.9).float().mean()
    assert both > 0.8  # two agreeing sources, almost straight on: near the ceiling of 1
    shifted = Views(cond.memory.images.clone(), cond.memory.cams, cond.memory.ids)
    shifted.images[1] = (shifted.images[1] + 2 * cfg.agreement_std).clamp(0, 1)  # the sources now disagree
    out = ReprojectGenerator(cfg).generate(
        ConditionVideo(cond.targets, cond.renders, shifted, cond.carried), num_steps=1, seed=0
    )
    core = out.confidence[:, 4:-4, 8:-8]  # both weighted alike: colour std = agreement_std, so e^-0.5
    torch.testing.assert_close(core, torch.full_like(core, math.exp(-0.5)), atol=0.02, rtol=0)


def test_render_colour_is_blended_where_the_render_covers() -> None:
    """The memory's render takes ``render_blend`` of a pixel, a one-fit guide's (source GUIDE_SOURCE)
    ``guide_blend``, an ensemble guide's (ENSEMBLE_SOURCE) ``ensemble_blend``."""
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[:, :, : W // 2] = True
    cond, truth = _cond([0.3], [0.2, 0.4], mask)
    source = cond.renders.source.clone()
    source[:, :, : W // 4] = (
        GUIDE_SOURCE  # the left quarter the guides' (its lower half the ensemble's), the next the memory's
    )
    source[:, H // 2 :, : W // 4] = ENSEMBLE_SOURCE
    dark = Renders(torch.zeros_like(cond.renders.rgb), cond.renders.depth, cond.renders.mask, source)
    cond = ConditionVideo(cond.targets, dark, cond.memory, cond.carried)
    for render_blend, guide_blend, ensemble_blend in ((0.0, 0.5, 1.0), (0.5, 0.75, 0.25)):
        cfg = ReprojectConfig(render_blend=render_blend, guide_blend=guide_blend, ensemble_blend=ensemble_blend)
        out = ReprojectGenerator(cfg).generate(cond, num_steps=1, seed=0)
        for blend, rows, cols in (
            (guide_blend, slice(4, H // 2 - 2), slice(4, W // 4 - 2)),
            (ensemble_blend, slice(H // 2 + 2, -4), slice(4, W // 4 - 2)),
            (render_blend, slice(4, -4), slice(W // 4 + 2, W // 2 - 4)),
        ):
            core = (slice(None), rows, cols)  # rendered, seen by both captures
            torch.testing.assert_close(out.images[core], (1 - blend) * truth[core], atol=0.02, rtol=0)
    with pytest.raises(ValueError, match=r"ReprojectConfig.guide_blend must be in \[0, 1\]; got 1.5"):
        ReprojectConfig(guide_blend=1.5)
    with pytest.raises(ValueError, match=r"ReprojectConfig.ensemble_blend must be in \[0, 1\]; got -0.1"):
        ReprojectConfig(ensemble_blend=-0.1)


def test_ensemble_angle_free_drops_the_angle_from_the_ensembles_confidence() -> None:
    """``ensemble_angle_free``: where a pixel takes an ensemble's colour alone, its confidence is the
    sources' agreement without the angular weight; a one-fit guide's pixels, and an ensemble's whose
    colour mixes in the reprojection (``ensemble_blend`` below 1), keep the angle."""
    mask = torch.ones(1, H, W, dtype=torch.bool)
    cond, _ = _cond([0.0], [-1.5, 1.5], mask)  # both captures about 17 degrees off the target's rays at its centre
    source = torch.full_like(cond.renders.source, ENSEMBLE_SOURCE)
    source[:, : H // 2] = GUIDE_SOURCE
    r = cond.renders
    cond = ConditionVideo(cond.targets, Renders(r.rgb, r.depth, r.mask, source), cond.memory, cond.carried)
    core = (slice(None), slice(H // 2 + 2, -4), slice(W // 2 - 3, W // 2 + 3))  # the ensemble's, seen by both
    guide_core = (slice(None), slice(4, H // 2 - 2), slice(W // 2 - 6, W // 2 + 6))
    weighted, default = ReprojectConfig(ensemble_angle_free=False), ReprojectConfig()  # the rule on since run 61
    angled = ReprojectGenerator(weighted).generate(cond, num_steps=1, seed=0).confidence
    free = ReprojectGenerator(default).generate(cond, num_steps=1, seed=0).confidence
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    point = torch.stack([(u - W / 2) / FOCAL, (v - H / 2) / FOCAL, torch.ones_like(u)], -1) * PLANE_Z  # [H, W, 3]
    angles = [
        torch.arccos((F.normalize(point, dim=-1) * F.normalize(point - torch.tensor([x, 0.0, 0.0]), dim=-1)).sum(-1))
        for x in (-1.5, 1.5)
    ]
    sigma = math.radians(ReprojectConfig().angle_sigma_deg)
    weight = torch.exp(-0.5 * (torch.minimum(*angles) / sigma) ** 2)[None]  # the best source's angular weight
    assert 0.5 < float(weight[core].mean()) < 0.65
    torch.testing.assert_close(angled[core], weight[core], atol=0.02, rtol=0)
    torch.testing.assert_close(free[core], torch.ones_like(free[core]), atol=0.01, rtol=0)  # the captures agree
    torch.testing.assert_close(free[guide_core], angled[guide_core])
    mixed = ReprojectConfig(ensemble_blend=0.75)
    torch.testing.assert_close(ReprojectGenerator(mixed).generate(cond, num_steps=1, seed=0).confidence, angled)


def test_sources_do_not_see_points_behind_their_surface() -> None:
    """A capture whose depth map puts a surface in front of the plane lends no colour to it."""
    mask = torch.ones(1, H, W, dtype=torch.bool)
    cond, truth = _cond([0.3], [0.2, 0.4], mask)
    gen = ReprojectGenerator()
    depth = torch.full((2, H, W), PLANE_Z)  # consistent with the plane: both captures still see it
    seen = Views(cond.memory.images, cond.memory.cams, cond.memory.ids, depth)
    out = gen.generate(ConditionVideo(cond.targets, cond.renders, seen, cond.carried), num_steps=1, seed=0)
    assert (out.confidence[:, 4:-4, 8:-8] > 0.9).float().mean() > 0.8
    depth = depth.clone()
    depth[1] = 0.5 * PLANE_Z  # capture 1 sees an occluder halfway: it is left out, capture 0 alone remains
    hidden = Views(cond.memory.images, cond.memory.cams, cond.memory.ids, depth)
    out = gen.generate(ConditionVideo(cond.targets, cond.renders, hidden, cond.carried), num_steps=1, seed=0)
    core = out.confidence[:, 4:-4, 8:-8]
    assert torch.all(core <= gen.config.single_source_factor + 1e-6) and torch.all(core > 0.4)
    depth[0] = 0.5 * PLANE_Z  # both hidden: nothing reprojects, the render's colour at low confidence
    hidden = Views(cond.memory.images, cond.memory.cams, cond.memory.ids, depth)
    out = gen.generate(ConditionVideo(cond.targets, cond.renders, hidden, cond.carried), num_steps=1, seed=0)
    assert torch.all(out.confidence == gen.config.inpainted_confidence)
    torch.testing.assert_close(out.images, cond.renders.rgb)


def test_carried_frames_are_sources() -> None:
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[:, :, :4] = True
    cond, truth = _cond([1.0], [], mask)
    carried_cams = _cams([0.9])
    carried = Views(_images(carried_cams), carried_cams, [-1])
    cond = ConditionVideo(cond.targets, cond.renders, cond.memory, carried)
    out = ReprojectGenerator().generate(cond, num_steps=1, seed=0)
    inner = ~mask.clone()
    inner[:, :, -8:] = False  # the carried frame at x=0.9 sees all but the right edge
    assert (out.images[inner] - truth[inner]).abs().mean() < 0.01


def test_nearest_sources_keeps_the_views_nearest_the_targets() -> None:
    caps = _cams([3.0, 0.5, -2.0, -0.2])  # distances from the targets' mean centre 0: 3, 0.5, 2, 0.2
    sources = Views(_images(caps), caps, [10, 11, 12, 13])
    kept = ReprojectGenerator._nearest_sources(sources, _cams([-0.4, 0.4]), 2)
    assert sorted(kept.ids) == [11, 13]
    assert sorted(kept.cams.centers[:, 0].tolist()) == pytest.approx([-0.2, 0.5])


def test_no_sources_inpaints_everything_low() -> None:
    cfg = ReprojectConfig(inpainted_confidence=0.05)
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[:, 8:24, 8:40] = True
    cond, truth = _cond([0.0], [], mask)
    out = ReprojectGenerator(cfg).generate(cond, num_steps=1, seed=0)
    assert torch.all(out.confidence[~mask] == 0.05)
    # push-pull continues the known colours: just outside the box, close to the box's edge
    edge = (out.images[0, 7, 8:40] - truth[0, 8, 8:40]).abs().mean()
    assert edge < 0.05, float(edge)


def test_push_pull_keeps_known_and_fills_constant() -> None:
    values = torch.full((2, 3, 17, 9), 0.25)
    weights = (torch.rand(2, 1, 17, 9, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    vals = torch.where(weights > 0, values, torch.rand_like(values))
    out = push_pull(vals, weights)
    assert out.shape == values.shape
    torch.testing.assert_close(out, values)


@pytest.mark.parametrize("width", [15, 16, 17, 33])
def test_push_pull_fills_a_ramp_in_place_at_odd_and_even_sizes(width: int) -> None:
    """A linear ramp known in every other column is filled in between by its neighbours' mean: the
    coarse levels' centres sit where they belong at odd sizes too (resized to an odd size they moved
    the fill by up to half a pixel). The last unknown column is next to the padded border."""
    ramp = (torch.arange(width) + 0.5).expand(8, width)[None, None].clone()
    known = torch.zeros(1, 1, 8, width)
    known[..., ::2] = 1.0
    between = slice(1, width - 1, 2)  # the unknown columns with a known one on each side
    error = (push_pull(ramp * known, known) - ramp)[0, 0, :, between]
    assert float(error[:, :-1].abs().max()) < 1e-4
    assert float(error[:, -1].abs().max()) <= 0.2


def test_bad_shapes_name_the_field() -> None:
    mask = torch.ones(1, H, W, dtype=torch.bool)
    cond, _ = _cond([0.0], [0.0], mask)
    bad = Renders(cond.renders.rgb[:, :-1], cond.renders.depth, cond.renders.mask, cond.renders.source)
    with pytest.raises(ValueError, match="cond.renders.rgb"):
        ReprojectGenerator().generate(ConditionVideo(cond.targets, bad, cond.memory, cond.carried), num_steps=1, seed=0)
    source = Renders(cond.renders.rgb, cond.renders.depth, cond.renders.mask, cond.renders.source[:, :4])
    with pytest.raises(ValueError, match=r"cond.renders.source must be \[1, "):
        ReprojectGenerator().generate(
            ConditionVideo(cond.targets, source, cond.memory, cond.carried), num_steps=1, seed=0
        )
    if len(cond.memory):
        m = cond.memory
        deep = Views(m.images, m.cams, m.ids, depth=torch.ones(len(m), 2 * H, 2 * W))
        with pytest.raises(ValueError, match=r"cond.memory.depth must be \["):
            ReprojectGenerator().generate(
                ConditionVideo(cond.targets, cond.renders, deep, cond.carried), num_steps=1, seed=0
            )
    with pytest.raises(ValueError, match="inpainted_confidence"):
        ReprojectConfig(inpainted_confidence=2.0)
