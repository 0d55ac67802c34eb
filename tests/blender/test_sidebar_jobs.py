"""A job's results in the scene as a user meets them: undo after they arrive, Import job of a past job
(its own path, no second copy, from the server a script names), a trajectory camera that does not move,
a job left running by Stop service or by opening another file, and the service shown after a job.

A real service runs in this process on loopback with a small runner that writes what the loop writes
(a point cloud, Gaussians, one frame per trajectory frame, cameras.json), in milliseconds.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import numpy as np
import pytest

from blender_addon import connection, importers, operators, panels, preferences
from protocol.ply import GaussianArrays, PointArrays, write_gaussians_ply, write_points_ply

from ._layout import RecordingLayout, draw
from ._plys import write_blank_points
from ._temple import COLLECTION, build_temple_scene

HOLD = "hold"  # the prompt of a job that waits for RELEASE before its last files (a job still running)
RELEASE = threading.Event()
HOLD_S = 60.0
JOB_TIMEOUT_S = 60.0


def _png(seed: int) -> bytes:
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def results_runner(scene, out_dir: Path, *, device, progress):
    """Writes and announces the files of a loop job: points, frames, Gaussians, cameras.json (the
    trajectory sent, or the capture cameras as frames 1..n when none was sent: an invented path)."""
    from backend.progress import ProgressEvent

    rng = np.random.default_rng(0)
    n = 50
    write_points_ply(
        out_dir / "points.ply",
        PointArrays(
            xyz=rng.normal(scale=0.05, size=(n, 3)).astype(np.float32),
            rgb=rng.integers(0, 256, (n, 3), dtype=np.uint8),
            confidence=rng.uniform(size=n).astype(np.float32),
            source=np.zeros(n, np.int32),
        ),
    )
    progress(ProgressEvent("memory", 0.2, "points", ("points.ply",)))
    if scene.settings.prompt == HOLD:
        deadline = time.monotonic() + HOLD_S
        while not RELEASE.wait(0.05) and time.monotonic() < deadline:
            progress(ProgressEvent("generate", 0.3, "holding"))
    path = [(t.frame, t.camera) for t in scene.trajectory] or [(i + 1, c.camera) for i, c in enumerate(scene.captures)]
    (out_dir / "frames").mkdir()
    names = []
    for frame, _ in path:
        names.append(f"frames/frame_{frame:06d}.png")
        (out_dir / names[-1]).write_bytes(_png(frame))
    progress(ProgressEvent("generate", 0.6, "frames", tuple(names)))
    write_gaussians_ply(
        out_dir / "gaussians.ply",
        GaussianArrays(
            means=rng.normal(scale=0.05, size=(n, 3)).astype(np.float32),
            log_scales=np.full((n, 3), -5.0, np.float32),
            quats=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
            opacity_logits=np.zeros(n, np.float32),
            sh=rng.normal(scale=0.3, size=(n, 16, 3)).astype(np.float32),
        ),
    )
    doc = {
        "captures": [
            {"name": c.name, "image": c.image.name, "camera": c.camera.to_json(), "estimated": False}
            for c in scene.captures
        ],
        "trajectory": [{"frame": f, "camera": cam.to_json()} for f, cam in path],
    }
    (out_dir / "cameras.json").write_text(json.dumps(doc))
    progress(ProgressEvent("fit", 0.9, "gaussians", ("gaussians.ply", "cameras.json")))


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    from backend.service import Service, ServiceConfig

    svc = Service(
        ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=tmp_path_factory.mktemp("jobs"), device="cpu"),
        runner=results_runner,
    )
    thread = svc.start_thread()
    yield svc.endpoint
    RELEASE.set()
    svc.stop()
    thread.join(20)


@pytest.fixture
def registered(registered):
    """conftest's, with the runner held until the test releases it (and released before unregistering)."""
    RELEASE.clear()
    yield
    RELEASE.set()


@pytest.fixture
def ui(monkeypatch):
    """The UI's path: operators return at once and the timer callbacks (called here) drive the job."""
    monkeypatch.setattr(operators, "_background", lambda: False)


def _tick_until(done, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if operators._tick() is None:
            return
        assert time.monotonic() < deadline, bpy.context.window_manager.reconloop.message
        time.sleep(0.01)


def _draw(panel_cls) -> RecordingLayout:
    return draw(panel_cls, bpy.context)


def _labels(panel_cls) -> list[str]:
    return [e[1] for e in _draw(panel_cls).log if e[0] == "label"]


def _names() -> list[str]:
    return sorted(o.name for o in bpy.data.objects)


def _results() -> list[str]:
    return [n for n in _names() if n.startswith(COLLECTION)]


def _job_collections(job: str) -> list[bpy.types.Collection]:
    return [c for c in bpy.data.collections if c.get(importers.COLLECTION_JOB) == job]


def _frame_backgrounds(obj) -> list[tuple[int, int]]:
    return [
        (bg.image_user.frame_start, bg.image_user.frame_duration)
        for bg in obj.data.background_images
        if bg.image is not None and bg.image.source == "SEQUENCE"
    ]


def _user_edit() -> None:
    bpy.ops.ed.undo_push(message="scene built")
    bpy.ops.mesh.primitive_cube_add(location=(3, 0, 0))
    bpy.context.active_object.name = "UserEdit"
    bpy.ops.ed.undo_push(message="user adds a cube")


# -- 1: undo ------------------------------------------------------------------------------------


def test_undo_after_the_results_arrive_takes_only_the_results(registered, endpoint, temple_dir, tmp_path):
    """Results come after the operator returned (on a timer in the UI): an undo step of their own, so
    Ctrl-Z takes away the results and keeps the edit before them, and Redo brings them back."""
    build_temple_scene(temple_dir, ids=(0, 8))
    _user_edit()
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(tmp_path)) == {"FINISHED"}
    assert _results() == [f"{COLLECTION} gaussians", f"{COLLECTION} points"]
    bpy.ops.ed.undo()
    assert "UserEdit" in _names() and _results() == []
    bpy.ops.ed.redo()
    assert "UserEdit" in _names() and len(_results()) == 2


def test_undo_after_results_that_came_on_the_timer(registered, ui, endpoint, temple_dir, tmp_path):
    build_temple_scene(temple_dir, ids=(0, 8))
    _user_edit()
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(tmp_path)) == {"FINISHED"}
    assert bpy.context.window_manager.reconloop.is_running
    _tick_until(lambda: False)
    assert len(_results()) == 2 and bpy.context.scene.view_settings.view_transform == "Raw"
    # each tick's arrivals an undo step of their own (the points while the job ran, then the rest): undone one
    # by one, never the user's edit with them
    undone = []
    while _results():
        assert "UserEdit" in _names() and len(undone) < 4, undone  # points, Gaussians, the frames at the end
        undone.append(_results())
        bpy.ops.ed.undo()
    assert "UserEdit" in _names() and undone[-1] == [f"{COLLECTION} points"], undone
    for _ in undone:
        bpy.ops.ed.redo()
    assert "UserEdit" in _names() and len(_results()) == 2
    assert bpy.context.scene.view_settings.view_transform == "Raw"


# -- 2, 4, 5: Import job ------------------------------------------------------------------------


def test_import_job_uses_the_jobs_own_path_and_no_second_copy(registered, endpoint, temple_dir, tmp_path):
    """A past job's frames go back behind the camera the job ran on while that camera still follows the
    job's path (cameras.json), else behind a camera on that path, whatever the sidebar's Trajectory is now;
    a job already in the scene (also after reopening the file) is refreshed where it is."""
    made = build_temple_scene(temple_dir, ids=(0, 8))  # Trajectory keyed at frames 1 and 3
    scene = bpy.context.scene
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(tmp_path)) == {"FINISHED"}
    job = bpy.context.window_manager.reconloop.job
    assert _frame_backgrounds(made["trajectory"]) == [(1, 3)]
    # The user moves on: another camera under Trajectory, the scene's range 1-250, and reopens the file.
    still = bpy.data.objects.new("Still", bpy.data.cameras.new("Still"))
    scene.collection.objects.link(still)
    scene.reconloop.trajectory_camera = still
    scene.frame_start, scene.frame_end = 1, 250
    blend = tmp_path / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    bpy.ops.wm.open_mainfile(filepath=str(blend))

    def reimport() -> bpy.types.Collection:
        assert bpy.ops.reconloop.import_job(job=job, server=endpoint, output_dir=str(tmp_path)) == {"FINISHED"}
        assert _frame_backgrounds(bpy.data.objects["Still"]) == []
        (coll,) = _job_collections(job)
        assert coll.name == f"ReconLoop {COLLECTION}" and f"ReconLoop job {job[:8]}" not in bpy.data.collections
        return coll

    for _ in range(2):  # twice: the second import refreshes the first; the Trajectory camera has not moved
        coll = reimport()
        assert sorted(o.get(importers.OBJECT_KIND) for o in coll.objects) == ["gaussians", "points"]
        assert _frame_backgrounds(bpy.data.objects["Trajectory"]) == [(1, 3)]
        assert _results() == [f"{COLLECTION} gaussians", f"{COLLECTION} points"]
    # The camera the job ran on is moved, or made orthographic: the frames go behind a camera on the job's
    # path instead; moved back, the path camera goes again.
    trajectory = bpy.data.objects["Trajectory"]
    bpy.context.scene.frame_set(3)  # the file was reopened: a new scene
    trajectory.location.x += 0.5
    trajectory.keyframe_insert("location", frame=3)

    def on_the_path_camera() -> None:
        coll = reimport()
        kinds = sorted(o.get(importers.OBJECT_KIND) for o in coll.objects)
        assert kinds == ["gaussians", "points", importers.KIND_TRAJECTORY], kinds
        (path,) = [o for o in coll.objects if o.get(importers.OBJECT_KIND) == importers.KIND_TRAJECTORY]
        assert _frame_backgrounds(path) == [(1, 3)]
        assert _results() == [f"{COLLECTION} gaussians", f"{COLLECTION} path", f"{COLLECTION} points"]

    on_the_path_camera()
    on_the_path_camera()
    trajectory.location.x -= 0.5
    trajectory.keyframe_insert("location", frame=3)
    trajectory.data.type = "ORTHO"
    on_the_path_camera()
    trajectory.data.type = "PERSP"
    coll = reimport()
    assert sorted(o.get(importers.OBJECT_KIND) for o in coll.objects) == ["gaussians", "points"]
    assert _frame_backgrounds(trajectory) == [(1, 3)]


def test_import_job_takes_the_server_and_results_folder_a_script_gives(registered, endpoint, temple_dir, tmp_path):
    """As reconstruct and refresh_jobs do: the preferences' local backend (which cannot start a service
    here) is not used when a script names the server."""
    build_temple_scene(temple_dir, ids=(0, 8))
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(tmp_path / "a")) == {"FINISHED"}
    job = bpy.context.window_manager.reconloop.job
    assert preferences.connection_config(bpy.context).mode == "local"  # what import_job used to connect to
    connection.close()
    bpy.ops.wm.read_homefile(app_template="")
    out = tmp_path / "b"
    assert bpy.ops.reconloop.import_job(job=job, server=endpoint, output_dir=str(out)) == {"FINISHED"}
    assert connection.SESSION.endpoint == endpoint
    assert (out / "jobs" / job / "gaussians.ply").is_file()
    (coll,) = _job_collections(job)
    assert coll.name == f"ReconLoop job {job[:8]}"
    assert {o.get(importers.OBJECT_KIND) for o in coll.objects} == {"points", "gaussians", importers.KIND_TRAJECTORY}


def test_delete_job_removes_an_ended_job_from_the_service_and_the_list(registered, endpoint, temple_dir, tmp_path):
    """Past jobs offers Delete for an ended job only; the service forgets it, the list drops it, and the
    objects already imported stay in the scene."""
    from protocol.client import Client

    build_temple_scene(temple_dir, ids=(0, 8))
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(tmp_path)) == {"FINISHED"}
    rt = bpy.context.window_manager.reconloop
    job = rt.job
    assert bpy.ops.reconloop.refresh_jobs(server=endpoint) == {"FINISHED"}
    rt.jobs_index = [j.job for j in rt.jobs].index(job)
    operators_drawn = [e[1] for e in _draw(panels.RECONLOOP_PT_jobs).log if e[0] == "operator"]
    assert operators_drawn == ["reconloop.refresh_jobs", "reconloop.import_job", "reconloop.delete_job"]
    rt.jobs[rt.jobs_index].state = "running"  # as a job still running is listed: no Delete, and refused
    assert "reconloop.delete_job" not in [e[1] for e in _draw(panels.RECONLOOP_PT_jobs).log if e[0] == "operator"]
    with pytest.raises(RuntimeError, match=rf"job {job[:8]} is running: it can be deleted once it has ended"):
        bpy.ops.reconloop.delete_job(job=job, server=endpoint)
    rt.jobs[rt.jobs_index].state = "done"
    results = _results()
    assert bpy.ops.reconloop.delete_job(job=job, server=endpoint) == {"FINISHED"}
    assert job not in [j.job for j in rt.jobs] and _results() == results
    with Client(endpoint) as c:
        assert job not in [j["job"] for j in c.jobs()]
    # deleted already (here, or by a first try whose reply was lost): gone, not an error
    assert bpy.ops.reconloop.delete_job(job=job, server=endpoint) == {"FINISHED"}
    assert (
        operators._deleted(rt, {"job": job, "gone": True})
        == f"job {job[:8]} was not on the service (deleted already, or no such job)"
    )


def test_delete_job_in_the_ui_returns_at_once_and_a_timer_takes_the_reply(
    registered, endpoint, temple_dir, tmp_path, monkeypatch
):
    build_temple_scene(temple_dir, ids=(0, 8))
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(tmp_path)) == {"FINISHED"}
    rt = bpy.context.window_manager.reconloop
    job = rt.job
    assert bpy.ops.reconloop.refresh_jobs(server=endpoint) == {"FINISHED"}
    monkeypatch.setattr(operators, "_background", lambda: False)  # the UI's path from here
    assert bpy.ops.reconloop.delete_job(job=job, server=endpoint) == {"FINISHED"}
    assert bpy.app.timers.is_registered(operators._delete_tick) and job in [j.job for j in rt.jobs]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while operators._delete_tick() is not None:
        assert time.monotonic() < deadline, rt.jobs_note
        time.sleep(0.01)
    assert job not in [j.job for j in rt.jobs] and rt.jobs_note == "" and "delete" not in connection.SESSION.handlers


# -- 3: a trajectory camera that does not move --------------------------------------------------


def test_a_trajectory_camera_that_does_not_move_is_refused(registered, temple_dir):
    made = build_temple_scene(temple_dir, ids=(0, 8))
    scene = bpy.context.scene
    assert not any("not animated" in t for t in _labels(panels.RECONLOOP_PT_trajectory))
    still = bpy.data.objects.new("Still", bpy.data.cameras.new("Still"))
    scene.collection.objects.link(still)
    still.matrix_world = made["trajectory"].matrix_world.copy()
    scene.reconloop.trajectory_camera = still
    scene.frame_start, scene.frame_end = 1, 250
    labels = _labels(panels.RECONLOOP_PT_trajectory)
    assert "250 frames" in labels and "Camera is not animated: every frame would be the same view" in labels
    rt = bpy.context.window_manager.reconloop
    with pytest.raises(RuntimeError, match=r"Trajectory: the camera 'Still' does not move over frames 1-250"):
        bpy.ops.reconloop.reconstruct(server="tcp://127.0.0.1:9")  # refused before connecting
    assert "animate it" in rt.last_error and "clear Trajectory" in rt.last_error
    assert connection.SESSION.client is None and not rt.is_running
    # One frame of a still camera is a one-view trajectory: allowed, and not flagged.
    scene.frame_end = 1
    assert not any("not animated" in t for t in _labels(panels.RECONLOOP_PT_trajectory))
    from blender_addon.scene_io import check_trajectory_moves
    from blender_addon.scene_read import sample_trajectory

    check_trajectory_moves(sample_trajectory(still, scene, 1, 1, 1), "Still")
    # A camera that moves only through its lens moves.
    still.data.keyframe_insert("lens", frame=1)
    still.data.lens = 35.0
    still.data.keyframe_insert("lens", frame=250)
    check_trajectory_moves(sample_trajectory(still, scene, 1, 250, 50), "Still")
    scene.frame_end = 250
    assert not any("not animated" in t for t in _labels(panels.RECONLOOP_PT_trajectory))


# -- 7: a job left running ------------------------------------------------------------------------


def _start_held_job(endpoint: str, temple_dir: Path, out: Path) -> str:
    build_temple_scene(temple_dir, ids=(0, 8))
    bpy.context.scene.reconloop.prompt = HOLD
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(out)) == {"FINISHED"}
    rt = bpy.context.window_manager.reconloop
    _tick_until(lambda: rt.job and rt.stage == "generate")
    assert rt.is_running
    return rt.job


def _listed_state(endpoint: str, job: str) -> str:
    assert bpy.ops.reconloop.refresh_jobs(server=endpoint) == {"FINISHED"}
    return next(j.state for j in bpy.context.window_manager.reconloop.jobs if j.job == job)


def test_stop_service_says_the_remote_job_goes_on_and_it_can_be_imported(
    registered, endpoint, temple_dir, tmp_path, monkeypatch
):
    """Stop service with a remote job running leaves the job on the service (nothing is lost) and says so;
    once done it imports from Past jobs."""
    monkeypatch.setattr(operators, "_background", lambda: False)
    job = _start_held_job(endpoint, temple_dir, tmp_path)
    rt = bpy.context.window_manager.reconloop
    assert bpy.ops.reconloop.stop_service() == {"FINISHED"}
    assert rt.last_error == (
        f"Stop service closed the connection: job {job[:8]} keeps running on the service; "
        "import it from Past jobs (Refresh jobs) once it is done"
    )
    assert not rt.is_running and connection.SESSION.driver is None
    assert any(t == rt.last_error for t in _labels(panels.RECONLOOP_PT_main))
    monkeypatch.setattr(operators, "_background", lambda: True)  # a script's turn: replies awaited
    assert _listed_state(endpoint, job) == "running"
    RELEASE.set()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _listed_state(endpoint, job) != "done":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert bpy.ops.reconloop.import_job(job=job, server=endpoint, output_dir=str(tmp_path)) == {"FINISHED"}
    assert _results() == [f"{COLLECTION} gaussians", f"{COLLECTION} path", f"{COLLECTION} points"]


def test_opening_another_file_says_the_job_goes_on(registered, ui, endpoint, temple_dir, tmp_path):
    """The job is no longer followed once another .blend opens; that file's sidebar says where it is."""
    blend = tmp_path / "other.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    job = _start_held_job(endpoint, temple_dir, tmp_path)
    part = Path(connection.SESSION.driver.out_dir) / "gaussians.ply.part"  # a download the file's opening cuts off
    part.write_bytes(b"ply\n")
    connection.SESSION.driver._current = connection._Download("gaussians.ply", "0" * 64, 9, "gaussians", 4, str(part))
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    assert not part.exists()
    rt = bpy.context.window_manager.reconloop
    assert rt.last_error == (
        f"Another file was opened: job {job[:8]} keeps running on the service; "
        "import it from Past jobs (Refresh jobs) once it is done"
    )
    assert connection.SESSION.driver is None and not rt.is_running
    assert any(t == rt.last_error for t in _labels(panels.RECONLOOP_PT_main))
    # Said once: the file after that has nothing to carry.
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    assert bpy.context.window_manager.reconloop.last_error == ""


def test_a_file_that_fails_to_open_leaves_the_job_where_it_was(registered, ui, endpoint, temple_dir, tmp_path):
    """A .blend that fails to open leaves the open file as it was: its job is followed on and imported there,
    and no note about an abandoned job waits for the next file that opens."""
    good = tmp_path / "other.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(good))
    broken = tmp_path / "broken.blend"
    broken.write_bytes(b"BLENDER-v500 not a blend file")
    job = _start_held_job(endpoint, temple_dir, tmp_path)
    driver = connection.SESSION.driver
    rt = bpy.context.window_manager.reconloop
    shown = rt.hello_summary
    assert "ReconLoop" in shown
    with pytest.raises(RuntimeError, match="broken.blend"):
        bpy.ops.wm.open_mainfile(filepath=str(broken))
    rt = bpy.context.window_manager.reconloop
    assert connection.SESSION.driver is driver and bpy.app.timers.is_registered(operators._tick)
    assert rt.is_running and rt.job == job and rt.last_error == "" and rt.hello_summary == shown
    RELEASE.set()
    _tick_until(lambda: False)
    assert rt.state == "done" and not rt.is_running
    assert _results() == [f"{COLLECTION} gaussians", f"{COLLECTION} points"]
    bpy.ops.wm.open_mainfile(filepath=str(good))
    assert bpy.context.window_manager.reconloop.last_error == ""


# -- 8: the service a job ran on ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["background", "ui"])
def test_the_status_row_shows_the_service_the_job_ran_on(registered, endpoint, temple_dir, tmp_path, monkeypatch, mode):
    """Without Test connection first, the job's own hello fills the status row."""
    monkeypatch.setattr(operators, "_background", lambda: mode == "background")
    build_temple_scene(temple_dir, ids=(0, 8))
    rt = bpy.context.window_manager.reconloop
    assert rt.hello_summary == "" and "service: not connected" in _labels(panels.RECONLOOP_PT_main)
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(tmp_path)) == {"FINISHED"}
    if mode == "ui":
        _tick_until(lambda: rt.stage not in ("", "submit"))
        assert rt.is_running and "ReconLoop" in rt.hello_summary  # shown while the job runs
        _tick_until(lambda: False)
    assert rt.state == "done" and "ReconLoop" in rt.hello_summary and "device cpu" in rt.hello_summary
    assert rt.hello_summary[:80] in _labels(panels.RECONLOOP_PT_main)
    assert "service: not connected" not in _labels(panels.RECONLOOP_PT_main)


def _driver(job=None, submitted=True, state="running"):
    return SimpleNamespace(job=job, submitted=submitted, progress=SimpleNamespace(state=state))


@pytest.mark.parametrize(
    ("driver", "importer", "service_stopped", "said"),
    [
        (None, None, False, ""),
        (_driver(submitted=False), None, False, ""),  # nothing reached the service
        (_driver("a" * 32), None, False, "S: job aaaaaaaa keeps running on the service; import it from Past jobs"),
        (_driver("a" * 32), None, True, "S: job aaaaaaaa was interrupted; click Reconstruct to run it again"),
        (_driver(), None, False, "S while the job was being sent: if the service got it, it keeps running there"),
        (_driver(), None, True, "S: the job being sent was stopped; click Reconstruct to run it again"),
        (
            _driver("a" * 32, state="done"),
            None,
            True,
            "S before the results of job aaaaaaaa were all downloaded: import it again from Past jobs",
        ),
        (
            _driver("a" * 32, state=""),
            SimpleNamespace(reimport=True),
            False,
            "S before the results of job aaaaaaaa were all downloaded",
        ),
    ],
)
def test_what_is_said_of_a_job_left_behind(driver, importer, service_stopped, said):
    note = operators.abandoned_job_note(driver, importer, "S", service_stopped=service_stopped)
    assert note.startswith(said) and bool(note) == bool(said), note


# -- 9: what arrives while the user goes on working ---------------------------------------------


def test_undo_while_the_job_runs_keeps_what_already_arrived(registered, ui, endpoint, temple_dir, tmp_path):
    """The points arrive on the timer while the job runs: an undo step of their own there and then, so undoing
    the user's next edit takes that edit, not the points (and the Gaussians go into the same collection)."""
    _user_edit()
    _start_held_job(endpoint, temple_dir, tmp_path)
    assert _results() == [f"{COLLECTION} points"]
    bpy.ops.mesh.primitive_uv_sphere_add(location=(0, 3, 0))
    bpy.context.active_object.name = "NextEdit"
    bpy.ops.ed.undo_push(message="user adds a sphere")
    bpy.ops.ed.undo()
    assert "NextEdit" not in _names() and _results() == [f"{COLLECTION} points"]
    RELEASE.set()
    _tick_until(lambda: False)
    assert _results() == [f"{COLLECTION} gaussians", f"{COLLECTION} points"]
    (coll,) = _job_collections(bpy.context.window_manager.reconloop.job)
    assert sorted(o.name for o in coll.objects) == _results()


def test_a_scene_renamed_while_the_job_runs_still_gets_its_results(registered, ui, endpoint, temple_dir, tmp_path):
    _start_held_job(endpoint, temple_dir, tmp_path)
    bpy.context.scene.name = "Renamed"
    RELEASE.set()
    _tick_until(lambda: False)
    rt = bpy.context.window_manager.reconloop
    assert rt.last_error == "" and rt.state == "done", rt.last_error
    assert _results() == [f"{COLLECTION} gaussians", f"{COLLECTION} points"]


def test_cancel_stops_the_downloads_of_a_job_that_ended(registered, ui, endpoint, temple_dir, tmp_path):
    """Import job of a past job: its files are only downloads, which Cancel stops (the service has nothing
    left to cancel); nothing half-downloaded stays."""
    build_temple_scene(temple_dir, ids=(0, 8))
    RELEASE.set()
    assert bpy.ops.reconloop.reconstruct(server=endpoint, output_dir=str(tmp_path / "run")) == {"FINISHED"}
    _tick_until(lambda: False)
    job = bpy.context.window_manager.reconloop.job
    again = tmp_path / "again"
    assert bpy.ops.reconloop.import_job(job=job, server=endpoint, output_dir=str(again)) == {"FINISHED"}
    assert bpy.ops.reconloop.cancel() == {"FINISHED"}
    _tick_until(lambda: False)
    rt = bpy.context.window_manager.reconloop
    assert rt.state == "cancelled" and "file(s) not downloaded (Import job brings them)" in rt.message, rt.message
    assert not rt.is_running and connection.SESSION.driver is None
    assert not list(again.rglob("*.ply")) and not list(again.rglob("*.part"))


def _mixed_sizes_runner(scene, out_dir: Path, *, device, progress):
    """A photo folder's job whose SfM placed photos of two sizes (one scene cannot hold both cameras)."""
    from backend.progress import ProgressEvent

    results_runner(scene, out_dir, device=device, progress=lambda event: None)
    doc = json.loads((out_dir / "cameras.json").read_text())
    first, second = (dict(c, estimated=True) for c in doc["captures"][:2])
    second["camera"] = dict(second["camera"], width=first["camera"]["height"], height=first["camera"]["width"])
    doc["captures"] = [first, second]
    (out_dir / "cameras.json").write_text(json.dumps(doc))
    progress(ProgressEvent("fit", 0.9, "all", ("points.ply", "cameras.json", "gaussians.ply")))


def test_a_file_that_cannot_be_imported_costs_only_itself(registered, ui, temple_dir, tmp_path):
    """cameras.json's estimated cameras refused (two image sizes): the Gaussians after it still come, and the
    error names the file and why."""
    from backend.service import Service, ServiceConfig

    svc = Service(
        ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=tmp_path / "jobs", device="cpu"), runner=_mixed_sizes_runner
    )
    thread = svc.start_thread()
    try:
        build_temple_scene(temple_dir, ids=(0, 8))
        assert bpy.ops.reconloop.reconstruct(server=svc.endpoint, output_dir=str(tmp_path / "out")) == {"FINISHED"}
        _tick_until(lambda: False)
    finally:
        svc.stop()
        thread.join(20)
    rt = bpy.context.window_manager.reconloop
    assert rt.last_error.startswith("could not import cameras.json: estimated cameras: 1 camera(s) differ"), (
        rt.last_error
    )
    assert rt.last_error.endswith("; the job's other results were imported")
    assert _results() == [f"{COLLECTION} gaussians", f"{COLLECTION} points"]


def test_results_and_imports_stay_in_their_own_scene(registered, tmp_path):
    """Two scenes: a job's collection of the same key (photo folders of one name) in the other scene is not
    emptied, and a .ply imported in one scene does not bring the other's imports along."""
    a = bpy.context.scene
    coll = importers.job_collection(a, "images", "a" * 32)
    importers._link(bpy.data.objects.new("A result", bpy.data.meshes.new("m")), coll, "points")
    b = bpy.data.scenes.new("B")
    other = importers.job_collection(b, "images", "b" * 32)
    assert other is not coll and [o.name for o in coll.objects] == ["A result"]
    assert coll not in b.collection.children_recursive and other not in a.collection.children_recursive
    ply = write_blank_points(tmp_path / "p.ply", 3)
    assert bpy.ops.reconloop.import_points(filepath=str(ply)) == {"FINISHED"}
    bpy.context.window.scene = b
    assert bpy.ops.reconloop.import_points(filepath=str(ply)) == {"FINISHED"}
    assert sorted(o.name for o in b.objects) == ["p.001"] and "p.001" not in a.objects
