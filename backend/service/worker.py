"""The worker thread: runs one job at a time and talks to the main thread only through messages.

It creates its own PAIR socket on the ``inproc://`` endpoint of the service's context (sockets are
never shared between threads). Messages are msgpack maps:

main -> worker: ``{"cmd": "run", "job", "dir"}``, ``{"cmd": "cancel", "job"}``, ``{"cmd": "stop"}``
worker -> main: ``{"kind": "started", "job"}``,
``{"kind": "progress", "job", "stage", "fraction", "message", "artifacts": [entries]}``,
``{"kind": "finished", "job", "state", "message", "artifacts": [entries]}``

Cancel and stop are read in the progress callback, which raises ``Cancelled``: a job stops at the
next step boundary the runner reports.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from protocol import limits

from ..progress import Cancelled, ProgressEvent, ProgressFn
from ..scene import Scene, load_scene
from .faults import describe_failure, release_memory
from .store import ARTIFACTS_DIR, SCENE_DIR, Manifest

log = logging.getLogger(__name__)

Runner = Callable[..., Any]  # runner(scene, out_dir, *, device, progress) -> Any
POLL_MS = 200  # how often an idle worker looks at its socket


def default_runner(scene: Scene, out_dir: Path, *, device: str, progress: ProgressFn) -> Any:
    """The reconstruction loop (imported when the first job runs: torch loads then, not at start)."""
    from ..loop import run_loop

    return run_loop(scene, out_dir, device=device, progress=progress)


def _clean_text(value: Any, max_chars: int) -> str:
    text = str(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _clean_fraction(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(max(f, 0.0), 1.0) if math.isfinite(f) else 0.0


class _Stop(Cancelled):
    """Cancelled because the service is stopping (the job becomes interrupted, not cancelled)."""


class Worker(threading.Thread):
    """Runs jobs handed over by the main thread, one at a time."""

    def __init__(self, context: zmq.Context, endpoint: str, runner: Runner, device: str) -> None:
        super().__init__(name="reconloop-worker", daemon=True)
        self.context = context
        self.endpoint = endpoint
        self.runner = runner
        self.device = device

    def run(self) -> None:
        sock = self.context.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            while True:
                if not sock.poll(POLL_MS):
                    continue
                msg = msgpack.unpackb(sock.recv())
                if msg["cmd"] == "stop":
                    break
                if msg["cmd"] == "run":
                    if self._run_job(sock, msg["job"], Path(msg["dir"])):
                        break
                # a cancel for a job that already ended needs nothing
        finally:
            sock.close()

    def _run_job(self, sock: zmq.Socket, job: str, job_dir: Path) -> bool:
        """Run one job; returns True when a stop arrived during it."""
        send = lambda body: sock.send(msgpack.packb(body, use_bin_type=True))  # noqa: E731
        manifest = Manifest(job_dir)
        flags = {"cancel": False, "stop": False}
        stage: list[str | None] = [None]  # the stage last reported, for failure messages

        def progress(event: ProgressEvent) -> None:
            stage[0] = _clean_text(event.stage, limits.MAX_NAME_CHARS)
            while sock.poll(0):
                msg = msgpack.unpackb(sock.recv())
                if msg["cmd"] == "stop":
                    flags["stop"] = True
                elif msg["cmd"] == "cancel" and msg.get("job") == job:
                    flags["cancel"] = True
            entries = manifest.add(list(event.artifacts))
            send(
                {
                    "kind": "progress",
                    "job": job,
                    "stage": _clean_text(event.stage, limits.MAX_NAME_CHARS),
                    "fraction": _clean_fraction(event.fraction),
                    "message": _clean_text(event.message, limits.MAX_STR_BYTES),
                    "artifacts": entries,
                }
            )
            if flags["stop"]:
                raise _Stop("the service is stopping")
            if flags["cancel"]:
                raise Cancelled("cancelled by a client")

        send({"kind": "started", "job": job})
        state, message = "done", "finished"
        try:
            scene = load_scene(job_dir / SCENE_DIR)
            self.runner(scene, job_dir / ARTIFACTS_DIR, device=self.device, progress=progress)
        except _Stop:
            state, message = "interrupted", "the service stopped during this job; submit it again to rerun"
        except Cancelled:
            state, message = "cancelled", "cancelled by a client"
        except Exception as err:  # a fault in a job fails that job; the worker goes on with the next
            log.error("job %s failed:\n%s", job, traceback.format_exc())
            state, message = (
                "failed",
                _clean_text(describe_failure(err, stage=stage[0], data_dir=job_dir.parent), limits.MAX_STR_BYTES),
            )
            del err  # drop the traceback's frames (and the tensors they hold) before freeing memory
            release_memory()
        try:
            entries = manifest.add(manifest.unlisted())
        except (OSError, ValueError) as err:
            log.error("job %s: cannot list its outputs: %s", job, err)
            entries = []
            if state == "done":
                state, message = "failed", f"cannot record the outputs: {err}"
        send({"kind": "finished", "job": job, "state": state, "message": message, "artifacts": entries})
        return flags["stop"]


@dataclass
class Slot:
    """The front end's handle on one worker (the local thread, or a Ray actor) and the job it runs."""

    name: str
    pair: zmq.Socket  # the front end's end of the worker's PAIR socket
    running: str | None = None  # the job handed to it, until its "finished" message
    describe: str = ""  # "worker ray-1 (pid 4242 on 10.0.0.7, GPU 3)", for messages and status
    ready: bool = False  # the worker is connected: jobs may be sent
    serve_ref: Any = None  # Ray: the actor's running ``serve`` call
    actor: Any = None  # Ray: the actor handle
    info: dict[str, Any] = field(default_factory=dict)  # Ray: pid, node, gpus
    info_ref: Any = None


class ThreadPool:
    """One worker thread on ``inproc://``: the service on one device (no Ray). The pool interface:

    ``start() -> slots``, ``check_ready(slot)``, ``dead() -> [(slot, reason)]``, ``replace(slot)``,
    ``join(wait_s)`` after stop was sent, ``close()``.
    """

    def __init__(self, context: zmq.Context, runner: Runner, device: str) -> None:
        self.context = context
        self.runner = runner
        self.device = device
        self.slots: list[Slot] = []

    def start(self) -> list[Slot]:
        endpoint = f"inproc://reconloop-worker-{secrets.token_hex(8)}"
        pair = self.context.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.bind(endpoint)
        self.worker = Worker(self.context, endpoint, self.runner, self.device)
        self.worker.start()
        self.slots = [
            Slot(name="local", pair=pair, describe=f"the service's worker thread on {self.device}", ready=True)
        ]
        return self.slots

    def check_ready(self, slot: Slot) -> bool:
        return True

    def dead(self) -> list[tuple[Slot, str]]:
        return []  # a thread that raised would have failed its job already: run() catches job faults

    def replace(self, slot: Slot) -> Slot:
        raise RuntimeError("the worker thread is never replaced")

    def join(self, wait_s: float) -> None:
        self.worker.join(wait_s)

    def close(self) -> None:
        for slot in self.slots:
            slot.pair.close(linger=0)
