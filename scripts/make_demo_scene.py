"""Build the demo scene with Blender as a Python module (the ``bpy`` wheel) and render it with Cycles.

A few objects with Blender's own procedural materials (checker, noise, voronoi, wave, magic) stand on
a textured ground under a sun and a soft sky. Captures are rendered from a ring of cameras around the
scene; ground truth is rendered at every frame of an animated orbit camera (the trajectory), so the
loop's output can be scored. Everything is made here, so the project ships no third-party data.

Writes ``OUT/scene.json`` (``backend.scene.save_scene``), ``OUT/captures/*.png``,
``OUT/heldout/*.png`` (ground truth at the trajectory cameras, listed as held-out views) and
``OUT/demo.blend`` (the scene ready to reconstruct: a *Captures* collection of cameras with their photos
and the animated trajectory camera, both picked in the ReconLoop sidebar).
Cameras go from Blender to OpenCV with ``blender_addon.cameras`` (DESIGN.md section 3).

Usage::

    python scripts/make_demo_scene.py --out demo_scene --captures 12 --frames 24 --size 320x240 --samples 16
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.scene import Camera, Capture, Scene, Settings, TrajectoryFrame, save_scene  # noqa: E402
from blender_addon.cameras import BlenderCameraParams, opencv_from_blender  # noqa: E402

# Where things stand (metres, Blender world: +Z up). The beacon is the test's known object.
LOOK_AT = (0.0, 0.0, 0.8)
BEACON_CENTER = (0.0, 0.0, 1.95)
BEACON_RADIUS = 0.32
BEACON_RGB = (1.0, 0.0, 0.0)  # emissive red: its colour does not depend on light or samples
CAPTURE_RING = (6.5, 3.4)  # radius, height of the capture cameras
ORBIT_RING = (5.6, 2.6)  # radius, height of the trajectory camera
LENS_MM = 30.0
SENSOR_WIDTH_MM = 36.0
SUN_STRENGTH = 3.0
SKY_RGB = (0.55, 0.62, 0.72)
SKY_STRENGTH = 0.6
CAPTURES_COLLECTION = "Captures"
MAX_BOUNCES = 2  # enough for soft colour bleeding, cheap on CPU


@dataclass(frozen=True)
class DemoArgs:
    out: Path
    captures: int = 12  # 30 degrees apart: what plane sweep matches (docs/benchmarks.md, "make demo")
    frames: int = 12
    width: int = 160
    height: int = 120
    samples: int = 16
    denoise: bool = True  # OpenImageDenoise on every render: clean photos, as a camera gives
    threads: int = 0  # 0: Blender picks (all cores)


def parse_args(argv: list[str] | None = None) -> DemoArgs:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="scene folder to write")
    ap.add_argument("--captures", type=int, default=DemoArgs.captures, help="capture cameras on a ring")
    ap.add_argument("--frames", type=int, default=DemoArgs.frames, help="frames of the orbit trajectory")
    ap.add_argument("--size", default=f"{DemoArgs.width}x{DemoArgs.height}", help="render size WxH")
    ap.add_argument("--samples", type=int, default=DemoArgs.samples, help="Cycles samples per pixel")
    ap.add_argument("--no-denoise", action="store_true", help="keep Cycles' sampling noise (no OpenImageDenoise)")
    ap.add_argument("--threads", type=int, default=0, help="render threads (0: all cores)")
    a = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size must be WxH, e.g. 160x120; got {a.size!r}")
    if w < 8 or h < 8:
        ap.error(f"--size must be at least 8x8; got {a.size}")
    if a.captures < 1 or a.frames < 1 or a.samples < 1:
        ap.error("--captures, --frames and --samples must be at least 1")
    return DemoArgs(
        out=a.out,
        captures=a.captures,
        frames=a.frames,
        width=w,
        height=h,
        samples=a.samples,
        denoise=not a.no_denoise,
        threads=a.threads,
    )


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Blender camera-to-world (looks down -Z, +Y up) at ``eye`` facing ``target``. [4, 4]"""
    back = eye - target
    back = back / np.linalg.norm(back)
    right = np.cross((0.0, 0.0, 1.0), back)
    right = right / np.linalg.norm(right)
    up = np.cross(back, right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, back, eye
    return m


def ring(count: int, radius: float, height: float, phase: float) -> list[np.ndarray]:
    """Camera-to-world matrices on a horizontal circle, all facing LOOK_AT."""
    out = []
    for i in range(count):
        a = phase + 2.0 * math.pi * i / count
        eye = np.array([radius * math.cos(a), radius * math.sin(a), height])
        out.append(look_at(eye, np.array(LOOK_AT)))
    return out


# ----------------------------------------------------------------------------------------------
# Blender side


def _material(bpy, name: str, kind: str, colors: tuple, scale: float):
    """A Principled BSDF whose base colour comes from a procedural texture through a colour ramp."""
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = nodes.get("Principled BSDF")
    tex = nodes.new(
        {
            "noise": "ShaderNodeTexNoise",
            "voronoi": "ShaderNodeTexVoronoi",
            "checker": "ShaderNodeTexChecker",
            "wave": "ShaderNodeTexWave",
            "magic": "ShaderNodeTexMagic",
        }[kind]
    )
    tex.inputs["Scale"].default_value = scale
    if kind == "checker":
        tex.inputs["Color1"].default_value = (*colors[0], 1.0)
        tex.inputs["Color2"].default_value = (*colors[1], 1.0)
        noise = nodes.new("ShaderNodeTexNoise")
        noise.inputs["Scale"].default_value = scale * 3.0
        mix = nodes.new("ShaderNodeMix")
        mix.data_type = "RGBA"
        mix.blend_type = "MULTIPLY"
        mix.inputs["Factor"].default_value = 0.5
        links.new(tex.outputs["Color"], mix.inputs[6])
        links.new(noise.outputs["Color"], mix.inputs[7])
        links.new(mix.outputs[2], bsdf.inputs["Base Color"])
    else:
        ramp = nodes.new("ShaderNodeValToRGB")
        ramp.color_ramp.elements[0].color = (*colors[0], 1.0)
        ramp.color_ramp.elements[1].color = (*colors[1], 1.0)
        out = tex.outputs["Distance"] if kind == "voronoi" else tex.outputs["Fac"]
        links.new(out, ramp.inputs["Fac"])
        links.new(ramp.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.8
    return mat


def _emissive(bpy, name: str, rgb: tuple):
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    for n in list(nodes):
        nodes.remove(n)
    em = nodes.new("ShaderNodeEmission")
    em.inputs["Color"].default_value = (*rgb, 1.0)
    em.inputs["Strength"].default_value = 1.0
    out = nodes.new("ShaderNodeOutputMaterial")
    links.new(em.outputs["Emission"], out.inputs["Surface"])
    return mat


def build_scene(bpy, a: DemoArgs):
    """Objects, materials, lights, world and render settings. Returns the scene."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    ops = bpy.ops.mesh

    def add(op, mat, **kw):
        op(**kw)
        obj = bpy.context.active_object
        obj.data.materials.append(mat)
        return obj

    add(
        ops.primitive_plane_add,
        _material(bpy, "ground", "checker", ((0.75, 0.7, 0.6), (0.25, 0.3, 0.35)), 6.0),
        size=14.0,
    )
    add(
        ops.primitive_cylinder_add,
        _material(bpy, "pedestal", "wave", ((0.8, 0.75, 0.65), (0.35, 0.25, 0.2)), 3.0),
        radius=0.55,
        depth=1.6,
        location=(0.0, 0.0, 0.8),
    )
    add(ops.primitive_uv_sphere_add, _emissive(bpy, "beacon", BEACON_RGB), radius=BEACON_RADIUS, location=BEACON_CENTER)
    add(
        ops.primitive_cube_add,
        _material(bpy, "cube", "voronoi", ((0.9, 0.85, 0.2), (0.1, 0.35, 0.6)), 4.0),
        size=1.3,
        location=(2.1, -1.1, 0.65),
        rotation=(0.0, 0.0, 0.5),
    )
    sphere = add(
        ops.primitive_uv_sphere_add,
        _material(bpy, "sphere", "noise", ((0.1, 0.5, 0.2), (0.9, 0.9, 0.8)), 5.0),
        radius=0.8,
        location=(-1.9, -1.2, 0.8),
    )
    sphere.data.polygons.foreach_set("use_smooth", [True] * len(sphere.data.polygons))
    add(
        ops.primitive_torus_add,
        _material(bpy, "torus", "magic", ((0.6, 0.1, 0.5), (0.95, 0.6, 0.2)), 2.0),
        major_radius=0.7,
        minor_radius=0.25,
        location=(-0.6, 2.1, 0.25),
    )
    add(
        ops.primitive_cone_add,
        _material(bpy, "cone", "checker", ((0.2, 0.2, 0.8), (0.9, 0.9, 0.9)), 8.0),
        radius1=0.6,
        depth=1.4,
        location=(1.7, 1.8, 0.7),
    )

    bpy.ops.object.light_add(type="SUN", location=(3.0, -4.0, 8.0), rotation=(0.6, 0.2, 0.9))
    sun = bpy.context.active_object
    sun.data.energy = SUN_STRENGTH
    sun.data.angle = math.radians(8.0)

    world = bpy.data.worlds.new("sky")
    world.use_nodes = True
    bg = world.node_tree.nodes.get("Background")
    bg.inputs["Color"].default_value = (*SKY_RGB, 1.0)
    bg.inputs["Strength"].default_value = SKY_STRENGTH
    scene.world = world

    r = scene.render
    r.engine = "CYCLES"
    r.resolution_x, r.resolution_y, r.resolution_percentage = a.width, a.height, 100
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGB"
    r.image_settings.color_depth = "8"
    r.use_persistent_data = True
    if a.threads:
        r.threads_mode = "FIXED"
        r.threads = a.threads
    scene.view_settings.view_transform = "Standard"  # plain sRGB, no filmic tone curve
    scene.view_settings.look = "None"
    c = scene.cycles
    c.device = "CPU"
    c.samples = a.samples
    c.use_adaptive_sampling = False
    c.use_denoising = a.denoise
    if a.denoise:
        c.denoiser = "OPENIMAGEDENOISE"
    c.max_bounces = MAX_BOUNCES
    c.diffuse_bounces = MAX_BOUNCES
    c.glossy_bounces = 1
    c.transmission_bounces = 0
    c.volume_bounces = 0
    c.transparent_max_bounces = 0
    return scene


def add_camera(bpy, name: str, c2w_gl: np.ndarray):
    data = bpy.data.cameras.new(name)
    data.lens = LENS_MM
    data.sensor_width = SENSOR_WIDTH_MM
    data.sensor_fit = "AUTO"
    obj = bpy.data.objects.new(name, data)
    bpy.context.scene.collection.objects.link(obj)
    set_matrix_world(obj, c2w_gl)
    return obj


def set_matrix_world(obj, c2w_gl: np.ndarray) -> None:
    import mathutils  # a plain nested list would be read column by column

    obj.matrix_world = mathutils.Matrix([list(map(float, row)) for row in c2w_gl])


def opencv_camera(scene, obj) -> Camera:
    """The camera as the scene renders it now, through blender_addon.cameras (DESIGN.md section 3)."""
    r, d = scene.render, obj.data
    p = BlenderCameraParams(
        matrix_world=np.array(obj.matrix_world, dtype=np.float64),
        lens_mm=d.lens,
        sensor_width_mm=d.sensor_width,
        sensor_height_mm=d.sensor_height,
        sensor_fit=d.sensor_fit,
        shift_x=d.shift_x,
        shift_y=d.shift_y,
        resolution_x=r.resolution_x,
        resolution_y=r.resolution_y,
        resolution_percentage=r.resolution_percentage,
        pixel_aspect_x=r.pixel_aspect_x,
        pixel_aspect_y=r.pixel_aspect_y,
    )
    cv = opencv_from_blender(p)
    return Camera(w2c=cv.w2c, K=cv.K, width=cv.width, height=cv.height)


def render_to(bpy, scene, cam_obj, path: Path) -> None:
    scene.camera = cam_obj
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)


def ready_to_reconstruct(bpy, scene, capture_objs, traj_obj, a: DemoArgs) -> None:
    """Wire the scene as the add-on's sidebar wants it, so opening demo.blend and clicking Reconstruct
    works: the capture cameras in a *Captures* collection, each with its rendered photo as background
    (relative to the .blend), and the sidebar pointed at them and at the animated trajectory camera."""
    coll = bpy.data.collections.new(CAPTURES_COLLECTION)
    scene.collection.children.link(coll)
    for obj in capture_objs:
        scene.collection.objects.unlink(obj)
        coll.objects.link(obj)
        bg = obj.data.background_images.new()
        bg.image = bpy.data.images.load(str(a.out.resolve() / "captures" / f"{obj.name}.png"))
        bg.frame_method = "STRETCH"
        obj.data.show_background_images = True
    import blender_addon  # this repository's add-on: its properties are saved with the .blend

    blender_addon.register()
    try:
        st = scene.reconloop
        st.capture_source = "COLLECTION"
        st.captures = coll
        st.trajectory_camera = traj_obj
        st.use_scene_range = True
        st.width, st.height = a.width, a.height
    finally:
        blender_addon.unregister()


def make_demo_scene(a: DemoArgs) -> Path:
    """Render the demo scene into ``a.out``. Returns the path of scene.json."""
    import bpy

    out = a.out.resolve()
    (out / "captures").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    scene = build_scene(bpy, a)

    captures = []
    # ring phase: captures start half a step away from the orbit's first frame, so frames fall between them
    for i, c2w in enumerate(ring(a.captures, *CAPTURE_RING, phase=math.pi / max(a.captures, 1))):
        obj = add_camera(bpy, f"capture_{i:02d}", c2w)
        bpy.context.view_layer.update()
        path = out / "captures" / f"capture_{i:02d}.png"
        render_to(bpy, scene, obj, path)
        captures.append(Capture(name=obj.name, image=path, camera=opencv_camera(scene, obj)))

    # the trajectory: one camera, keyframed on an orbit (frames 1..N), as an artist would animate it
    traj_obj = add_camera(bpy, "trajectory", np.eye(4))
    orbit = ring(a.frames, *ORBIT_RING, phase=0.0)
    for f, c2w in enumerate(orbit, start=1):
        set_matrix_world(traj_obj, c2w)
        traj_obj.keyframe_insert("location", frame=f)
        traj_obj.keyframe_insert("rotation_euler", frame=f)
    scene.frame_start, scene.frame_end = 1, a.frames
    trajectory, heldout = [], []
    for f in range(1, a.frames + 1):
        scene.frame_set(f)
        cam = opencv_camera(scene, traj_obj)
        path = out / "heldout" / f"frame_{f:04d}.png"
        render_to(bpy, scene, traj_obj, path)
        trajectory.append(TrajectoryFrame(frame=f, camera=cam))
        heldout.append(Capture(name=f"frame_{f:04d}", image=path, camera=cam))
    scene.frame_set(1)
    scene.camera = traj_obj
    scene.render.filepath = "//render/"
    ready_to_reconstruct(bpy, scene, [bpy.data.objects[c.name] for c in captures], traj_obj, a)
    bpy.ops.wm.save_as_mainfile(filepath=str(out / "demo.blend"), relative_remap=True)

    settings = Settings(width=a.width, height=a.height)
    return save_scene(
        Scene(root=out, captures=captures, trajectory=trajectory, heldout=heldout, settings=settings), out
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    path = make_demo_scene(a)
    print(
        f"wrote {path} ({a.captures} captures, {a.frames} frames at {a.width}x{a.height}, "
        f"{a.samples} samples{', denoised' if a.denoise else ''}) in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
