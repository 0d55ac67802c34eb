"""Helpers of the reliability tests (auth, limits, fuzz, faults, load): services, subprocesses, waits.

Tests record what they injected and what happened with ``row(record_property, ...)``; the properties
land in pytest's junit XML, which ``scripts/reliability_report.py`` turns into ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backend.service import Service, ServiceConfig
from backend.service.probe import run as probe_runner
from backend.service.spawn import free_port, serve_command, serve_env
from protocol.client import Client
from protocol.schemas import TERMINAL_STATES
from tests.protocol.helpers import scene_msg

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 5000
WAIT_S = 30.0
POLL_S = 0.02


def probe_scene(plan: str = "", *, captures: int = 2) -> dict[str, Any]:
    """A small valid submit ``scene`` whose job the probe runner runs as ``probe <plan>``."""
    return scene_msg(f"probe {plan}".strip() if plan else "", captures=captures)


def start_service(
    data_dir: Path, *, runner: Callable[..., Any] = probe_runner, bind: str = "tcp://127.0.0.1:*", **config: Any
) -> tuple[Service, Any]:
    svc = Service(ServiceConfig(bind=bind, data_dir=data_dir, device="cpu", **config), runner=runner)
    return svc, svc.start_thread()


def stop_service(svc: Service, thread: Any) -> None:
    svc.stop()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the service did not stop"


def finished_probe_job(data_dir: Path, plan: str) -> str:
    """Run one probe job to its end on a service that is then stopped; returns the job id."""
    svc, thread = start_service(data_dir)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            job = c.submit(probe_scene(plan))
            wait_state(c, job)
    finally:
        stop_service(svc, thread)
    return job


def wait_state(
    client: Client, job: str, states: tuple[str, ...] = TERMINAL_STATES, timeout_s: float = WAIT_S
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status = client.status(job)
    while status["state"] not in states:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} still {status['state']} ({status['message']}) after {timeout_s} s")
        time.sleep(POLL_S)
        status = client.status(job)
    return status


def spawn_serve(
    data_dir: Path, endpoint: str, *extra: str, preexec: Callable[[], None] | None = None
) -> subprocess.Popen:
    """``reconloop serve`` with the probe runner in a subprocess (stderr to ``data_dir``/../serve.log)."""
    cmd = serve_command(endpoint, data_dir, runner="backend.service.probe:run", extra=extra)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(data_dir.parent / f"serve-{endpoint.rsplit(':', 1)[1]}.log", "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=serve_env(), stdout=log, stderr=log, preexec_fn=preexec)


@contextlib.contextmanager
def serve_processes(data_dir: Path) -> Iterator[tuple[str, Callable[[], subprocess.Popen]]]:
    """An endpoint on a free port, and ``spawn()`` starting ``reconloop serve`` there on ``data_dir`` (a first
    start, a restart); every process spawned is killed at the end if still running."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []

    def spawn() -> subprocess.Popen:
        procs.append(spawn_serve(data_dir, endpoint))
        return procs[-1]

    try:
        yield endpoint, spawn
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def row(record_property: Callable[[str, Any], None], category: str, injected: str, outcome: str) -> None:
    """One row of docs/reliability.md: what was injected and what happened (measured)."""
    record_property("category", category)
    record_property("injected", injected)
    record_property("outcome", outcome)
