"""The add-on's side of the service: start/stop a local ``reconloop serve``, drive one job in small steps.

No bpy at import time. Blender's main thread owns the socket and calls :meth:`JobDriver.step` from a
``bpy.app.timers`` callback (``wait_ms=0``); in background mode the operator calls ``step(wait_ms=...)``
in a loop instead (timers never fire there). No step waits for the service: a request goes out in one
step (``Client.begin``: a ``protocol.client.PendingRequest``) and its reply is picked up by a later
one, so a service that does not answer never freezes Blender's UI. The only thread waits for a stopped
local service's process to exit.
The protocol itself is ``protocol.client.Client`` (Lazy Pirate retries, event replay, sha256 checks).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol.limits import check_artifact_name, is_job_id
from protocol.schemas import TERMINAL_STATES

from . import scene_io
from .errors import ReconLoopError

if TYPE_CHECKING:
    from protocol.client import PendingRequest

LOOPBACK = "127.0.0.1"
SERVICE_START_TIMEOUT_S = 120.0  # a cold start imports torch; a first start on a laptop can be slow
SERVICE_PROBE_MS = 100  # blocking callers (background mode) wait this long per look for a reply
SERVICE_STOP_TIMEOUT_S = 10.0  # a stopping service gets this long to exit, then is terminated, then killed
SHUTDOWN_REPLY_MS = 100  # Stop service waits this long for the shutdown reply (on the UI's thread)
WAITING_NOTE_S = 2.0  # a request unanswered this long shows "waiting for the service" in the progress
FETCH_CHUNK_BYTES = 4 << 20  # bytes fetched per step: keeps each timer tick short
IDLE_STATUS_S = 5.0  # ask for the job's status after this long without an event
LOG_TAIL_CHARS = 1500
# Files of a job that are imported (the rest stays on the server, except these small ones).
IMPORTED_KINDS = (scene_io.KIND_POINTS, scene_io.KIND_CAMERAS, scene_io.KIND_FRAME, scene_io.KIND_GAUSSIANS)
EXTRA_FILES = ("metrics.json", "overview.png")
# Download order: the point cloud first, so it shows while the rest is still on its way.
KIND_PRIORITY = {
    scene_io.KIND_POINTS: 0,
    scene_io.KIND_CAMERAS: 1,
    scene_io.KIND_FRAME: 2,
    scene_io.KIND_GAUSSIANS: 3,
    scene_io.KIND_OTHER: 4,
}
GIB = float(1 << 30)


def _protocol():
    try:
        from protocol import client as client_mod
        from protocol.errors import ProtocolError
    except ImportError as err:  # pragma: no cover - an extension built without its wheels
        raise ReconLoopError(
            f"the ReconLoop extension is missing a part it needs ({err.name}): reinstall it from its zip"
        ) from None
    return client_mod, ProtocolError


# ---------------------------------------------------------------------------------------------
# Connection settings and the client


@dataclass(frozen=True)
class ConnectionConfig:
    """Plain values from the add-on preferences.

    Attributes:
        mode: "local" (start ``reconloop serve`` on loopback) or "remote".
        remote_address: ZeroMQ endpoint of a remote service (``tcp://gpu-box:5555``).
        server_key_file: the server's CurveZMQ public key file (remote, optional).
        client_key_file: this client's CurveZMQ secret key file (remote, optional).
        local_python: Python interpreter with ReconLoop installed ("" to use ``local_command``).
        local_command: command that starts the service (default ``reconloop``).
        local_device: ``auto``, ``cpu`` or ``cuda``.
        data_dir: the local service's job store.
        log_path: where the local service's output goes.
        timeout_ms: per-request timeout before a retry.
    """

    mode: str = "local"
    remote_address: str = "tcp://127.0.0.1:5555"
    server_key_file: str = ""
    client_key_file: str = ""
    local_python: str = ""
    local_command: str = "reconloop"
    local_device: str = "auto"
    data_dir: str = ""
    log_path: str = ""
    timeout_ms: int = 10_000


def make_client(endpoint: str, cfg: ConnectionConfig):
    """A protocol Client for ``endpoint``; with key files, an authenticated (CurveZMQ) one."""
    client_mod, _ = _protocol()
    kwargs: dict[str, Any] = {"timeout_ms": cfg.timeout_ms, "name": "reconloop-blender"}
    if cfg.mode == "remote" and (cfg.server_key_file or cfg.client_key_file):
        if not (cfg.server_key_file and cfg.client_key_file):
            raise ReconLoopError(
                "an authenticated connection needs both files: the server's public key (NAME.key) "
                "and your secret key (NAME.key_secret); set both in the add-on preferences, or neither"
            )
        for path in (cfg.server_key_file, cfg.client_key_file):
            if not os.path.isfile(path):
                raise ReconLoopError(f"key file not found: {path}")
        kwargs["server_key"] = cfg.server_key_file
        kwargs["client_key"] = cfg.client_key_file
    import zmq  # importable: _protocol() above found protocol.client, which uses it

    try:
        return client_mod.Client(endpoint, **kwargs)
    except (ValueError, OSError, zmq.ZMQError) as err:  # unreadable key files, an address ZeroMQ refuses
        raise ReconLoopError(f"cannot connect to {endpoint}: {err}") from None


def describe_hello(reply: dict[str, Any]) -> str:
    """One line for the user from a ``hello`` reply: version, device, GPU and free memory, generators."""
    parts = [
        f"ReconLoop {reply.get('server', '?')} (protocol {reply.get('version', '?')})",
        f"device {reply.get('device', '?')}",
    ]
    gpu = reply.get("gpu")
    if gpu:
        parts.append(
            f"{gpu.get('name', 'GPU')}: {gpu.get('free_bytes', 0) / GIB:.1f} of {gpu.get('total_bytes', 0) / GIB:.1f} GiB free"
        )
    gens = reply.get("generators") or []
    parts.append("generators: " + (", ".join(gens) if gens else "none"))
    return "; ".join(parts)


def is_unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the service did not answer or the connection is gone (not what the job did)."""
    return isinstance(err, (TimeoutError, _protocol()[0].ClientClosedError))


def plain_error(err: BaseException, endpoint: str = "") -> str:
    """A user-facing sentence for an error from the client or the service."""
    client_mod, ProtocolError = _protocol()
    if isinstance(err, ReconLoopError):
        return str(err)
    if isinstance(err, client_mod.ClientClosedError):
        return "the connection to the service was closed"
    if isinstance(err, TimeoutError):
        where = f" at {endpoint}" if endpoint else ""
        hint = f" Start it with `{start_hint(endpoint)}`." if endpoint else ""
        return f"the ReconLoop service{where} does not answer: is it running?{hint} ({err})"
    if isinstance(err, ProtocolError):
        from protocol.errors import UNSUPPORTED_VERSION  # importable: _protocol() above found the package

        if err.code == UNSUPPORTED_VERSION:
            where = f" at {endpoint}" if endpoint else ""
            return (
                f"the ReconLoop service{where} speaks another protocol version than this add-on "
                f"({err.message}): update the older of the two so that both speak the same version"
            )
        return f"the service refused the request: {err}"
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------
# Requests that never block (Blender's UI timers)
#
# ``Client.request`` waits for its reply (timeout_ms per try, retries more tries): 30 s of a frozen
# UI when the service does not answer. The add-on sends with ``Client.begin`` (``begin_hello``,
# ``begin_watch``) and picks the reply up on later ticks with ``PendingRequest.poll``, with the same
# Lazy Pirate retries; ``Client.take_events`` gives the events that came meanwhile. A client has one
# request in flight at a time (a reply to another is dropped as stale): while a job's JobDriver uses
# the session's client, the sidebar sends nothing else on it.


def waiting_text(request: PendingRequest) -> str:
    """What the progress shows while ``request`` (a PendingRequest) has no reply yet."""
    return f"waiting for the service at {request.client.endpoint} to answer ({request.op}, {request.waited_s:.0f} s)"


class ServiceRequest:
    """A request sent without waiting: :meth:`poll` returns the reply once it came, else None.

    For a local service being started, the request waits for it (ZeroMQ delivers it once the service
    listens) up to SERVICE_START_TIMEOUT_S, and a service that exits is reported with its log's end.
    Subclasses say what :meth:`_begin` sends.
    """

    def __init__(self, client, service: LocalService | None = None) -> None:
        self.client, self.service = client, service
        retries = None
        if service is not None and not service.answered:
            retries = max(client.retries, math.ceil(SERVICE_START_TIMEOUT_S * 1000 / max(1, client.timeout_ms)))
        self.request = self._begin(retries)

    def _begin(self, retries: int | None) -> PendingRequest:
        raise NotImplementedError

    @property
    def waited_s(self) -> float:
        return self.request.waited_s

    def waiting_text(self) -> str:
        if self.service is not None and not self.service.answered:
            return f"starting the local ReconLoop service ({self.waited_s:.0f} s)"
        return waiting_text(self.request)

    def poll(self, wait_ms: float = 0) -> dict[str, Any] | None:
        if self.service is not None:
            self.service.check_alive()
        try:
            reply = self.request.poll(wait_ms)
        except TimeoutError:
            if self.service is not None:
                raise self.service.start_timeout() from None
            raise
        if reply is not None and self.service is not None:
            self.service.answered = True
        return reply


class HelloProbe(ServiceRequest):
    """``Client.hello`` without waiting (Test connection, a job's first step); its reply is stored as
    ``client.server``."""

    def _begin(self, retries: int | None) -> PendingRequest:
        return self.client.begin_hello(retries=retries)


class JobsRequest(ServiceRequest):
    """``Client.jobs`` without waiting (Refresh jobs): the reply's ``jobs`` lists the jobs, oldest first."""

    def _begin(self, retries: int | None) -> PendingRequest:
        return self.client.begin("jobs", retries=retries)


class DeleteRequest(ServiceRequest):
    """``Client.delete`` without waiting (Delete job): the reply's ``job`` is gone from the service's store,
    also when the service no longer had it (``gone: True``: deleted elsewhere, or by a lost first try)."""

    def __init__(self, client, job: str, service: LocalService | None = None) -> None:
        self.job = job
        super().__init__(client, service)

    def _begin(self, retries: int | None) -> PendingRequest:
        return self.client.begin_delete(self.job, gone_ok=True, retries=retries)


# ---------------------------------------------------------------------------------------------
# Checking a remote address before ZeroMQ sees it

ADDRESS_EXAMPLE = "tcp://gpu-box:5555"
PREFLIGHT_TIMEOUT_S = 4.0  # a TCP connect to a remote service: refused or silent, we know within this
_TCP_ADDRESS = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")


def _has_ipc() -> bool:
    """Whether this ZeroMQ has the ipc:// transport (not on Windows); assumed so where pyzmq is missing."""
    try:
        import zmq
    except ImportError:  # pragma: no cover - an extension built without its wheels: _protocol() says so later
        return True
    return bool(zmq.has("ipc"))


def check_address(text: str) -> str | None:
    """Why ``text`` is not a ZeroMQ address a client can connect to, or None when it is.

    Accepted: ``tcp://host:port`` (a name, an IPv4 address or a bracketed IPv6 one; port 1-65535) and
    ``ipc://path``. The message says what to write instead.
    """
    text = text.strip()
    if not text:
        return f"enter the service's address, e.g. {ADDRESS_EXAMPLE}"
    scheme, sep, rest = text.partition("://")
    if not sep:
        host_port = text if ":" in text else f"{text}:5555"
        return f"an address starts with tcp:// or ipc://: write tcp://{host_port}"
    if scheme in ("http", "https", "ws", "wss"):
        return f"the service speaks ZeroMQ, not {scheme.upper()}: write tcp://{rest.rstrip('/')}"
    if scheme == "ipc":
        if not _has_ipc():
            return "ipc:// is not available on this system (Windows' ZeroMQ has none): use tcp://127.0.0.1:5555"
        return None if rest else "ipc:// needs the path of the service's socket file, e.g. ipc:///tmp/reconloop"
    if scheme != "tcp":
        return f"unknown transport {scheme!r}: use tcp://host:port or ipc://path"
    m = _TCP_ADDRESS.match(text)
    if m is None:
        return f"write the address as tcp://host:port, e.g. {ADDRESS_EXAMPLE}; got {text!r}"
    if not 1 <= int(m.group("port")) <= 65535:
        return f"the port must be in 1-65535; got {m.group('port')}"
    return None


def start_hint(endpoint: str) -> str:
    """The command that starts a service answering at ``endpoint`` (run on the machine it names): on a loopback
    address as it is; on any other, bound to every interface with the CurveZMQ keys the service then needs."""
    if not endpoint.startswith("tcp://"):
        return f"reconloop serve --bind {endpoint}"
    try:
        from protocol.curve import endpoint_is_local
    except ImportError:  # pragma: no cover - an extension built without its wheels: the plain command
        return f"reconloop serve --bind {endpoint}"
    port = endpoint.rsplit(":", 1)[-1]
    if endpoint_is_local(endpoint):  # as it is: a service on 127.0.0.2 or [::1] answers there only
        return f"reconloop serve --bind {endpoint.replace('tcp://localhost:', 'tcp://127.0.0.1:')}"
    return (
        f"reconloop serve --bind tcp://0.0.0.0:{port} --curve-secret keys/server.key_secret --allow-keys keys/clients"
    )


def preflight(endpoint: str, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Fail at once, in plain words, where ZeroMQ would retry silently: a malformed address, an unknown
    host, a port where nothing listens (refused, or silent for ``timeout_s``), a missing ipc socket."""
    problem = check_address(endpoint)
    if problem:
        raise ReconLoopError(problem)
    if endpoint.startswith("ipc://"):
        if not os.path.exists(endpoint[len("ipc://") :]):
            raise ReconLoopError(f"no ReconLoop service at {endpoint}: start one with `{start_hint(endpoint)}`")
        return
    m = _TCP_ADDRESS.match(endpoint)
    host, port = m.group("host").strip("[]"), int(m.group("port"))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ReconLoopError(f"unknown host {host!r} in {endpoint}: check the name in the add-on preferences") from None
    errors: list[OSError] = []
    deadline = time.monotonic() + timeout_s  # one wait for all of them: Blender's UI waits on it
    for family, kind, proto, _, addr in infos:  # each address in turn: macOS and Windows give localhost's ::1 first
        try:
            with socket.socket(family, kind, proto) as sock:  # inside: a family this machine lacks is one more miss
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.connect(addr)
                return
        except OSError as e:  # refused, timed out, unreachable
            errors.append(e)
    refused = any(isinstance(e, ConnectionRefusedError) for e in errors)  # the clearest of the addresses' answers
    why = "refused the connection" if refused else f"did not answer ({errors[-1]})"
    raise ReconLoopError(
        f"no ReconLoop service at {endpoint}: {host}:{port} {why}. Start it on {host} with `{start_hint(endpoint)}`"
    )


# ---------------------------------------------------------------------------------------------
# A local service (a subprocess; one short-lived thread awaits its exit after a stop)


def command_words(text: str, *, windows: bool = os.name == "nt") -> list[str]:
    """The words of the preferences' service command. On Windows a path's backslashes stay (POSIX splitting takes
    them for escapes: ``C:\\Users\\me\\reconloop.exe`` became ``C:Usersmereconloop.exe``) and quotes around a
    word with spaces go, as the Windows shell would take them; elsewhere the shell's own rules."""
    if not windows:
        return shlex.split(text)
    # a word is a run of non-blanks and "quoted spans", which may sit inside it (--data-dir="C:\a b")
    return [w.replace('"', "") for w in re.findall(r'(?:[^\s"]+|"[^"]*"?)+', text)]


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def service_command(cfg: ConnectionConfig, endpoint: str) -> list[str]:
    """The command line of a local ``reconloop serve`` bound to ``endpoint``."""
    if cfg.local_python:
        base = [cfg.local_python, "-m", "backend.cli"]
    else:
        base = command_words(cfg.local_command or "reconloop")
        if not base:
            raise ReconLoopError("set the command that starts the ReconLoop service in the add-on preferences")
    cmd = base + ["serve", "--bind", endpoint, "--device", cfg.local_device or "auto"]
    if cfg.data_dir:
        cmd += ["--data-dir", cfg.data_dir]
    return cmd


class LocalService:
    """``reconloop serve`` on loopback, started as a subprocess and stopped with ``stop()``."""

    def __init__(self, cfg: ConnectionConfig, *, cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.endpoint = f"tcp://{LOOPBACK}:{free_loopback_port()}"
        self.command = service_command(cfg, self.endpoint)
        self.log_path = cfg.log_path or os.path.join(cfg.data_dir or ".", "service.log")
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env
            )
        except OSError as err:
            self._log.close()
            raise ReconLoopError(
                f"could not start the ReconLoop service ({' '.join(self.command)}): {err.strerror}. "
                "Set its Python or command in the add-on preferences"
            ) from None
        self.answered = False  # it answered hello: it can be asked to shut down
        self._stopper: threading.Thread | None = None

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_CHARS))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.is_running():
            raise ReconLoopError(
                f"the local ReconLoop service stopped (exit code {self.proc.returncode}). "
                f"Its log ({self.log_path}) ends with:\n{self.log_tail()}"
            )

    def start_timeout(self) -> ReconLoopError:
        return ReconLoopError(
            f"the local ReconLoop service did not answer within {SERVICE_START_TIMEOUT_S:.0f} s. "
            f"Its log ({self.log_path}) ends with:\n{self.log_tail()}"
        )

    def stop(self, client=None, *, wait: bool = False) -> None:
        """Stop the service, blocking the caller at most SHUTDOWN_REPLY_MS (unless ``wait``).

        A service that answered hello is asked to shut down (loopback); one that did not, or does not
        reply at once, is terminated. Its exit is then awaited here (``wait``) or on a small thread,
        which terminates, then kills, a service still running after SERVICE_STOP_TIMEOUT_S each.
        """
        if self.is_running():
            asked = False
            if client is not None and self.answered:
                try:
                    asked = client.begin("shutdown", retries=0).poll(SHUTDOWN_REPLY_MS) is not None
                except Exception:  # noqa: BLE001 - a closed client, a refusal: terminate below
                    asked = False
            if not asked:
                self.proc.terminate()
        if wait:
            self._reap()
        elif self._stopper is None:
            self._stopper = threading.Thread(target=self._reap, name="reconloop-service-stop", daemon=True)
            self._stopper.start()

    def wait_stopped(self, timeout_s: float) -> bool:
        """After ``stop``: wait up to ``timeout_s`` for the process to be gone; True when it is."""
        if self._stopper is not None:
            self._stopper.join(timeout_s)
        return not self.is_running()

    def _reap(self) -> None:
        """Wait for the process to exit (terminate, then kill, one that will not); close the log."""
        for escalate in (self.proc.terminate, self.proc.kill):
            try:
                self.proc.wait(timeout=SERVICE_STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                escalate()
        else:
            self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------------------------------
# One job, step by step


@dataclass
class _Download:
    name: str
    sha256: str
    size: int
    kind: str
    offset: int = 0
    tmp: str = ""
    hasher: Any = None


@dataclass
class JobProgress:
    state: str = "connecting"
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    started: float = field(default_factory=time.time)


class JobDriver:
    """Submit a scene (or follow an existing job), watch its events, download its files.

    Each :meth:`step` does a bounded amount of work and never waits for the service longer than its
    ``wait_ms``: it takes the reply to the request in flight if it came (hello, submit, watch, a
    status, a chunk of a file), reads the events that arrived, and sends the next request. Finished
    files go to ``on_file(kind, name, path)`` as they complete (the point cloud first);
    ``on_progress(progress)`` follows events, and says so while the service keeps a reply waiting.

    Args:
        client: a ``protocol.client.Client``.
        out_root: the job's files are written to ``out_root/<job id>/<name>``.
        scene: the submit's ``scene`` map; None to follow ``job`` (re-import of a past job).
        service: the LocalService being started, to wait for before submitting.
    """

    def __init__(
        self,
        client,
        out_root: str,
        *,
        scene: dict[str, Any] | None = None,
        job: str | None = None,
        service: LocalService | None = None,
        on_progress: Callable[[JobProgress], None] | None = None,
        on_file: Callable[[str, str, str], None] | None = None,
    ) -> None:
        if (scene is None) == (job is None):
            raise ValueError("JobDriver: give either scene (a new job) or job (an existing one)")
        self.client = client
        self.out_root = out_root
        self.out_dir = ""
        self.scene = scene
        self.job = job
        self.service = service
        self.on_progress = on_progress or (lambda p: None)
        self.on_file = on_file or (lambda kind, name, path: None)
        self.progress = JobProgress()
        self.hello: dict[str, Any] | None = None
        self._queue: list[_Download] = []
        self._have: dict[str, str] = {}  # name -> sha256 downloaded
        # why an output file the service announced was not written, one per file (dict: ordered, no repeats when
        # the file is announced again)
        self.refused: dict[str, None] = {}
        self._current: _Download | None = None
        self._last_event = time.monotonic()
        self._seq = 0  # the newest event (or status) applied
        self._watching = False
        self._terminal = False
        self._pending: PendingRequest | ServiceRequest | None = None
        self._on_reply: Callable[[dict[str, Any]], None] | None = None
        self._noted_s = -1  # the last "waiting for the service" second shown
        self.submitted = job is not None  # a submit went out (or the job exists): cancel must reach it
        self.done = False
        self.cancel_requested = False
        self._cancel_sent = False

    # -- public ---------------------------------------------------------------------------------

    def step(self, wait_ms: int = 0) -> bool:
        """Do one bounded piece of work; True once the job ended and every wanted file is here."""
        if self.done:
            return True
        if self._pending is not None:
            reply = self._pending.poll(wait_ms)
            self._apply_events(self.client.take_events())
            if reply is None:
                self._note_waiting()
                return False
            on_reply, self._pending, self._on_reply = self._on_reply, None, None
            on_reply(reply)
            wait_ms = 0
        request = self._next_request()
        if request is not None:
            self._send(*request)
        else:
            self._apply_events(self.client.poll_events(wait_ms))  # nothing in flight: read events
            self._check_idle()
        if self._terminal and self._pending is None and self._current is None and not self._queue:
            self.done = True
        return self.done

    def cancel(self) -> None:
        """Ask the service to cancel the job (sent by the next step; it stops at a step boundary); once the job
        has ended, the files still to download are dropped (what arrived stays)."""
        self.cancel_requested = True

    def drop_downloads(self) -> None:
        """Forget the files still to come and delete the one half downloaded (its ``.part``): the add-on stops
        following the job after an error; what arrived whole stays."""
        if self._current is not None and self._current.tmp:
            with contextlib.suppress(OSError):
                os.remove(self._current.tmp)
        self._current, self._queue = None, []

    @property
    def is_downloading(self) -> bool:
        return self._current is not None or bool(self._queue)

    @property
    def failed(self) -> bool:
        return self.done and self.progress.state in ("failed", "interrupted")

    # -- requests -------------------------------------------------------------------------------

    def _send(self, request: PendingRequest | ServiceRequest, on_reply: Callable[[dict[str, Any]], None]) -> None:
        self._pending, self._on_reply, self._noted_s = request, on_reply, -1

    def _next_request(self) -> tuple[PendingRequest | ServiceRequest, Callable[[dict[str, Any]], None]] | None:
        """The next request the job needs, sent now, with what takes its reply; None when there is none."""
        if self.hello is None:
            if self.service is not None and not self.service.answered:
                self._set(state="starting service", message="starting the local ReconLoop service")
            return HelloProbe(self.client, self.service), self._on_hello
        if self.scene is not None:
            self._set(state="uploading", stage="submit", message="sending photos and cameras")
            self.submitted = True
            return self.client.begin("submit", scene=self.scene), self._on_submit
        if not self._watching:
            if not is_job_id(self.job):  # a folder name below: the service's own kind of id, nothing else
                raise ReconLoopError(f"job: {self.job!r} is not a ReconLoop job id (32 hex characters)")
            self.out_dir = os.path.join(self.out_root, self.job)
            os.makedirs(self.out_dir, exist_ok=True)
            return self.client.begin_watch(self.job), self._on_watch
        if self.cancel_requested and not self._cancel_sent:
            self._cancel_sent = True
            return self.client.begin("cancel", job=self.job), lambda reply: None
        if self.cancel_requested and self._terminal and self.is_downloading:  # the job ended: stop its downloads
            left = len(self._queue) + (self._current is not None)
            self.drop_downloads()
            self._set(state="cancelled", message=f"cancelled: {left} file(s) not downloaded (Import job brings them)")
            return None
        if self._current is not None or self._queue:
            return self._fetch_request(), self._on_chunk
        return None

    def _check_idle(self) -> None:
        if self._pending is None and not self._terminal and time.monotonic() - self._last_event > IDLE_STATUS_S:
            # Silence: ask (also finds a lost server, re-subscribes and replays missed events).
            self._send(self.client.begin_watch(self.job), self._on_status)

    def _note_waiting(self) -> None:
        pending = self._pending
        waited = pending.waited_s
        if waited >= WAITING_NOTE_S and int(waited) != self._noted_s:
            self._noted_s = int(waited)
            self._set(message=pending.waiting_text() if isinstance(pending, ServiceRequest) else waiting_text(pending))

    # -- replies --------------------------------------------------------------------------------

    def _on_hello(self, reply: dict[str, Any]) -> None:
        self.hello = reply

    def _on_submit(self, reply: dict[str, Any]) -> None:
        self.job = reply["job"]
        self.scene = None  # free the photos

    def _on_watch(self, reply: dict[str, Any]) -> None:
        self._watching = True
        self._on_status(reply)

    def _on_status(self, reply: dict[str, Any]) -> None:  # begin_watch has marked a job that goes on watched
        self._apply(reply)
        self._last_event = time.monotonic()

    def _apply_events(self, events: list[dict[str, Any]]) -> None:
        events = [e for e in events if e.get("job") == self.job]
        for e in events:
            self._apply(e)
        if events:
            self._last_event = time.monotonic()

    def _apply(self, msg: dict[str, Any]) -> None:
        """Take a status reply or an event; older ones (replayed after a watch) only add files."""
        seq = int(msg.get("seq", 0))
        if seq and seq <= self._seq:
            for a in msg.get("artifacts") or []:
                self._want(a)
            return
        self._seq = max(self._seq, seq)
        self._set(
            state=msg["state"],
            stage=msg.get("stage", ""),
            fraction=float(msg.get("fraction", 0.0)),
            message=msg.get("message", ""),
        )
        for a in msg.get("artifacts") or []:
            self._want(a)
        if msg["state"] in TERMINAL_STATES:
            self._terminal = True

    def _want(self, a: dict[str, Any]) -> None:
        name, sha = a["name"], a["sha256"]
        kind = scene_io.artifact_kind(name)
        if kind not in IMPORTED_KINDS and name not in EXTRA_FILES:
            return
        try:  # joined to the job's folder below: a wrong or hostile service must not write outside it
            check_artifact_name(name)
        except ValueError as err:  # the job's other files still come; the job's end names this one
            self.refused[str(err)] = None
            return
        if self._have.get(name) == sha:
            return
        if self._current is not None and self._current.name == name and self._current.sha256 == sha:
            return
        self._queue = [d for d in self._queue if d.name != name]
        self._queue.append(_Download(name=name, sha256=sha, size=int(a["size"]), kind=kind))
        self._queue.sort(key=lambda d: (KIND_PRIORITY.get(d.kind, len(KIND_PRIORITY)), d.name))

    def _fetch_request(self) -> PendingRequest:
        if self._current is None:
            d = self._queue.pop(0)
            d.tmp = os.path.join(self.out_dir, *d.name.split("/")) + ".part"
            os.makedirs(os.path.dirname(d.tmp), exist_ok=True)
            open(d.tmp, "wb").close()
            d.hasher = hashlib.sha256()
            self._current = d
        d = self._current
        return self.client.begin("fetch", job=self.job, name=d.name, offset=d.offset, length=FETCH_CHUNK_BYTES)

    def _on_chunk(self, reply: dict[str, Any]) -> None:
        d = self._current
        if reply["sha256"] != d.sha256:
            # The file was rewritten on the server since it was announced: start over with the new one.
            d.sha256, d.size, d.offset, d.hasher = reply["sha256"], int(reply["total"]), 0, hashlib.sha256()
            open(d.tmp, "wb").close()
            return
        data = reply["data"]
        with open(d.tmp, "ab") as f:
            f.write(data)
        d.hasher.update(data)
        d.offset += len(data)
        if d.offset >= int(reply["total"]):
            if d.hasher.hexdigest() != d.sha256:
                raise ReconLoopError(f"download of {d.name} was corrupted (sha256 mismatch); run the job again")
            path = d.tmp[: -len(".part")]
            os.replace(d.tmp, path)
            self._have[d.name] = d.sha256
            self._current = None
            self.on_file(d.kind, d.name, path)
        elif len(data) == 0:
            raise ReconLoopError(f"download of {d.name} stopped at byte {d.offset} of {reply['total']}")

    def _set(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self.progress, k, v)
        self.on_progress(self.progress)


def run_blocking(driver: JobDriver, timeout_s: float, *, wait_ms: int = 200) -> None:
    """Drive a job to its end in this thread (background mode): poll with a timeout, never spin."""
    deadline = time.monotonic() + timeout_s
    while not driver.step(wait_ms=wait_ms):
        if time.monotonic() > deadline:
            if driver.job is not None:
                try:
                    driver.client.cancel(driver.job)
                except Exception:  # noqa: BLE001 - report the timeout, not the cancel
                    pass
            raise ReconLoopError(f"the job did not finish within {timeout_s:.0f} s; it was cancelled")


# ---------------------------------------------------------------------------------------------
# Process-wide state of the add-on (one service, one client, one running job)


@dataclass
class Session:
    service: LocalService | None = None
    client: Any = None
    endpoint: str = ""
    config: ConnectionConfig | None = None
    driver: JobDriver | None = None
    handlers: dict[str, Any] = field(default_factory=dict)


SESSION = Session()


def connect(cfg: ConnectionConfig, *, start_service: bool = True) -> tuple[Any, LocalService | None]:
    """The session's client for ``cfg`` (starting a local service if needed; not waiting for it)."""
    s = SESSION
    if s.config != cfg:
        close()
    if cfg.mode == "local":
        if s.service is not None and not s.service.is_running():
            s.service.stop(wait=True)  # it has exited: nothing to wait for
            s.service = None
            if s.client is not None:
                s.client.close()
                s.client = None
        if s.service is None:
            if not start_service:
                raise ReconLoopError("the local ReconLoop service is not running")
            s.service = LocalService(cfg)
        endpoint = s.service.endpoint
    elif cfg.mode == "remote":
        endpoint = cfg.remote_address.strip()
        preflight(endpoint)  # milliseconds when the service is there; a plain error at once when not
    else:
        raise ReconLoopError(f"backend mode must be local or remote; got {cfg.mode!r}")
    if s.client is None or s.endpoint != endpoint:
        if s.client is not None:
            s.client.close()
        s.client = make_client(endpoint, cfg)
        s.endpoint = endpoint
    s.config = cfg
    return s.client, (s.service if cfg.mode == "local" else None)


def wait_for(request: ServiceRequest, timeout_s: float = SERVICE_START_TIMEOUT_S) -> dict[str, Any]:
    """Block until ``request`` is answered (background mode: Test connection, Refresh jobs, Delete job); the
    reply."""
    deadline = time.monotonic() + timeout_s
    while (reply := request.poll(SERVICE_PROBE_MS)) is None:
        if time.monotonic() > deadline:
            raise ReconLoopError(f"the ReconLoop service did not answer within {timeout_s:.0f} s")
    return reply


def close(*, wait: bool = False) -> None:
    """Stop the local service (if we started it) and close the socket. Safe to call twice.

    Blocks at most SHUTDOWN_REPLY_MS, unless ``wait``: then until the service has exited (at exit)."""
    s = SESSION
    if s.service is not None:
        s.service.stop(s.client, wait=wait)
        s.service = None
    if s.client is not None:
        s.client.close()
        s.client = None
    if s.driver is not None:
        s.driver.drop_downloads()  # no .part file outlives the following of its job
    s.driver = None
    s.handlers.clear()
    s.config = None
    s.endpoint = ""


def close_at_exit() -> None:
    """``close`` for Blender's exit: wait for the service to be gone (no thread outlives the process)."""
    close(wait=True)
