"""``make demo``: the whole product on one machine, CPU only, through the add-on and the service.

1. make the procedural demo scene (``scripts/make_demo_scene.py``: rendered captures, an animated
   trajectory camera, ``demo.blend``), in its own process;
2. build the extension zip (``scripts/build_extension.py``; wheels from ``make setup``);
3. start ``reconloop serve`` on a free loopback port with a temporary job store;
4. open ``demo.blend`` with the bpy wheel, install the zip with Blender's own extension installer,
   put the capture cameras in a collection with their photos as background images (what a user does
   in the UI), and run the Reconstruct operator against the service;
5. save ``OUT/demo_result.blend`` holding the imported point cloud, Gaussians and the generated frames
   behind the trajectory camera; shut the service down.

    .venv/bin/python scripts/demo.py --out demo_out
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
for p in (str(REPO), str(SCRIPTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from backend.cli import DEMO_SETTINGS  # noqa: E402  (CPU-sized job settings, shared with `reconloop demo --scene`)
from backend.service.spawn import free_port, serve_command, serve_env, wait_answering  # noqa: E402

LOOPBACK = "127.0.0.1"
CAPTURES_COLLECTION = "Captures"
CAPTURE_PREFIX = "capture_"
SERVICE_START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 600.0
SHUTDOWN_WAIT_S = 15.0
# CPU-sized defaults (the whole demo in a few minutes on 2 cores): a dozen denoised photos around the
# table, 30 degrees apart, as a user would take them; the trajectory orbits closer and lower. Six photos
# 60 degrees apart leave the plane sweep with 2,300 points (19 % of the held-out pixels) and the Gaussians
# fog (18 dB); twelve give it 43,000 (docs/benchmarks.md, "make demo").
DEMO_SCENE_ARGS = ["--captures", "12", "--frames", "12", "--size", "160x120", "--samples", "16"]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def make_scene(out: Path, extra: list[str]) -> Path:
    scene_dir = out / "scene"
    if (scene_dir / "demo.blend").is_file():
        log(f"reusing {scene_dir}")
        return scene_dir
    cmd = [sys.executable, str(SCRIPTS / "make_demo_scene.py"), "--out", str(scene_dir), *extra]
    log("making the demo scene: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=REPO)
    return scene_dir


def start_service(data_dir: Path, device: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://{LOOPBACK}:{free_port(LOOPBACK)}"
    env = serve_env()
    cmd = serve_command(endpoint, data_dir, device=device)
    log(f"starting the service on {endpoint} (log {log_path})")
    logf = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    from protocol.client import Client

    try:
        wait_answering(endpoint, SERVICE_START_TIMEOUT_S, proc=proc)
    except RuntimeError as err:
        proc.kill()
        raise RuntimeError(f"{err}; see {log_path}") from None
    with Client(endpoint, timeout_ms=60_000, retries=0) as c:
        info = c.hello()
    log(f"service up: {info['server']} on {info['device']}, generators {info['generators']}")
    return proc, endpoint


def stop_service(proc: subprocess.Popen, endpoint: str) -> None:
    from protocol.client import Client

    if proc.poll() is None:
        try:
            with Client(endpoint, timeout_ms=5000, retries=0) as c:
                c.shutdown()
        except Exception as err:  # noqa: BLE001 - terminate below
            log(f"shutdown request failed ({err}); terminating")
        try:
            proc.wait(timeout=SHUTDOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=SHUTDOWN_WAIT_S)
    log(f"service stopped (exit code {proc.returncode})")


def prepare_captures(scene_dir: Path) -> None:
    """Gather the capture cameras in a collection, each with its rendered photo as background."""
    import bpy

    coll = bpy.data.collections.get(CAPTURES_COLLECTION) or bpy.data.collections.new(CAPTURES_COLLECTION)
    if coll.name not in bpy.context.scene.collection.children:
        bpy.context.scene.collection.children.link(coll)
    cams = sorted(
        (o for o in bpy.data.objects if o.type == "CAMERA" and o.name.startswith(CAPTURE_PREFIX)), key=lambda o: o.name
    )
    if not cams:
        raise RuntimeError(f"demo.blend has no {CAPTURE_PREFIX}* cameras")
    for obj in cams:
        photo = scene_dir / "captures" / f"{obj.name}.png"
        if not photo.is_file():
            raise RuntimeError(f"no photo for {obj.name}: {photo}")
        for c in list(obj.users_collection):
            c.objects.unlink(obj)
        coll.objects.link(obj)
        obj.data.background_images.clear()
        bg = obj.data.background_images.new()
        bg.image = bpy.data.images.load(str(photo))
        obj.data.show_background_images = True
    log(f"{len(cams)} capture cameras with photos in collection {coll.name!r}")


def score_gaussians(scene_dir: Path, gaussians_ply: Path) -> str:
    """The job's Gaussians at the demo scene's ground-truth views (the trajectory's own frames, rendered
    by Cycles when the scene was made): mean PSNR / SSIM, as ``reconloop eval`` scores held-out views."""
    from dataclasses import replace

    from backend.metrics import image_metrics
    from backend.scene import load_scene
    from backend.stages.cameras import load_image, resize_image, to_tensor
    from backend.stages.fit import FitConfig, gaussians_from_arrays, render_gaussians
    from backend.types import Cameras
    from protocol.ply import read_gaussians_ply

    scene = load_scene(scene_dir)
    W, H = scene.settings.width, scene.settings.height
    truth = to_tensor([resize_image(load_image(c.image), W, H) for c in scene.heldout], "cpu")
    cams = Cameras.from_scene([c.camera for c in scene.heldout], W, H, device="cpu")
    gaussians = gaussians_from_arrays(read_gaussians_ply(gaussians_ply))
    cfg = replace(FitConfig(), rasterizer="torch_cpu")
    scores = image_metrics(render_gaussians(gaussians, cams, cfg), truth).mean()
    return f"{scores['psnr']:.2f} dB PSNR, SSIM {scores['ssim']:.3f} at {len(truth)} ground-truth views"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the ReconLoop demo through the Blender add-on and the service.")
    ap.add_argument("--out", type=Path, default=REPO / "demo_out")
    ap.add_argument("--device", default="cpu", help="service device: cpu, cuda or auto (default %(default)s)")
    ap.add_argument("--fresh", action="store_true", help="re-make the demo scene even if it exists")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    out = args.out.resolve()
    if args.fresh and (out / "scene").exists():
        shutil.rmtree(out / "scene")
    out.mkdir(parents=True, exist_ok=True)
    scene_dir = make_scene(out, DEMO_SCENE_ARGS)

    import build_extension

    (zip_path,) = build_extension.build(out / "dist", split=False)
    log(f"built {zip_path.name}")

    work = Path(tempfile.mkdtemp(prefix="reconloop_demo_"))
    # Blender's user folders go to a temporary place: the demo does not touch your own Blender set-up.
    os.environ["BLENDER_USER_RESOURCES"] = str(work / "blender_user")
    proc, endpoint = start_service(work / "jobs", args.device, out / "service.log")
    try:
        import bpy
        import reconstruct_headless

        bpy.ops.wm.open_mainfile(filepath=str(scene_dir / "demo.blend"))
        module = reconstruct_headless.ensure_addon(zip_path)
        log(f"installed the extension as {module}")
        prepare_captures(scene_dir)
        scene = bpy.context.scene
        st = scene.reconloop
        st.capture_source = "COLLECTION"
        st.captures = bpy.data.collections[CAPTURES_COLLECTION]
        st.trajectory_camera = scene.camera
        st.use_scene_range = True
        for key, value in DEMO_SETTINGS.items():
            setattr(st, key, value)
        log(f"Reconstruct: frames {scene.frame_start}..{scene.frame_end}, settings {DEMO_SETTINGS}")
        t_job = time.monotonic()
        bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(out / "results"), timeout_s=JOB_TIMEOUT_S)
        rt = bpy.context.window_manager.reconloop
        coll = next(c for c in bpy.data.collections if c.get("reconloop_job") == rt.job)
        log(
            f"job {rt.job} {rt.state} in {time.monotonic() - t_job:.0f} s; imported {sorted(o.name for o in coll.objects)}"
        )
        result = out / "demo_result.blend"
        bpy.ops.wm.save_as_mainfile(filepath=str(result))
        log(f"saved {result}")
        ply = next(
            (p for p in (out / "results").rglob("gaussians.ply") if p.parent.name == rt.job), None
        )  # not an earlier run's
        if ply is not None:
            log(f"the Gaussians: {score_gaussians(scene_dir, ply)}")
    finally:
        stop_service(proc, endpoint)
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
