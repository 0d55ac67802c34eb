"""The sidebar panel in the 3D viewport (N panel, tab "ReconLoop")."""

from __future__ import annotations

import time

import bpy

from protocol.schemas import TERMINAL_STATES
from protocol.settings import SECTION_ADVANCED, SECTION_MAIN, in_section

from . import connection

CATEGORY = "ReconLoop"


class _Panel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = CATEGORY


class RECONLOOP_PT_main(_Panel, bpy.types.Panel):
    bl_idname = "RECONLOOP_PT_main"
    bl_label = "ReconLoop"

    def draw(self, context):
        layout = self.layout
        rt = context.window_manager.reconloop
        s = connection.SESSION
        if rt.is_running and s.driver is not None:
            col = layout.column(align=True)
            elapsed = time.time() - rt.started
            stage = rt.stage or rt.state
            col.progress(factor=rt.fraction, type="BAR", text=f"{stage} {rt.fraction * 100:.0f}%  ({elapsed:.0f} s)")
            if rt.message:
                col.label(text=rt.message[:120])
            col.operator("reconloop.cancel", icon="CANCEL")
        else:
            row = layout.row()
            row.scale_y = 1.5
            row.operator("reconloop.reconstruct", icon="PLAY")
        if rt.last_error:
            box = layout.box()
            for line in rt.last_error.splitlines()[:6]:
                box.label(text=line[:160], icon="ERROR")
        row = layout.row(align=True)
        row.label(
            text=rt.hello_summary[:80] or "service: not connected", icon="LINKED" if rt.hello_summary else "UNLINKED"
        )
        row.operator("reconloop.test_connection", text="", icon="FILE_REFRESH")


class RECONLOOP_PT_captures(_Panel, bpy.types.Panel):
    bl_label = "Captures"
    bl_parent_id = "RECONLOOP_PT_main"

    def draw(self, context):
        st = context.scene.reconloop
        layout = self.layout
        layout.prop(st, "capture_source", expand=True)
        if st.capture_source == "COLLECTION":
            layout.prop(st, "captures", text="")
            if st.captures is not None:
                cams = [o for o in st.captures.all_objects if o.type == "CAMERA"]
                with_photo = sum(1 for o in cams if any(bg.image for bg in o.data.background_images))
                layout.label(text=f"{len(cams)} cameras, {with_photo} with photos")
        else:
            layout.prop(st, "photo_folder", text="")
            unregistered = context.window_manager.reconloop.unregistered
            if unregistered:
                box = layout.box()
                box.label(text=unregistered.split(":")[0], icon="ERROR")
                box.label(text=unregistered.split(": ", 1)[-1][:200])


class RECONLOOP_PT_trajectory(_Panel, bpy.types.Panel):
    bl_label = "Trajectory"
    bl_parent_id = "RECONLOOP_PT_main"

    def draw(self, context):
        st = context.scene.reconloop
        layout = self.layout
        layout.prop(st, "trajectory_camera", text="Camera")
        layout.prop(st, "use_scene_range")
        col = layout.column(align=True)
        # With the scene's range, show the scene's own numbers (greyed), not the unused custom ones.
        source = context.scene if st.use_scene_range else st
        col.enabled = not st.use_scene_range
        col.prop(source, "frame_start", text="Start")
        col.prop(source, "frame_end", text="End")
        col.prop(source, "frame_step", text="Step")
        start, end, step = st.frame_range(context.scene)
        cam = st.trajectory_camera
        if cam is None:
            layout.label(text="No camera: the service invents a path", icon="INFO")
        elif st.capture_source == "FOLDER":  # Reconstruct refuses it (operators.prepare_job says why)
            layout.label(text="A photo folder's cameras come from SfM: clear this camera", icon="ERROR")
        else:
            frames = len(range(start, end + 1, step))
            layout.label(text=f"{frames} frames")
            if frames > 1 and not may_move(cam):
                layout.label(text="Camera is not animated: every frame would be the same view", icon="ERROR")


def _animated(id_data) -> bool:
    ad = id_data.animation_data
    return ad is not None and (ad.action is not None or len(ad.drivers) > 0 or len(ad.nla_tracks) > 0)


def may_move(obj) -> bool:
    """Whether the camera can change over the frames: keyframes, drivers or NLA on it or its camera data,
    a parent or constraints (cheap enough for draw(); Reconstruct samples the frames to be sure)."""
    return _animated(obj) or _animated(obj.data) or obj.parent is not None or len(obj.constraints) > 0


class RECONLOOP_PT_settings(_Panel, bpy.types.Panel):
    """The job settings of protocol.settings.SETTINGS whose section is "main", in table order."""

    bl_label = "Settings"
    bl_parent_id = "RECONLOOP_PT_main"
    bl_options = {"DEFAULT_CLOSED"}
    section = SECTION_MAIN

    def draw(self, context):
        draw_settings(self.layout, context.scene.reconloop, self.section)


class RECONLOOP_PT_settings_advanced(_Panel, bpy.types.Panel):
    bl_label = "Advanced"
    bl_parent_id = "RECONLOOP_PT_settings"
    bl_options = {"DEFAULT_CLOSED"}
    section = SECTION_ADVANCED

    def draw(self, context):
        draw_settings(self.layout, context.scene.reconloop, self.section)


def draw_settings(layout, st, section: str) -> None:
    """One row per setting of ``section``; label and value share the width, so labels are not cut."""
    layout.use_property_split = True
    layout.use_property_decorate = False
    col = layout.column(align=False)
    for row in in_section(section):
        col.prop(st, row.name)


class RECONLOOP_UL_jobs(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        when = time.strftime("%m-%d %H:%M", time.localtime(item.created)) if item.created else ""
        icons = {"done": "CHECKMARK", "failed": "ERROR", "cancelled": "CANCEL", "running": "PLAY"}
        layout.label(text=f"{when}  {item.job[:8]}  {item.state}", icon=icons.get(item.state, "TIME"))


class RECONLOOP_PT_jobs(_Panel, bpy.types.Panel):
    bl_label = "Past jobs"
    bl_parent_id = "RECONLOOP_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        rt = context.window_manager.reconloop
        layout = self.layout
        layout.operator("reconloop.refresh_jobs", icon="FILE_REFRESH")
        if rt.jobs_note:
            layout.label(text=rt.jobs_note[:120], icon="TIME")
        layout.template_list("RECONLOOP_UL_jobs", "", rt, "jobs", rt, "jobs_index", rows=3)
        if 0 <= rt.jobs_index < len(rt.jobs):
            item = rt.jobs[rt.jobs_index]
            if item.message:
                layout.label(text=item.message[:120])
            row = layout.row()
            if item.state == "done":  # only a finished job has results to import
                row.operator("reconloop.import_job", icon="IMPORT").job = item.job
            elif item.state not in TERMINAL_STATES:
                row.label(text=f"results when the job is done ({item.state})", icon="TIME")
            else:
                row.label(text=f"no results ({item.state})", icon="INFO")
            if item.state in TERMINAL_STATES:  # the service deletes an ended job only
                row.operator("reconloop.delete_job", icon="TRASH", text="Delete").job = item.job


CLASSES = (
    RECONLOOP_PT_main,
    RECONLOOP_PT_captures,
    RECONLOOP_PT_trajectory,
    RECONLOOP_PT_settings,
    RECONLOOP_PT_settings_advanced,
    RECONLOOP_UL_jobs,
    RECONLOOP_PT_jobs,
)
