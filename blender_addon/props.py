"""Properties: per-scene job settings (saved with the .blend) and the window manager's runtime state."""

from __future__ import annotations

import zlib

import bpy

from protocol.settings import BY_NAME, SETTINGS, Setting


def enum_value(name: str) -> int:
    """The number a dynamic enum item is stored as, fixed by its name (31 bits: Blender's int).

    Blender saves an enum's number, not its name; numbered by position, the chosen generator would
    become another one when a service lists them in another order, and so would a saved .blend's.
    """
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _items(names) -> list[tuple[str, str, str, int]]:
    return [(g, g, f"generator {g}", enum_value(g)) for g in dict.fromkeys(names)]


# EnumProperty item callbacks must keep their strings alive (a Blender requirement): module level.
_generator_items: list[tuple[str, str, str, int]] = _items(BY_NAME["generator"].choices)


def set_generators(names: list[str]) -> None:
    """Offer the generators a service reported in hello (the choice made stays, by name)."""
    if names:
        _generator_items[:] = _items(names)


def offer_generator(name: str) -> None:
    """Add one generator to the offer (a script's choice of a name the service lists and the table does not)."""
    if name not in [item[0] for item in _generator_items]:
        _generator_items.append(_items([name])[0])


def _generators(self, context):
    return _generator_items


def setting_property(row: Setting):
    """The Blender property for one row of protocol.settings.SETTINGS (default, range, label, help)."""
    common = {"name": row.label, "description": row.help}
    if row.kind == "int":
        lo, hi = row.range
        return bpy.props.IntProperty(default=row.default, min=int(lo), max=int(hi), **common)
    if row.kind == "float":
        lo, hi = row.range
        return bpy.props.FloatProperty(default=row.default, min=lo, max=hi, **common)
    if row.kind == "bool":
        return bpy.props.BoolProperty(default=row.default, **common)
    if row.kind == "str":
        return bpy.props.StringProperty(default=row.default, **common)
    if row.open_choices:  # the service's list replaces the table's; the generator is the only such row
        return bpy.props.EnumProperty(items=_generators, default=enum_value(row.default), **common)
    items = [(c, c, f"{row.label}: {c}") for c in row.choices]
    return bpy.props.EnumProperty(items=items, default=row.default, **common)


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

    def frame_range(self, scene) -> tuple[int, int, int]:
        if self.use_scene_range:
            return scene.frame_start, scene.frame_end, max(1, scene.frame_step)
        return self.frame_start, self.frame_end, self.frame_step

    def job_settings(self) -> dict:
        """Every job setting by name (protocol.settings.SETTINGS); an empty string is left out."""
        out = {}
        for row in SETTINGS:
            value = getattr(self, row.name)
            if row.kind in ("str", "enum") and not value:
                continue
            out[row.name] = value
        return out


# One property per job setting, from the table (Blender reads the annotations when it registers the class).
for _row in SETTINGS:
    ReconLoopSceneSettings.__annotations__[_row.name] = setting_property(_row)


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
    jobs_note: bpy.props.StringProperty(name="Jobs")  # while Refresh jobs or Delete job waits for the service
    unregistered: bpy.props.StringProperty(name="Photos without camera")
    jobs: bpy.props.CollectionProperty(type=ReconLoopJobItem)
    jobs_index: bpy.props.IntProperty()


CLASSES = (ReconLoopSceneSettings, ReconLoopJobItem, ReconLoopRuntime)


def register_properties() -> None:
    bpy.types.Scene.reconloop = bpy.props.PointerProperty(type=ReconLoopSceneSettings)
    bpy.types.WindowManager.reconloop = bpy.props.PointerProperty(type=ReconLoopRuntime)


def unregister_properties() -> None:
    del bpy.types.WindowManager.reconloop
    del bpy.types.Scene.reconloop
