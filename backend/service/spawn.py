"""``reconloop serve`` in a subprocess of this interpreter: a free loopback port, the command line, the environment,
and the wait until it answers.

For the scripts and tests that run the real service in its own process (benchmarks, the load test, the demo,
the restart and fault tests). The Blender add-on has its own (``blender_addon/connection.py``): it cannot
import ``backend``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocol.client import Client

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (another process may take it before the service binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_command(
    endpoint: str, data_dir: str | Path, *, device: str = "cpu", runner: str | None = None, extra: Sequence[str] = ()
) -> list[str]:
    """``python -m backend.cli serve`` with this interpreter, bound to ``endpoint``, its job store in ``data_dir``.

    Args:
        endpoint: the ZeroMQ endpoint it binds (``--bind``), e.g. ``tcp://127.0.0.1:5555``.
        data_dir: its job store folder (``--data-dir``).
        device: its compute device (``--device``).
        runner: a job runner ``MODULE:FUNC`` instead of the loop (``--runner``), e.g. ``backend.service.probe:run``.
        extra: more ``serve`` arguments, appended as given (``--curve-secret``, ``--max-frame-mib``, ...).
    """
    cmd = [sys.executable, "-m", "backend.cli", "serve", "--bind", endpoint, "--device", device]
    cmd += ["--data-dir", str(data_dir)]
    if runner:
        cmd += ["--runner", runner]
    return [*cmd, *extra]


def serve_env(*paths: str | Path) -> dict[str, str]:
    """This process's environment with ``PYTHONPATH`` = the repository root, then ``paths``, then its old value."""
    old = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), *map(str, paths), old]))}


def wait_answering(endpoint: str, timeout_s: float, *, proc: subprocess.Popen | None = None, **client_kw: Any) -> None:
    """Return once the service at ``endpoint`` answers ``jobs`` (``hello``'s first call imports the generators,
    which is slow); ``client_kw`` go to :class:`protocol.client.Client` (CurveZMQ keys).

    Raises:
        RuntimeError: ``proc`` (the service's process, if given) exited first, or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service at {endpoint} exited with {proc.returncode} before it answered")
        try:
            with Client(endpoint, timeout_ms=500, retries=0, **client_kw) as c:
                c.jobs()
                return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service at {endpoint} did not answer in {timeout_s:.0f} s") from None
