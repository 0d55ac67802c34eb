"""Client.begin: a request sent now whose reply a later poll picks up (Lazy Pirate, never blocking).

Against a scripted ROUTER on loopback (answers when the test says so, or never) and the real service."""

from __future__ import annotations

import time

import pytest

from protocol import errors
from protocol.client import Client, ClientClosedError, PendingRequest
from protocol.errors import ProtocolError
from tests.protocol.helpers import ScriptedService, running_service, scene_msg

JOB = "0123456789abcdef0123456789abcdef"
POLL_BOUND_S = 0.05  # poll(0) reads what is there and returns
WAIT_S = 20


@pytest.fixture
def svc(loopback_router) -> ScriptedService:
    """The test plays the service: it reads the requests and sends the replies (or none)."""
    return ScriptedService(loopback_router)


def _timed_poll(pending: PendingRequest):
    t0 = time.perf_counter()
    reply = pending.poll(0)
    took = time.perf_counter() - t0
    assert took < POLL_BOUND_S, f"poll(0) took {took:.3f} s"
    return reply


def _poll_until_reply(pending: PendingRequest) -> tuple[dict, int]:
    """Poll as a UI timer does until the reply came; (reply, polls that returned None)."""
    deadline, empty = time.monotonic() + WAIT_S, 0
    while (reply := _timed_poll(pending)) is None:
        empty += 1
        assert time.monotonic() < deadline, "no reply"
        time.sleep(0.005)
    return reply, empty


def test_poll_returns_at_once_and_a_later_poll_takes_the_reply(svc):
    with Client(svc.endpoint, timeout_ms=WAIT_S * 1000, retries=0) as client:
        pending = client.begin("cancel", job=JOB)
        assert _timed_poll(pending) is None  # nothing was answered yet
        header = svc.request(WAIT_S)
        assert header["op"] == "cancel" and header["job"] == JOB and header["id"] == pending.rid
        svc.answer(header, id=pending.rid + 100, job=JOB, state="cancelled")  # not this request's: dropped
        svc.event(JOB, 1, "running", fraction=0.5)
        assert _timed_poll(pending) is None  # a stale reply and an event: still no reply
        svc.answer(header, job=JOB, state="cancelled")
        reply, _ = _poll_until_reply(pending)
        assert reply["id"] == pending.rid and reply["ok"]
        assert pending.poll(0) is reply  # the reply stays taken
        # The event that came meanwhile waits on the client; take_events never reads the socket.
        events = client.take_events()
        assert [(e["job"], e["seq"], e["state"]) for e in events] == [(JOB, 1, "running")]
        assert client.take_events() == []

        # An error reply raises ProtocolError from the poll that takes it (and from any later poll).
        pending = client.begin("status", job=JOB)
        svc.fail(svc.request(WAIT_S), errors.NOT_FOUND, f"no job {JOB}")
        with pytest.raises(ProtocolError, match="no job"):
            _poll_until_reply(pending)
        with pytest.raises(ProtocolError, match="no job"):
            pending.poll(0)


def test_resent_on_a_fresh_socket_with_the_same_key_then_timeout(svc):
    with Client(svc.endpoint, timeout_ms=150, retries=2) as client:
        pending = client.begin("submit", scene=scene_msg())
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"submit: no reply from .* after 3 tries of 150 ms"):
            _poll_until_reply(pending)
        assert 0.4 < time.monotonic() - t0 < 5
        assert pending.tries == 3 and client.reconnects == 3  # a fresh socket after each try, as request()
        with pytest.raises(TimeoutError):  # a later poll raises the same, sending nothing more
            pending.poll(0)
        got = []  # (the sending socket's identity, the request) per try
        for _ in range(3):
            header = svc.request(WAIT_S)
            got.append((svc.ident, header))
        assert not svc.router.poll(100), "a fourth try went out"
    idents = {ident for ident, _ in got}
    keys = {header["key"] for _, header in got}
    ids = [header["id"] for _, header in got]
    assert len(idents) == 3, "each try comes from a fresh socket"
    assert len(keys) == 1 and len(set(ids)) == 3, "the same submit key on every try, a new id each"


def test_request_waits_through_begin_and_retries(svc):
    """request() is begin().wait(): the same Lazy Pirate loop, blocking."""
    with Client(svc.endpoint, timeout_ms=100, retries=1) as client:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"jobs: no reply from .* after 2 tries of 100 ms"):
            client.request("jobs")
        assert 0.15 < time.monotonic() - t0 < 5 and client.reconnects == 2


def test_closed_client_raises_client_closed(svc):
    client = Client(svc.endpoint, timeout_ms=WAIT_S * 1000)
    pending = client.begin("jobs")
    client.close()
    with pytest.raises(ClientClosedError):
        pending.poll(0)
    with pytest.raises(ClientClosedError):
        client.begin("jobs")
    assert issubclass(ClientClosedError, RuntimeError)  # what request() raised before


def test_begin_hello_and_begin_watch_against_the_service(tmp_path):
    with running_service(tmp_path / "jobs") as svc, Client(svc.endpoint, timeout_ms=WAIT_S * 1000) as client:
        hello = client.begin_hello()
        reply, _ = _poll_until_reply(hello)
        assert client.server is reply and reply["version"] == 1  # stored, as hello() does
        job = client.submit(scene_msg("steps:3", delay_ms=50))
        watch = client.begin_watch(job)
        status, _ = _poll_until_reply(watch)
        assert status["job"] == job
        # Events come on later polls (of other requests, or poll_events) and are replayed from seq 1.
        seqs, deadline = [], time.monotonic() + WAIT_S
        while not seqs or seqs[-1] != "done":
            assert time.monotonic() < deadline, f"events so far: {seqs}"
            seqs += [e["state"] for e in client.poll_events(50) if e["job"] == job]
        assert seqs[-1] == "done" and client.begin("status", job=job).wait()["state"] == "done"


def test_an_error_reply_without_an_id_is_this_requests_error(svc):
    """A server that cannot read a request's id answers with id nil (its header over the limits, say): the
    client takes that error as its request's, rather than dropping it as stale and timing out."""
    with Client(svc.endpoint, timeout_ms=2000, retries=0) as client:
        pending = client.begin("jobs")
        message = "header frame of 9860594 bytes; at most 8388608"
        svc.fail(svc.request(WAIT_S), errors.TOO_LARGE, message, op=None, id=None)
        with pytest.raises(ProtocolError) as err:
            pending.wait()
    assert err.value.code == errors.TOO_LARGE and "9860594" in err.value.message


def test_a_header_over_the_servers_limit_is_refused_before_sending(svc):
    """Images as msgpack bin in the header count against max_header_bytes: refused here, naming the limit."""
    with Client(svc.endpoint, timeout_ms=2000, retries=0) as client:
        client.server = {"limits": {"max_header_bytes": 200}}
        with pytest.raises(ProtocolError) as err:
            client.begin("submit", key="k", scene=scene_msg(captures=1))  # a PNG as bin in the header
        assert not svc.router.poll(200), "the oversized request was sent"
    assert err.value.code == errors.TOO_LARGE and "max_header_bytes" in err.value.message


def test_a_resent_delete_that_finds_no_job_succeeds_and_a_first_one_fails(svc):
    """The first try deleted the job but its reply was lost: the resend's not_found means it is gone. A first
    try's not_found is the caller's error."""
    import threading

    def delete_in_thread(client: Client) -> tuple[threading.Thread, list]:
        out: list = []

        def run():
            try:
                out.append(client.delete(JOB))
            except ProtocolError as err:
                out.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        return thread, out

    not_found = (errors.NOT_FOUND, f"delete: no job {JOB!r}")
    with Client(svc.endpoint, timeout_ms=300, retries=2) as client:
        thread, out = delete_in_thread(client)
        first = svc.request(WAIT_S)  # handled, its reply never sent
        assert first["op"] == "delete" and first["job"] == JOB
        svc.fail(svc.request(WAIT_S), *not_found)  # the resend, 300 ms later
        thread.join(WAIT_S)
        assert out == [{"job": JOB, "state": None, "gone": True}]
        thread, out = delete_in_thread(client)
        svc.fail(svc.request(WAIT_S), *not_found)
        thread.join(WAIT_S)
        assert isinstance(out[0], ProtocolError) and out[0].code == errors.NOT_FOUND
