"""Faults: errors and out-of-memory inside a stage, cancel, a full disk, kill -9 and restart, lost clients.

Jobs run the probe runner (``backend/service/probe.py``): real file work in milliseconds, with faults
steered by the scene's settings. Each test records its row of ``docs/reliability.md``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from backend.fileio import sha256_file
from backend.scene import load_scene
from backend.service import worker as worker_module
from backend.service.probe import run as probe_runner
from backend.service.spawn import free_port, serve_command, serve_env, wait_answering
from backend.service.store import (
    ARTIFACTS_DIR,
    INTERRUPTED_REASON,
    JOURNAL_FILE,
    MANIFEST_FILE,
    SCENE_DIR,
    JobStore,
    scene_message,
)
from protocol import errors
from protocol.client import Client
from protocol.errors import ProtocolError
from tests.backend._reliability import (
    REPO,
    TIMEOUT_MS,
    WAIT_S,
    finished_probe_job,
    probe_scene,
    row,
    serve_processes,
    spawn_serve,
    start_service,
    stop_service,
    wait_state,
)
from tests.protocol.helpers import png_bytes, scene_msg

CANCEL_BOUND_S = 2.0  # cancel must end a job that reports steps this fast well within this
STEP_MS = 20
FSIZE_LIMIT_BYTES = 512 * 1024  # RLIMIT_FSIZE of the "small disk" service subprocess
TMPFS_BYTES = 2 * 1024 * 1024
BIG_IMAGE_SIDE = 600  # random PNGs this size are ~1.1 MB each: every image is over FSIZE_LIMIT_BYTES


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc, thread = start_service(tmp_path_factory.mktemp("faults") / "jobs")
    yield svc
    stop_service(svc, thread)


@pytest.fixture
def client(service):
    with Client(service.endpoint, timeout_ms=TIMEOUT_MS) as c:
        yield c


def test_exception_in_a_stage_fails_the_job_and_the_worker_goes_on(client, record_property):
    bad = client.submit(probe_scene("steps=3 fault=error at=1"))
    good = client.submit(probe_scene("steps=2"))
    status = wait_state(client, bad)
    assert status["state"] == "failed"
    assert status["message"] == "RuntimeError: injected fault in probe step 1 (in stage 'probe')"
    assert [a["name"] for a in status["artifacts"]] == ["step0.json"]  # what finished before the fault stays
    assert wait_state(client, good)["state"] == "done"
    row(
        record_property,
        "fault",
        "RuntimeError raised inside a stage (step 2 of 3)",
        f'job failed: "{status["message"]}"; its finished artifact kept; next job done',
    )


@pytest.mark.parametrize(
    "fault, expect",
    [
        ("memory", "out of memory in stage 'probe': Unable to allocate"),  # a real numpy allocation of 2^60 bytes
        ("cuda_oom", "out of GPU memory in stage 'probe': CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)
def test_out_of_memory_fails_the_job_plainly_and_the_worker_goes_on(client, record_property, fault, expect):
    bad = client.submit(probe_scene(f"steps=2 fault={fault} at=1"))
    good = client.submit(probe_scene("steps=1"))
    status = wait_state(client, bad)
    assert status["state"] == "failed"
    assert status["message"].startswith(expect), status["message"]
    assert "the job was stopped" in status["message"]
    assert wait_state(client, good)["state"] == "done"
    how = (
        "MemoryError from a real allocation (numpy, 2^60 bytes)"
        if fault == "memory"
        else "torch.cuda.OutOfMemoryError raised in a stage (simulated GPU OOM)"
    )
    row(
        record_property,
        "fault",
        how,
        f'job failed: "{status["message"][:90]}..."; CUDA cache emptied if loaded; next job done',
    )


def test_cancel_stops_a_running_job_within_a_bound(client, record_property):
    job = client.submit(probe_scene(f"steps=5000 delay_ms={STEP_MS}"))
    wait_state(client, job, states=("running",))
    while not client.status(job)["artifacts"]:
        time.sleep(STEP_MS / 1000)
    t0 = time.monotonic()
    assert client.cancel(job)["state"] == "running"  # it ends at its next step boundary, not at the cancel
    status = wait_state(client, job, timeout_s=CANCEL_BOUND_S)
    took_s = time.monotonic() - t0
    assert status["state"] == "cancelled" and status["message"] == "cancelled by a client"
    assert took_s < CANCEL_BOUND_S
    # a queued job is cancelled at once, and the worker goes on
    blocker = client.submit(probe_scene(f"steps=10 delay_ms={STEP_MS}"))
    queued = client.submit(probe_scene("steps=1"))
    assert client.cancel(queued)["state"] == "cancelled"
    assert wait_state(client, blocker)["state"] == "done"
    record_property("cancel_s", round(took_s, 3))
    row(
        record_property,
        "fault",
        f"cancel of a running job ({STEP_MS} ms steps); cancel of a queued job",
        f"running job cancelled {took_s * 1000:.0f} ms after the cancel reply (bound {CANCEL_BOUND_S:.0f} s: one step); queued job cancelled at once",
    )


def test_cancel_waits_for_the_step_boundary(client, record_property):
    """Cancel acts between steps: a stage that reports nothing for 1 s runs on until it reports, then
    ends cancelled: not sooner, not never (half a step of slack for a loaded machine's polls)."""
    step_s = 1.0
    job = client.submit(probe_scene(f"steps=3 delay_ms={int(step_s * 1000)}"))
    # The first step boundary: step0.json announced. The next one is step_s after it.
    status = wait_state(client, job, states=("running",))
    while not status["artifacts"]:
        time.sleep(0.01)
        status = client.status(job)
    seen = time.monotonic()
    t0 = time.monotonic()
    assert client.cancel(job)["state"] == "running"  # asked: the worker sees it at its next boundary
    # Until that boundary (half a step of slack for the lag in seeing the first), the job runs on.
    checks = 0
    while time.monotonic() - seen < step_s / 2:
        status = client.status(job)
        assert status["state"] == "running", f"{status['state']} {time.monotonic() - t0:.2f} s after the cancel"
        checks += 1
        time.sleep(0.02)
    status = wait_state(client, job, timeout_s=step_s + CANCEL_BOUND_S)
    took_s = time.monotonic() - t0
    assert checks >= 3
    assert (status["state"], status["message"]) == ("cancelled", "cancelled by a client")
    assert step_s / 2 <= took_s <= step_s + CANCEL_BOUND_S, took_s
    # It stopped at the second boundary: the step it was in finished and is kept, the third never ran.
    assert [a["name"] for a in status["artifacts"]] == ["step0.json", "step1.json"]
    row(
        record_property,
        "fault",
        f"cancel while a stage runs {step_s:g} s without reporting progress",
        f"ended after {took_s:.2f} s as {status['state']}, running until then: cancel takes effect at step boundaries only (documented bound: the longest step)",
    )


# ----------------------------------------------------------------------------------------------
# A full disk


def _limit_file_size() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT_BYTES, FSIZE_LIMIT_BYTES))


@pytest.mark.xdist_group("service-subprocess")
def test_file_size_limit_gives_clear_errors_and_the_service_goes_on(tmp_path, record_property):
    """A real kernel write limit (RLIMIT_FSIZE, no root needed): writes past it fail with EFBIG."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = spawn_serve(tmp_path / "jobs", endpoint, preexec=_limit_file_size)
    try:
        wait_answering(endpoint, WAIT_S)
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as c:
            big = c.submit(probe_scene(f"steps=2 fault=write bytes={4 * FSIZE_LIMIT_BYTES} at=0"))
            status = wait_state(c, big)
            assert status["state"] == "failed"
            assert status["message"].startswith("no space left on the server's disk"), status["message"]
            assert "File too large" in status["message"]
            scene = probe_scene()
            for i, cap in enumerate(scene["captures"]):
                cap["image"] = png_bytes(BIG_IMAGE_SIDE, BIG_IMAGE_SIDE, seed=i)
                cap["camera"]["width"] = cap["camera"]["height"] = BIG_IMAGE_SIDE
            with pytest.raises(ProtocolError) as err:
                c.submit(scene)
            assert err.value.code == errors.INTERNAL and "no space left on the server's disk" in err.value.message
            assert wait_state(c, c.submit(probe_scene("steps=1")))["state"] == "done"  # still serving
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert not list((tmp_path / "jobs").glob(".tmp-*")), "a failed submit left its temporary folder"
    row(
        record_property,
        "fault",
        "disk limit: service run under RLIMIT_FSIZE 512 KiB; a job writes 2 MiB; a submit of three 1.1 MB images",
        f'job failed: "{status["message"][:80]}..."; submit answered internal "no space left on the server\'s disk ..."; no partial job folder; next job done',
    )


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.xdist_group("service-subprocess")
def test_full_tmpfs_gives_clear_errors_and_the_service_goes_on(tmp_path, record_property):
    """A real full file system (ENOSPC) on a 2 MiB tmpfs; needs root (CI runs as root) and mount rights."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (not root or no mount rights); the RLIMIT_FSIZE test covers the path")
    try:
        svc, thread = start_service(disk / "jobs")
        try:
            with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
                first = c.submit(probe_scene("steps=1"))
                assert wait_state(c, first)["state"] == "done"
                big = c.submit(probe_scene(f"steps=2 fault=write bytes={2 * TMPFS_BYTES} at=0"))
                status = wait_state(c, big)
                assert status["state"] == "failed" and "No space left on device" in status["message"]
                assert status["message"].startswith("no space left on the server's disk")
                # the disk entirely full: submits are refused plainly; the journal cannot grow, the service answers
                filler = disk / "filler"
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(bytes(1 << 16))
                    except OSError:
                        pass
                with pytest.raises(ProtocolError) as err:
                    c.submit(probe_scene("steps=1"))
                assert err.value.code == errors.INTERNAL and "no space left on the server's disk" in err.value.message
                assert c.status(first)["state"] == "done" and len(c.jobs()) == 2
                filler.unlink()  # the operator frees space: the filler and the failed job's partial file
                (disk / "jobs" / big / ARTIFACTS_DIR / "big.bin").unlink()
                assert wait_state(c, c.submit(probe_scene("steps=1")))["state"] == "done"
        finally:
            stop_service(svc, thread)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    row(
        record_property,
        "fault",
        "full disk: data dir on a 2 MiB tmpfs; a job writes 4 MiB; then the disk filled to the last byte",
        'job failed: "no space left on the server\'s disk ... No space left on device"; submits refused with that text while full; '
        "status/jobs answered; after freeing space the next job done",
    )


# ----------------------------------------------------------------------------------------------
# kill -9, restart, resubmit, resume


def _verify_manifest(job_dir: Path) -> dict[str, str]:
    """Every manifest entry's file exists with its size and sha256; returns name -> sha256."""
    manifest = json.loads((job_dir / MANIFEST_FILE).read_text())
    out = {}
    for entry in manifest["artifacts"]:
        path = job_dir / ARTIFACTS_DIR / entry["name"]
        assert path.stat().st_size == entry["size"], entry
        assert sha256_file(path) == entry["sha256"], entry
        out[entry["name"]] = entry["sha256"]
    return out


@pytest.mark.xdist_group("service-subprocess")
def test_kill9_mid_job_then_restart_resubmit_and_resume(tmp_path, record_property):
    data_dir = tmp_path / "jobs"
    with serve_processes(data_dir) as (endpoint, spawn):
        proc = spawn()
        wait_answering(endpoint, WAIT_S)
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as c:
            finished = c.submit(probe_scene("steps=3"))
            before = {a["name"]: a["sha256"] for a in wait_state(c, finished)["artifacts"]}
            long_job = c.submit(probe_scene("steps=40 delay_ms=50"))
            waiting = c.submit(probe_scene("steps=3 delay_ms=10"))
            while len(c.status(long_job)["artifacts"]) < 2:
                time.sleep(0.02)
        watcher = Client(endpoint, timeout_ms=1000, retries=30)  # the client that loses its server
        watcher.watch(waiting)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.3)
        spawn()
        events = list(watcher.events(waiting))  # reconnects (Lazy Pirate) and resumes with since
        watcher.close()
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), seqs  # no gap, no duplicate across the restart
        assert events[-1]["state"] == "done"
        assert events[0]["state"] == "queued" and "running" in {e["state"] for e in events}  # events from both lives
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as c:
            states = {j["job"]: j for j in c.jobs()}
            assert states[finished]["state"] == "done"
            assert states[long_job]["state"] == "interrupted" and states[long_job]["message"] == INTERRUPTED_REASON
            assert _verify_manifest(data_dir / finished) == before  # finished job intact, sha256 checked on disk
            partial = _verify_manifest(data_dir / long_job)  # what the interrupted job finished is intact too
            assert len(partial) >= 2
            assert {a["name"]: a["sha256"] for a in c.status(finished)["artifacts"]} == before
            # resubmittable: the job folder keeps its scene (scene.json and images); send it again
            scene = scene_message(load_scene(data_dir / long_job / SCENE_DIR))
            scene["settings"]["prompt"] = "probe steps=3"  # same scene, shorter run for the test
            again = c.submit(scene)
            assert again != long_job and wait_state(c, again)["state"] == "done"
            assert sorted(c.status(again)["artifacts"], key=lambda a: a["name"])[0]["name"] == "step0.json"
    row(
        record_property,
        "fault",
        "kill -9 of `reconloop serve` mid-job (2 of 40 steps done, one job queued, a client watching), then restart",
        f"finished job intact ({len(before)} artifacts, sha256 verified on disk); running job 'interrupted' with its reason, "
        f"its {len(partial)} finished artifacts intact, resubmitted from its stored request: done; queued job ran after restart; "
        f"watching client resumed (status watch+since; {watcher.reconnects} socket reopens) and got events 1..{seqs[-1]} with no gap or duplicate",
    )


@pytest.mark.xdist_group("service-subprocess")
def test_sigterm_mid_step_stops_like_ctrl_c_and_exits_0(tmp_path):
    """SIGTERM (systemd, docker stop, kill) stops the service as Ctrl-C does, also while a step runs past the
    stop's 10 s wait: the job is marked interrupted with the stop's reason and the process exits 0 at once
    (it used to die by the signal, the job left "running", or abort with 134 at the interpreter's exit)."""
    data_dir = tmp_path / "jobs"
    with serve_processes(data_dir) as (endpoint, spawn):
        proc = spawn()
        wait_answering(endpoint, WAIT_S)
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as c:
            job = c.submit(probe_scene("steps=2 delay_ms=60000"))  # one step sleeps a minute
            wait_state(c, job, ("running",))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        log = (tmp_path / f"serve-{endpoint.rsplit(':', 1)[1]}.log").read_text()
        assert "stopped by SIGTERM" in log and "a job step was still running; exiting without waiting" in log, log
        spawn()
        wait_answering(endpoint, WAIT_S)
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as c:
            status = c.status(job)
        assert status["state"] == "interrupted" and "the service stopped during this job" in status["message"]


# `reconloop serve` whose request loop fails once, when a job runs: the error a bug in the loop would raise,
# with the stop's wait cut to half a second (the test's time). A step in torch's native code can make the
# interpreter's exit abort (134); the atexit hook stands in for that: only os._exit skips it.
LOOP_FAULT = """
import atexit, os, sys
from backend import cli
from backend.service import server

atexit.register(os._exit, 134)
server.STOP_WAIT_S = 0.5
drain = server.Service._drain
fired = []

def faulty_drain(self, slot):
    drain(self, slot)
    if not fired and slot.running and self.store.jobs[slot.running].state == "running":
        fired.append(slot.running)
        raise RuntimeError("injected fault in the request loop")

server.Service._drain = faulty_drain
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.xdist_group("service-subprocess")
def test_an_error_in_the_loop_mid_step_exits_1_with_its_traceback(tmp_path):
    """An error that ends the service's loop while a worker thread is inside a step: the service closes as
    after a stop (the job interrupted), logs the error and exits 1 at once, past the interpreter's exit,
    which can abort with 134 on a step in torch's native code."""
    data_dir = tmp_path / "jobs"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = serve_command(endpoint, data_dir, runner="backend.service.probe:run")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([cmd[0], "-c", LOOP_FAULT, *cmd[3:]], cwd=REPO, env=serve_env(), stderr=log)
    try:
        wait_answering(endpoint, WAIT_S, proc=proc)
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as c:
            job = c.submit(probe_scene("steps=2 delay_ms=60000"))  # one step sleeps a minute
        assert proc.wait(WAIT_S) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "the service stopped on an error; a job step was still running" in log, log
    assert log.count("RuntimeError: injected fault in the request loop") == 1, log
    last = json.loads((data_dir / job / JOURNAL_FILE).read_text().splitlines()[-1])
    assert last["state"] == "interrupted", last


# `reconloop serve` whose start-up (the store's recovery) takes a minute, saying when it begins: where a Ray
# pool's workers or a large store keep start-up long, before the loop reads stop()'s flag.
SLOW_START = """
import sys, time
from backend import cli
from backend.service import store

def slow_load(self):
    print("store load begins", file=sys.stderr, flush=True)
    time.sleep(60)
    return []

store.JobStore.load = slow_load
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.xdist_group("service-subprocess")
def test_sigterm_during_start_up_stops_at_once(tmp_path):
    """SIGTERM while the service starts (before its loop reads the stop flag) ends it at once with exit 0, as
    Ctrl-C does, not after start-up (docker stop's 10 s would have ended in SIGKILL)."""
    data_dir = tmp_path / "jobs"
    cmd = serve_command(f"tcp://127.0.0.1:{free_port()}", data_dir, runner="backend.service.probe:run")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([cmd[0], "-c", SLOW_START, *cmd[3:]], cwd=REPO, env=serve_env(), stderr=log)
    try:
        deadline = time.monotonic() + WAIT_S
        while "store load begins" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(WAIT_S) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped by SIGTERM" in log_path.read_text()


def test_torn_journal_line_is_ignored_after_restart(tmp_path, record_property):
    """A crash can cut the journal's last line; the job loads from the lines before it."""
    job = finished_probe_job(tmp_path / "jobs", "steps=2")
    journal = tmp_path / "jobs" / job / "journal.jsonl"
    with open(journal, "ab") as f:
        f.write(b'{"seq": 99, "time": 1.0, "sta')
    (tmp_path / "jobs" / "not-a-job").mkdir()
    svc, thread = start_service(tmp_path / "jobs")
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            status = c.status(job)
            assert status["state"] == "done" and len(status["artifacts"]) == 3
            assert wait_state(c, c.submit(probe_scene("steps=1")))["state"] == "done"
    finally:
        stop_service(svc, thread)
    row(
        record_property,
        "fault",
        "journal's last line torn (as by a crash mid-write), stray folder in the data dir",
        "torn line ignored, job listed done with its 3 artifacts; stray folder skipped; new jobs run",
    )


def test_runner_outputs_outside_the_job_are_refused(client, record_property):
    for fault, needle in (("symlink", "is a symlink"), ("escape", "'..' parts")):
        job = client.submit(probe_scene(f"steps=2 fault={fault} at=0"))
        status = wait_state(client, job)
        assert status["state"] == "failed" and needle in status["message"], status["message"]
        names = {a["name"] for a in status["artifacts"]}
        assert "leak.txt" not in names and "../meta.json" not in names
        for name in ("leak.txt", "../meta.json"):
            with pytest.raises(ProtocolError) as err:
                client.fetch_bytes(job, name)
            assert err.value.code == errors.NOT_FOUND
    assert np.all([wait_state(client, client.submit(probe_scene("steps=1")))["state"] == "done"])
    row(
        record_property,
        "fault",
        "runner announces a symlink to /etc/hostname and the name ../meta.json as artifacts",
        "job failed naming the symlink / the '..' part; neither listed nor fetchable (not_found)",
    )


# ----------------------------------------------------------------------------------------------
# The real loop behind the service


def temple_orbit_scene(temple_dir: Path, tmp_path: Path, frames: int, **settings: Any) -> Any:
    """3 temple captures (ring-arc, none held out) and an orbit of ``frames`` through them, at 64x48 with
    ``settings``: a real loop job small enough for a test."""
    from dataclasses import replace

    from backend.camera_paths import default_trajectory
    from backend.evaluate import split_protocol
    from backend.formats import import_scene
    from backend.scene import Settings, TrajectoryFrame

    scene = split_protocol(
        import_scene("middlebury", temple_dir, tmp_path / "temple"), "ring-arc", train_views=3, ring_start=11
    )
    orbit = default_trajectory([c.camera for c in scene.captures], frames)
    trajectory = [TrajectoryFrame(i + 1, c) for i, c in enumerate(orbit)]
    return replace(scene, trajectory=trajectory, heldout=[], settings=Settings(width=64, height=48, **settings))


@pytest.mark.slow
@pytest.mark.xdist_group("loop")
def test_real_loop_job_and_cancel_through_the_service(temple_dir, tmp_path, record_property):
    """The reconstruction loop (default runner) on 3 temple captures at 64x48, no fit: done, fetched, then cancelled."""
    from backend.service.store import scene_message
    from backend.service.worker import default_runner

    scene = temple_orbit_scene(temple_dir, tmp_path, 6, gaussian_iterations=0, segment_length=6, segment_overlap=2)
    svc, thread = start_service(tmp_path / "jobs", runner=default_runner)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            job = c.submit(scene_message(scene))
            c.watch(job, since=0)
            events = list(c.events(job, idle_ms=60_000))
            assert events[-1]["state"] == "done", events[-1]
            artifacts = c.status(job)["artifacts"]
            assert {"points.ply", "frames/frame_0001.png"} <= {a["name"] for a in artifacts}
            for a in artifacts:
                assert hashlib.sha256(c.fetch_bytes(job, a["name"])).hexdigest() == a["sha256"]
            again = c.submit(scene_message(scene))
            c.watch(again, since=0)
            for event in c.events(again, idle_ms=60_000):
                if event["stage"] == "memory":
                    break
            t0 = time.monotonic()
            c.cancel(again)
            status = wait_state(c, again, timeout_s=120)
            took_s = time.monotonic() - t0
            assert status["state"] == "cancelled"
    finally:
        stop_service(svc, thread)
    record_property("real_loop_cancel_s", round(took_s, 2))
    row(
        record_property,
        "fault",
        "the real loop (3 temple captures, 6 frames, 64x48) through the service; a second run cancelled after its memory stage",
        f"first job done, {len(artifacts)} artifacts fetched with sha256; cancel took effect after {took_s:.1f} s (at the loop's next progress report)",
    )


def exiting_runner(scene, out_dir, *, device, progress):
    """The probe runner, but the prompts ``exit`` and ``interrupt`` raise SystemExit and KeyboardInterrupt."""
    if scene.settings.prompt == "exit":
        sys.exit(3)  # as some libraries do on a fatal error
    if scene.settings.prompt == "interrupt":
        raise KeyboardInterrupt  # not a job's fault: it ends the worker thread
    return probe_runner(scene, out_dir, device=device, progress=progress)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_base_exceptions_fail_the_job_and_a_dead_worker_thread_is_replaced(tmp_path, record_property):
    svc, thread = start_service(tmp_path / "jobs", runner=exiting_runner)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            exited, interrupted, good = (c.submit(scene_msg(p)) for p in ("exit", "interrupt", ""))
            status = wait_state(c, exited)
            assert (status["state"], status["message"]) == ("failed", "SystemExit: 3")
            status = wait_state(c, interrupted)
            assert status["state"] == "failed", status
            assert "worker thread on cpu died during this job (KeyboardInterrupt" in status["message"]
            assert wait_state(c, good)["state"] == "done"  # on the thread started in place of the dead one
    finally:
        stop_service(svc, thread)
    row(
        record_property,
        "fault",
        "SystemExit raised in a job; then KeyboardInterrupt, which ends the worker thread",
        f'first job failed: "SystemExit: 3"; second failed: "{status["message"][:70]}..."; '
        "a new worker thread ran the next job",
    )


def test_memory_is_released_once_the_failed_jobs_frames_are_gone(tmp_path, monkeypatch, record_property):
    """release_memory runs after the except block: the exception's traceback no longer holds the tensors."""
    held, seen = [], []

    class Tensor:  # stands in for a CUDA tensor a runner's frame holds
        pass

    def oom_runner(scene, out_dir, *, device, progress):
        tensor = Tensor()
        held.append(weakref.ref(tensor))
        raise MemoryError("CUDA out of memory (simulated)")

    def spy():
        gc.collect()
        seen.append((held[0]() is None, sys.exc_info()[0]))

    monkeypatch.setattr(worker_module, "release_memory", spy)
    monkeypatch.setattr(worker_module, "load_scene", lambda folder: None)
    ctx = zmq.Context.instance()
    main, end = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    endpoint = f"inproc://test-release-{os.getpid()}"
    main.bind(endpoint)
    end.connect(endpoint)
    main.setsockopt(zmq.RCVTIMEO, 10_000)  # a message never sent fails the test (zmq.Again), not hangs it
    (tmp_path / ARTIFACTS_DIR).mkdir()
    try:
        worker_module.Worker(ctx, endpoint, oom_runner, "cpu")._run_job(end, "j", tmp_path)
        finished = msgpack.unpackb([main.recv() for _ in range(2)][-1])
    finally:
        main.close(linger=0)
        end.close(linger=0)
    assert finished["state"] == "failed" and finished["message"].startswith("out of memory")
    assert seen == [(True, None)]
    row(
        record_property,
        "fault",
        "MemoryError in a runner whose frame holds a (stand-in) tensor",
        "gc and the CUDA cache emptied after the except block: the tensor was already freed",
    )


def test_memory_is_released_after_every_job_not_only_a_failed_one(tmp_path, monkeypatch):
    """A done, a cancelled and a failed job each end with release_memory (gc and the CUDA cache emptied): a done
    job used to keep the GPU memory it reserved until the next job's failure."""
    calls = []
    monkeypatch.setattr(worker_module, "release_memory", lambda: calls.append(1))
    svc, thread = start_service(tmp_path / "jobs")
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            assert wait_state(c, c.submit(probe_scene("steps=2")))["state"] == "done"
            assert len(calls) == 1
            job = c.submit(probe_scene(f"steps=5000 delay_ms={STEP_MS}"))
            wait_state(c, job, states=("running",))
            c.cancel(job)
            assert wait_state(c, job)["state"] == "cancelled"
            assert len(calls) == 2
            assert wait_state(c, c.submit(probe_scene("steps=2 fault=error at=0")))["state"] == "failed"
            assert len(calls) == 3
    finally:
        stop_service(svc, thread)


def test_a_stage_meter_tags_what_leaves_a_stage_the_innermost_stage_wins():
    import torch

    from backend.outputs import StageMeter
    from backend.progress import failed_stage
    from backend.service.faults import describe_failure

    meter = StageMeter(torch.device("cpu"))
    with pytest.raises(RuntimeError) as info:
        with meter.measure("fit"), meter.measure("outputs"):
            raise RuntimeError("disk on fire")
    assert failed_stage(info.value) == "outputs"
    assert meter.stages["fit"]["calls"] == meter.stages["outputs"]["calls"] == 1  # still timed
    assert describe_failure(info.value, stage="update") == "RuntimeError: disk on fire (in stage 'outputs')"
    assert describe_failure(ValueError("x"), stage="update") == "ValueError: x (in stage 'update')"  # untagged


def _raise(err: BaseException):
    def stage_fn(*args, **kwargs):
        raise err

    return stage_fn


@pytest.mark.parametrize(
    "target, err, stage, message",
    [
        # the loop reports "update" as it ends, then fits: the OOM used to read "in stage 'update'"
        (
            "fit_gaussians",
            "oom",
            "fit",
            "out of GPU memory in stage 'fit': CUDA out of memory. Tried to allocate 2.00 GiB (injected)",
        ),
        # the loop reports "cameras" as it ends, then builds the memory: the error used to read "in stage 'cameras'"
        ("build_memory", RuntimeError("injected in the memory"), "memory", "RuntimeError: injected in the memory"),
    ],
)
@pytest.mark.xdist_group("loop")
def test_a_failed_real_loop_job_names_the_stage_it_failed_in(
    temple_dir, tmp_path, monkeypatch, single_thread, target, err, stage, message
):
    """The real loop (default runner, 3 temple captures at 64x48) with a stage that raises: the failed event's
    stage and message name that stage (StageMeter.measure tags the error), not the stage reported before it."""
    import torch

    import backend.loop as loop_module
    from backend.service.worker import default_runner

    if err == "oom":
        err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    monkeypatch.setattr(loop_module, target, _raise(err))
    scene = temple_orbit_scene(
        temple_dir, tmp_path, 4, gaussian_iterations=10, guide=False, segment_length=4, segment_overlap=1
    )
    svc, thread = start_service(tmp_path / "jobs", runner=default_runner)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            job = c.submit(scene_message(scene))
            c.watch(job, since=0)
            events = list(c.events(job, idle_ms=60_000))
    finally:
        stop_service(svc, thread)
    failed = events[-1]
    assert failed["state"] == "failed", failed
    assert failed["stage"] == stage, failed
    assert failed["message"].startswith(message), failed["message"]
    assert f"(in stage {stage!r})" in failed["message"] or f"in stage {stage!r}:" in failed["message"]


def test_torn_journal_line_keeps_its_seq_and_the_next_event_starts_a_new_line(tmp_path, record_property):
    """A cut last line: the next event (interrupted) goes on a line of its own with a seq never given out."""
    store = JobStore(tmp_path / "jobs")
    record = store.create({"scene": scene_msg(), "key": None})
    store.append(record, "running", "starting", 0.0, "started")
    store.append(record, "running", "fit", 0.5, "half")  # seq 3: a watching client has seen it
    journal = record.dir / JOURNAL_FILE
    journal.write_bytes(journal.read_bytes()[:-20])  # seq 3's line cut, as by a crash mid-write
    svc, thread = start_service(tmp_path / "jobs")
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            status = c.status(record.job)
            assert (status["state"], status["seq"]) == ("interrupted", 4)
            c.watch(record.job, since=3)  # a client that saw seq 3 gets the new event
            assert [(e["seq"], e["state"]) for e in c.poll_events(TIMEOUT_MS)] == [(4, "interrupted")]
    finally:
        stop_service(svc, thread)
    again = JobStore(tmp_path / "jobs")
    again.load()
    assert [e["seq"] for e in again.jobs[record.job].events] == [1, 2, 4]  # only the cut line is lost
    assert again.jobs[record.job].state == "interrupted"
    row(
        record_property,
        "fault",
        "journal's last line (an event a client saw) cut, then restart",
        "the next event starts a new line, with seq one past the cut line's: the client does not drop it; "
        "readable at the next restart",
    )


def _port_bindable(port: int, within_s: float) -> bool:
    """Whether a plain socket can bind ``port`` on loopback within ``within_s`` seconds. ZeroMQ closes a
    listening socket in its I/O thread, so a closed ROUTER gives its port back a moment later, not at once."""
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.02)


def test_failed_start_up_releases_the_store_lock_and_the_port(tmp_path, monkeypatch, record_property):
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"

    def broken(self):
        raise RuntimeError("the worker pool cannot start")

    with monkeypatch.context() as m:
        m.setattr(worker_module.ThreadPool, "start", broken)
        with pytest.raises(RuntimeError, match="the worker pool cannot start"):
            start_service(tmp_path / "jobs", bind=bind)
    assert _port_bindable(port, within_s=5.0), "the failed start-up kept its port"
    svc, thread = start_service(tmp_path / "jobs", bind=bind)  # same store, same port, same process
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            assert c.jobs() == []
    finally:
        stop_service(svc, thread)
    row(
        record_property,
        "fault",
        "the worker pool fails to start (after the store is locked and the port bound)",
        "start-up error raised; lock, port and auth released: a second start in the same process works",
    )
