"""Imported Gaussians rendered by Cycles look like the service's own render of the same Gaussians
(backend.stages.fit.render_gaussians, torch_cpu rasterizer) from the same camera."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.scene import look_at
from protocol.ply import SH_C0, GaussianArrays

from ._splat_compare import cycles_render, fit_temple, psnr, service_render

MIN_PSNR_DB = 25.0
# View-dependent colour: Cycles against the service on the varied Gaussians with SH bands of degree 1 / 2 / 3
# (40.7 / 39.7 / 40.3 dB measured; 41.5 with SH 0), and the same Gaussians drawn in their DC colour only, as the
# add-on drew them before it read f_rest (25.2 / 22.8 / 19.7 dB)
MIN_SH_PSNR_DB = 35.0
MAX_DC_ONLY_PSNR_DB = 28.0
SH_REST_SIGMA = 0.3  # the higher bands' coefficients: about +-0.15 of colour per band across the view
# Gaussians thinner than a pixel, and Gaussians too faint to reach an alpha of 1/255: Cycles against the service
# with the rasterizer's low-pass and alpha floor in the add-on (52.3 / 52.6 dB at 100 / 50 %, and 54.1 dB measured),
# and before them (21.2 / 15.5 and 30.6 dB)
MIN_RASTERIZER_RULES_PSNR_DB = 40.0
MIN_LONGER_FIT_PSNR_DB = 45.0  # the temple after 300 steps, captures 0-3: 49.3-53.7 dB now, 28.4-31.2 before


def _front_view() -> tuple[np.ndarray, np.ndarray, int, int]:
    """The synthetic tests' camera: (w2c, K, W, H), 96x72 at a 90-px focal length, 4 m in front of the origin."""
    W, H = 96, 72
    return look_at((0.3, 0.5, -4.0)), np.array([[90.0, 0, W / 2], [0, 90.0, H / 2], [0, 0, 1]]), W, H


def _varied_gaussians(n=300, seed=0, degree=0) -> GaussianArrays:
    """Overlapping Gaussians of every shape: thin and round, 3 cm to 25 cm sigmas, faint to opaque; of SH
    degree ``degree``, the bands above DC random (drawn last: the Gaussians of degree 0 are the same)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 0.6, (n, 3)).astype(np.float32)
    log_scales = np.log(rng.uniform(0.03, 0.25, (n, 3))).astype(np.float32)
    quats = rng.normal(size=(n, 4)).astype(np.float32)
    opacity_logits = rng.uniform(-2, 4, n).astype(np.float32)
    dc = (rng.uniform(0, 1, (n, 1, 3)) - 0.5) / SH_C0
    rest = rng.normal(0, SH_REST_SIGMA, (n, (degree + 1) ** 2 - 1, 3))
    return GaussianArrays(means, log_scales, quats, opacity_logits, np.concatenate([dc, rest], 1).astype(np.float32))


def _small_gaussians(n: int, seed: int, sigmas: tuple[float, float], logits: tuple[float, float]) -> GaussianArrays:
    """Gaussians spread as :func:`_varied_gaussians`, each axis's sigma log-uniform in ``sigmas`` (metres), their
    opacity logits uniform in ``logits``, SH degree 0."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 0.6, (n, 3)).astype(np.float32)
    log_scales = rng.uniform(*np.log(sigmas), (n, 3)).astype(np.float32)
    quats = rng.normal(size=(n, 4)).astype(np.float32)
    opacity_logits = rng.uniform(*logits, n).astype(np.float32)
    dc = ((rng.uniform(0, 1, (n, 1, 3)) - 0.5) / SH_C0).astype(np.float32)
    return GaussianArrays(means, log_scales, quats, opacity_logits, dc)


def _dc_only(g: GaussianArrays) -> GaussianArrays:
    """The same Gaussians without their bands above DC (degree 0)."""
    return GaussianArrays(g.means, g.log_scales, g.quats, g.opacity_logits, np.ascontiguousarray(g.sh[:, :1]))


def test_varied_gaussians_render_as_the_service_renders_them(tmp_path):
    g = _varied_gaussians()
    w2c, K, W, H = _front_view()
    want = service_render(g, w2c, K, W, H)
    got = cycles_render(g, w2c, K, W, H, tmp_path / "cycles.png")
    assert psnr(want, got) >= MIN_PSNR_DB
    # blended in Blender's linear space instead, the see-through parts come out brighter
    linear = cycles_render(g, w2c, K, W, H, tmp_path / "linear.png", as_fitted=False)
    assert linear.mean() > got.mean()


@pytest.mark.parametrize("percent", [100, 50])
def test_gaussians_thinner_than_a_pixel_render_as_the_service_renders_them(percent, tmp_path):
    """Opaque Gaussians of sigmas down to a tenth of a pixel (3 mm to 10 cm, 1 px = 4.4 cm at 96x72 and twice that
    at 50 %): the service's rasterizer adds 0.3 px^2 to every projected covariance (gsplat's eps2d), so it draws
    a thin one as a blob of at least 0.55 px; the add-on's cards add the same in the pixels of the render, which
    follow the render's size and percentage (the fitted temple's opaque Gaussians are 0.3-1.3 px thin; without
    the low-pass it scored 28.4-31.2 dB after 300 steps, docs/benchmarks.md)."""
    g = _small_gaussians(400, 0, (0.003, 0.1), (0.0, 5.0))
    w2c, K, W, H = _front_view()
    scaled = K * np.array([[percent / 100], [percent / 100], [1.0]])
    want = service_render(g, w2c, scaled, W * percent // 100, H * percent // 100)
    got = cycles_render(g, w2c, K, W, H, tmp_path / "thin.png", resolution_percentage=percent)
    assert got.shape == want.shape
    assert psnr(want, got) >= MIN_RASTERIZER_RULES_PSNR_DB


def test_an_orthographic_camera_widens_a_thin_gaussian_by_the_low_pass_at_any_depth(tmp_path):
    """An orthographic camera maps a world unit to the same pixels at every depth: a Gaussian of 1 mm (a fiftieth
    of a pixel) 6 m away is drawn as the low-pass's blob of about 0.55 px sigma, its alpha summing to about
    2 pi 0.3 = 1.9 pixels, not widened as a perspective camera's would be at that depth (6 times as wide)."""
    g = GaussianArrays(
        means=np.zeros((1, 3), np.float32),
        log_scales=np.full((1, 3), np.log(0.001), np.float32),
        quats=np.float32([[1, 0, 0, 0]]),
        opacity_logits=np.float32([8.0]),
        sh=np.full((1, 1, 3), 0.5 / SH_C0, np.float32),  # white
    )
    W, H = 48, 36
    K = np.array([[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]])
    got = cycles_render(g, look_at((0.0, 0.0, -6.0)), K, W, H, tmp_path / "ortho.png", ortho_scale=2.4)
    total = float(got[..., 0].sum())  # 1 px = 5 cm; white over black: the alpha, pixel by pixel
    assert 1.0 < total < 4.0, total


def test_faint_gaussians_render_as_the_service_renders_them(tmp_path):
    """2000 Gaussians of opacity 0.004-0.01: the rasterizer leaves out every alpha below 1/255, so each covers at
    most the middle of its footprint (none where its opacity is below 1/255); Cycles drew all of them out to
    3 sigma, a haze (the fitted temple's median opacity is 0.006)."""
    g = _small_gaussians(2000, 1, (0.05, 0.3), (-5.6, -4.6))
    w2c, K, W, H = _front_view()
    want = service_render(g, w2c, K, W, H)
    got = cycles_render(g, w2c, K, W, H, tmp_path / "faint.png")
    assert want.mean() > 0.01
    assert psnr(want, got) >= MIN_RASTERIZER_RULES_PSNR_DB


def test_the_viewport_keeps_its_shells_and_renders_read_the_render_size():
    """The low-pass is for renders: the viewport's instances stay the shells in each Gaussian's own frame (identity
    frame rows, scaled by its sigmas), and the node group reads the active scene's render size, percentage
    included, through drivers on two Value nodes; the modifier's "Low-pass" input starts at the service's 0.3."""
    import bpy

    from blender_addon import importers

    scene = bpy.context.scene
    g = _small_gaussians(20, 2, (0.01, 0.1), (0.0, 3.0))
    obj = importers.import_gaussians(g, "G", importers.job_collection(scene, "splats", "job"))
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 200, 150, 50
    depsgraph = bpy.context.evaluated_depsgraph_get()
    geometry = obj.evaluated_get(depsgraph).evaluated_geometry()
    instances = geometry.instances_pointcloud()
    assert len(instances.points) == len(g.means)
    for name, row in zip(importers.ATTR_FRAME, np.eye(3), strict=True):
        values = np.array([v.vector for v in instances.attributes[name].data])
        np.testing.assert_allclose(values, np.broadcast_to(row, values.shape), atol=1e-6)
    transforms = np.array([np.array(v.value) for v in instances.attributes["instance_transform"].data])
    np.testing.assert_allclose(np.linalg.norm(transforms[:, :3, :3], axis=1), g.scales, rtol=1e-4)
    tree = importers.gaussians_node_group(0).evaluated_get(depsgraph)
    sizes = [tree.nodes[label].outputs[0].default_value for label, _ in importers.RENDER_SIZE_NODES]
    assert sizes == [100.0, 75.0]
    mod = obj.modifiers["Gaussians"]
    item = next(i for i in mod.node_group.interface.items_tree if i.name == importers.LOW_PASS_INPUT)
    assert mod[item.identifier] == pytest.approx(importers.LOW_PASS_PX2)


@pytest.mark.parametrize("degree", [1, 3])
def test_view_dependent_colour_renders_as_the_service_renders_it(degree, tmp_path):
    """Gaussians with SH bands above DC: the add-on colours each one from the camera's direction to its
    centre, as the service does; drawn in the DC colour only, the render is clearly another."""
    g = _varied_gaussians(degree=degree)
    w2c, K, W, H = _front_view()
    want = service_render(g, w2c, K, W, H)
    got = cycles_render(g, w2c, K, W, H, tmp_path / "sh.png")
    assert psnr(want, got) >= MIN_SH_PSNR_DB
    dc_only = cycles_render(_dc_only(g), w2c, K, W, H, tmp_path / "dc.png")
    assert psnr(want, dc_only) <= MAX_DC_ONLY_PSNR_DB


def test_view_dependent_colour_follows_the_camera(tmp_path):
    """One nearly opaque Gaussian of SH degree 2 seen from two sides takes the service's colour from each, in
    "as fitted" and in linear blending (opaque: the two agree once displayed)."""
    rng = np.random.default_rng(3)
    sh = rng.normal(0, 0.4, (1, 9, 3)).astype(np.float32)
    sh[0, 0] = (0.5 - 0.5) / SH_C0
    g = GaussianArrays(
        means=np.zeros((1, 3), np.float32),
        log_scales=np.log(np.float32([[0.3, 0.3, 0.3]])),
        quats=np.float32([[1.0, 0.0, 0.0, 0.0]]),
        opacity_logits=np.float32([8.0]),
        sh=sh,
    )
    W, H = 24, 18
    K = np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])  # sigma 4.5 pixels: a flat top at the centre
    centres = []
    for i, eye in enumerate([(0.3, 0.5, -4.0), (-3.0, 1.0, 2.5)]):
        w2c = look_at(eye, target=(0.0, 0.0, 0.0))
        want = service_render(g, w2c, K, W, H)[H // 2, W // 2]
        for as_fitted in (True, False):
            got = cycles_render(g, w2c, K, W, H, tmp_path / f"{i}{as_fitted}.png", as_fitted=as_fitted)
            np.testing.assert_allclose(got[H // 2, W // 2], want, atol=0.02)
        centres.append(want)
    assert np.abs(centres[0] - centres[1]).max() > 0.1, centres  # the two sides differ


def test_gaussian_ply_keeps_its_sh_coefficients(tmp_path):
    """A .ply's f_dc and f_rest arrive as the ``sh_k`` attributes, unchanged; degree 0 adds none."""
    import bpy

    from blender_addon import importers
    from protocol.ply import write_gaussians_ply

    coll = importers.job_collection(bpy.context.scene, "splats", "job")
    for degree in (0, 2, 3):
        g = _varied_gaussians(n=50, seed=degree, degree=degree)
        write_gaussians_ply(tmp_path / f"{degree}.ply", g)
        obj = importers.import_gaussians_ply(str(tmp_path / f"{degree}.ply"), f"degree {degree}", coll)
        assert obj["sh_degree"] == degree
        names = sorted(a.name for a in obj.data.attributes if a.name.startswith("sh_"))
        assert names == sorted(importers.ATTR_SH.format(k) for k in range(g.sh.shape[1] if degree else 0))
        for k in range(len(names)):
            np.testing.assert_array_equal(importers.attribute_values(obj, importers.ATTR_SH.format(k)), g.sh[:, k])
        mod = obj.modifiers["Gaussians"]
        assert mod.node_group == importers.gaussians_node_group(degree)
        # the colour the node group evaluates from them reaches the instances the material reads
        depsgraph = bpy.context.evaluated_depsgraph_get()
        geometry = obj.evaluated_get(depsgraph).evaluated_geometry()
        instances = geometry.instances_pointcloud()
        assert {importers.ATTR_COLOR, importers.ATTR_COLOR_SRGB} <= set(instances.attributes.keys())


def test_the_addon_uses_the_service_constants():
    """The add-on repeats the service's alpha clamp and floor, footprint, low-pass and SH constants (it does not
    ship the backend)."""
    from backend import rasterizers
    from backend.rasterizers import sh, torch_cpu
    from blender_addon import importers

    assert importers.ALPHA_MAX == rasterizers.ALPHA_MAX and importers.ALPHA_MIN == rasterizers.ALPHA_MIN
    assert importers.CUTOFF_SIGMA == pytest.approx(torch_cpu.RADIUS_SIGMAS, rel=1e-12)
    assert importers.LOW_PASS_PX2 == torch_cpu.EPS2D
    assert importers.SH_OFFSET == sh.COLOR_OFFSET and importers.MAX_SH_DEGREE == sh.MAX_SH_DEGREE
    np.testing.assert_allclose(
        [importers.SH_C0, importers.SH_C1, *importers.SH_C2, *importers.SH_C3],
        [sh.SH_C0, sh.SH_C1, *sh.SH_C2, *sh.SH_C3],
        rtol=1e-15,
    )


def test_fitted_temple_renders_as_the_service_renders_it(temple_dir, tmp_path):
    g, cams = fit_temple(temple_dir)
    cam = cams[0]  # a capture's camera
    want = service_render(g, cam.w2c, cam.K, cam.width, cam.height)
    got = cycles_render(g, cam.w2c, cam.K, cam.width, cam.height, tmp_path / "temple.png")
    assert want.mean() > 0.02, "the fit left the temple empty"
    assert psnr(want, got) >= MIN_PSNR_DB


def test_a_longer_temple_fit_renders_as_the_service_renders_it(temple_dir, tmp_path):
    """300 steps at SH degree 3 (a band more every 50): the fit thins its opaque Gaussians below a pixel
    (0.3-1.3 px across at 80x60) and leaves most of the rest fainter than 1/255 where they spread. Cycles scored
    28.4-31.2 dB against the service from captures 0-3 before the cards took the rasterizer's low-pass and
    alpha floor; 49.3-53.7 dB with them."""
    g, cams = fit_temple(temple_dir, iterations=300, sh_degree=3, sh_degree_interval=50)
    for i, cam in enumerate(cams):
        want = service_render(g, cam.w2c, cam.K, cam.width, cam.height)
        got = cycles_render(g, cam.w2c, cam.K, cam.width, cam.height, tmp_path / f"temple{i}.png")
        assert psnr(want, got) >= MIN_LONGER_FIT_PSNR_DB, f"capture {i}"


@pytest.mark.parametrize("opacity_logit", [-1.0, 3.0])
def test_one_gaussian_profile(opacity_logit, tmp_path):
    """One anisotropic Gaussian: its centre value and footprint match, faint or nearly opaque."""
    g = GaussianArrays(
        means=np.zeros((1, 3), np.float32),
        log_scales=np.log(np.float32([[0.3, 0.1, 0.2]])),
        quats=np.float32([[0.9, 0.3, 0.2, 0.1]]),
        opacity_logits=np.float32([opacity_logit]),
        sh=np.full((1, 1, 3), (0.8 - 0.5) / SH_C0, np.float32),
    )
    W, H = 48, 36
    K = np.array([[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]])
    w2c = look_at((0.3, 0.5, -4.0))
    want = service_render(g, w2c, K, W, H)
    got = cycles_render(g, w2c, K, W, H, tmp_path / "one.png")
    assert abs(got.max() - want.max()) < 0.02
    assert abs((got[..., 0] > 0.02).sum() - (want[..., 0] > 0.02).sum()) <= 0.1 * (want[..., 0] > 0.02).sum()


def test_a_gaussian_around_the_camera_is_drawn(tmp_path):
    """The camera inside a Gaussian's cutoff sphere (a large one around the viewer): its rays meet only back
    faces, which then count, so Cycles draws it as the rasterizer does instead of leaving it out."""
    g = GaussianArrays(
        means=np.zeros((1, 3), np.float32),
        log_scales=np.log(np.float32([[1.5, 1.2, 1.0]])),
        quats=np.float32([[1.0, 0.0, 0.0, 0.0]]),
        opacity_logits=np.float32([0.0]),
        sh=np.full((1, 1, 3), (0.8 - 0.5) / SH_C0, np.float32),
    )
    W, H = 48, 36
    K = np.array([[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]])
    w2c = look_at((0.2, 0.3, -2.0))  # 2 m from the centre: well inside 3 sigma
    want = service_render(g, w2c, K, W, H)
    got = cycles_render(g, w2c, K, W, H, tmp_path / "inside.png")
    assert want.mean() > 0.2
    assert psnr(want, got) >= MIN_PSNR_DB


def test_a_wide_gaussian_behind_a_small_one_stays_behind_it(tmp_path):
    """A backdrop-like Gaussian (sigma 3 m, centre 6 m behind a small opaque one) reaches in front of the small
    one with its cutoff sphere. The rasterizer composites by the centres' depth, so the small one covers it;
    a render draws each on a card through its centre, so Cycles agrees (shells met where a ray enters them
    drew the backdrop in front: the demo's objects under a haze)."""
    g = GaussianArrays(
        means=np.float32([[0.0, 0.0, 0.0], [0.0, 0.0, 6.0]]),
        log_scales=np.log(np.float32([[0.3, 0.3, 0.3], [3.0, 3.0, 3.0]])),
        quats=np.float32([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]),
        opacity_logits=np.float32([6.0, 2.0]),
        sh=((np.float32([[[0.9, 0.1, 0.1]], [[0.1, 0.2, 0.9]]]) - 0.5) / SH_C0).astype(np.float32),
    )
    W, H = 48, 36
    K = np.array([[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]])
    w2c = look_at((0.0, 0.0, -4.0), target=(0.0, 0.0, 0.0))
    want = service_render(g, w2c, K, W, H)
    got = cycles_render(g, w2c, K, W, H, tmp_path / "behind.png")
    centre = got[H // 2, W // 2]
    assert centre[0] > 0.8 and centre[2] < 0.2, centre  # the small red one, not the blue backdrop over it
    assert psnr(want, got) >= MIN_PSNR_DB


def test_demo_scene_gaussians_render_as_the_service_renders_them(tmp_path):
    """The demo scene (made by scripts/make_demo_scene.py, 4 captures at 80x60): Gaussians fitted on its
    captures, from the geometry memory the loop builds, render in Cycles as the service renders them."""
    import subprocess
    import sys

    from backend.scene import load_scene
    from backend.stages.cameras import load_image, resize_image, to_tensor
    from backend.stages.fit import FitConfig, FitViews, fit_gaussians, gaussians_to_arrays
    from backend.stages.memory import build_memory
    from backend.types import Cameras, Views

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(repo / "scripts" / "make_demo_scene.py"), "--out", str(tmp_path / "demo")]
    cmd += ["--captures", "4", "--frames", "2", "--size", "80x60", "--samples", "1", "--threads", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    scene = load_scene(tmp_path / "demo")
    W, H = 80, 60
    views = Views(
        to_tensor([resize_image(load_image(c.image), W, H) for c in scene.captures], "cpu"),
        Cameras.from_scene([c.camera for c in scene.captures], W, H),
        list(range(len(scene.captures))),
    )
    cfg = FitConfig(iterations=200, rasterizer="torch_cpu", sh_degree=0)
    g = gaussians_to_arrays(fit_gaussians(FitViews.from_views(views), build_memory(views), cfg, device="cpu"))
    cam = scene.captures[1].camera.scaled(W, H)
    want = service_render(g, cam.w2c, cam.K, W, H)
    got = cycles_render(g, cam.w2c, cam.K, W, H, tmp_path / "demo.png")
    assert want.mean() > 0.2
    assert psnr(want, got) >= MIN_PSNR_DB
