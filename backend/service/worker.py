"""The worker thread: runs one job at a time and talks to the main thread only through messages.

It creates its own PAIR socket on the ``inproc://`` endpoint of the service's context (sockets are
never shared between threads). Messages are msgpack maps:

main -> worker: ``{"cmd": "run", "job", "dir"}``, ``{"cmd": "cancel", "job"}``, ``{"cmd": "stop"}``
worker -> main: ``{"kind": "started", "job"}``,
``{"kind": "progress", "job", "stage", "fraction", "message", "artifacts": [entries]}``,
``{"kind": "finished", "job", "state", "message", "artifacts": [entries]}`` (a failed job's also ``"stage"``: the
stage it failed in, ``progress.failed_stage``, else the stage it last reported)

Cancel and stop are read in the progress callback, which raises ``Cancelled``: a job stops at the
next step boundary the runner reports. Texts are clipped to the protocol's limits in UTF-8 bytes.
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

from ..progress import Cancelled, ProgressEvent, ProgressFn, failed_stage
from ..scene import Scene, load_scene
from .faults import describe_failure, release_memory
from .store import ARTIFACTS_DIR, SCENE_DIR, Manifest

log = logging.getLogger(__name__)

Runner = Callable[..., Any]  # runner(scene, out_dir, *, device, progress) -> Any
POLL_MS = 200  # how often an idle worker looks at its socket
CONNECT_TIMEOUT_S = 10.0  # how long start() waits for the worker thread to connect its PAIR


def default_runner(scene: Scene, out_dir: Path, *, device: str, progress: ProgressFn) -> Any:
    """The reconstruction loop (imported when the first job runs: torch loads then, not at start)."""
    from ..loop import run_loop

    return run_loop(scene, out_dir, device=device, progress=progress)


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
        self.exit_reason: str | None = None  # why run() ended other than by a stop, for ThreadPool.dead

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
        except BaseException as err:  # recorded before the thread ends: the front end fails the job and replaces us
            self.exit_reason = describe_failure(err)
            raise
        finally:
            sock.close()

    def _run_job(self, sock: zmq.Socket, job: str, job_dir: Path) -> bool:
        """Run one job; returns True when a stop arrived during it."""
        send = lambda body: sock.send(msgpack.packb(body, use_bin_type=True))  # noqa: E731
        manifest = Manifest(job_dir)
        flags = {"cancel": False, "stop": False}
        stage: list[str | None] = [None]  # the stage last reported, for failure messages

        def progress(event: ProgressEvent) -> None:
            stage[0] = str(event.stage)
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
                    "stage": str(event.stage),  # clipped where the store makes the event
                    "fraction": _clean_fraction(event.fraction),
                    "message": str(event.message),
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
            try:
                scene = load_scene(job_dir / SCENE_DIR)
                self.runner(scene, job_dir / ARTIFACTS_DIR, device=self.device, progress=progress)
            except _Stop:
                state, message = "interrupted", "the service stopped during this job; submit it again to rerun"
            except Cancelled:
                state, message = "cancelled", "cancelled by a client"
            except KeyboardInterrupt:
                raise
            except BaseException as err:  # a fault in a job (even SystemExit from a library) fails that job only
                log.error("job %s failed:\n%s", job, traceback.format_exc())
                stage[0] = failed_stage(err) or stage[0]  # the stage it was raised in, not the last reported
                state, message = "failed", describe_failure(err, stage=stage[0], data_dir=job_dir.parent)
        finally:
            # After every job, done or not: what it held goes, and the CUDA cache it filled goes back to the
            # device (a done job kept GBs reserved). Out of the except blocks: a handled exception no longer
            # holds the frames' tensors. The generator cache's weights stay (referenced, not garbage).
            release_memory()
        try:
            entries = manifest.add(manifest.unlisted())
        except (OSError, ValueError) as err:
            log.error("job %s: cannot list its outputs: %s", job, err)
            entries = []
            if state == "done":
                state, message = "failed", f"cannot record the outputs: {err}"
        finished = {"kind": "finished", "job": job, "state": state, "message": message, "artifacts": entries}
        if state == "failed" and stage[0] is not None:  # the failed event's stage (else: the stage last reported)
            finished["stage"] = stage[0]
        send(finished)
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
    actor: Any = None  # Ray: the actor handle; ThreadPool: the Worker thread
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
        """Start the worker thread and wait until it has connected: a message sent before is lost."""
        self.slots = [self._new_slot()]  # listed first: close() closes its socket when the wait fails
        if not self.check_ready(self.slots[0], CONNECT_TIMEOUT_S):
            raise TimeoutError(f"the worker thread did not connect within {CONNECT_TIMEOUT_S:.0f} s")
        return self.slots

    def _new_slot(self) -> Slot:
        endpoint = f"inproc://reconloop-worker-{secrets.token_hex(8)}"
        pair = self.context.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.bind(endpoint)
        worker = Worker(self.context, endpoint, self.runner, self.device)
        worker.start()
        return Slot(name="local", pair=pair, describe=f"the service's worker thread on {self.device}", actor=worker)

    def check_ready(self, slot: Slot, wait_s: float = 0.0) -> bool:
        """Whether the slot's thread has connected (its PAIR can send), waiting up to ``wait_s``."""
        if not slot.ready:
            slot.ready = bool(slot.pair.poll(int(wait_s * 1000), zmq.POLLOUT))
        return slot.ready

    def dead(self) -> list[tuple[Slot, str]]:
        """Slots whose thread ended without a stop (a fault outside a job's runner), with the reason."""
        out = []
        for slot in self.slots:
            if slot.actor is not None and not slot.actor.is_alive():
                out.append((slot, slot.actor.exit_reason or "its thread ended without being asked to stop"))
                slot.actor = None  # reported once
        return out

    def replace(self, slot: Slot) -> Slot:
        """A new thread in place of a dead one (same position in ``slots``); it becomes ready once connected."""
        slot.pair.close(linger=0)
        new = self._new_slot()
        self.slots[self.slots.index(slot)] = new
        return new

    def join(self, wait_s: float) -> None:
        for slot in self.slots:
            if slot.actor is not None:
                slot.actor.join(wait_s)

    def close(self) -> None:
        for slot in self.slots:
            slot.pair.close(linger=0)
