"""scripts/guide_union.py: the guide's sets as one set, each opacity thinned so K stacked copies of a
Gaussian let through the light the one did (docs/benchmarks.md, run 44)."""

from __future__ import annotations

import torch

from backend.stages.fit import init_gaussians, render_gaussians
from tests.backend.stages.test_fit import make_scene, test_config
from tests.backend.test_evaluate import script_module


def test_union_of_copies_lets_through_the_sets_light_at_the_centres_and_draws_near_it() -> None:
    """K copies of a set, thinned, pass the set's light exactly at each Gaussian's centre (1 - a
    composited K times at 1 - (1 - a)^(1/K)); away from it a copy's alpha a'G stacks above aG, so the
    image only comes near the set's: much nearer than the plain union's, which stacks full opacities."""
    cams, _, memory = make_scene(seed=5, n=25)
    cfg = test_config()
    g = init_gaussians(memory, cfg)
    g.opacity_logits[:] = torch.linspace(-2.0, 2.0, len(g))  # opacities 0.12-0.88
    union = script_module("guide_union").union
    three = union([g, g, g])
    assert len(three) == 3 * len(g)
    a, thinned = torch.sigmoid(g.opacity_logits), torch.sigmoid(three.opacity_logits[: len(g)])
    torch.testing.assert_close((1 - thinned) ** 3, 1 - a, atol=1e-5, rtol=0)
    one = render_gaussians(g, cams, cfg)
    near = (render_gaussians(three, cams, cfg) - one).abs().mean()
    plain = (render_gaussians(union([g, g, g], thin_opacity=False), cams, cfg) - one).abs().mean()
    assert near < 0.015 and plain > 4 * near, (float(near), float(plain))
