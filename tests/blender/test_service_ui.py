"""The sidebar's timers never wait for the service, and Stop service neither waits nor leaves a timer behind."""

from __future__ import annotations

import shlex
import sys
import time

import bpy
import pytest

from blender_addon import connection, operators
from protocol import errors
from tests.protocol.helpers import HELLO_REPLY, ScriptedService, artifact, status_reply

TICK_BOUND_S = 0.2  # a timer tick may take about 0.1 s: Blender's UI waits for it


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def test_ticks_return_at_once_when_the_service_never_answers(registered, silent_endpoint, loopback_router):
    rt = bpy.context.window_manager.reconloop
    cfg = connection.ConnectionConfig(mode="remote", remote_address=silent_endpoint, timeout_ms=300)
    client, service = connection.connect(cfg)
    # Test connection (UI): its timer looks for the hello reply once a tick.
    connection.SESSION.handlers["probe"] = connection.HelloProbe(client, service)
    intervals, longest = [], 0.0
    deadline = time.monotonic() + 10
    while not intervals or intervals[-1] is not None:
        interval, took = _timed(operators._probe_tick)
        intervals.append(interval)
        longest = max(longest, took)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert longest < TICK_BOUND_S, f"a Test connection tick took {longest:.3f} s"
    assert len(intervals) > 5 and intervals[0] == operators.TICK_S
    assert "does not answer" in rt.last_error and rt.hello_summary == ""

    # A running job whose service answers hello and watch, then goes silent at the download: each
    # tick returns (the fetch is only sent), then the job ends in a plain error.
    rt.last_error = ""
    svc = ScriptedService(loopback_router)
    svc.drain()  # the probe's unanswered hellos
    job = "0123456789abcdef0123456789abcdef"
    driver = connection.JobDriver(client, bpy.app.tempdir, job=job)
    importer = operators.ResultImporter(bpy.context.scene.name, "k", "", (1, 2))
    operators.begin_job(bpy.context, driver, importer)
    interval, longest, ops = 0.0, 0.0, []
    while interval is not None:
        interval, took = _timed(operators._tick)
        longest = max(longest, took)
        while svc.pending():  # answer hello and watch at once; from the first fetch on, nothing
            request = svc.request()
            ops.append(request["op"])
            if "fetch" in ops:
                continue
            if request["op"] == "hello":
                svc.answer(request, **HELLO_REPLY)
            elif request["op"] == "status":
                svc.answer(request, **status_reply(job, "running", 1, [artifact("points.ply", b"ply" * 100)]))
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert longest < TICK_BOUND_S, f"a job tick took {longest:.3f} s"
    assert ops[:3] == ["hello", "status", "fetch"] and ops.count("fetch") == 3, ops  # 3 tries of the fetch
    assert "does not answer" in rt.last_error and "fetch" in rt.last_error
    assert not rt.is_running and connection.SESSION.driver is None

    # With the default 10 s a try (30 s in a blocking request), a tick still returns at once.
    connection.close()
    client, service = connection.connect(connection.ConnectionConfig(mode="remote", remote_address=silent_endpoint))
    connection.SESSION.handlers["probe"] = connection.HelloProbe(client, service)
    for _ in range(3):
        interval, took = _timed(operators._probe_tick)
        assert interval == operators.TICK_S and took < TICK_BOUND_S


def test_stop_service_stops_the_timers_without_waiting(registered, tmp_path):
    cfg = connection.ConnectionConfig(
        local_command=f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'", data_dir=str(tmp_path)
    )
    client, service = connection.connect(cfg)  # a service still starting, as Test connection leaves it
    connection.SESSION.handlers["probe"] = connection.HelloProbe(client, service)
    for side in operators.SIDE.values():  # every side request's timer, as if each had been sent
        bpy.app.timers.register(side.tick, first_interval=1.0)
    assert operators._probe_tick() == operators.TICK_S
    result, took = _timed(bpy.ops.reconloop.stop_service)
    assert result == {"FINISHED"} and took < 1.0, f"Stop service took {took:.1f} s"
    assert not [key for key, side in operators.SIDE.items() if bpy.app.timers.is_registered(side.tick)]
    # A tick that fires anyway (queued before the stop) finds no client and ends quietly.
    assert operators._probe_tick() is None and operators._tick() is None
    assert bpy.context.window_manager.reconloop.last_error == ""
    assert service.wait_stopped(10) and service.proc.returncode is not None


def _listed(job: str, state: str) -> dict:
    """A job as the ``jobs`` reply lists it."""
    return {k: v for k, v in status_reply(job, state, 1).items() if k not in ("seq", "artifacts")}


def test_refresh_jobs_never_waits_and_never_takes_a_running_jobs_reply(
    registered, silent_endpoint, loopback_router, monkeypatch
):
    """Refresh jobs sends its request and returns; a timer takes the reply. The client has one request in
    flight at a time, so while a job runs, Refresh jobs and Test connection are refused (the job's reply
    is never read, and dropped, by theirs), and a job that starts drops a refresh still waiting."""
    monkeypatch.setattr(operators, "_background", lambda: False)  # the UI's path: replies come on timer ticks
    rt = bpy.context.window_manager.reconloop
    svc = ScriptedService(loopback_router)  # silent until the test answers
    done_job, running_job = "a" * 32, "b" * 32

    # A silent service: the operator returns at once, and so does each tick.
    result, took = _timed(lambda: bpy.ops.reconloop.refresh_jobs(server=silent_endpoint))
    assert result == {"FINISHED"} and took < TICK_BOUND_S, f"Refresh jobs took {took:.3f} s"
    assert bpy.app.timers.is_registered(operators._jobs_tick)
    for _ in range(3):
        interval, took = _timed(operators._jobs_tick)
        assert interval == operators.TICK_S and took < TICK_BOUND_S
    assert rt.jobs_note == "listing the jobs..."
    assert "Refresh jobs is waiting for the service" in operators.client_busy("probe")
    assert bpy.ops.reconloop.test_connection(server=silent_endpoint) == {"CANCELLED"}
    # The reply, once it comes, fills the list (newest first) on the next tick.
    request = svc.request()
    assert request["op"] == "jobs" and not svc.pending()
    svc.answer(request, jobs=[_listed(done_job, "done"), _listed(running_job, "running")])
    deadline = time.monotonic() + 5
    while (interval := operators._jobs_tick()) is not None:
        assert interval == operators.TICK_S and time.monotonic() < deadline
        time.sleep(0.01)
    assert [(j.job, j.state) for j in rt.jobs] == [(running_job, "running"), (done_job, "done")]
    assert rt.jobs_note == "" and "jobs" not in connection.SESSION.handlers

    # A refresh still waiting when a job starts is dropped: the job's requests alone use the client.
    assert bpy.ops.reconloop.refresh_jobs(server=silent_endpoint) == {"FINISHED"}
    jobs_request = svc.request()
    driver = connection.JobDriver(connection.SESSION.client, bpy.app.tempdir, job=running_job)
    importer = operators.ResultImporter(bpy.context.scene.name, "k", "", (1, 2))
    operators.begin_job(bpy.context, driver, importer)
    assert "jobs" not in connection.SESSION.handlers and rt.jobs_note == "" and operators._jobs_tick() is None
    assert operators._tick() == operators.TICK_S  # the job's hello is in flight
    hello = svc.request()
    assert hello["op"] == "hello"

    # With the job's request in flight, Refresh jobs and Test connection send nothing.
    assert operators.client_busy("jobs").startswith("a job is running: its status is shown in the panel")
    assert bpy.ops.reconloop.refresh_jobs(server=silent_endpoint) == {"CANCELLED"}
    assert bpy.ops.reconloop.test_connection(server=silent_endpoint) == {"CANCELLED"}
    assert not svc.pending() and connection.SESSION.driver is driver
    assert not {"jobs", "probe"} & set(connection.SESSION.handlers)

    # The job's reply is taken at once (a lost one would wait out the 10 s try and be resent), also
    # after the dropped refresh's reply.
    svc.answer(jobs_request, jobs=[])
    svc.answer(hello, **HELLO_REPLY)
    deadline = time.monotonic() + 2
    while driver.hello is None:  # every timer of the add-on fires, as in the UI
        [side.tick() for side in operators.SIDE.values()]
        assert operators._tick() is not None and time.monotonic() < deadline
        time.sleep(0.01)
    assert svc.request()["op"] == "status"  # the watch follows; the hello was not resent
    assert driver.progress.message == "" and rt.last_error == ""


def test_delete_job_takes_not_found_as_gone_and_keeps_the_selection(
    registered, silent_endpoint, loopback_router, monkeypatch
):
    """Delete job in the UI: sent at once, Refresh jobs refused while it waits; a job the service no longer
    has (deleted elsewhere, or by a first try whose reply was lost) leaves the list without an error, and
    the selection stays on its job."""
    monkeypatch.setattr(operators, "_background", lambda: False)
    rt = bpy.context.window_manager.reconloop
    svc = ScriptedService(loopback_router)
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    operators._show_jobs(rt, {"jobs": [_listed(c, "done"), _listed(b, "failed"), _listed(a, "cancelled")]})
    assert [j.job for j in rt.jobs] == [a, b, c]
    rt.jobs_index = 2
    assert bpy.ops.reconloop.delete_job(job=a, server=silent_endpoint) == {"FINISHED"}
    assert rt.jobs_note == "deleting the job..."
    assert "Delete job is waiting for the service" in operators.client_busy("jobs")
    assert bpy.ops.reconloop.refresh_jobs(server=silent_endpoint) == {"CANCELLED"}
    request = svc.request()
    assert request["op"] == "delete" and request["job"] == a and not svc.pending()
    svc.fail(request, errors.NOT_FOUND, f"delete: no job {a!r}")
    deadline = time.monotonic() + 5
    while operators._delete_tick() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [j.job for j in rt.jobs] == [b, c] and rt.jobs[rt.jobs_index].job == c
    assert rt.last_error == "" and rt.jobs_note == ""


def test_a_file_that_fails_to_open_keeps_a_waiting_refresh(
    registered, silent_endpoint, loopback_router, monkeypatch, tmp_path
):
    """load_pre drops the side requests; a file that then fails to open gives them back, timer and note."""
    monkeypatch.setattr(operators, "_background", lambda: False)
    rt = bpy.context.window_manager.reconloop
    svc = ScriptedService(loopback_router)
    assert bpy.ops.reconloop.refresh_jobs(server=silent_endpoint) == {"FINISHED"}
    request = svc.request()
    broken = tmp_path / "broken.blend"
    broken.write_bytes(b"BLENDER-v500 not a blend file")
    with pytest.raises(RuntimeError, match="broken.blend"):
        bpy.ops.wm.open_mainfile(filepath=str(broken))
    assert "jobs" in connection.SESSION.handlers and bpy.app.timers.is_registered(operators._jobs_tick)
    assert rt.jobs_note == "listing the jobs..."
    svc.answer(request, jobs=[_listed("a" * 32, "done")])
    deadline = time.monotonic() + 5
    while operators._jobs_tick() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [j.job for j in rt.jobs] == ["a" * 32] and rt.jobs_note == ""
