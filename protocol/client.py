"""A small synchronous client for the ReconLoop service (used by the Blender add-on and the CLI).

It imports only zmq, msgpack, numpy and this package. One DEALER socket, owned by the thread that
made the client. Every receive is a poll with a timeout; when the server does not answer, the client
follows the ZeroMQ guide's Lazy Pirate: ``LINGER`` 0, close, reopen, resend, give up after a bounded
number of tries. After a reconnect it re-subscribes to the jobs it watches and replays the events it
missed (``status`` with ``since``), dropping duplicates by ``seq``.

Example::

    with Client("tcp://127.0.0.1:5555") as c:
        c.hello()
        job = c.submit(scene)                     # scene: the submit request's "scene" map
        c.watch(job)
        for event in c.events(job):               # ends after the job's last event
            print(event["stage"], event["fraction"])
        c.fetch_to(job, "points.ply", "out/points.ply")

A caller that must never block (Blender's UI thread) sends with ``begin`` and picks the reply up
later, one ``poll(0)`` a timer tick; events received meanwhile wait in ``take_events``::

    pending = c.begin("status", job=job)      # sent now
    ...                                       # on each later tick:
    reply = pending.poll(0)                   # None until the reply came; retries as request does
    for event in c.take_events(): ...

``request`` is ``begin(...).wait()``: one Lazy Pirate loop serves both.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import errors, limits
from .codec import decode, encode
from .errors import ProtocolError
from .images import is_raw_pixels
from .schemas import TERMINAL_STATES
from .version import PROTOCOL_VERSION, SUPPORTED_VERSIONS

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT_MS = 10_000  # per try; a submit of large images needs the server to write them
DEFAULT_RETRIES = 2  # tries after the first
FETCH_WINDOW = 2  # fetch requests in flight at once (scripts/bench_protocol.py)
IDEMPOTENT_KEY_BYTES = 16
# A submit's raw pixels (uint8 [H, W, C] images) are PNG-encoded by the service before it answers: 805 MB took 28.9 s
# on a 2-core machine (28 MB/s). Each try of such a submit waits this much longer per byte, at a third of that rate.
RAW_SUBMIT_BYTES_PER_S = 10e6


class ClientClosedError(RuntimeError):
    """A request on a client that was closed (``Client.close``): nothing can be sent or received."""


# ``on_retry(op, attempt, attempts, waited_s)``: a request ``op`` got no reply in time and is about to be sent
# again, as try ``attempt`` of ``attempts``, ``waited_s`` seconds after it was first sent.
RetryFn = Callable[[str, int, int, float], None]


class Client:
    """Requests, pushed events and chunked downloads over one DEALER socket.

    Args:
        endpoint: the service's ZeroMQ address.
        timeout_ms: how long one try of a request waits for its reply.
        retries: how many times a request is resent (on a fresh socket) before TimeoutError.
        context: a zmq.Context to make sockets from (default: the process-wide one).
        name: told to the server in hello, for its logs.
        server_key: the server's CurveZMQ public key (its ``NAME.key`` file, or the 40 z85 characters);
            with ``client_key``, the connection is encrypted and authenticated (``reconloop keys``).
        client_key: this client's ``NAME.key_secret`` file; its public key must be in the server's
            ``--allow-keys`` folder. The server ties the jobs this client submits to that key.
        on_retry: called as ``on_retry(op, attempt, attempts, waited_s)`` each time a request that got no reply
            within ``timeout_ms`` is about to be resent (try ``attempt`` of ``attempts``), so that a command line
            can say why it waits (default: nothing is said; the resend is logged at DEBUG). An exception it raises
            ends the request.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        retries: int = DEFAULT_RETRIES,
        context: zmq.Context | None = None,
        name: str = "reconloop-client",
        server_key: str | os.PathLike | bytes | None = None,
        client_key: str | os.PathLike | None = None,
        on_retry: RetryFn | None = None,
    ) -> None:
        if (server_key is None) != (client_key is None):
            raise ValueError("Client: server_key and client_key go together (CurveZMQ needs both); got one of them")
        self.server_key = server_key
        self.client_key = client_key
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.name = name
        self.on_retry = on_retry
        self.context = context or zmq.Context.instance()
        self.server: dict[str, Any] | None = None  # the hello reply
        self.reconnects = 0
        self._next_id = 1
        self._events: deque[dict[str, Any]] = deque()
        self._seen: dict[str, int] = {}  # job -> highest event seq received
        self._watched: set[str] = set()
        self._background: set[int] = set()  # ids of re-subscriptions whose replies are not awaited
        self._sock: zmq.Socket | None = None
        self._open()

    # -- socket ------------------------------------------------------------------------------------

    def _open(self) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # A DEALER whose only peer is gone (or refused its CURVE handshake) has no pipe, and a plain
        # send would block for ever: bound it, and treat a send that timed out as a lost request.
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_ms)))
        sock.setsockopt(zmq.MAXMSGSIZE, limits.MAX_FRAME_BYTES + limits.MAX_HEADER_BYTES)
        if self.server_key is not None:
            from .curve import configure_client_socket

            configure_client_socket(sock, self.server_key, self.client_key)
        sock.connect(self.endpoint)
        self._sock = sock

    def _retrying(self, op: str, attempt: int, attempts: int, waited_s: float) -> None:
        """A request without a reply is about to be sent again: log it and tell ``on_retry``."""
        log.debug(
            "%s: no reply to %s after %.1f s; retrying (%d of %d)", self.endpoint, op, waited_s, attempt, attempts
        )
        if self.on_retry is not None:
            self.on_retry(op, attempt, attempts, waited_s)

    def _reopen(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._open()
        self.reconnects += 1
        for job in sorted(self._watched):  # the new socket has a new identity: subscribe it again
            self._background.add(self._send("status", {"job": job, "watch": True, "since": self._seen.get(job, 0)}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, op: str, fields: dict[str, Any]) -> int:
        if self._sock is None:
            raise ClientClosedError("the client is closed")
        rid = self._next_id
        self._next_id += 1
        frames = encode({"v": PROTOCOL_VERSION, "op": op, "id": rid, **fields}, "request")
        _check_frame_sizes(op, frames, self.server)
        try:
            self._sock.send_multipart(frames, copy=False)
        except zmq.Again:
            log.info("%s: request %d (%s) could not be sent within %d ms", self.endpoint, rid, op, self.timeout_ms)
        return rid

    def _recv(self, timeout_ms: float) -> dict[str, Any] | None:
        """One decoded reply or event, or None when none came in ``timeout_ms``. Events are queued."""
        if self._sock is None or not self._sock.poll(max(0, int(timeout_ms))):
            return None
        msg = decode(self._sock.recv_multipart(copy=False), "reply")
        if msg["op"] == "event":
            job, seq = msg["job"], msg["seq"]
            if seq > self._seen.get(job, 0):
                self._seen[job] = seq
                self._events.append(msg)
                if msg["state"] in TERMINAL_STATES:
                    self._watched.discard(job)
            return None if timeout_ms == 0 else msg
        if msg.get("id") in self._background:
            self._background.discard(msg["id"])
            return msg
        return msg

    # -- requests ------------------------------------------------------------------------------------

    def begin(
        self, op: str, *, timeout_ms: int | None = None, retries: int | None = None, **fields: Any
    ) -> PendingRequest:
        """Send one request now; its reply is taken later with ``poll`` or ``wait`` (PendingRequest).

        ``timeout_ms`` and ``retries`` default to the client's. A submit gets an idempotency ``key``
        if it has none, the same on every try, so that a resent submit is not doubled.
        """
        if op == "submit" and not fields.get("key"):
            fields["key"] = secrets.token_hex(IDEMPOTENT_KEY_BYTES)
        return PendingRequest(self, op, fields, timeout_ms=timeout_ms, retries=retries)

    def request(
        self, op: str, *, timeout_ms: int | None = None, retries: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send one request and return its reply (a dict with the op's reply fields).

        Raises ProtocolError for an error reply, TimeoutError when no reply came after all tries.
        A submit gets an idempotency ``key`` if it has none, so that a resent submit is not doubled.
        """
        return self.begin(op, timeout_ms=timeout_ms, retries=retries, **fields).wait()

    def begin_hello(self, *, retries: int | None = None) -> PendingRequest:
        """``hello`` without waiting: once its reply is polled, it is stored as ``server``."""
        return PendingRequest(
            self,
            "hello",
            {"versions": list(SUPPORTED_VERSIONS), "client": self.name},
            retries=retries,
            on_reply=self._set_server,
        )

    def _set_server(self, reply: dict[str, Any]) -> None:
        self.server = reply  # its limits bound later requests (_check_frame_sizes)

    def hello(self) -> dict[str, Any]:
        """Negotiate the version and learn the server's generators, device and limits."""
        return self.begin_hello().wait()

    def submit(self, scene: dict[str, Any], *, key: str | None = None) -> str:
        """Queue a job; returns its id. ``scene``: captures, trajectory, heldout, settings (README).

        The service answers once the job's folder is written: a scene of raw pixels is PNG-encoded first, so each try
        waits ``timeout_ms`` plus the time that takes at ``RAW_SUBMIT_BYTES_PER_S`` (a larger scene is not given up
        while the service still writes it)."""
        raw = sum(
            image.nbytes
            for view in (*(scene.get("captures") or ()), *(scene.get("heldout") or ()))
            for image in (view.get("image"), view.get("mask"))
            if is_raw_pixels(image)
        )
        timeout_ms = self.timeout_ms + math.ceil(1000 * raw / RAW_SUBMIT_BYTES_PER_S)
        key = key or secrets.token_hex(IDEMPOTENT_KEY_BYTES)
        return self.request("submit", timeout_ms=timeout_ms, scene=scene, key=key)["job"]

    def status(self, job: str) -> dict[str, Any]:
        return self.request("status", job=job)

    def cancel(self, job: str) -> dict[str, Any]:
        return self.request("cancel", job=job)

    def begin_delete(self, job: str, *, gone_ok: bool = False, retries: int | None = None) -> PendingRequest:
        """``delete`` without waiting. A not_found answer means the job is gone when it answers a resent try
        (the first one deleted it, its reply lost) or, with ``gone_ok``, any try (a list whose row is stale):
        the reply is then ``{"job": job, "state": None, "gone": True}``; otherwise the ProtocolError stands."""

        def gone(pending: PendingRequest, err: ProtocolError) -> dict[str, Any] | None:
            if err.code == errors.NOT_FOUND and (gone_ok or pending.tries > 1):
                return {"job": job, "state": None, "gone": True}
            return None

        return PendingRequest(self, "delete", {"job": job}, retries=retries, on_error=gone)

    def delete(self, job: str) -> dict[str, Any]:
        """Delete an ended job and its files from the service's store (a queued or running one: ProtocolError
        bad_field; cancel it and wait for it to end); ``begin_delete`` says what a not_found means."""
        return self.begin_delete(job).wait()

    def jobs(self) -> list[dict[str, Any]]:
        return self.request("jobs")["jobs"]

    def shutdown(self) -> None:
        self.request("shutdown", retries=0)

    # -- events ----------------------------------------------------------------------------------------

    def begin_watch(self, job: str, *, since: int | None = None) -> PendingRequest:
        """``watch`` without waiting: once its reply is polled, a job that goes on counts as watched
        (a reconnect re-subscribes it)."""
        since = self._seen.get(job, 0) if since is None else since

        def watched(reply: dict[str, Any]) -> None:
            if reply["state"] not in TERMINAL_STATES:
                self._watched.add(job)

        return PendingRequest(self, "status", {"job": job, "watch": True, "since": since}, on_reply=watched)

    def watch(self, job: str, *, since: int | None = None) -> dict[str, Any]:
        """Subscribe to a job's events; events after ``since`` (default: the last seen) are replayed."""
        return self.begin_watch(job, since=since).wait()

    def take_events(self) -> list[dict[str, Any]]:
        """The events received so far (while waiting for replies), without reading the socket.

        Unlike ``poll_events``, it never reads a reply that a PendingRequest waits for.
        """
        out = list(self._events)
        self._events.clear()
        return out

    def poll_events(self, timeout_ms: int = 0) -> list[dict[str, Any]]:
        """Events received so far, waiting at most ``timeout_ms`` for the first (0: never blocks)."""
        if not self._events:
            first = self._recv(timeout_ms) if timeout_ms > 0 else None
            del first  # queued by _recv when it was an event
        while self._sock is not None and self._sock.poll(0):
            self._recv(0)
        return self.take_events()

    def events(self, job: str, *, idle_ms: int | None = None) -> Iterator[dict[str, Any]]:
        """Yield the job's events until its final one. Call ``watch(job)`` first.

        When no event comes for ``idle_ms`` (default: the request timeout), the client asks for the
        job's status, which also finds a lost server (Lazy Pirate) and replays missed events.
        """
        idle_ms = self.timeout_ms if idle_ms is None else idle_ms
        others: list[dict[str, Any]] = []
        last = 0  # seq of the last event yielded
        try:
            while True:
                got = self.poll_events(idle_ms)
                if not got:
                    status = self.request("status", job=job, watch=True, since=self._seen.get(job, 0))
                    if status["state"] in TERMINAL_STATES and status["seq"] <= last:
                        return
                    continue
                for event in got:
                    if event["job"] != job:
                        others.append(event)
                        continue
                    last = event["seq"]
                    yield event
                    if event["state"] in TERMINAL_STATES:
                        return
        finally:
            self._events.extendleft(reversed(others))

    # -- fetch -------------------------------------------------------------------------------------------

    def fetch_chunks(
        self,
        job: str,
        name: str,
        sink: Callable[[int, np.ndarray], None],
        *,
        chunk_bytes: int = limits.FETCH_CHUNK_BYTES,
        window: int = FETCH_WINDOW,
        on_total: Callable[[int], None] | None = None,
        verify: bool = True,
    ) -> dict[str, Any]:
        """Download an artifact in order, ``window`` chunk requests in flight; check its sha256.

        ``sink(offset, data)`` gets each chunk in file order (data: read-only uint8 [n], valid only
        during the call). Returns ``{"size", "sha256"}`` (the server's sha256, checked against the
        bytes received unless ``verify`` is False). Raises ValueError on a mismatch.
        """
        first = self.request("fetch", job=job, name=name, offset=0, length=chunk_bytes)
        total, want_sha = first["total"], first["sha256"]
        if on_total is not None:
            on_total(total)
        h = hashlib.sha256() if verify else None
        if h is not None:
            h.update(first["data"])
        sink(0, first["data"])
        done = len(first["data"])
        next_offset = done
        inflight: dict[int, int] = {}  # request id -> offset
        buffered: dict[int, np.ndarray] = {}
        tries = 0
        while done < total:
            while len(inflight) < window and next_offset < total:
                inflight[
                    self._send("fetch", {"job": job, "name": name, "offset": next_offset, "length": chunk_bytes})
                ] = next_offset
                next_offset += chunk_bytes
            msg = self._recv(self.timeout_ms)
            if msg is None:
                tries += 1
                if tries > self.retries:
                    raise TimeoutError(f"fetch {name}: no reply from {self.endpoint} after {tries} tries")
                self._retrying("fetch", tries + 1, self.retries + 1, tries * self.timeout_ms / 1000)
                self._reopen()
                next_offset = min(list(inflight.values()) + [next_offset])
                inflight.clear()
                continue
            if msg.get("op") != "fetch" or msg.get("id") not in inflight:
                continue
            offset = inflight.pop(msg["id"])
            if not msg["ok"]:
                raise ProtocolError.from_wire(msg["error"])
            if msg["sha256"] != want_sha:
                raise ValueError(f"fetch {name}: the artifact changed during the download")
            buffered[offset] = msg["data"]
            while done in buffered:
                data = buffered.pop(done)
                if h is not None:
                    h.update(data)
                sink(done, data)
                done += len(data)
                if len(data) == 0:
                    raise ProtocolError(errors.INTERNAL, f"fetch {name}: empty chunk at {done} of {total}")
        if h is None:
            return {"size": total, "sha256": want_sha}
        got_sha = h.hexdigest()
        if got_sha != want_sha:
            raise ValueError(f"fetch {name}: sha256 mismatch: got {got_sha}, the server lists {want_sha}")
        return {"size": total, "sha256": got_sha}

    def fetch_bytes(self, job: str, name: str, **kw: Any) -> bytearray:
        """An artifact in memory (sha256 checked)."""
        buf = bytearray()

        def allocate(total: int) -> None:
            buf.extend(bytes(total))

        def sink(offset: int, data: np.ndarray) -> None:
            buf[offset : offset + len(data)] = memoryview(data).cast("B")

        self.fetch_chunks(job, name, sink, on_total=allocate, **kw)
        return buf

    def fetch_to(self, job: str, name: str, path: str | os.PathLike, **kw: Any) -> dict[str, Any]:
        """Download an artifact to ``path`` (written to a temporary file, renamed once the sha256 matches)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            with open(tmp, "wb") as f:
                result = self.fetch_chunks(job, name, lambda offset, data: f.write(data), **kw)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return result


class PendingRequest:
    """One request in flight (made by :meth:`Client.begin`): sent at once, its reply taken by :meth:`poll`.

    The Lazy Pirate pattern of the ZeroMQ guide, in steps that never wait longer than asked: the
    request goes out when made; ``poll(wait_ms)`` reads what has arrived, waiting at most ``wait_ms``
    (0: not at all), and returns the reply, or None while there is none. Events that arrive meanwhile
    are queued on the client (:meth:`Client.take_events`). When ``timeout_ms`` passes without the
    reply, the client closes its socket (``LINGER`` 0), opens a fresh one (re-subscribing the jobs it
    watches) and sends the request again with the same fields (a submit keeps its idempotency ``key``);
    replies to earlier tries are dropped. After ``retries`` resends without a reply, ``poll``
    raises TimeoutError. An error reply raises ProtocolError; a closed client raises
    ClientClosedError. Once the reply came, ``poll`` returns it again (or raises the same error).
    One request is in flight per client at a time: a reply to another is dropped as stale (its
    request is resent after its timeout), as with ``request``.

    Attributes:
        client: the Client that sent it.
        op: the request's op.
        fields: the request's fields (without ``v``, ``op`` and ``id``).
        timeout_ms: how long one try waits for the reply.
        retries: how many times it is resent before TimeoutError.
        tries: how many times it was sent so far.
        rid: the request id of the latest try (a reply with another id is not this one's).
        started: ``time.monotonic()`` when it was first sent.
    """

    def __init__(
        self,
        client: Client,
        op: str,
        fields: dict[str, Any],
        *,
        timeout_ms: int | None = None,
        retries: int | None = None,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        on_error: Callable[[PendingRequest, ProtocolError], dict[str, Any] | None] | None = None,
    ) -> None:
        self.client, self.op, self.fields = client, op, fields
        self.timeout_ms = client.timeout_ms if timeout_ms is None else int(timeout_ms)
        self.retries = client.retries if retries is None else int(retries)
        self.tries = 0
        self.started = time.monotonic()
        self._on_reply = on_reply  # the client's own bookkeeping for this op (hello, watch)
        self._on_error = on_error  # an error reply this op takes as a reply (delete's not_found), or None
        self._reply: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._send()

    def _send(self) -> None:
        self.rid = self.client._send(self.op, self.fields)
        self.tries += 1
        self.deadline = time.monotonic() + self.timeout_ms / 1000

    @property
    def waited_s(self) -> float:
        """Seconds since the request was first sent."""
        return time.monotonic() - self.started

    def poll(self, wait_ms: float = 0) -> dict[str, Any] | None:
        """The reply, or None when it has not come within ``wait_ms`` (0: look without waiting)."""
        return self._poll(time.monotonic() + max(0.0, wait_ms) / 1000)

    def wait(self) -> dict[str, Any]:
        """Block until the reply (after all tries: TimeoutError)."""
        reply = self._poll(math.inf)
        assert reply is not None  # with no time bound, _poll ends with the reply or an error
        return reply

    def _poll(self, until: float) -> dict[str, Any] | None:
        if self._reply is not None:
            return self._reply
        if self._error is not None:
            raise self._error
        try:
            reply = self._wait_reply(until)
        except ProtocolError as err:
            reply = self._on_error(self, err) if self._on_error is not None else None
            if reply is None:
                self._error = err
                raise
        except (TimeoutError, ClientClosedError) as err:
            self._error = err
            raise
        if reply is not None and self._on_reply is not None:
            self._on_reply(reply)
        self._reply = reply
        return reply

    def _wait_reply(self, until: float) -> dict[str, Any] | None:
        client = self.client
        while True:
            if client._sock is None:
                raise ClientClosedError("the client is closed")
            reply = self._read()
            if reply is not None:
                return reply
            now = time.monotonic()
            if now >= self.deadline:
                client._reopen()  # Lazy Pirate: a fresh socket (re-subscribed) ...
                try:  # what ends the request here ends it for a later poll too (the socket is gone)
                    if self.tries > self.retries:
                        raise TimeoutError(
                            f"{self.op}: no reply from {client.endpoint} after {self.tries} tries of "
                            f"{self.timeout_ms} ms"
                        )
                    client._retrying(self.op, self.tries + 1, self.retries + 1, self.waited_s)
                except BaseException as err:
                    self._error = err
                    raise
                self._send()  # ... and the request again
                continue
            left_ms = (min(until, self.deadline) - now) * 1000
            if left_ms <= 0:
                return None
            client._sock.poll(math.ceil(left_ms))

    def _read(self) -> dict[str, Any] | None:
        """Everything already received, without waiting: events queued, this request's reply returned."""
        client = self.client
        while client._sock.poll(0):
            msg = client._recv(0)  # queues an event and returns None; returns a reply
            if msg is None or msg.get("op") == "event":
                continue
            # An error reply with a nil id answers a request whose id the server could not read (a header
            # over its limits, say), taken as this request's: the only other requests on this socket are a
            # reopen's watch re-subscriptions, small headers the server reads, so their errors carry their ids.
            unread = msg.get("id") is None and not msg["ok"]
            if msg.get("id") != self.rid and not unread:
                continue  # stale replies of earlier tries (and of re-subscriptions) are dropped
            if not msg["ok"]:
                raise ProtocolError.from_wire(msg["error"])
            return msg
        return None


def _check_frame_sizes(op: str, frames: list[Any], server: dict[str, Any] | None) -> None:
    """Refuse locally what the server would refuse: a frame over its max_frame_bytes (its socket drops the
    message unanswered) and a header over its max_header_bytes (images as msgpack bin in the header count
    there: send large ones as uint8 arrays)."""
    server_limits = (server or {}).get("limits") or {}
    most = server_limits.get("max_frame_bytes", limits.MAX_FRAME_BYTES)
    header_most = server_limits.get("max_header_bytes", limits.MAX_HEADER_BYTES)
    header = memoryview(frames[0]).nbytes
    if header > header_most:
        raise ProtocolError(
            errors.TOO_LARGE,
            f"{op}: header of {header} bytes; the server takes at most {header_most} (hello limits.max_header_bytes): "
            "send images as uint8 array frames rather than bin in the header",
        )
    for i, frame in enumerate(frames):
        n = memoryview(frame).nbytes
        if n > most:
            what = "header" if i == 0 else f"array frame {i - 1}"
            raise ProtocolError(
                errors.TOO_LARGE,
                f"{op}: {what} of {n} bytes; the server takes at most {most} bytes a frame (hello limits.max_frame_bytes)",
            )
