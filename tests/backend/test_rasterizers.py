"""The torch_cpu rasterizer against closed forms and gsplat's documented conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.rasterizers import RASTERIZERS, Rasterizer
from backend.rasterizers.sh import SH_C0, eval_sh, rgb_to_sh, sh_basis, sh_to_colors, sh_to_rgb
from backend.rasterizers.torch_cpu import EPS2D, TorchCpuRasterizer, covariances, project_gaussians

IDENTITY_QUAT = [1.0, 0.0, 0.0, 0.0]


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster than two fighting over two loaded cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pinhole(f: float, cx: float, cy: float, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([[[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]]], dtype=dtype)


def pixel_centres(width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return xs, ys


def test_registry_and_protocol():
    assert RASTERIZERS.names() == ["gsplat", "torch_cpu"]
    r = RASTERIZERS.make("torch_cpu")
    assert isinstance(r, Rasterizer)
    assert RASTERIZERS.get("gsplat").__name__ == "GsplatRasterizer"
    with pytest.raises(ValueError, match=r"unknown rasterizer 'opengl'; known: gsplat, torch_cpu"):
        RASTERIZERS.make("opengl")


def test_gsplat_refuses_cpu_tensors():
    r = RASTERIZERS.make("gsplat")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        r.render(
            torch.zeros(1, 3),
            torch.zeros(1, 4),
            torch.ones(1, 3),
            torch.ones(1),
            torch.ones(1, 3),
            torch.eye(4)[None],
            pinhole(10, 5, 5),
            10,
            10,
        )


def test_single_isotropic_gaussian_is_the_analytic_2d_gaussian():
    """On the optical axis: o * exp(-r^2 / (2 (f s / z)^2 + 2 eps2d)), centred at (cx, cy), pixel centres at i + 0.5."""
    f, s, z, o = 50.0, 0.1, 4.0, 0.8
    cx, cy = 20.5, 13.5  # the centre of pixel (20, 13)
    r = TorchCpuRasterizer()
    img, alpha, meta = r.render(
        torch.tensor([[0.0, 0.0, z]]),
        torch.tensor([IDENTITY_QUAT]),
        torch.full((1, 3), s),
        torch.tensor([o]),
        torch.ones(1, 1),
        torch.eye(4)[None],
        pinhole(f, cx, cy),
        40,
        30,
    )
    var = (f * s / z) ** 2 + EPS2D
    xs, ys = pixel_centres(40, 30)
    expected = o * torch.exp(-0.5 * ((xs - cx) ** 2 + (ys - cy) ** 2) / var)
    expected = torch.where(expected >= 1 / 255, expected, torch.zeros_like(expected))  # gsplat's alpha cut-off
    torch.testing.assert_close(img[0, ..., 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(alpha[0, ..., 0], expected, atol=1e-6, rtol=0)
    assert img[0].argmax() == 13 * 40 + 20  # peak at pixel (20, 13)
    torch.testing.assert_close(meta["means2d"][0, 0], torch.tensor([cx, cy]))
    # gsplat's opacity-aware box: alpha = o exp(-m^2/2) reaches 1/255 up to m = sqrt(2 ln(255 o)).
    assert meta["radii"][0, 0].tolist() == [math.ceil(math.sqrt(2 * math.log(255 * o)) * math.sqrt(var))] * 2


def test_off_axis_covariance_is_jacobian_projection():
    """2D covariance = J R Sigma R^T J^T + eps2d, J the pinhole Jacobian at the camera-space mean."""
    rng = np.random.default_rng(3)
    f, w, h = 60.0, 64, 48
    K = pinhole(f, 30.0, 25.0, torch.float64)
    angle = 0.3
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = torch.tensor(
        [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]]
    )
    w2c[:3, 3] = torch.tensor([0.1, -0.2, 3.0])
    means = torch.tensor(rng.normal(size=(5, 3)) * 0.4, dtype=torch.float64)
    quats = torch.tensor(rng.normal(size=(5, 4)), dtype=torch.float64)
    scales = torch.tensor(rng.uniform(0.02, 0.2, size=(5, 3)), dtype=torch.float64)
    means2d, conics, depths, radii = project_gaussians(means, covariances(quats, scales), w2c[None], K, w, h)
    for i in range(5):
        q = quats[i].numpy() / np.linalg.norm(quats[i].numpy())
        qw, qx, qy, qz = q
        Rq = np.array(
            [
                [1 - 2 * (qy**2 + qz**2), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)],
                [2 * (qx * qy + qw * qz), 1 - 2 * (qx**2 + qz**2), 2 * (qy * qz - qw * qx)],
                [2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx**2 + qy**2)],
            ]
        )
        sigma = Rq @ np.diag(scales[i].numpy() ** 2) @ Rq.T
        Rv, tv = w2c[:3, :3].numpy(), w2c[:3, 3].numpy()
        pc = Rv @ means[i].numpy() + tv
        J = np.array([[f / pc[2], 0, -f * pc[0] / pc[2] ** 2], [0, f / pc[2], -f * pc[1] / pc[2] ** 2]])
        cov2d = J @ Rv @ sigma @ Rv.T @ J.T + EPS2D * np.eye(2)
        inv = np.linalg.inv(cov2d)
        np.testing.assert_allclose(conics[0, i].numpy(), [inv[0, 0], inv[0, 1], inv[1, 1]], rtol=1e-9)
        np.testing.assert_allclose(
            means2d[0, i].numpy(), [f * pc[0] / pc[2] + 30.0, f * pc[1] / pc[2] + 25.0], rtol=1e-12
        )
        assert depths[0, i].item() == pytest.approx(pc[2])


@pytest.fixture(params=["numba", "torch"])
def kernel(request) -> str:
    """The compositing kernels of torch_cpu: numba's rows (CPU's default) and torch's pairs (mps')."""
    return request.param


def test_front_to_back_compositing_and_depth_order(kernel):
    f, z_front, z_back = 40.0, 2.0, 3.0
    means = torch.tensor([[0.0, 0.0, z_back], [0.0, 0.0, z_front]])  # back one listed first
    quats = torch.tensor([IDENTITY_QUAT] * 2)
    scales = torch.tensor([[0.3] * 3, [0.1] * 3])
    opac = torch.tensor([0.9, 0.6])
    colors = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    r = TorchCpuRasterizer(kernel=kernel)
    args = (torch.eye(4)[None], pinhole(f, 8.5, 8.5), 17, 17)
    img, alpha, _ = r.render(means, quats, scales, opac, colors, *args)
    flip = [1, 0]
    img2, _, _ = r.render(means[flip], quats, scales[flip], opac[flip], colors[flip], *args)
    torch.testing.assert_close(img, img2)
    # At the centre pixel both Gaussians peak: front alpha 0.6 over back alpha 0.9.
    centre = img[0, 8, 8]
    torch.testing.assert_close(centre, torch.tensor([0.6, 0.0, 0.4 * 0.9]), atol=1e-6, rtol=0)
    assert alpha[0, 8, 8, 0].item() == pytest.approx(0.6 + 0.4 * 0.9, abs=1e-6)


def test_transmittance_cut_off_like_gsplat(kernel):
    """Behind an alpha-0.999 Gaussian, T = 1e-3; the next would take it to 1e-6 < 1e-4: not drawn."""
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    img, alpha, _ = TorchCpuRasterizer(kernel=kernel).render(
        means,
        torch.tensor([IDENTITY_QUAT] * 2),
        torch.full((2, 3), 0.5),
        torch.tensor([1.0, 1.0]),
        torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        torch.eye(4)[None],
        pinhole(10.0, 4.5, 4.5),
        9,
        9,
    )
    torch.testing.assert_close(img[0, 4, 4], torch.tensor([0.999, 0.0, 0.0]))
    assert alpha[0, 4, 4, 0].item() == pytest.approx(0.999)


def test_culling_and_backgrounds(kernel):
    means = torch.tensor([[0.0, 0.0, -2.0], [50.0, 0.0, 2.0], [0.0, 0.0, 0.005]])  # behind, outside, before near
    img, alpha, meta = TorchCpuRasterizer(kernel=kernel).render(
        means,
        torch.tensor([IDENTITY_QUAT] * 3),
        torch.full((3, 3), 0.1),
        torch.ones(3),
        torch.ones(3, 3),
        torch.eye(4)[None],
        pinhole(10.0, 4.0, 4.0),
        8,
        8,
        backgrounds=torch.tensor([[0.2, 0.3, 0.4]]),
    )
    assert (meta["radii"] == 0).all()
    assert alpha.abs().max() == 0
    torch.testing.assert_close(img[0], torch.tensor([0.2, 0.3, 0.4]).expand(8, 8, 3))


def test_row_bands_bound_memory_without_changing_the_image():
    torch.manual_seed(0)
    n = 60
    means = torch.randn(n, 3) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    args = (
        means,
        torch.randn(n, 4),
        torch.rand(n, 3) * 0.2,
        torch.rand(n),
        torch.rand(n, 3),
        torch.eye(4)[None].repeat(2, 1, 1),
        pinhole(30.0, 16.0, 12.0).repeat(2, 1, 1),
        32,
        24,
    )
    full, _, _ = TorchCpuRasterizer(kernel="torch").render(*args)
    banded, _, _ = TorchCpuRasterizer(kernel="torch", max_pairs=500).render(*args)
    torch.testing.assert_close(full, banded, atol=1e-6, rtol=0)


def test_gradients_match_finite_differences(kernel):
    """gradcheck in float64 on a tiny scene: every input of the rasterizer is differentiable."""
    torch.manual_seed(1)
    n = 3
    dt = torch.float64
    means = (torch.randn(n, 3, dtype=dt) * 0.2 + torch.tensor([0.0, 0.0, 2.0], dtype=dt)).requires_grad_()
    quats = torch.randn(n, 4, dtype=dt).requires_grad_()
    scales = (torch.rand(n, 3, dtype=dt) * 0.15 + 0.1).requires_grad_()
    opac = (torch.rand(n, dtype=dt) * 0.5 + 0.3).requires_grad_()
    sh = (torch.randn(n, 4, 3, dtype=dt) * 0.3).requires_grad_()
    w2c = torch.eye(4, dtype=dt)[None]
    K = pinhole(8.0, 5.0, 4.0, dt)
    r = TorchCpuRasterizer(kernel=kernel)

    def render(m, q, s, o, c):
        img, alpha, _ = r.render(m, q, s, o, c, w2c, K, 10, 8, sh_degree=1)
        return img, alpha

    assert torch.autograd.gradcheck(render, (means, quats, scales, opac, sh), eps=1e-6, atol=1e-5, rtol=1e-3)


def dense_scene(n: int, n_cams: int, feats: int, seed: int = 0) -> tuple:
    """Render arguments of n Gaussians in front of n_cams cameras at 48x36: footprints from a pixel to the
    whole image, opacities up to 1 (the 0.999 clamp and the 1e-4 cut-off are reached), feats features."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.6, 0.45, 0.3]) + torch.tensor([0.0, 0.0, 2.5])
    scales = torch.exp(torch.rand(n, 3, generator=g) * 3.5 - 5.0)  # 0.007 .. 0.22
    opac = torch.where(torch.rand(n, generator=g) < 0.3, torch.ones(n), torch.rand(n, generator=g))
    viewmats = torch.eye(4).repeat(n_cams, 1, 1)
    viewmats[:, 0, 3] = torch.linspace(-0.2, 0.2, n_cams)
    Ks = pinhole(40.0, 24.0, 18.0).repeat(n_cams, 1, 1)
    leaves = (means, torch.randn(n, 4, generator=g), scales, opac, torch.rand(n, feats, generator=g))
    return leaves, (viewmats, Ks, 48, 36)


def test_numba_rows_match_torch_pairs_images_and_gradients():
    """The CPU kernel (numba, rows in parallel) draws and differentiates what the torch path does, on
    300 Gaussians of every size in 2 cameras with 4 features, on one thread and on two."""
    leaves, cams = dense_scene(300, 2, 4)
    results = {}
    for kernel, threads in (("torch", 1), ("numba", 1), ("numba", 2)):
        torch.set_num_threads(threads)
        params = [t.clone().requires_grad_() for t in leaves]
        img, alpha, _ = TorchCpuRasterizer(kernel=kernel).render(*params, *cams)
        weights = torch.linspace(-1.0, 1.0, img.numel()).reshape(img.shape)
        ((img * weights).sum() + (alpha * 0.5).sum()).backward()
        results[kernel, threads] = (img.detach(), alpha.detach(), [p.grad for p in params])
    ref_img, ref_alpha, ref_grads = results["torch", 1]
    assert (ref_alpha > 0.99).any() and (ref_alpha < 0.5).any()  # opaque and thin pixels both present
    for key in (("numba", 1), ("numba", 2)):
        img, alpha, grads = results[key]
        torch.testing.assert_close(img, ref_img, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(alpha, ref_alpha, atol=2e-6, rtol=1e-5)
        for name, grad, ref in zip(("means", "quats", "scales", "opacities", "colors"), grads, ref_grads):
            scale = ref.abs().max()
            torch.testing.assert_close(grad / scale, ref / scale, atol=1e-5, rtol=0, msg=f"{key}: d{name}")


def test_numba_kernel_takes_turns_across_threads():
    """Two Python threads rendering at once (the service's worker thread and a caller) get what one
    gets alone: launches of the parallel kernel take turns."""
    from concurrent.futures import ThreadPoolExecutor

    leaves, cams = dense_scene(200, 1, 3, seed=3)
    r = TorchCpuRasterizer(kernel="numba")
    alone = r.render(*leaves, *cams)[0]
    with ThreadPoolExecutor(2) as pool:
        images = list(pool.map(lambda _: r.render(*leaves, *cams)[0], range(4)))
    for img in images:
        torch.testing.assert_close(img, alone, atol=0, rtol=0)


def test_numba_kernel_compiles_where_no_cache_folder_is_writable():
    """A read-only install and home leave numba no cache folder, and it refuses a cached function at import;
    the kernel then compiles uncached and draws the same image (a fresh process: the import is the test)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import numba.core.caching as c; c.CacheImpl._locator_classes = []\n"
        "import torch\n"
        "from backend.rasterizers import cpu_kernel\n"
        "from backend.rasterizers.torch_cpu import TorchCpuRasterizer\n"
        "from tests.backend.test_rasterizers import dense_scene\n"
        "assert cpu_kernel._forward._cache.__class__.__name__ == 'NullCache'\n"
        "leaves, cams = dense_scene(50, 1, 3)\n"
        "a = TorchCpuRasterizer(kernel='numba').render(*leaves, *cams)[0]\n"
        "b = TorchCpuRasterizer(kernel='torch').render(*leaves, *cams)[0]\n"
        "torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)\n"
        "print('uncached ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "uncached ok" in out.stdout, out.stderr[-2000:]


def test_kernel_is_checked():
    with pytest.raises(ValueError, match="kernel must be one of auto, numba, torch; got 'cuda'"):
        TorchCpuRasterizer(kernel="cuda")
    assert TorchCpuRasterizer()._uses_numba(torch.device("cpu"))
    assert not TorchCpuRasterizer()._uses_numba(torch.device("mps"))
    with pytest.raises(ValueError, match="kernel 'numba' draws CPU tensors only; got tensors on mps"):
        TorchCpuRasterizer(kernel="numba")._uses_numba(torch.device("mps"))


def test_meta_means2d_gradient_is_retainable():
    torch.manual_seed(0)
    n = 20
    means = (torch.randn(n, 3) * 0.2 + torch.tensor([0.0, 0.0, 2.0])).requires_grad_()
    img, _, meta = TorchCpuRasterizer().render(
        means,
        torch.randn(n, 4),
        torch.rand(n, 3) * 0.1,
        torch.rand(n),
        torch.rand(n, 3),
        torch.eye(4)[None],
        pinhole(20.0, 8.0, 8.0),
        16,
        16,
    )
    meta["means2d"].retain_grad()
    img.sum().backward()
    assert meta["means2d"].grad.shape == (1, n, 2) and meta["means2d"].grad.abs().sum() > 0
    assert meta["width"] == 16 and meta["height"] == 16 and meta["n_cameras"] == 1 and meta["gaussian_ids"] is None


def test_sh_basis_is_orthonormal_and_in_gsplat_sign_convention():
    # Fibonacci sphere: the mean of Y_i Y_j over the sphere times 4 pi is the identity.
    m = 20000
    k = torch.arange(m, dtype=torch.float64) + 0.5
    zs = 1 - 2 * k / m
    phi = math.pi * (1 + 5**0.5) * k
    rho = torch.sqrt(1 - zs**2)
    dirs = torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), zs], dim=-1)
    Y = sh_basis(3, dirs)
    gram = 4 * math.pi * (Y.T @ Y) / m
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)
    # Degree 1 in 3DGS order and signs: (-C1 y, C1 z, -C1 x).
    y1 = sh_basis(1, torch.tensor([[0.6, 0.0, 0.8]], dtype=torch.float64))[0]
    c1 = math.sqrt(3 / (4 * math.pi))
    torch.testing.assert_close(y1, torch.tensor([SH_C0, 0.0, 0.8 * c1, -0.6 * c1], dtype=torch.float64))


def _sloan_sh_basis(d: torch.Tensor) -> torch.Tensor:
    """Degree-3 real SH written out independently (Sloan 2013 constants, as in gsplat's torch reference)."""
    x, y, z = d.unbind(-1)
    z2, c1, s1 = z * z, x * x - y * y, 2 * x * y
    c2, s2 = x * c1 - y * s1, x * s1 + y * c1
    tc = -2.285228997322329 * z2 + 0.4570457994644658
    return torch.stack(
        [
            torch.full_like(x, 0.2820947917738781),
            -0.48860251190292 * y,
            0.48860251190292 * z,
            -0.48860251190292 * x,
            0.5462742152960395 * s1,
            -1.092548430592079 * z * y,
            0.9461746957575601 * z2 - 0.3153915652525201,
            -1.092548430592079 * z * x,
            0.5462742152960395 * c1,
            -0.5900435899266435 * s2,
            1.445305721320277 * z * s1,
            tc * y,
            z * (1.865881662950577 * z2 - 1.119528997770346),
            tc * x,
            1.445305721320277 * z * c1,
            -0.5900435899266435 * c2,
        ],
        dim=-1,
    )


def test_sh_basis_matches_written_out_values_at_fixed_directions():
    d = torch.nn.functional.normalize(
        torch.tensor([[0.6, -0.3, 0.74], [-0.5, 0.7, -0.2], [0.1, 0.2, -0.97]], dtype=torch.float64), dim=-1
    )
    torch.testing.assert_close(sh_basis(3, d), _sloan_sh_basis(d), atol=1e-10, rtol=1e-9)


def test_sh_view_direction_runs_from_the_camera_to_the_gaussian():
    sh = torch.zeros(1, 4, 3)
    sh[0, 1] = 0.5  # degree-1 y coefficient: Y = -C1 * dir_y
    w2c = torch.eye(4)[None].repeat(2, 1, 1)
    w2c[1, :3, 3] = torch.tensor([0.0, -2.0, 0.0])  # second camera centred at (0, 2, 0), beyond the Gaussian
    c1 = math.sqrt(3 / (4 * math.pi))
    colours = sh_to_colors(1, torch.tensor([[0.0, 1.0, 0.0]]), sh, w2c)
    torch.testing.assert_close(colours[0, 0], torch.full((3,), 0.5 - 0.5 * c1))  # dir +y
    torch.testing.assert_close(colours[1, 0], torch.full((3,), 0.5 + 0.5 * c1))  # dir -y


def test_sh_colours():
    rgb = torch.tensor([[0.2, 0.5, 0.9]])
    torch.testing.assert_close(sh_to_rgb(rgb_to_sh(rgb)), rgb)
    sh = torch.zeros(1, 9, 3)
    sh[0, 0] = rgb_to_sh(rgb)[0]
    w2c = torch.eye(4)[None].repeat(2, 1, 1)
    w2c[1, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(sh_to_colors(2, torch.zeros(1, 3), sh, w2c), rgb.expand(2, 1, 3))
    with pytest.raises(ValueError, match="at least 16"):
        eval_sh(3, torch.ones(1, 3), sh)


def test_bench_rasterizer_runs_tiny(tmp_path):
    """scripts/bench_rasterizer.py --tiny: every case timed and written; its scene draws and has gradients."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_rasterizer.py"
    spec = importlib.util.spec_from_file_location("bench_rasterizer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(["--tiny", "--threads", "1", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert len(report["cases"]) == len(bench.TINY_CASES)
    assert (report["speedup_of"], report["speedup_over"]) == ("current/numba", "current/torch")
    for case in report["cases"]:
        for kernel in ("current/numba", "current/torch"):
            assert case[kernel]["seconds"] > 0 and case[kernel]["gaussian_pixels_per_s"] > 0
        assert case["max_image_diff"] < 1e-5 and case["max_grad_rel_diff"] < 1e-4 and case["speedup"] > 0
    scene = bench.probe_scene(300, 32, 24, 1)
    # --against REV: a revision's file loaded as a module of the package (its relative imports resolve there)
    from backend.rasterizers import torch_cpu

    loaded = bench.load_source(Path(torch_cpu.__file__).read_text(), "test")
    assert loaded is not TorchCpuRasterizer
    assert torch.equal(bench.step(loaded(), scene)[2], bench.step(TorchCpuRasterizer(), scene)[2])
    with pytest.raises(ValueError, match="no backend/rasterizers/torch_cpu.py at 'no-such-revision'"):
        bench.load_revision("no-such-revision")
    _, _, img, grads = bench.step(TorchCpuRasterizer(), scene)
    assert img.shape == (1, 24, 32, 3) and img.abs().sum() > 0
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_float32_running_sums_as_on_mps_stay_exact_per_pixel():
    """The accumulation mps gets (float32, no float64 there) restarts at every pixel, so a pixel late
    in a long list of pairs gets its log transmittance within 1e-3 of float64's (T within 0.1 %);
    one plain float32 running sum over all pairs would be off by far more."""
    from backend.rasterizers.torch_cpu import _exclusive_segment_cumsum, _segment_starts

    gen = torch.Generator().manual_seed(0)
    pixel_ids = torch.sort(torch.randint(0, 20_000, (400_000,), generator=gen)).values
    log_keep = torch.log1p(-torch.rand(400_000, generator=gen) * 0.999)  # as deep as alpha 0.999
    is_first, segment = _segment_starts(pixel_ids)
    exact = _exclusive_segment_cumsum(log_keep.double(), is_first, segment)
    as_mps = _float32_segment_cumsum(log_keep, is_first, segment)
    assert as_mps.dtype == torch.float32
    torch.testing.assert_close(as_mps.double(), exact, atol=1e-3, rtol=0)
    running = torch.cumsum(log_keep, 0) - log_keep  # float32, no restart
    naive = running - running[is_first][segment]
    assert (naive.double() - exact).abs().max() > 1e-2


def _float32_segment_cumsum(values, is_first, segment):
    """_exclusive_segment_cumsum with the mps accumulation dtype, run on the CPU."""
    import backend.rasterizers.torch_cpu as torch_cpu

    before = torch_cpu._accumulation_dtype
    torch_cpu._accumulation_dtype = lambda device: torch.float32
    try:
        return torch_cpu._exclusive_segment_cumsum(values, is_first, segment)
    finally:
        torch_cpu._accumulation_dtype = before
