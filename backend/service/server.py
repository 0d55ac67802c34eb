"""The service: one ROUTER socket, one Poller loop, its workers, one job store.

The main thread owns the ROUTER (clients) and one PAIR per worker and answers every request at once, but for
a submit: its job folder (photos written, raw pixels encoded as PNGs, the scene loaded, its masks read: seconds
for a large scene) is written by a writer thread (WRITER_THREADS of them), and the loop answers the submit when the
folder is whole.
Without Ray there is one worker, a thread on ``inproc://`` (see ``worker.py``); with ``ServiceConfig.ray``
the workers are Ray actors on a cluster, each behind a PAIR over TCP (``ray_pool.py``). Waiting jobs
start FIFO per client, clients in turn (``fairqueue.py``). Every request and
reply goes through ``protocol.codec``; a request that cannot be decoded gets an error reply with a
stable code and the loop goes on.

Example (a service on a random loopback port, in a thread)::

    svc = Service(ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=tmp, device="cpu"))
    thread = svc.start_thread()          # returns once bound; svc.endpoint is the address
    ...
    svc.stop(); thread.join()
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import msgpack
import numpy as np
import zmq

from protocol import errors, limits
from protocol.codec import check_frame_count, decode, encode
from protocol.errors import ProtocolError
from protocol.schemas import OPS
from protocol.version import PROTOCOL_VERSION, SUPPORTED_VERSIONS, choose_version

from .. import __version__
from .auth import LOCAL_OWNER, AuthConfig, ServerAuth, may_access
from .fairqueue import FairQueue
from .faults import describe_failure
from .store import JobRecord, JobStore, PreparedJob
from .worker import Runner, Slot, ThreadPool, default_runner

if TYPE_CHECKING:
    from .ray_pool import RayConfig

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5555"
POLL_MS = 100  # the loop wakes at least this often to notice stop()
WRITING_POLL_MS = 20  # ... and this often while the writer thread writes a submit's job folder
WRITER_THREADS = 2  # submits' folders written at once: a small one is not held up by a large one's 29 s
CLOSE_LINGER_MS = 200  # a stopping service's last replies (submits answered as it stops) this long to go out
MAX_BATCH = 64  # requests handled per wake-up before the worker's messages get a turn
STOP_WAIT_S = 10.0  # how long shutdown waits for a running job to reach a step boundary
PRUNE_EVERY_S = 600.0  # how often a service with keep_days looks for ended jobs to delete
DAY_S = 86_400.0
OPEN_ARTIFACTS = 8  # artifact files kept open between fetch chunks
SNDHWM = 10000  # replies and events queued per client before the socket drops them
ENVELOPE_FRAMES = 2  # frames before a request's own: the ROUTER's identity, a REQ client's empty delimiter


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("reconloop")) / "jobs"


@dataclass(frozen=True)
class ServiceConfig:
    """How to run the service.

    Attributes:
        bind: ZeroMQ endpoint of the ROUTER; ``tcp://127.0.0.1:*`` picks a free port.
        data_dir: folder of the job store (default: the user cache dir, ``.../reconloop/jobs``).
        device: what the runner gets: ``cpu``, ``cuda``, ``cuda:1``; ``auto`` picks cuda:0 when torch sees a GPU.
        auth: CurveZMQ keys and allow-list (``auth.py``); required to bind a non-loopback address.
        job_limits: what one job may ask (captures, trajectory, resolution, request and frame bytes, queue).
        ray: run jobs on a pool of Ray actors (``ray_pool.RayConfig``); None: one worker thread here.
        keep_days: delete an ended job's folder this many days after its last event (at start, then every
            PRUNE_EVERY_S); None: keep every job.
    """

    bind: str = DEFAULT_BIND
    data_dir: Path | None = None
    device: str = "auto"
    auth: AuthConfig | None = None
    job_limits: limits.JobLimits = limits.JobLimits()
    ray: RayConfig | None = None
    keep_days: float | None = None

    def __post_init__(self) -> None:
        if self.keep_days is not None and not self.keep_days > 0:
            raise ValueError(f"ServiceConfig.keep_days must be > 0 or None; got {self.keep_days}")


def resolve_device(device: str) -> str:
    """``--device`` to a torch device name (backend.devices: auto = cuda, then mps, then cpu)."""
    from ..devices import pick_device

    return pick_device(device)


def device_info(device: str) -> dict[str, Any]:
    """``{"device": ..., "gpu": {name, total_bytes, free_bytes}}`` (gpu only on a CUDA device)."""
    out: dict[str, Any] = {"device": device}
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index or 0
            free, total = torch.cuda.mem_get_info(index)
            out["gpu"] = {"name": torch.cuda.get_device_name(index), "total_bytes": int(total), "free_bytes": int(free)}
    return out


def is_loopback(peer: str | None) -> bool:
    """Whether a Peer-Address is a loopback IP (127.0.0.0/8, ::1, IPv4-mapped 127.x)."""
    import ipaddress

    if not peer:
        return False
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def peer_address(frame: zmq.Frame) -> str | None:
    """The TCP peer's IP address of a received frame, or None (other transports)."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, KeyError, TypeError):
        return None


class Service:
    """The ReconLoop service. Create, then ``serve_forever()`` (blocks) or ``start_thread()``."""

    def __init__(
        self,
        config: ServiceConfig = ServiceConfig(),
        *,
        runner: Runner | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        self.runner = runner or default_runner
        # a ZAP handler is one per context: an authenticated service gets a context of its own
        self.context = context or (zmq.Context() if config.auth is not None else zmq.Context.instance())
        self.auth: ServerAuth | None = None
        self.data_dir = Path(config.data_dir) if config.data_dir is not None else default_data_dir()
        self.endpoint: str | None = None
        self._stopping = False  # a plain flag, no lock: stop() may run in a signal handler (``reconloop serve``'s)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.device = config.device
        self.store: JobStore | None = None
        self._lock: _DirLock | None = None  # what start-up creates: a failed start-up closes what exists
        self.router: zmq.Socket | None = None
        self.pool: Any = None
        self.handlers: dict[str, Callable[[dict[str, Any], _Request], dict[str, Any] | None]] = {
            "hello": self._hello,
            "submit": self._submit,
            "status": self._status,
            "cancel": self._cancel,
            "delete": self._delete,
            "jobs": self._jobs,
            "fetch": self._fetch,
            "shutdown": self._shutdown,
        }

    # -- running ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end (any thread, or a signal handler: it takes no lock); the loop notices within
        POLL_MS. A running job becomes interrupted."""
        self._stopping = True

    @property
    def serving(self) -> bool:
        """Whether start-up is over and the loop runs (it reads ``stop()``'s flag); False while it binds, recovers
        the store and waits for a Ray pool's workers, and after a start-up error."""
        return self._ready.is_set() and self._startup_error is None

    def worker_still_running(self) -> bool:
        """After ``serve_forever``: whether a worker thread is still inside a job step (one longer than the
        stop's wait, STOP_WAIT_S). Ray's workers are processes, stopped with the pool: never."""
        slots = self.pool.slots if isinstance(self.pool, ThreadPool) else []
        return any(slot.actor is not None and slot.actor.is_alive() for slot in slots)

    def start_thread(self, timeout_s: float = 30.0) -> threading.Thread:
        """Run ``serve_forever`` in a thread; return once bound (``self.endpoint`` set)."""
        thread = threading.Thread(target=self._serve_in_thread, name="reconloop-service", daemon=True)
        thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"service did not start within {timeout_s} s")
        if self._startup_error is not None:
            raise self._startup_error
        return thread

    def _serve_in_thread(self) -> None:
        try:
            self.serve_forever()
        except BaseException:
            if self._startup_error is None:  # start-up errors reach start_thread's caller instead
                raise

    def serve_forever(self) -> None:
        """Bind, recover the store, run the loop until ``stop()`` or a ``shutdown`` request."""
        try:
            self.auth = ServerAuth.start(
                self.context, self.config.auth, self.config.bind
            )  # refuses an open bind without keys
            if self.config.ray is None:  # a Ray pool's workers resolve it on their own nodes (RayPool)
                self.device = resolve_device(self.config.device)
            from ..generators import GENERATORS  # imports torch: here, not in the first hello

            self.generators = GENERATORS.names()
            self.store = JobStore(self.data_dir)
            self._lock = _lock_dir(self.store.root)
            self.queue = FairQueue()
            for record in self.store.load():
                self.queue.append(record.owner or LOCAL_OWNER, record.job)
            self.router = self.context.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.setsockopt(zmq.MAXMSGSIZE, self.config.job_limits.max_frame_bytes)
            self.router.setsockopt(zmq.SNDHWM, SNDHWM)
            self.auth.apply(self.router)
            self.router.bind(self.config.bind)
            self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
            if self.config.ray is None:
                self.pool = ThreadPool(self.context, self.runner, self.device)
            else:
                from .ray_pool import RayPool

                self.pool = RayPool(self.context, self.config.ray, self.runner, self.config.device)
            self.slots: list[Slot] = self.pool.start()
            if self.config.ray is not None:
                count = len(self.slots)
                self.device = f"ray: {count} worker{'s' if count != 1 else ''}, {self.pool.device_kind()}"
        except BaseException as err:
            self._startup_error = err
            self._release()  # a retry in this process finds the store unlocked and the port free
            self._ready.set()
            raise
        self._files: OrderedDict[tuple[str, str, str], BinaryIO] = OrderedDict()
        self._writer = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="reconloop-write")
        self._writing: list[_Writing] = []  # submits whose folders the writers write, in the order they came
        self.watchers: dict[str, dict[bytes, list[bytes]]] = {}
        log.info("reconloop service on %s, data in %s, device %s", self.endpoint, self.data_dir, self.device)
        self._ready.set()
        try:
            self._loop()
        finally:
            self._close()

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        for slot in self.slots:
            poller.register(slot.pair, zmq.POLLIN)
        return poller

    def _loop(self) -> None:
        poller = self._poller()
        next_prune = 0.0  # time.monotonic() of the next look for old jobs (keep_days)
        while not self._stopping:
            if self.config.keep_days is not None and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                self._prune()
            if self._reap():
                poller = self._poller()
            self._finish_writes()
            self._dispatch()
            ready = dict(poller.poll(WRITING_POLL_MS if self._writing else POLL_MS))
            for slot in self.slots:
                if slot.pair in ready:
                    self._drain(slot)
            if self.router in ready:
                for _ in range(MAX_BATCH):
                    if not self.router.poll(0):
                        break
                    self._on_request(*recv_message(self.router, limits.MAX_FRAMES + ENVELOPE_FRAMES))

    def _close(self) -> None:
        try:
            for slot in self.slots:  # first: the running job reaches its step boundary while the writer finishes
                self._send(slot, {"cmd": "stop"})
            # a folder being written is finished and its job listed (queued: the next start runs it); submits not
            # begun are refused
            self._writer.shutdown(wait=True, cancel_futures=True)
            self._finish_writes()
            while self._files:
                self._files.popitem()[1].close()
            self.pool.join(STOP_WAIT_S)
            for slot in self.slots:
                self._drain(slot)
                record = self.store.jobs.get(slot.running) if slot.running else None
                if record is not None and not record.is_terminal:
                    self._event(
                        record,
                        "interrupted",
                        record.stage,
                        record.fraction,
                        "the service stopped during this job; submit it again to rerun",
                    )
        finally:  # also after a second Ctrl-C: the lock, the port and the pool are let go
            self._release(linger_ms=CLOSE_LINGER_MS)
        log.info("reconloop service stopped")

    def _release(self, linger_ms: int = 0) -> None:
        """Close the pool, the ROUTER (its unsent replies kept ``linger_ms``), auth and the store's lock: each one that
        start-up got to."""
        if self.pool is not None:
            self.pool.close()
        if self.router is not None:
            self.router.close(linger=linger_ms)
        if self.auth is not None:
            self.auth.stop()
        if self._lock is not None:
            self._lock.close()

    # -- jobs and the worker -------------------------------------------------------------------------

    @staticmethod
    def _send(slot: Slot, body: dict[str, Any]) -> bool:
        """A message to a worker; never blocks (a dead actor's socket would): a lost one is logged.
        Returns whether it was sent."""
        try:
            slot.pair.send(msgpack.packb(body), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("%s: %s not delivered (the worker is not connected)", slot.describe, body["cmd"])
            return False
        return True

    def _drain(self, slot: Slot) -> None:
        while slot.pair.poll(0):
            self._on_worker(slot, msgpack.unpackb(slot.pair.recv()))

    def _prune(self) -> None:
        """Delete ended jobs older than ``keep_days``; a job whose folder cannot be moved stays listed."""
        gone = 0
        for record in self.store.expired(self.config.keep_days * DAY_S):
            try:
                self._remove(record)
            except OSError as err:
                log.warning("job %s: not deleted (kept listed): %s", record.job, err)
                continue
            gone += 1
        if gone:
            log.info("deleted %d ended job(s) older than %g days (--keep-days)", gone, self.config.keep_days)

    def _remove(self, record: JobRecord) -> None:
        """Delete an ended job: what the loop holds for it first (its artifacts' open files, which can block the
        folder's move and keep the files' space), then its folder (``JobStore.delete``).

        Raises:
            OSError: the folder could not be moved; the job stays listed.
        """
        for key in [k for k in self._files if k[0] == record.job]:
            self._files.pop(key).close()
        self.store.delete(record)

    def _reap(self) -> bool:
        """Fail the job of every worker that died, start one in its place; returns True when slots changed."""
        changed = False
        for slot, reason in self.pool.dead():
            self._drain(slot)  # what it sent before it died comes first
            record = self.store.jobs.get(slot.running) if slot.running else None
            if record is not None and not record.is_terminal:
                message = (
                    f"{slot.describe} died during this job ({reason}); "
                    "the job was not run again: submit it again to rerun"
                )
                log.error("job %s failed: %s", record.job, message)
                self._event(record, "failed", record.stage, record.fraction, message)
            log.warning("%s died (%s); starting a new worker in its place", slot.describe, reason)
            self.pool.replace(slot)  # in place: self.slots is the pool's list
            changed = True
        return changed

    def _dispatch(self) -> None:
        for slot in self.slots:
            if not self.queue:
                return
            if slot.running is None and self.pool.check_ready(slot):
                record = self.store.jobs[self.queue.pop()]
                if self._send(slot, {"cmd": "run", "job": record.job, "dir": str(record.dir)}):
                    slot.running = record.job
                else:  # the worker is not connected (yet): the job stays next in line, the slot waits for it
                    self.queue.push_front(record.owner or LOCAL_OWNER, record.job)
                    slot.ready = False

    def _slot_of(self, job: str) -> Slot | None:
        return next((s for s in self.slots if s.running == job), None)

    def _on_worker(self, slot: Slot, msg: dict[str, Any]) -> None:
        record = self.store.jobs.get(msg["job"])
        if record is None:
            return
        kind = msg["kind"]
        if kind == "started":
            self._event(
                record,
                "running",
                "starting",
                0.0,
                "started" if self.config.ray is None else f"started on {slot.describe}",
            )
        elif kind == "progress":
            self._event(record, "running", msg["stage"], msg["fraction"], msg["message"], msg["artifacts"])
        elif kind == "finished":
            fraction = 1.0 if msg["state"] == "done" else record.fraction
            stage = "done" if msg["state"] == "done" else msg.get("stage") or record.stage  # failed: where
            self._event(record, msg["state"], stage, fraction, msg["message"], msg["artifacts"])
            if slot.running == record.job:
                slot.running = None

    def _event(
        self,
        record: JobRecord,
        state: str,
        stage: str,
        fraction: float,
        message: str,
        artifacts: list[dict[str, Any]] = (),
    ) -> None:  # type: ignore[assignment]
        event = self.store.append(record, state, stage, fraction, message, artifacts)
        watchers = self.watchers.get(record.job, {})
        frames = self._event_frames(record, event) if watchers else None
        if frames is not None:
            for envelope in watchers.values():
                self.router.send_multipart(envelope + frames, copy=False)
        if record.is_terminal:
            self.watchers.pop(record.job, None)

    @staticmethod
    def _event_frames(record: JobRecord, event: dict[str, Any]) -> list[Any] | None:
        """An event as frames to push; None (logged) when it breaks the protocol's limits: one event
        that cannot be sent must not stop the service (the job and its other events go on)."""
        try:
            return encode({"v": PROTOCOL_VERSION, "op": "event", "ok": True, "job": record.job, **event}, "reply")
        except ProtocolError as err:
            log.error("job %s: event %d not sent to watchers: %s", record.job, event["seq"], err)
            return None

    # -- requests ------------------------------------------------------------------------------------

    def _on_request(self, frames: list[zmq.Frame], count: int) -> None:
        """Answer one request: ``frames``, the envelope first, are the first of its ``count`` frames
        (``recv_message`` dropped those past the limit unkept)."""
        if count < 2:
            return  # an identity with nothing after it: nothing to answer
        envelope = [frames[0].bytes]
        body = frames[1:]
        if count > 2 and len(body[0]) == 0:  # a REQ client's empty delimiter frame: echo it
            envelope.append(b"")
            body = body[1:]
        req = _Request(envelope=envelope, frames=body, peer=peer_address(body[0]), owner=self.auth.owner(body[0]))
        op, rid = None, None
        try:
            check_frame_count(count - len(envelope))  # what decode says of len(body) once all frames are kept
            msg = decode(body, "request")
            op, rid = req.op, req.rid = msg["op"], msg["id"]
            fields = self.handlers[op](msg, req)
            if fields is None:  # a submit whose folder the writer writes: _finish_writes answers it
                return
            out = self._reply_frames(op, rid, fields)
        except ProtocolError as err:
            op = op or err.op
            rid = rid if rid is not None else err.request_id
            out = self._error_frames(op, rid, err)
        except Exception as err:  # a bug: answer, log, go on
            out = self._internal_error_frames(op, rid, err)
        self._answer(req, out)

    def _answer(self, req: _Request, out: list[Any]) -> None:
        """Send a request's reply, then what it sends after it (``status``'s replayed events)."""
        self.router.send_multipart(req.envelope + out, copy=False)
        for frames_after in req.after:
            self.router.send_multipart(req.envelope + frames_after, copy=False)
        if req.stop_after:
            self._stopping = True

    @staticmethod
    def _reply_frames(op: str, rid: Any, fields: dict[str, Any]) -> list[Any]:
        return encode({"v": PROTOCOL_VERSION, "op": op, "id": rid, "ok": True, **fields}, "reply")

    def _internal_error_frames(self, op: str | None, rid: Any, err: Exception) -> list[Any]:
        """A bug's reply (logged with its traceback): the service answers and goes on."""
        log.error("request %s %r failed:\n%s", op, rid, "".join(traceback.format_exception(err)))
        text = f"{op}: {describe_failure(err, data_dir=self.data_dir)}"
        return self._error_frames(op, rid, ProtocolError(errors.INTERNAL, text))

    @staticmethod
    def _error_frames(op: str | None, rid: Any, err: ProtocolError) -> list[Any]:
        op = op if isinstance(op, str) and op in OPS else None
        error = {key: _clip(text) for key, text in err.to_wire().items()}  # they may echo a client's long text
        reply = {"v": PROTOCOL_VERSION, "op": op, "id": rid, "ok": False, "error": error}
        try:
            return encode(reply, "reply")
        except ProtocolError:  # the id itself is unfit to echo
            reply.update(id=None, error={"code": err.code, "message": error["message"]})
            return encode(reply, "reply")

    def _record(self, msg: dict[str, Any], req: _Request) -> JobRecord:
        record = self.store.jobs.get(msg["job"])
        if record is None or not may_access(record.owner, req.owner):  # another client's job: as if absent
            raise ProtocolError(errors.NOT_FOUND, f"{msg['op']}: no job {msg['job']!r}", field="job")
        return record

    def _hello(self, msg: dict[str, Any], req: _Request) -> dict[str, Any]:
        version = choose_version(msg["versions"])
        if version is None:
            raise ProtocolError(
                errors.UNSUPPORTED_VERSION,
                f"hello: no common version; client speaks {msg['versions']}, server speaks {list(SUPPORTED_VERSIONS)}",
                field="versions",
            )
        return {
            "version": version,
            "versions": list(SUPPORTED_VERSIONS),
            "server": f"reconloop {__version__}",
            "generators": self.generators,
            **device_info(self.device),
            "limits": self.config.job_limits.as_dict(),
        }

    def _submit(self, msg: dict[str, Any], req: _Request) -> dict[str, Any] | None:
        """Check a submit and hand its job folder to the writer thread; None: ``_finish_writes`` answers it.
        A submit with the key of a listed job is answered with that job; one with the key of a job being
        written (a client's resend) is answered with it when it is listed."""
        key = msg.get("key")
        if key and (req.owner, key) in self.store.keys:
            record = self.store.jobs[self.store.keys[(req.owner, key)]]
            return {"job": record.job, "state": record.state}
        writing = next((w for w in self._writing if key and (w.owner, w.key) == (req.owner, key)), None)
        if writing is not None:
            req.frames = []  # its answer needs the envelope and id alone: the resent payload is not kept meanwhile
            writing.requests.append(req)
            return None
        nbytes = sum(memoryview(f).nbytes for f in req.frames)
        limits.check_job(msg["scene"], nbytes, self.config.job_limits)
        held, most = sum(w.nbytes for w in self._writing), self.config.job_limits.max_writing_bytes
        if self._writing and held + nbytes > most:
            raise ProtocolError(
                errors.TOO_LARGE,
                f"submit: the service is writing {len(self._writing)} earlier submits of {_mib(held)} and holds at "
                f"most {_mib(most)} of them at once; this one is {_mib(nbytes)}: submit it again when they are "
                "written (seconds)",
            )
        waiting = len(self.queue) + len(self._writing)
        if waiting >= self.config.job_limits.max_queued_jobs:
            raise ProtocolError(
                errors.TOO_LARGE,
                f"submit: the queue is full ({waiting} jobs waiting); submit again when some have finished",
            )
        mine = self.queue.count(req.owner) + sum(w.owner == req.owner for w in self._writing)
        cap = self.config.job_limits.max_queued_per_client
        if mine >= cap:
            raise ProtocolError(
                errors.TOO_LARGE,
                f"submit: this client has {mine} jobs waiting, the most one client may queue on this server "
                f"is {cap}; submit again when some have started",
            )
        future = self._writer.submit(self.store.prepare, msg, req.owner)
        self._writing.append(_Writing(future, req.owner, key, len(msg["scene"]["captures"]), nbytes, [req]))
        return None

    def _finish_writes(self) -> None:
        """List the jobs whose folders the writers have finished and answer their submits (the job and its state, or
        why the scene was refused): a job is queued when its folder is whole, but after every earlier submit of the
        same connection, so one connection's submits are answered and queued in the order they came (protocol
        README, Transport); another connection's small submit overtakes a large one."""
        waiting: set[bytes] = set()  # connections with an earlier submit still being written
        done: list[_Writing] = []
        for writing in list(self._writing):  # in arrival order; each future read once: a write may end meanwhile
            connection = writing.requests[0].envelope[0]
            if connection not in waiting and writing.future.done():
                done.append(writing)
                self._writing.remove(writing)
            else:
                waiting.add(connection)
        for writing in done:
            try:
                record = self.store.commit(writing.future.result())
            except CancelledError:
                err = ProtocolError(
                    errors.INTERNAL, "submit: the service stopped before this job was written; submit it again"
                )
                outs = [self._error_frames(r.op, r.rid, err) for r in writing.requests]
            except ProtocolError as err:
                outs = [self._error_frames(r.op, r.rid, err) for r in writing.requests]
            except Exception as err:  # a bug, or the disk: every request of this submit answered
                outs = [self._internal_error_frames(r.op, r.rid, err) for r in writing.requests]
            else:
                self.queue.append(writing.owner, record.job)
                log.info("job %s queued (%d captures)", record.job, writing.captures)
                fields = {"job": record.job, "state": record.state}
                outs = [self._reply_frames(r.op, r.rid, fields) for r in writing.requests]
            for req, out in zip(writing.requests, outs):
                self._answer(req, out)

    def _status(self, msg: dict[str, Any], req: _Request) -> dict[str, Any]:
        record = self._record(msg, req)
        if msg.get("watch") and not record.is_terminal:
            self.watchers.setdefault(record.job, {})[req.envelope[0]] = req.envelope
        since = msg.get("since")
        if since is not None:  # events are in seq order; seqs may skip one lost to a cut journal line
            for event in record.events[bisect.bisect_right(record.events, since, key=lambda e: e["seq"]) :]:
                frames = self._event_frames(record, event)
                if frames is not None:
                    req.after.append(frames)
        return {
            **self._summary(record, self.queue.positions() if record.state == "queued" else {}),
            "seq": record.seq,
            "artifacts": sorted(record.artifacts.values(), key=lambda e: e["name"]),
        }

    def _cancel(self, msg: dict[str, Any], req: _Request) -> dict[str, Any]:
        record = self._record(msg, req)
        slot = self._slot_of(record.job)
        if slot is not None:  # first: a job handed to a worker is still "queued" until it starts
            self._send(slot, {"cmd": "cancel", "job": record.job})
        elif record.state == "queued":
            self.queue.remove(record.job)
            self._event(record, "cancelled", record.stage, record.fraction, "cancelled by a client before it started")
        return {"job": record.job, "state": record.state}

    def _delete(self, msg: dict[str, Any], req: _Request) -> dict[str, Any]:
        record = self._record(msg, req)
        if not record.is_terminal:
            raise ProtocolError(
                errors.BAD_FIELD,
                f"delete: job {record.job} is {record.state}; only an ended job is deleted: cancel it and wait "
                "for it to end",
                field="job",
            )
        try:
            self._remove(record)
        except OSError as err:
            raise ProtocolError(
                errors.INTERNAL,
                f"delete: job {record.job}'s folder cannot be moved ({err.strerror or err}); it stays listed",
                field="job",
            ) from None
        log.info("job %s deleted by a client", record.job)
        return {"job": record.job, "state": record.state}

    def _jobs(self, msg: dict[str, Any], req: _Request) -> dict[str, Any]:
        positions = self.queue.positions()
        return {"jobs": [self._summary(r, positions) for r in self.store.listed(req.owner)]}

    def _summary(self, record: JobRecord, positions: dict[str, int]) -> dict[str, Any]:
        """A job's summary, with a waiting job's place in the queue (``queue_position``, 1 = next, and
        ``queue_length``) and a running job's ``worker``; its message says the same in words.

        Only the reply says so (the journal keeps the events' own messages): ``queued: 3rd of 5 waiting``,
        ``step 2 of 9 (on worker ray-1 (pid 4242 on 10.0.0.7, GPU 3))``.
        """
        out = record.summary()
        if record.job in positions:
            out["queue_position"], out["queue_length"] = positions[record.job], len(self.queue)
            out["message"] = f"queued: {_ordinal(positions[record.job])} of {len(self.queue)} waiting"
        elif record.state == "running":
            slot = self._slot_of(record.job)
            if slot is not None:
                out["worker"] = _clip(slot.describe)
                if self.config.ray is not None and slot.describe not in record.message:  # "started on ..." names it
                    out["message"] = _clip(f"{record.message} (on {slot.describe})")
        return out

    def _fetch(self, msg: dict[str, Any], req: _Request) -> dict[str, Any]:
        record = self._record(msg, req)
        name = msg["name"]
        entry = record.artifacts.get(name)
        if entry is None:
            self.store.artifact_path(record, name)  # raises not_found, listing what there is
        total = entry["size"]
        offset = msg.get("offset") or 0
        length = msg.get("length") or limits.FETCH_CHUNK_BYTES
        if offset > total:
            raise ProtocolError(
                errors.BAD_FIELD, f"fetch: offset must be at most the size {total}; got {offset}", field="offset"
            )
        n = min(length, total - offset)
        data = self._artifact_chunk(record, name, entry, offset, n)
        return {
            "job": record.job,
            "name": name,
            "offset": offset,
            "data": data,
            "total": total,
            "sha256": entry["sha256"],
        }

    def _artifact_chunk(self, record: JobRecord, name: str, entry: dict[str, Any], offset: int, n: int) -> Any:
        """``n`` bytes of an artifact from ``offset`` (uint8 [n]), read from a file kept open for the next
        chunks (the few most recent ones), keyed by sha256 too, so a file the job rewrote is opened again.

        Read, not memory-mapped: a file cut short in place under a map kills the process (SIGBUS) when a
        reply's frame points into the part that is gone; read, it is an error for that fetch alone.
        """
        key = (record.job, name, entry["sha256"])
        f = self._files.get(key)
        if f is None:
            f = _open_artifact(self.store.artifact_path(record, name), entry["size"])
            self._files[key] = f
            while len(self._files) > OPEN_ARTIFACTS:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(key)
        f.seek(offset)
        data = f.read(n)
        if len(data) != n:
            self._files.pop(key).close()
            raise ProtocolError(
                errors.INTERNAL, f"fetch: {name} changed size since it was recorded (cut short on the server's disk)"
            )
        return np.frombuffer(data, dtype=np.uint8)

    def _shutdown(self, msg: dict[str, Any], req: _Request) -> dict[str, Any]:
        if not is_loopback(req.peer):
            raise ProtocolError(
                errors.FORBIDDEN,
                f"shutdown: only loopback peers may stop the service; this peer is {req.peer or 'not on TCP'}",
            )
        req.stop_after = True
        return {}


@dataclass
class _Request:
    envelope: list[bytes]
    frames: list[zmq.Frame]
    peer: str | None
    owner: str = "local"  # auth.LOCAL_OWNER, or the client's CurveZMQ public key
    op: str | None = None  # the op and id once decoded: a deferred reply (a submit being written) names them
    rid: Any = None
    after: list[list[Any]] = None  # type: ignore[assignment]
    stop_after: bool = False

    def __post_init__(self) -> None:
        self.after = []


@dataclass
class _Writing:
    """A submit whose job folder the writer thread writes (``JobStore.prepare``).

    Attributes:
        future: the prepared job, or the error that refused the scene.
        owner, key: the client and its idempotency key (None: none), so a resend joins this submit.
        captures: how many captures it has (the log's line).
        nbytes: the submit's frames, held until its folder is written (``JobLimits.max_writing_bytes``).
        requests: the requests it answers when done: the submit, then resends with its key.
    """

    future: Future[PreparedJob]
    owner: str
    key: str | None
    captures: int
    nbytes: int
    requests: list[_Request]


def recv_message(sock: zmq.Socket, keep: int) -> tuple[list[zmq.Frame], int]:
    """One multipart message, frame by frame: its first ``keep`` frames (zero-copy) and its frame count.

    Frames past ``keep`` are received and dropped at once, unkept: libzmq holds a whole message before the
    first frame can be read, ~64 bytes a frame, but a kept frame is a Python object of a few hundred, so a
    message of millions of empty frames (2 bytes each on the wire) kept whole took a GiB and seconds before
    its frame count was checked. ``frame.more`` is a field of the frame: cheaper than ``RCVMORE``'s getsockopt.
    """
    frame = sock.recv(copy=False)
    frames = [frame]
    count = 1
    while frame.more:
        frame = sock.recv(copy=False)
        count += 1
        if count <= keep:
            frames.append(frame)
    return frames, count


def _mib(nbytes: int) -> str:
    return f"{nbytes / limits.MIB:.1f} MiB"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _clip(text: str) -> str:
    """Text within the protocol's string limit, in UTF-8 bytes (the unit of the client's decoder)."""
    return limits.clip_utf8(text, limits.MAX_STR_BYTES)


def _open_artifact(path: Path, total: int) -> BinaryIO:
    """The artifact open for reading, its size checked against the one recorded."""
    # unbuffered: each chunk read from the disk as it is now, not from what an earlier read left buffered
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open between chunks (Service._files), closed on eviction
    if f.seek(0, 2) != total:
        f.close()
        raise ProtocolError(errors.INTERNAL, f"fetch: {path.name} changed size since it was recorded")
    return f


class StoreInUseError(RuntimeError):
    """The job store is locked by another service (``_lock_dir``)."""


class _DirLock:
    def __init__(self, f: Any) -> None:
        self.f = f

    def close(self) -> None:
        self.f.close()


def _lock_dir(folder: Path) -> _DirLock:
    """Hold an exclusive lock on ``folder/.lock`` so that two services never share a job store."""
    f = open(folder / ".lock", "a+")
    try:
        try:
            import fcntl
        except ImportError:  # Windows: a lock on the file's first byte, held until the file is closed
            import msvcrt

            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StoreInUseError(f"the job store {folder} is in use by another reconloop service") from None
    return _DirLock(f)
