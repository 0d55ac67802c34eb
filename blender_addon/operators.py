"""Operators: Reconstruct, Cancel, Test connection, past jobs, .ply import.

Operators stay thin: read properties, call the pure helpers (scene_read -> scene_io -> connection),
build objects (importers), report. Every user-facing failure is a ReconLoopError turned into
``self.report({'ERROR'}, ...)`` (and a popup in the UI). In the UI a ``bpy.app.timers`` callback drives
the job (no thread touches bpy or the socket); in background mode the operator drives it itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bpy
from bpy_extras.io_utils import ExportHelper, ImportHelper

from protocol.errors import listed
from protocol.schemas import TERMINAL_STATES

from . import connection, datasets, importers, preferences, props, scene_io
from .errors import ReconLoopError
from .scene_read import read_captures, sample_frames, sample_trajectory

TICK_S = 0.1  # timer interval while a job runs
TICK_BUSY_S = 0.01  # ...while files are downloading
DEFAULT_TIMEOUT_S = 3600.0  # background mode: give up (and cancel) after this long
POPUP_TITLE = "ReconLoop"
PROGRESS_LINES = 10  # background mode prints progress in tenths
IMPORTS_COLLECTION = "ReconLoop imports"
IMPORTS_KEY = "reconloop_imports"  # marks a scene's collection of imported .ply files


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "job"


def _server_property():
    """The ``server`` option of the operators that talk to the service (Reconstruct, Test connection,
    Refresh jobs, Import job, Delete job): an address that overrides the preferences, for scripts and tests."""
    return bpy.props.StringProperty(
        name="Server", description="Service address; overrides the preferences (e.g. tcp://127.0.0.1:5555)", default=""
    )


def _output_dir_property():
    """The ``output_dir`` option of the operators that download results (Reconstruct, Import job)."""
    return bpy.props.StringProperty(
        name="Results folder", description="Overrides the preferences", default="", subtype="DIR_PATH"
    )


def _background() -> bool:
    """Background mode (no UI, timers never fire): operators wait for their replies themselves."""
    return bpy.app.background


# ---------------------------------------------------------------------------------------------
# Results into the scene


class ResultImporter:
    """Turns a job's finished files into objects of one collection, as they arrive.

    Args:
        scene_name: the scene the results go to.
        key: shared by a re-run with the same captures: its collection is replaced.
        trajectory_camera: name of the camera whose background shows the generated frames ("" none).
        frame_range: (start, end) of the trajectory in Blender frames.
        photos: {capture name: photo file} for estimated cameras' backgrounds.
        reimport: a past job downloaded again (Import job), not a job this file submitted.
        source: where the photos came from (a photo folder's absolute path): a re-run of the same source replaces
            its results, another folder of the same name gets a collection of its own.
    """

    def __init__(
        self,
        scene_name: str,
        key: str,
        trajectory_camera: str,
        frame_range: tuple[int, int],
        photos: dict[str, str] | None = None,
        *,
        reimport: bool = False,
        source: str = "",
    ) -> None:
        self.scene_name = scene_name
        self.source = source
        found = bpy.data.scenes.get(scene_name)
        self.scene_uid = found.session_uid if found is not None else 0  # the scene renamed meanwhile: still found
        self.key = key
        self.trajectory_camera = trajectory_camera
        self.frame_range = frame_range
        self.photos = photos or {}
        self.job = ""
        self.frames: dict[int, str] = {}
        self._frames_dirty = False
        self._job_dir = ""
        self.objects: dict[str, str] = {}  # kind -> object name
        self.delivered: set[str] = set()  # the kinds this job has put in its collection (the rest: an earlier run's)
        self.unregistered = ""  # photo-folder mode: the photos that got no camera, in one line
        self.reimport = reimport
        self.arrived: list[str] = []  # what reached the scene since the last undo step pushed for it
        self.failed: dict[str, str] = {}  # file name -> why it could not be imported (the others still are)

    @property
    def scene(self) -> bpy.types.Scene:
        scene = bpy.data.scenes.get(self.scene_name)
        if scene is None or (self.scene_uid and scene.session_uid != self.scene_uid):
            scene = next((s for s in bpy.data.scenes if self.scene_uid and s.session_uid == self.scene_uid), None)
            if scene is None:
                raise ReconLoopError(f"the scene {self.scene_name!r} was deleted while the job ran")
            self.scene_name = scene.name  # renamed while the job ran
        return scene

    def collection(self) -> bpy.types.Collection:
        """The job's collection: the one already holding this job's results, whatever its key (a past
        job imported again, also after reopening the file, refreshes them there), else a new one (or
        the one of an earlier run with the same key, emptied)."""
        coll = importers.existing_job_collection(self.scene, self.job) if self.job else None
        if coll is not None:
            self.key = coll.get(importers.COLLECTION_KEY, self.key)  # object names follow the collection's
        else:
            # an earlier run's results stay until this job's replace them (a cancelled re-run keeps its Gaussians)
            coll = importers.job_collection(self.scene, self.key, self.job, self.source, empty=False)
            self.key = coll[importers.COLLECTION_KEY]  # "images 2" beside another folder's "images"
        return coll

    def drop_earlier(self) -> None:
        """At the end of a job that finished: an earlier run's results of kinds this job did not deliver go."""
        coll = importers.existing_job_collection(self.scene, self.job) if self.job else None
        if coll is not None:
            importers.remove_other_kinds(coll, self.delivered)

    def on_file(self, kind: str, name: str, path: str) -> None:
        """Import one downloaded file. A file that fails is named in ``failed`` and the job's other files still
        come (a deleted scene stops the job: every file would fail)."""
        self._job_dir = os.path.dirname(path) if kind != scene_io.KIND_FRAME else os.path.dirname(os.path.dirname(path))
        self.scene  # noqa: B018 - raises when the scene is gone
        try:
            self._import(kind, name, path)
        except Exception as err:  # noqa: BLE001 - one file's failure must not cost the job's other results
            self.failed[name] = str(err) or type(err).__name__
            print(f"ReconLoop: could not import {name}: {self.failed[name]}")

    def _import(self, kind: str, name: str, path: str) -> None:
        if kind == scene_io.KIND_POINTS:
            points = importers.read_points_file(path)  # read first: a file that fails leaves the earlier result
            coll = self.collection()
            importers.remove_kind(coll, kind)
            obj = importers.import_points(points, f"{self.key} points", coll)
            self.objects[kind] = obj.name
            self.delivered.add(kind)
            self.arrived.append("points")
        elif kind == scene_io.KIND_GAUSSIANS:
            gaussians = importers.read_gaussians_file(path)
            coll = self.collection()
            importers.remove_kind(coll, kind)
            obj = importers.import_gaussians(gaussians, f"{self.key} gaussians", coll)
            self.objects[kind] = obj.name
            self.delivered.add(kind)
            self.arrived.append("Gaussians")
            importers.prepare_render_for_gaussians(self.scene)
        elif kind == scene_io.KIND_FRAME:
            self.frames[scene_io.frame_number(name)] = path
            self._frames_dirty = True
        elif kind == scene_io.KIND_CAMERAS:
            with open(path, "rb") as f:
                cams = scene_io.parse_cameras_json(f.read(), name)
            coll = self.collection()
            if cams:
                importers.remove_kind(coll, kind)
                self.delivered.add(kind)
                try:  # refused (photos of several sizes): the path camera below still comes
                    importers.import_estimated_cameras(cams, self.photos, coll, self.scene)
                    self.arrived.append("cameras")
                except ReconLoopError as err:
                    self.failed[name] = str(err)
                    print(f"ReconLoop: could not import {name}: {err}")
            if self.photos:  # photo-folder mode: say which photos SfM could not place
                missing = scene_io.unregistered_photos(self.photos, cams)
                self.unregistered = scene_io.unregistered_note(missing, len(self.photos))
                _runtime().unregistered = self.unregistered
            if not self.trajectory_camera:  # the service invented the path, or a re-import: a camera on it
                with open(path, "rb") as f:
                    path_cams = scene_io.parse_trajectory_json(f.read(), name)
                if path_cams:
                    own = self._camera_it_ran_on(path_cams) if self.reimport else None
                    importers.remove_kind(coll, importers.KIND_TRAJECTORY)  # a re-import: one path camera at most
                    self.delivered.add(importers.KIND_TRAJECTORY)
                    if own is not None:  # the user's camera, unmoved: its frames are refreshed there
                        self.trajectory_camera = own.name
                    else:
                        obj = importers.import_trajectory_camera(path_cams, f"{self.key} path", coll, self.scene)
                        self.arrived.append("path camera")
                        self.trajectory_camera = obj.name
                    self.frame_range = (path_cams[0][0], path_cams[-1][0])
                    self._frames_dirty = bool(self.frames)

    def _camera_it_ran_on(self, path: list) -> bpy.types.Object | None:
        """The user's camera that shows this job's frames and still follows the job's ``path`` (the frames
        are refreshed there rather than on a second, path camera), or None."""
        for cam in importers.cameras_showing_job(self.scene, self.job) if self.job else []:
            try:
                now = dict(sample_frames(cam, self.scene, [frame for frame, _ in path]))
            except (ReconLoopError, ValueError):  # no longer a perspective camera; scaled to nothing, sheared
                continue
            if scene_io.same_path(now, path):
                return cam
        return None

    def flush(self) -> None:
        """Show newly arrived generated frames as the trajectory camera's background sequence."""
        if not self._frames_dirty or not self.frames:
            return
        self._frames_dirty = False
        cam = bpy.data.objects.get(self.trajectory_camera) if self.trajectory_camera else None
        if cam is None or cam.type != "CAMERA":
            return
        start, end = self.frame_range
        folder = os.path.join(self._job_dir, "sequence")
        first_file = importers.write_frame_sequence(self.frames, folder, start, end)
        first = min(self.frames)
        importers.set_background_sequence(cam, first_file, first, max(end, max(self.frames)) - first + 1, self.job)
        self.arrived.append("frames")


# ---------------------------------------------------------------------------------------------
# Runtime state shown in the panel


def _runtime():
    return bpy.context.window_manager.reconloop


def _show_progress(p: connection.JobProgress) -> None:
    rt = _runtime()
    rt.state, rt.stage, rt.fraction, rt.message = p.state, p.stage, max(0.0, min(1.0, p.fraction)), p.message[:1000]


def _redraw() -> None:
    wm = bpy.context.window_manager
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


def popup_error(message: str) -> None:
    """A popup with the message (UI only; reports go to the status bar and the Info log as well)."""
    if bpy.app.background:
        return
    wm = bpy.context.window_manager
    if not wm.windows:
        return

    def draw(self, _context):
        for line in message.splitlines()[:12]:
            self.layout.label(text=line)

    with bpy.context.temp_override(window=wm.windows[0]):
        wm.popup_menu(draw, title=POPUP_TITLE, icon="ERROR")


UNDO_MESSAGE = "ReconLoop results"


def push_undo(message: str = UNDO_MESSAGE) -> bool:
    """Make what the add-on just put in the scene one undo step of its own (whether a step was pushed).

    Results arrive on a timer, after the operator has returned, so Blender pushes no step for them:
    without this, Ctrl-Z would take them away together with the user's edit before, and Redo would
    bring back only that edit. A timer has no window in its context: one is given, as the UI needs.
    """
    wm = bpy.context.window_manager
    with bpy.context.temp_override(window=wm.windows[0]) if wm.windows else contextlib.nullcontext():
        if not bpy.ops.ed.undo_push.poll():  # no undo stack (e.g. undo steps set to 0)
            return False
        bpy.ops.ed.undo_push(message=message)
    return True


def _push_arrivals(importer: ResultImporter, *, ending: bool = False) -> None:
    """What arrived since the last step pushed, an undo step of its own: without it an undo of the user's
    next edit would take the results away with it, while the job still runs. Frames alone wait for the next
    object or the job's end (``ending``): one a tick would fill Blender's undo steps (32 by default) and push
    the user's own out; an undo meanwhile loses only their background, which the next frame sets again."""
    if importer.arrived and (ending or set(importer.arrived) != {"frames"}):
        push_undo(f"{UNDO_MESSAGE}: {', '.join(dict.fromkeys(importer.arrived))}")
        importer.arrived.clear()


def _stop_following(driver: connection.JobDriver) -> None:
    """Let go of a job the add-on no longer follows (an error, or the end): its half-downloaded file, the session's
    driver and importer, the running flag."""
    driver.drop_downloads()
    _runtime().is_running = False
    connection.SESSION.driver = None
    connection.SESSION.handlers.pop("importer", None)


def _finish(driver: connection.JobDriver, importer: ResultImporter) -> str | None:
    """After the last step: the error message of a failed job, or None."""
    rt = _runtime()
    importer.flush()
    if driver.progress.state == "done":  # a job cancelled or failed keeps the earlier run's results it did not replace
        importer.drop_earlier()
    _push_arrivals(importer, ending=True)
    _stop_following(driver)
    if driver.progress.state in ("failed", "interrupted"):
        rt.last_error = driver.progress.message or f"the job {driver.progress.state}"
        return f"the reconstruction {driver.progress.state}: {driver.progress.message}"
    if driver.refused:  # the job's other files came and were imported; a hostile service may name thousands
        refused = listed(list(driver.refused))
        rt.last_error = f"the service announced output files this add-on did not write: {refused}"
        return rt.last_error
    if importer.failed:  # the job's other files came and were imported
        failed = listed([f"{name}: {why}" for name, why in importer.failed.items()])
        rt.last_error = f"could not import {failed}; the job's other results were imported"
        return rt.last_error
    if importer.unregistered:
        print(f"ReconLoop: {importer.unregistered}")
    return None


def _tick():
    """The timer: one bounded step of the running job; returns the next interval, or None to stop."""
    s = connection.SESSION
    driver, importer = s.driver, s.handlers.get("importer")
    if driver is None or importer is None or s.client is None:  # stopped meanwhile
        return None
    try:
        done = driver.step(0)
        importer.flush()
    except Exception as err:  # noqa: BLE001 - one boundary: show it, stop the job's timer
        message = connection.plain_error(err, s.endpoint)
        # the job goes on there unless it ended, or the service itself is what failed (the message says so)
        if not connection.is_unreachable(err) and driver.progress.state not in ("failed", "cancelled", "interrupted"):
            note = abandoned_job_note(driver, importer, "The add-on stopped following the job")
            message = f"{message}. {note}" if note else message
        _stop_following(driver)
        _runtime().last_error = message
        print(f"ReconLoop: {message}")
        _push_arrivals(importer, ending=True)  # what arrived stays: an undo step of its own
        popup_error(message)
        _redraw()
        return None
    _push_arrivals(importer)
    _redraw()
    if done:
        message = _finish(driver, importer)
        if message:
            popup_error(message)
        return None
    return TICK_BUSY_S if driver.is_downloading else TICK_S


def begin_job(context, driver: connection.JobDriver, importer: ResultImporter) -> None:
    """Make ``driver`` the session's running job (what ``_tick`` steps and the panel shows)."""
    s = connection.SESSION
    rt = context.window_manager.reconloop
    _drop_side_requests(rt)  # the job takes the client: one request in flight per client
    rt.is_running, rt.last_error, rt.started, rt.fraction, rt.job = True, "", time.time(), 0.0, ""
    s.driver = driver
    s.handlers["importer"] = importer


def _start_job(context, driver: connection.JobDriver, importer: ResultImporter, timeout_s: float) -> str | None:
    """Run the driver: to the end here in background mode, else on the timer. Returns an error or None."""
    begin_job(context, driver, importer)
    if _background():
        try:
            connection.run_blocking(driver, timeout_s)
        except BaseException:
            _stop_following(driver)
            raise
        return _finish(driver, importer)
    if not bpy.app.timers.is_registered(_tick):
        bpy.app.timers.register(_tick, first_interval=0.0)
    return None


def _driver_hooks(driver: connection.JobDriver, importer: ResultImporter) -> None:
    printed = {"line": "", "hello": False}

    def on_progress(p):
        if driver.job and not importer.job:
            importer.job = driver.job
        if driver.job:
            _runtime().job = driver.job
        if driver.hello is not None and not printed["hello"]:  # the job's service, as Test connection shows it
            printed["hello"] = True
            _show_hello(_runtime(), driver.hello)
        _show_progress(p)
        if bpy.app.background:  # headless: a line per stage and per tenth of the way
            line = f"ReconLoop: {p.stage or p.state} {int(p.fraction * PROGRESS_LINES) * 100 // PROGRESS_LINES}%"
            if line != printed["line"]:
                printed["line"] = line
                print(f"{line} {p.message[:100]}", flush=True)

    def on_file(kind, name, path):
        importer.job = driver.job
        importer.on_file(kind, name, path)

    driver.on_progress = on_progress
    driver.on_file = on_file


def prepare_job(context, *, server: str = "", output_dir: str = "") -> tuple[connection.JobDriver, ResultImporter]:
    """Read the scene (captures, trajectory, settings) into a submit payload and a JobDriver for it."""
    scene = context.scene
    st = scene.reconloop
    photos: dict[str, str] = {}
    if st.capture_source == "COLLECTION":
        if st.captures is None:
            raise ReconLoopError("pick the collection that holds your cameras (each with its photo as background)")
        captures = read_captures(st.captures, scene)
        key = st.captures.name
        source = f"collection {key}"  # not a folder's results of the same name
    else:
        if not st.photo_folder:
            raise ReconLoopError("pick a folder of photos")
        folder = bpy.path.abspath(st.photo_folder)
        if st.trajectory_camera is not None:  # before the photos are read: known at once
            raise ReconLoopError(
                "a folder of photos has no cameras: the service places them with SfM in a frame of its own, where the "
                f"trajectory camera {st.trajectory_camera.name!r} would not be; clear the trajectory camera (the service makes a path "
                "through the photos), or use a collection of cameras with the photos as backgrounds"
            )
        captures = scene_io.captures_from_folder(folder)
        photos = {c.name: c.path for c in captures}  # the files read, not a sidecar of the same stem
        source = os.path.normpath(folder)
        key = os.path.basename(source)
    trajectory = []
    start, end, step = st.frame_range(scene)
    cam = st.trajectory_camera
    if cam is not None:
        trajectory = sample_trajectory(cam, scene, start, end, step)
        scene_io.check_trajectory_moves(trajectory, cam.name)
    payload = scene_io.build_scene_payload(captures, trajectory, st.job_settings())
    cfg = preferences.connection_config(context, server=server)
    client, service = connection.connect(cfg)
    out_root = os.path.join(preferences.results_dir(context, output_dir), _safe_name(key))
    driver = connection.JobDriver(client, out_root, scene=payload, service=service)
    importer = ResultImporter(scene.name, key, cam.name if cam is not None else "", (start, end), photos, source=source)
    context.window_manager.reconloop.unregistered = ""
    _driver_hooks(driver, importer)
    return driver, importer


# ---------------------------------------------------------------------------------------------
# Operators

NO_TRAJECTORY_WARNING = (
    "no trajectory camera: the service invents a path around the captures; pick an animated camera "
    "under Trajectory to choose the views"
)


class RECONLOOP_OT_reconstruct(bpy.types.Operator):
    """Send the captures and the trajectory to the ReconLoop service and import what comes back"""

    bl_idname = "reconloop.reconstruct"
    bl_label = "Reconstruct"
    bl_options = {"REGISTER"}

    server: _server_property()
    output_dir: _output_dir_property()
    timeout_s: bpy.props.FloatProperty(
        name="Timeout (s)", description="Background mode: cancel after this long", default=DEFAULT_TIMEOUT_S, min=1.0
    )

    @classmethod
    def poll(cls, context):
        return connection.SESSION.driver is None

    def execute(self, context):
        try:
            error = self._run(context)
        except Exception as err:  # noqa: BLE001 - the operator is the boundary
            error = connection.plain_error(err, connection.SESSION.endpoint)
        if error:
            context.window_manager.reconloop.last_error = error
            self.report({"ERROR"}, error)
            popup_error(error)
            return {"CANCELLED"}
        if context.scene.reconloop.trajectory_camera is None:
            self.report({"WARNING"}, NO_TRAJECTORY_WARNING)
        if _background():
            self.report({"INFO"}, f"ReconLoop job {context.window_manager.reconloop.job} finished")
        return {"FINISHED"}

    def _run(self, context) -> str | None:
        driver, importer = prepare_job(context, server=self.server, output_dir=self.output_dir)
        return _start_job(context, driver, importer, self.timeout_s)


class RECONLOOP_OT_cancel(bpy.types.Operator):
    """Cancel the running reconstruction (what has arrived stays in the scene)"""

    bl_idname = "reconloop.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return connection.SESSION.driver is not None

    def execute(self, context):
        driver = connection.SESSION.driver
        if not driver.submitted:  # nothing sent yet: just stop
            connection.SESSION.driver = None
            context.window_manager.reconloop.is_running = False
        else:
            driver.cancel()  # the running timer sends it (never waiting here for the service)
        self.report({"INFO"}, "cancelling the job")
        return {"FINISHED"}


# Test connection, Refresh jobs and Delete job: requests of the sidebar's own ("side requests"), in the UI
# sent at once and answered on a timer. The session's client has one request in flight at a time (a reply
# to another is dropped as stale, and its request waits out its timeout), so a side request is refused
# while a job runs or while another side request waits, and a job that starts drops them.


@dataclass(frozen=True)
class SideRequest:
    """One kind of side request, by its ``SESSION.handlers`` key in ``SIDE``."""

    operator: str  # its button, as the user knows it
    then: str  # what the user may do later, when the client is busy
    note: str  # the runtime property that shows it waiting
    waiting: str  # what that note says meanwhile
    show: Callable[[Any, dict], None]  # show(rt, reply): the reply into the sidebar
    tick: Callable[[], float | None]  # its timer in the UI (a timer is one function)


def client_busy(key: str) -> str | None:
    """Why the side request ``key`` cannot be sent now (saying when to try again), or None."""
    then = SIDE[key].then
    s = connection.SESSION
    if s.driver is not None:
        return f"a job is running: its status is shown in the panel; {then} once it has ended"
    for other, side in SIDE.items():
        request = s.handlers.get(other)
        if other != key and request is not None and request.client is s.client:
            return f"{side.operator} is waiting for the service: {then} once it has answered"
    return None


def _drop_side_requests(rt) -> None:
    s = connection.SESSION
    for key, side in SIDE.items():
        if s.handlers.pop(key, None) is not None:
            setattr(rt, side.note, "")


def _show_hello(rt, reply: dict) -> None:
    props.set_generators(reply.get("generators") or [])
    rt.hello_summary = connection.describe_hello(reply)


def _show_jobs(rt, reply: dict) -> None:
    rt.jobs.clear()
    for j in reversed(reply["jobs"]):  # newest first
        item = rt.jobs.add()
        item.job, item.state, item.stage = j["job"], j["state"], j["stage"]
        item.message, item.created = j["message"][:500], j["created"]


def _forget_job(rt, reply: dict) -> None:
    """A job the service deleted (or no longer has: ``reply["gone"]``) leaves the list; the selection stays
    on the job it was on."""
    index = next((i for i, item in enumerate(rt.jobs) if item.job == reply["job"]), None)
    if index is not None:
        rt.jobs.remove(index)
        if index < rt.jobs_index or rt.jobs_index >= len(rt.jobs):
            rt.jobs_index -= 1


def _deleted(rt, reply: dict) -> str:
    what = (
        "was not on the service (deleted already, or no such job)" if reply.get("gone") else "deleted from the service"
    )
    return f"job {reply['job'][:8]} {what}"


def _side_tick(key: str) -> float | None:
    """One look for the reply of the side request ``key``, never waiting: the timer's next interval,
    or None once it has ended (its ``show`` takes the reply; an error goes to a popup)."""
    s = connection.SESSION
    request = s.handlers.get(key)
    if request is None or s.client is None or request.client is not s.client:  # stopped or reconnected meanwhile
        s.handlers.pop(key, None)
        return None
    rt = _runtime()
    side = SIDE[key]
    try:
        reply = request.poll(0)
    except Exception as err:  # noqa: BLE001
        s.handlers.pop(key, None)
        setattr(rt, side.note, "")
        message = connection.plain_error(err, s.endpoint)
        rt.last_error = message
        popup_error(message)
        _redraw()
        return None
    if reply is None:
        setattr(rt, side.note, request.waiting_text() if request.waited_s >= 1.0 else side.waiting)
        _redraw()
        return TICK_S
    s.handlers.pop(key, None)
    setattr(rt, side.note, "")
    side.show(rt, reply)
    _redraw()
    return None


def _probe_tick():
    """Timer for Test connection in the UI: one look for the hello reply per tick, never waiting."""
    return _side_tick("probe")


def _jobs_tick():
    """Timer for Refresh jobs in the UI: one look for the jobs reply per tick, never waiting."""
    return _side_tick("jobs")


def _delete_tick():
    """Timer for Delete job in the UI: one look for the delete reply per tick, never waiting."""
    return _side_tick("delete")


SIDE = {
    "probe": SideRequest(
        "Test connection", "test the connection", "hello_summary", "connecting...", _show_hello, _probe_tick
    ),
    "jobs": SideRequest("Refresh jobs", "refresh the jobs", "jobs_note", "listing the jobs...", _show_jobs, _jobs_tick),
    "delete": SideRequest(
        "Delete job", "delete the job", "jobs_note", "deleting the job...", _forget_job, _delete_tick
    ),
}


def send_side_request(op, context, key: str, make, *, done=None, popup: bool = False) -> set[str]:
    """What an operator with the side request ``key`` does: refused while the client is busy; in
    background mode it waits for the reply and shows it, in the UI its timer takes the reply.

    Args:
        op: the operator (its ``server`` and ``report``).
        make: ``make(client, service)`` -> the ``connection.ServiceRequest`` to send.
        done: ``done(rt, reply)`` -> a line to report once a background request is answered.
        popup: also show an error in a popup (besides the report).
    """
    side = SIDE[key]
    busy = client_busy(key)
    if busy:
        op.report({"WARNING"}, busy)
        return {"CANCELLED"}
    rt = context.window_manager.reconloop
    try:
        cfg = preferences.connection_config(context, server=op.server)
        request = make(*connection.connect(cfg))
        if _background():
            reply = connection.wait_for(request)
            side.show(rt, reply)
            if done is not None:
                op.report({"INFO"}, done(rt, reply))
            return {"FINISHED"}
    except Exception as err:  # noqa: BLE001
        message = connection.plain_error(err, connection.SESSION.endpoint)
        op.report({"ERROR"}, message)
        if popup:
            popup_error(message)
        return {"CANCELLED"}
    connection.SESSION.handlers[key] = request
    setattr(rt, side.note, side.waiting)
    if not bpy.app.timers.is_registered(side.tick):
        bpy.app.timers.register(side.tick, first_interval=0.0)
    return {"FINISHED"}


class RECONLOOP_OT_test_connection(bpy.types.Operator):
    """Connect to the service (starting the local one if needed) and show what it offers"""

    bl_idname = "reconloop.test_connection"
    bl_label = "Test connection"

    server: _server_property()

    def execute(self, context):
        return send_side_request(
            self, context, "probe", connection.HelloProbe, done=lambda rt, reply: rt.hello_summary, popup=True
        )


class RECONLOOP_OT_stop_service(bpy.types.Operator):
    """Stop the local service this add-on started, and close the connection"""

    bl_idname = "reconloop.stop_service"
    bl_label = "Stop service"

    def execute(self, context):
        s = connection.SESSION
        # A running job is left on the service, never cancelled: a remote one goes on and is imported from
        # Past jobs; a local one ends with the service (its process is stopped). Either way the user is told.
        local = s.service is not None
        why = "Stop service stopped the local service" if local else "Stop service closed the connection"
        importer = s.handlers.get("importer")
        note = abandoned_job_note(s.driver, importer, why, service_stopped=local)
        if s.driver is not None and importer is not None:
            _push_arrivals(importer, ending=True)  # what arrived stays: an undo step of its own
        stop_timers()
        connection.close()  # asks (or terminates) and returns; the process's exit is awaited off this thread
        rt = context.window_manager.reconloop
        rt.hello_summary, rt.jobs_note, rt.is_running = "", "", False
        if note:
            rt.last_error = note
            self.report({"WARNING"}, note)
        return {"FINISHED"}


class RECONLOOP_OT_refresh_jobs(bpy.types.Operator):
    """List the jobs the service has kept"""

    bl_idname = "reconloop.refresh_jobs"
    bl_label = "Refresh jobs"

    server: _server_property()

    def execute(self, context):
        return send_side_request(self, context, "jobs", connection.JobsRequest)


def _picked_job(op, rt) -> str:
    """The job Import job or Delete job acts on: its ``job`` option, else the row selected under Past jobs
    ("" when none is)."""
    return op.job or (rt.jobs[rt.jobs_index].job if 0 <= rt.jobs_index < len(rt.jobs) else "")


class RECONLOOP_OT_import_job(bpy.types.Operator):
    """Download a past job's results again and import them"""

    bl_idname = "reconloop.import_job"
    bl_label = "Import job"

    job: bpy.props.StringProperty(name="Job")
    server: _server_property()
    output_dir: _output_dir_property()
    timeout_s: bpy.props.FloatProperty(
        name="Timeout (s)", description="Background mode: give up after this long", default=DEFAULT_TIMEOUT_S, min=1.0
    )

    @classmethod
    def poll(cls, context):
        return connection.SESSION.driver is None

    def execute(self, context):
        rt = context.window_manager.reconloop
        job = _picked_job(self, rt)
        try:
            if not job:
                raise ReconLoopError("pick a job in the list first")
            state = next((j.state for j in rt.jobs if j.job == job), "done")
            if state != "done":
                raise ReconLoopError(f"job {job[:8]} is {state}: its results can be imported when it is done")
            cfg = preferences.connection_config(context, server=self.server)
            client, service = connection.connect(cfg)
            key = f"job {job[:8]}"
            out_root = os.path.join(preferences.results_dir(context, self.output_dir), "jobs")
            driver = connection.JobDriver(client, out_root, job=job, service=service)
            # The job's own path, not the sidebar's Trajectory of today: its cameras.json makes a camera
            # on the path the frames were generated from, and sets their frame range.
            scene = context.scene
            importer = ResultImporter(scene.name, key, "", (scene.frame_start, scene.frame_end), reimport=True)
            importer.job = job
            _driver_hooks(driver, importer)
            error = _start_job(context, driver, importer, self.timeout_s)
        except Exception as err:  # noqa: BLE001
            error = connection.plain_error(err, connection.SESSION.endpoint)
        if error:
            self.report({"ERROR"}, error)
            popup_error(error)
            return {"CANCELLED"}
        return {"FINISHED"}


class RECONLOOP_OT_delete_job(bpy.types.Operator):
    """Delete a past job and its files from the service (an ended one; what was imported stays in the scene)"""

    bl_idname = "reconloop.delete_job"
    bl_label = "Delete job"

    job: bpy.props.StringProperty(name="Job")
    server: _server_property()

    def invoke(self, context, event):
        job = _picked_job(self, context.window_manager.reconloop)
        if not job:
            self.report({"ERROR"}, "pick a job in the list first")
            return {"CANCELLED"}
        return context.window_manager.invoke_confirm(
            self,
            event,
            title="Delete job",
            message=f"Delete job {job[:8]} and its files from the service? What was imported stays in the scene.",
            confirm_text="Delete",
            icon="WARNING",
        )

    def execute(self, context):
        rt = context.window_manager.reconloop
        job = _picked_job(self, rt)
        state = next((j.state for j in rt.jobs if j.job == job), "")
        if not job:
            self.report({"ERROR"}, "pick a job in the list first")
            return {"CANCELLED"}
        if state and state not in TERMINAL_STATES:
            self.report({"ERROR"}, f"job {job[:8]} is {state}: it can be deleted once it has ended")
            return {"CANCELLED"}

        def make(client, service):
            return connection.DeleteRequest(client, job, service)

        return send_side_request(self, context, "delete", make, done=_deleted, popup=True)


class _ImportPly(ImportHelper):
    filename_ext = ".ply"
    filter_glob: bpy.props.StringProperty(default="*.ply", options={"HIDDEN"})

    def execute(self, context):
        name = os.path.splitext(os.path.basename(self.filepath))[0]
        scene = context.scene
        # this scene's (another scene's would bring that scene's imports into this one)
        coll = next((c for c in scene.collection.children_recursive if c.get(IMPORTS_KEY)), None)
        if coll is None:  # a file of an earlier version: the collection by name, where it is in this scene
            coll = next((c for c in scene.collection.children_recursive if c.name == IMPORTS_COLLECTION), None)
        made = coll is None
        if made:
            coll = bpy.data.collections.new(IMPORTS_COLLECTION)
            coll[IMPORTS_KEY] = True
            scene.collection.children.link(coll)
        try:
            obj = self.importer(bpy.path.abspath(self.filepath), name, coll)
        except ReconLoopError as err:
            if made:  # a file that cannot be read leaves nothing behind (no undo step is pushed for it)
                bpy.data.collections.remove(coll)
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        if getattr(self, "as_fitted", None) is not None:
            importers.prepare_render_for_gaussians(context.scene, as_fitted=self.as_fitted)
        self.report({"INFO"}, f"imported {len(obj.data.vertices):,} {self.what} as {obj.name!r}")
        return {"FINISHED"}


class RECONLOOP_OT_import_gaussians(bpy.types.Operator, _ImportPly):
    """Import a 3D Gaussian splat .ply (INRIA layout) as a Gaussians object"""

    bl_idname = "reconloop.import_gaussians"
    bl_label = "Import Gaussians (.ply)"
    bl_options = {"REGISTER", "UNDO"}
    what = "Gaussians"
    importer = staticmethod(importers.import_gaussians_ply)
    as_fitted: bpy.props.BoolProperty(
        name="Colours as fitted",
        description="Blend the splats on their fitted sRGB values and show the scene with the Raw view "
        "transform, as the service renders them (other objects look darker); off: linear blending, Standard view",
        default=True,
    )


class RECONLOOP_OT_import_points(bpy.types.Operator, _ImportPly):
    """Import a point cloud .ply (x y z, red green blue, optional confidence and source)"""

    bl_idname = "reconloop.import_points"
    bl_label = "Import point cloud (.ply)"
    bl_options = {"REGISTER", "UNDO"}
    what = "points"
    importer = staticmethod(importers.import_points_ply)


class RECONLOOP_OT_import_dataset(bpy.types.Operator, ImportHelper):
    """Import a dataset's cameras with their photos (scene.json, COLMAP, LLFF, NeRF, DTU, Middlebury)"""

    bl_idname = "reconloop.import_dataset"
    bl_label = "Import ReconLoop scene"
    bl_options = {"REGISTER", "UNDO"}

    filename_ext = ""
    filter_glob: bpy.props.StringProperty(default="*.json;*.txt;*.bin;*.npy;*.npz", options={"HIDDEN"})
    directory: bpy.props.StringProperty(subtype="DIR_PATH", options={"HIDDEN"})
    format: bpy.props.EnumProperty(
        name="Format",
        items=[(f, f.capitalize() if f != "colmap" else "COLMAP", f"read as {f}") for f in datasets.IMPORT_FORMATS],
        default=datasets.FORMAT_AUTO,
    )
    heldout: bpy.props.BoolProperty(name="Held-out views", description="Also import the held-out views", default=False)

    def execute(self, context):
        path = self.filepath if os.path.isfile(self.filepath) else (self.directory or self.filepath)
        try:
            coll = datasets.import_dataset(context.scene, path, self.format, heldout=self.heldout)
        except ReconLoopError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        n = sum(1 for o in coll.objects if o.type == "CAMERA")
        self.report({"INFO"}, f"imported {n} cameras with photos into {coll.name!r}")
        return {"FINISHED"}


class RECONLOOP_OT_export_dataset(bpy.types.Operator, ExportHelper):
    """Export the captures (and the trajectory) as scene.json, a COLMAP text model or transforms.json"""

    bl_idname = "reconloop.export_dataset"
    bl_label = "Export ReconLoop scene"

    filename_ext = ""
    use_filter_folder = True
    format: bpy.props.EnumProperty(
        name="Format",
        items=[
            ("scene", "scene.json", "ReconLoop scene folder (captures and trajectory)"),
            ("colmap", "COLMAP text", "cameras.txt, images.txt, points3D.txt"),
            ("nerf", "transforms.json", "NeRF / instant-ngp cameras"),
        ],
        default="scene",
    )

    def execute(self, context):
        st = context.scene.reconloop
        try:
            if st.captures is None:
                raise ReconLoopError("pick the captures' collection in the ReconLoop sidebar first")
            dst = os.path.splitext(self.filepath)[0] if not os.path.isdir(self.filepath) else self.filepath
            path = datasets.export_dataset(context.scene, st.captures, dst, self.format, st.trajectory_camera)
        except ReconLoopError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        self.report({"INFO"}, f"wrote {path}")
        return {"FINISHED"}


def _menu_import(self, context):
    self.layout.operator(RECONLOOP_OT_import_dataset.bl_idname, text="ReconLoop scene (cameras + photos)")
    self.layout.operator(RECONLOOP_OT_import_gaussians.bl_idname, text="ReconLoop Gaussians (.ply)")
    self.layout.operator(RECONLOOP_OT_import_points.bl_idname, text="ReconLoop point cloud (.ply)")


def _menu_export(self, context):
    self.layout.operator(RECONLOOP_OT_export_dataset.bl_idname, text="ReconLoop scene (cameras + photos)")


def register_menus() -> None:
    bpy.types.TOPBAR_MT_file_import.append(_menu_import)
    bpy.types.TOPBAR_MT_file_export.append(_menu_export)


def unregister_menus() -> None:
    bpy.types.TOPBAR_MT_file_export.remove(_menu_export)
    bpy.types.TOPBAR_MT_file_import.remove(_menu_import)


def stop_timers() -> None:
    for fn in (_tick, *(side.tick for side in SIDE.values())):
        if bpy.app.timers.is_registered(fn):
            bpy.app.timers.unregister(fn)


def abandoned_job_note(driver, importer, why: str, *, service_stopped: bool = False) -> str:
    """What the sidebar says about a job it stops following (Stop service, another file opened), or "".

    Args:
        why: what happened, as the sentence's start ("Stop service closed the connection").
        service_stopped: the job's service itself was stopped (the local one), so the job ends with it.
    """
    if driver is None or not driver.submitted:
        return ""  # nothing reached the service
    job = driver.job[:8] if driver.job else ""
    if getattr(importer, "reimport", False) or driver.progress.state == "done":
        return f"{why} before the results of job {job} were all downloaded: import it again from Past jobs"
    if service_stopped:
        what = f"job {job} was interrupted" if job else "the job being sent was stopped"
        return f"{why}: {what}; click Reconstruct to run it again"
    if not job:
        return (
            f"{why} while the job was being sent: if the service got it, it keeps running there; "
            "Refresh jobs under Past jobs to find it and import it once it is done"
        )
    return f"{why}: job {job} keeps running on the service; import it from Past jobs (Refresh jobs) once it is done"


# what load_pre let go of, until the file opens (load_post: its sidebar shows the note) or fails to
# (load_post_fail: the file still open takes its job and side requests back)
_CARRIED: dict = {"note": "", "driver": None, "handlers": {}}


def _take_carried() -> tuple[str, Any, dict]:
    """What load_pre let go of (note, driver, SESSION.handlers), now no longer carried."""
    out = _CARRIED["note"], _CARRIED["driver"], _CARRIED["handlers"]
    _CARRIED.update(note="", driver=None, handlers={})
    return out


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    """Another .blend is opening: stop importing into the old one (the job stays on the service,
    listed under Past jobs for re-import); the sidebar of the new file says so (``_on_load_post``)."""
    s = connection.SESSION
    handlers = {key: s.handlers.pop(key) for key in ("importer", *SIDE) if key in s.handlers}
    note = abandoned_job_note(s.driver, handlers.get("importer"), "Another file was opened")
    _CARRIED.update(note=note, driver=s.driver, handlers=handlers)
    s.driver = None
    stop_timers()


@bpy.app.handlers.persistent
def _on_load_post(*_args) -> None:
    """The file is open (with a fresh sidebar state): show what load_pre said about the job left behind; its
    half-downloaded file goes (Import job downloads the job's files again)."""
    note, driver, _ = _take_carried()
    if driver is not None:
        driver.drop_downloads()
    if note:
        print(f"ReconLoop: {note}")
        bpy.context.window_manager.reconloop.last_error = note


@bpy.app.handlers.persistent
def _on_load_post_fail(*_args) -> None:
    """The file did not open, and the one open before stays: it takes back the job and the side requests
    load_pre let go of (its sidebar still shows them), and no note is left for the next file that opens."""
    s = connection.SESSION
    note, driver, handlers = _take_carried()
    rt = bpy.context.window_manager.reconloop
    for key, request in handlers.items():
        if key not in SIDE:
            continue
        if s.client is not None and request.client is s.client:
            s.handlers[key] = request
            if not bpy.app.timers.is_registered(SIDE[key].tick):
                bpy.app.timers.register(SIDE[key].tick, first_interval=0.0)
        else:
            setattr(rt, SIDE[key].note, "")
    if driver is None:
        return
    if s.client is None or driver.client is not s.client:  # the connection changed meanwhile: as if left
        driver.drop_downloads()
        rt.is_running = False
        rt.last_error = note
        return
    s.driver = driver
    if "importer" in handlers:
        s.handlers["importer"] = handlers["importer"]
    if not bpy.app.timers.is_registered(_tick):
        bpy.app.timers.register(_tick, first_interval=0.0)


_HANDLERS = (("load_pre", _on_load_pre), ("load_post", _on_load_post), ("load_post_fail", _on_load_post_fail))


def register_handlers() -> None:
    for name, fn in _HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if fn not in handlers:
            handlers.append(fn)


def unregister_handlers() -> None:
    _take_carried()  # disabled between a load's pre and post: nothing carried to a later file
    for name, fn in _HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if fn in handlers:
            handlers.remove(fn)


CLASSES = (
    RECONLOOP_OT_reconstruct,
    RECONLOOP_OT_cancel,
    RECONLOOP_OT_test_connection,
    RECONLOOP_OT_stop_service,
    RECONLOOP_OT_refresh_jobs,
    RECONLOOP_OT_import_job,
    RECONLOOP_OT_delete_job,
    RECONLOOP_OT_import_gaussians,
    RECONLOOP_OT_import_points,
    RECONLOOP_OT_import_dataset,
    RECONLOOP_OT_export_dataset,
)
