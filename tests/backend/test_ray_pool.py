"""The service on a pool of Ray actors: a local Ray with 2 CPU workers, real loopback sockets, the probe runner.

One Ray instance serves the whole module (starting Ray takes seconds); the ``ray`` xdist group keeps these
tests in one pytest-xdist worker. Each test starts its own front end (and so its own two actors).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from backend.fileio import sha256_file
from backend.progress import no_progress
from backend.service import probe
from backend.service.fairqueue import FairQueue
from backend.service.spawn import free_port, wait_answering
from backend.service.store import ARTIFACTS_DIR, write_scene_message
from protocol import errors, limits
from protocol.client import Client
from protocol.errors import ProtocolError
from tests.backend._reliability import TIMEOUT_MS, probe_scene, spawn_serve, start_service, stop_service, wait_state
from tests.conftest import require_module

pytestmark = pytest.mark.xdist_group("ray")

ray = require_module("ray", "the dev extra holds it")

from backend.service.ray_pool import RayConfig, checkout_runtime_env  # noqa: E402

WORKERS = 2
CANCEL_BOUND_S = 2.0
DEATH_BOUND_S = 10.0
RAY_START_S = 120.0  # a Ray of its own in a subprocess: about 10 s on 2 idle cores


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(
        num_cpus=2 * WORKERS,  # logical CPUs: the module's shared service and the restart test's own, at once
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        object_store_memory=80 * 1024 * 1024,
        runtime_env=checkout_runtime_env(),
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    svc, thread = start_ray_service(tmp_path_factory.mktemp("ray") / "jobs")
    yield svc
    stop_service(svc, thread)


def start_ray_service(data_dir: Path, **config):
    return start_service(data_dir, ray=RayConfig(workers=WORKERS, host="127.0.0.1"), **config)


def journal(data_dir: Path, job: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / job / "journal.jsonl").read_text().splitlines()]


def expected_steps(tmp_path: Path, scene: dict) -> dict[str, str]:
    """sha256 of each probe step file when the same scene runs in this process (the reference)."""
    folder = tmp_path / f"ref-{len(list(tmp_path.glob('ref-*')))}"
    loaded = write_scene_message(scene, folder / "scene")
    probe.run(loaded, folder / "out", device="cpu", progress=no_progress)
    return {p.name: sha256_file(p) for p in sorted((folder / "out").glob("step*.json"))}


def test_three_clients_six_jobs_run_once_each_on_both_workers(service, tmp_path):
    scenes = [probe_scene(f"steps=3 delay_ms={40 + 10 * i}", captures=1 + i % 3) for i in range(6)]
    jobs: dict[int, str] = {}

    def submit_two(client_index: int) -> None:
        with Client(service.endpoint, timeout_ms=TIMEOUT_MS) as c:
            for k in range(2):
                i = 2 * client_index + k
                jobs[i] = c.submit(scenes[i])

    threads = [threading.Thread(target=submit_two, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(jobs.values())) == 6
    workers = set()
    with Client(service.endpoint, timeout_ms=TIMEOUT_MS) as c:
        listed = {j["job"]: j for j in c.jobs()}
        # queued and not yet handed to a worker (a handed-over job stays "queued" until it starts)
        waiting = sorted((j for j in listed.values() if "queue_position" in j), key=lambda j: j["queue_position"])
        assert all(j["state"] == "queued" for j in waiting), waiting
        assert len(waiting) >= 2 and waiting[0]["message"].startswith("queued: 1st of "), listed  # 6 jobs, 2 workers
        assert [j["queue_position"] for j in waiting] == list(range(1, len(waiting) + 1)), waiting
        assert all(j["queue_length"] == len(waiting) and "worker" not in j for j in waiting), waiting
        running = [j for j in listed.values() if j["state"] == "running"]
        # the message names the job's worker once ("started on worker ray-0 (...)" or "step 2 of 9 (on worker ...)")
        assert all(j["worker"].startswith("worker ray-") and j["message"].count(j["worker"]) == 1 for j in running), (
            running
        )
        assert all("queue_position" not in j for j in running), running
        for i, job in sorted(jobs.items()):
            status = wait_state(c, job)
            assert status["state"] == "done", status["message"]
            got = {a["name"]: a["sha256"] for a in status["artifacts"] if a["name"].startswith("step")}
            assert got == expected_steps(tmp_path, scenes[i])  # the outputs a run here gives
            events = journal(service.data_dir, job)
            started = [e for e in events if e["stage"] == "starting"]
            assert len(started) == 1, events  # ran once
            assert started[0]["message"].startswith("started on worker ray-")
            workers.add(started[0]["message"].split()[3])
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            steps = [e["fraction"] for e in events if e["stage"] == "probe"]
            assert steps == sorted(steps) and len(steps) == 3  # progress arrived in order
    assert workers == {"ray-0", "ray-1"}


def test_cancel_a_running_job_within_a_bound(service):
    with Client(service.endpoint, timeout_ms=TIMEOUT_MS) as c:
        job = c.submit(probe_scene("steps=5000 delay_ms=20"))
        other = c.submit(probe_scene("steps=2"))
        while not c.status(job)["artifacts"]:
            time.sleep(0.02)
        t0 = time.monotonic()
        c.cancel(job)
        status = wait_state(c, job, timeout_s=CANCEL_BOUND_S)
        assert status["state"] == "cancelled" and time.monotonic() - t0 < CANCEL_BOUND_S
        assert wait_state(c, other)["state"] == "done"


def test_killed_worker_fails_its_job_with_its_name_and_the_others_finish(service):
    with Client(service.endpoint, timeout_ms=TIMEOUT_MS) as c:
        doomed = c.submit(probe_scene("steps=5000 delay_ms=20"))
        while not c.status(doomed)["artifacts"]:
            time.sleep(0.02)
        others = [c.submit(probe_scene("steps=3 delay_ms=30")) for _ in range(3)]
        slot = next(s for s in service.slots if s.running == doomed)
        pid, name = slot.info["pid"], slot.name
        os.kill(pid, signal.SIGKILL)
        status = wait_state(c, doomed, timeout_s=DEATH_BOUND_S)
        assert status["state"] == "failed"
        assert status["message"].startswith(f"worker {name} (pid {pid} on "), status["message"]
        assert "died during this job" in status["message"] and "submit it again" in status["message"]
        for job in others:
            assert wait_state(c, job)["state"] == "done"
        assert [e["state"] for e in journal(service.data_dir, doomed)].count("failed") == 1
        # a new actor took the dead one's place: two workers again, and the next jobs use both
        deadline = time.monotonic() + DEATH_BOUND_S
        while not all(s.ready for s in service.slots) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(service.slots) == WORKERS and f"worker {name} " not in " ".join(s.describe for s in service.slots)
        more = [c.submit(probe_scene("steps=2 delay_ms=100")) for _ in range(2)]
        assert all(wait_state(c, job)["state"] == "done" for job in more)


def test_front_end_restart_keeps_finished_jobs_and_marks_running_ones_interrupted(ray_cluster, tmp_path):
    data_dir = tmp_path / "jobs"
    svc, thread = start_ray_service(data_dir)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            finished = c.submit(probe_scene("steps=2"))
            shas = {a["name"]: a["sha256"] for a in wait_state(c, finished)["artifacts"]}
            running = [c.submit(probe_scene("steps=5000 delay_ms=20")) for _ in range(WORKERS)]
            waiting = c.submit(probe_scene("steps=2"))
            for job in running:
                wait_state(c, job, states=("running",))
    finally:
        stop_service(svc, thread)
    svc, thread = start_ray_service(data_dir)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            states = {j["job"]: j["state"] for j in c.jobs()}
            assert states[finished] == "done" and all(states[j] == "interrupted" for j in running)
            assert {a["name"]: a["sha256"] for a in c.status(finished)["artifacts"]} == shas
            for name, sha in shas.items():
                assert sha256_file(data_dir / finished / ARTIFACTS_DIR / name) == sha
            assert wait_state(c, waiting)["state"] == "done"  # queued before the restart: runs after it
    finally:
        stop_service(svc, thread)


def test_sigterm_stops_a_ray_service_as_it_stops_one_without_ray(tmp_path):
    """SIGTERM (systemd, docker stop) to `serve --ray local` mid-job: the service stops between steps, marks the
    job interrupted and exits 0. ``ray.init`` used to take SIGTERM over: the process aborted (-6, glog's stack
    trace), left the job "running" and Ray's agents behind."""
    data_dir = tmp_path / "jobs"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = spawn_serve(data_dir, endpoint, "--ray", "local", "--workers", "1")
    try:
        wait_answering(endpoint, RAY_START_S, proc=proc)
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as c:
            assert c.hello()["device"] == "ray: 1 worker, cpu"
            job = c.submit(probe_scene("steps=2 delay_ms=60000"))  # one step sleeps a minute
            wait_state(c, job, ("running",))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(RAY_START_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / f"serve-{endpoint.rsplit(':', 1)[1]}.log").read_text()
    assert "stopped by SIGTERM" in log and "SIGTERM received" not in log, log
    assert journal(data_dir, job)[-1]["state"] == "interrupted"


def test_fair_queue_is_fifo_per_client_and_takes_turns():
    q = FairQueue()
    for job in ("a1", "a2", "a3"):
        q.append("alice", job)
    q.append("bob", "b1")
    q.append("carol", "c1")
    assert q.order() == ["a1", "b1", "c1", "a2", "a3"] and q.positions()["a3"] == 5
    assert q.pop() == "a1"
    q.append("bob", "b2")
    assert q.order() == ["b1", "c1", "a2", "b2", "a3"]
    q.remove("c1")
    assert [q.pop() for _ in range(len(q))] == ["b1", "a2", "b2", "a3"] and q.pop() is None
    with pytest.raises(ValueError, match="not waiting"):
        q.remove("a1")


def test_per_client_cap_refuses_the_extra_submit(tmp_path):
    caps = limits.JobLimits(max_queued_per_client=2)
    svc, thread = start_service(tmp_path / "jobs", job_limits=caps)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            first = c.submit(probe_scene("steps=200 delay_ms=10"))
            wait_state(c, first, states=("running",))
            c.submit(probe_scene())
            c.submit(probe_scene())
            with pytest.raises(ProtocolError) as err:
                c.submit(probe_scene())
            assert err.value.code == errors.TOO_LARGE and "the most one client may queue" in err.value.message
            assert c.hello()["limits"]["max_queued_per_client"] == 2
            c.cancel(first)
    finally:
        stop_service(svc, thread)


def test_bench_cluster_throughput_runs_at_a_tiny_size(ray_cluster, tmp_path):
    from scripts.bench_cluster import main

    assert (
        main(["throughput", "--workers", "1", "--jobs", "2", "--steps", "2", "--work-ms", "5", "--out", str(tmp_path)])
        == 0
    )
    result = json.loads((tmp_path / "bench_cluster_throughput.json").read_text())
    row = result["rows"][0]
    assert row["workers"] == 1 and row["events"] == 4 and row["jobs_per_min"] > 0 and result["ratio"] == [1.0]


def test_workers_share_the_cluster_cpus_as_threads() -> None:
    from backend.service.ray_pool import worker_cpus

    assert worker_cpus(2.0, 2, 0.0) == (1, 1)  # the CI pool: a core each
    assert worker_cpus(16.0, 1, 0.0) == (1, 16)  # one CPU worker runs on the machine's 16 cores
    assert worker_cpus(64.0, 8, 1.0) == (0, 8)  # GPU workers reserve no CPU but run 8 threads each
    assert worker_cpus(2.0, 4, 0.0) == (1, 1)  # never fewer than one


def test_the_head_check_takes_an_ipv6_address():
    """``--ray [::1]:PORT``: the brackets are the address's, not the host's (a live head was refused)."""
    from backend.service.ray_pool import check_head_answers

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with socket.socket(socket.AF_INET6) as head:
        try:
            head.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        head.listen()
        check_head_answers(f"[::1]:{head.getsockname()[1]}")
        check_head_answers(f"ray://[::1]:{head.getsockname()[1]}")


def test_a_ray_config_names_a_malformed_address_when_made():
    """A library caller's RayConfig(address="headnode") was taken, and failed only when the pool started."""
    with pytest.raises(
        ValueError, match=r"RayConfig.address must be auto, local or HOST:PORT of a Ray head; got 'headnode'"
    ):
        RayConfig(address="headnode")
    assert RayConfig(address="10.0.0.5:6379").address == "10.0.0.5:6379"
