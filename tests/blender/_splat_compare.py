"""Render the same Gaussians with Cycles (through the add-on's importer) and with the service's own
renderer (backend.stages.fit.render_gaussians, torch_cpu rasterizer) at one OpenCV camera."""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np
import torch

from backend.stages.fit import FitConfig, gaussians_from_arrays, render_gaussians
from backend.types import Cameras
from blender_addon import cameras as cam_math
from blender_addon import importers
from blender_addon.scene_read import apply_camera_params

CYCLES_SAMPLES = 1  # enough: splats are emission only and paths through them are not cut at random
PIXEL_FILTER_PX = 0.01  # sample pixel centres, as a rasterizer does


def service_render(g, w2c: np.ndarray, K: np.ndarray, width: int, height: int) -> np.ndarray:
    """The service's render over black. float32 [H, W, 3] in [0, 1]"""
    cams = Cameras(
        w2c=torch.as_tensor(w2c, dtype=torch.float32)[None],
        K=torch.as_tensor(K, dtype=torch.float32)[None],
        width=width,
        height=height,
    )
    cfg = FitConfig(rasterizer="torch_cpu")
    return render_gaussians(gaussians_from_arrays(g), cams, cfg)[0].numpy()


def cycles_render(
    g,
    w2c: np.ndarray,
    K: np.ndarray,
    width: int,
    height: int,
    out: Path,
    *,
    as_fitted: bool = True,
    engine: str = "CYCLES",
    resolution_percentage: int = 100,
    ortho_scale: float | None = None,
) -> np.ndarray:
    """Cycles' render of the imported Gaussians over black (a fresh scene). float32 [H, W, 3] in [0, 1]; with
    ``resolution_percentage`` p, the scene keeps the camera's size W x H and renders W p / 100 x H p / 100; with
    ``ortho_scale``, the camera is orthographic, that many world units wide (``K`` places nothing then)."""
    from PIL import Image

    scene = bpy.context.scene
    for obj in list(scene.objects):
        bpy.data.objects.remove(obj)
    coll = importers.job_collection(scene, "splats", "job")
    importers.import_gaussians(g, "Gaussians", coll)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    apply_camera_params(cam, scene, cam_math.blender_from_opencv(w2c, K, width, height))
    scene.render.resolution_percentage = resolution_percentage
    if ortho_scale is not None:
        cam.data.type, cam.data.ortho_scale = "ORTHO", ortho_scale
    cam.data.clip_start = 0.01
    scene.camera = cam
    importers.prepare_render_for_gaussians(scene, as_fitted=as_fitted)
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = CYCLES_SAMPLES
    scene.cycles.use_denoising = False
    scene.cycles.filter_width = PIXEL_FILTER_PX
    scene.render.film_transparent = False
    world = scene.world or bpy.data.worlds.new("World")
    scene.world = world
    world.color = (0.0, 0.0, 0.0)
    if world.node_tree is not None:
        bg = world.node_tree.nodes.get("Background")
        if bg is not None:
            bg.inputs["Strength"].default_value = 0.0
    scene.render.engine = engine
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = str(out)
    bpy.ops.render.render(write_still=True)
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(1.0 / max(mse, 1e-12))


TEMPLE_BOX = ((-0.073568, 0.021728, -0.012445), (0.028855, 0.181892, 0.062736))  # README.txt of the data


def fit_temple(
    temple_dir: Path,
    *,
    ids=(0, 4, 8, 12),
    size=(80, 60),
    iterations=60,
    points=1500,
    sh_degree=0,
    sh_degree_interval=1000,
):
    """A small Gaussian fit of the real temple on the CPU: (GaussianArrays, the captures' cameras at ``size``).

    Starts from points spread through the temple's bounding box (the data's README gives it); the SH
    degree fitted rises by one every ``sh_degree_interval`` steps up to ``sh_degree``.
    """
    from PIL import Image

    from backend.formats.middlebury import read_middlebury
    from backend.stages.fit import FitViews, fit_gaussians, gaussians_to_arrays
    from backend.types import GeometryMemory

    caps = [read_middlebury(temple_dir).captures[i] for i in ids]
    cams = [c.camera.scaled(*size) for c in caps]
    images = np.stack(
        [np.asarray(Image.open(c.image).convert("RGB").resize(size, Image.BILINEAR), np.float32) / 255 for c in caps]
    )
    rng = np.random.default_rng(0)
    lo, hi = (np.asarray(v) for v in TEMPLE_BOX)
    xyz = rng.uniform(lo, hi, (points, 3)).astype(np.float32)
    memory = GeometryMemory(
        torch.as_tensor(xyz),
        torch.full((points, 3), 0.5),
        torch.ones(points),
        torch.zeros(points, dtype=torch.int32),
    )
    views = FitViews(
        torch.as_tensor(images),
        Cameras(
            torch.as_tensor(np.stack([c.w2c for c in cams]), dtype=torch.float32),
            torch.as_tensor(np.stack([c.K for c in cams]), dtype=torch.float32),
            size[0],
            size[1],
        ),
        torch.ones(len(caps), size[1], size[0]),
    )
    torch.manual_seed(0)
    cfg = FitConfig(
        iterations=iterations,
        rasterizer="torch_cpu",
        strategy="none",
        lpips_weight=0.0,
        sh_degree=sh_degree,
        sh_degree_interval=sh_degree_interval,
    )
    g = fit_gaussians(views, memory, cfg, device="cpu")
    return gaussians_to_arrays(g), cams
