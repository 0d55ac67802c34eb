"""Properties: per-scene job settings (saved with the .blend) and the window manager's runtime state."""

from __future__ import annotations

import bpy

# Defaults follow backend.scene.Settings (CPU-friendly); the server checks every value.
DEFAULT_WIDTH = 320
DEFAULT_HEIGHT = 240
DEFAULT_SEGMENT_LENGTH = 40  # AnyRecon trains on 40-frame clips
DEFAULT_RETRIEVAL_K = 10  # AnyRecon keeps up to 10 captures per chunk
DEFAULT_GAUSSIAN_ITERATIONS = 300
DEFAULT_NUM_STEPS = 4  # AnyRecon's distilled generator
FALLBACK_GENERATORS = ("reproject", "anyrecon")

# EnumProperty item callbacks must keep their strings alive (a Blender requirement): module level.
_generator_items: list[tuple[str, str, str]] = [(g, g, f"generator {g}") for g in FALLBACK_GENERATORS]


def set_generators(names: list[str]) -> None:
    """Offer the generators a service reported in hello."""
    if names:
        _generator_items[:] = [(g, g, f"generator {g}") for g in names]


def _generators(self, context):
    return _generator_items


def _is_camera(self, obj) -> bool:
    return obj.type == "CAMERA"


class ReconLoopSceneSettings(bpy.types.PropertyGroup):
    capture_source: bpy.props.EnumProperty(
        name="Captures",
        items=[
            ("COLLECTION", "Cameras", "A collection of cameras, each with its photo as the camera's background image"),
            ("FOLDER", "Photo folder", "A folder of photos without cameras: the service estimates them"),
        ],
        default="COLLECTION",
    )
    captures: bpy.props.PointerProperty(name="Camera collection", type=bpy.types.Collection)
    photo_folder: bpy.props.StringProperty(name="Photo folder", subtype="DIR_PATH")
    trajectory_camera: bpy.props.PointerProperty(
        name="Trajectory",
        description="An animated camera: the views to generate",
        type=bpy.types.Object,
        poll=_is_camera,
    )
    use_scene_range: bpy.props.BoolProperty(name="Scene frame range", default=True)
    frame_start: bpy.props.IntProperty(name="Start", default=1)
    frame_end: bpy.props.IntProperty(name="End", default=40)
    frame_step: bpy.props.IntProperty(name="Step", default=1, min=1)
    generator: bpy.props.EnumProperty(name="Generator", items=_generators)
    width: bpy.props.IntProperty(
        name="Width",
        description="Working resolution (generated frames, Gaussian fitting)",
        default=DEFAULT_WIDTH,
        min=16,
        max=4096,
    )
    height: bpy.props.IntProperty(name="Height", default=DEFAULT_HEIGHT, min=16, max=4096)
    segment_length: bpy.props.IntProperty(
        name="Segment length", description="Frames generated together", default=DEFAULT_SEGMENT_LENGTH, min=2, max=512
    )
    retrieval_k: bpy.props.IntProperty(
        name="Retrieved views",
        description="Captures given to the generator per segment",
        default=DEFAULT_RETRIEVAL_K,
        min=0,
        max=64,
    )
    gaussian_iterations: bpy.props.IntProperty(name="Gaussian iterations", default=DEFAULT_GAUSSIAN_ITERATIONS, min=0)
    guide: bpy.props.BoolProperty(
        name="Guide",
        default=True,
        description="Fit Gaussians on the captures first and render them for the generator: better frames "
        "where the captures are far apart, about twice the fitting time",
    )
    num_steps: bpy.props.IntProperty(name="Denoising steps", default=DEFAULT_NUM_STEPS, min=1, max=1000)
    seed: bpy.props.IntProperty(name="Seed", default=0, min=0)
    prompt: bpy.props.StringProperty(name="Prompt", description="Optional text for the generator")

    def frame_range(self, scene) -> tuple[int, int, int]:
        if self.use_scene_range:
            return scene.frame_start, scene.frame_end, max(1, scene.frame_step)
        return self.frame_start, self.frame_end, self.frame_step

    def job_settings(self) -> dict:
        out = {
            "generator": self.generator,
            "width": self.width,
            "height": self.height,
            "segment_length": self.segment_length,
            "retrieval_k": self.retrieval_k,
            "gaussian_iterations": self.gaussian_iterations,
            "guide": self.guide,
            "num_steps": self.num_steps,
            "seed": self.seed,
        }
        if self.prompt:
            out["prompt"] = self.prompt
        return out


class ReconLoopJobItem(bpy.types.PropertyGroup):
    job: bpy.props.StringProperty(name="Job")
    state: bpy.props.StringProperty(name="State")
    stage: bpy.props.StringProperty(name="Stage")
    message: bpy.props.StringProperty(name="Message")
    created: bpy.props.FloatProperty(name="Created")


class ReconLoopRuntime(bpy.types.PropertyGroup):
    """What the panel shows about the service and the running job (not saved)."""

    is_running: bpy.props.BoolProperty(name="Running")
    job: bpy.props.StringProperty(name="Job")
    state: bpy.props.StringProperty(name="State")
    stage: bpy.props.StringProperty(name="Stage")
    fraction: bpy.props.FloatProperty(name="Progress", min=0.0, max=1.0, subtype="FACTOR")
    message: bpy.props.StringProperty(name="Message")
    started: bpy.props.FloatProperty(name="Started")
    last_error: bpy.props.StringProperty(name="Last error")
    hello_summary: bpy.props.StringProperty(name="Service")
    jobs: bpy.props.CollectionProperty(type=ReconLoopJobItem)
    jobs_index: bpy.props.IntProperty()


CLASSES = (ReconLoopSceneSettings, ReconLoopJobItem, ReconLoopRuntime)


def register_properties() -> None:
    bpy.types.Scene.reconloop = bpy.props.PointerProperty(type=ReconLoopSceneSettings)
    bpy.types.WindowManager.reconloop = bpy.props.PointerProperty(type=ReconLoopRuntime)


def unregister_properties() -> None:
    del bpy.types.WindowManager.reconloop
    del bpy.types.Scene.reconloop
