"""Bad input against the live service: every bad message gets an error reply with a code, and the next
valid request on the same connection succeeds. Raw DEALER sockets, so nothing in between fixes input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from backend.service.server import recv_message
from protocol import errors, limits
from protocol.codec import decode, pack
from tests.protocol.helpers import ask, dealer, running_service
from tests.protocol.test_codec import WRONG, path_text, set_path, valid_requests, wrong_type_cases

TIMEOUT_MS = 5000


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("jobs")) as svc:
        yield svc.endpoint


@pytest.fixture
def sock(endpoint):
    s = dealer(endpoint)
    yield s
    s.close()


def jobs_ok(sock) -> None:
    reply = ask(sock, [msgpack.packb({"v": 1, "op": "jobs", "id": "next"})])
    assert reply["ok"] and reply["id"] == "next"


GARBAGE = [
    ([b"\xc1\xc1\xc1 not msgpack"], errors.BAD_MSGPACK, None),
    ([msgpack.packb({"v": 1, "op": "jobs", "id": 3})[:-2]], errors.BAD_MSGPACK, None),
    ([msgpack.packb("a string")], errors.BAD_MSGPACK, None),
    ([b""], errors.BAD_MSGPACK, None),
    ([msgpack.packb({"v": 2, "op": "jobs", "id": 3})], errors.UNSUPPORTED_VERSION, 3),
    ([msgpack.packb({"v": 1, "op": "explode", "id": 3})], errors.UNKNOWN_OP, 3),
    ([msgpack.packb({"v": 1, "op": "jobs", "id": 3}), b"stray frame"], errors.BAD_FRAME, 3),
    (
        [
            msgpack.packb(
                {
                    "v": 1,
                    "op": "fetch",
                    "id": 3,
                    "job": "a" * 32,
                    "name": "x",
                    "length": limits.MAX_FETCH_CHUNK_BYTES + 1,
                }
            )
        ],
        errors.BAD_FIELD,
        3,
    ),
    ([msgpack.packb({"v": 1, "op": "hello", "id": 3, "versions": [99]})], errors.UNSUPPORTED_VERSION, 3),
    ([msgpack.packb({"op": "hello", "id": 3, "versions": [1]})], errors.UNSUPPORTED_VERSION, 3),  # as the table says
    ([msgpack.packb({"v": "1", "op": "hello", "id": 3, "versions": [1]})], errors.UNSUPPORTED_VERSION, 3),
    ([msgpack.packb({"v": 1, "op": "status", "id": 3, "job": "f" * 32})], errors.NOT_FOUND, 3),
]


@pytest.mark.parametrize("frames, code, rid", GARBAGE)
def test_garbage_gets_error_reply_then_valid_request_works(sock, frames, code, rid):
    reply = ask(sock, frames)
    assert reply["ok"] is False and reply["error"]["code"] == code and reply["id"] == rid
    assert reply["error"]["message"]
    jobs_ok(sock)


def test_wrong_type_in_every_field_of_every_op(sock):
    cases = wrong_type_cases()
    for op, path, field in cases:
        msg = set_path(valid_requests()[op], path, WRONG[field.type])
        reply = ask(sock, list(pack(msg)))
        assert reply["ok"] is False and reply["op"] == op, (op, path)
        assert reply["error"]["code"] == errors.BAD_FIELD and reply["error"]["field"] == path_text(path)
        jobs_ok(sock)


def test_too_many_captures_is_too_large(sock):
    msg = valid_requests()["submit"]
    one = {"name": "c", "image": np.zeros((2, 2, 3), np.uint8)}
    msg["scene"]["captures"] = [one] * (limits.MAX_CAPTURES + 1)
    reply = ask(sock, list(pack(msg)))
    assert reply["error"]["code"] == errors.TOO_LARGE and reply["error"]["field"] == "scene.captures"
    jobs_ok(sock)


def test_frame_over_socket_limit_is_dropped_and_service_goes_on(endpoint, sock):
    big = np.zeros(limits.MAX_FRAME_BYTES + 1, np.uint8)
    sock.send_multipart([msgpack.packb({"v": 1, "op": "jobs", "id": 1}), big])
    assert not sock.poll(300)  # ZMQ_MAXMSGSIZE: the connection is dropped, nothing reaches Python
    fresh = zmq.Context.instance().socket(zmq.DEALER)
    fresh.setsockopt(zmq.LINGER, 0)
    fresh.connect(endpoint)
    jobs_ok(fresh)
    fresh.close()


def test_far_too_many_frames_are_dropped_unkept_answered_too_large_and_service_goes_on(sock):
    """A message of 300,000 frames more than MAX_FRAMES (empty: 2 bytes each on the wire): the service reads it
    frame by frame and keeps at most the limit, answers too_large naming the count and the limit, and serves the
    next request. It used to keep every frame before counting them (4M frames: 1.1 GB, the loop blocked 14 s)."""
    count = limits.MAX_FRAMES + 300_000
    header = msgpack.packb({"v": 1, "op": "jobs", "id": 4})
    sock.send(header, zmq.SNDMORE)
    for _ in range(count - 2):
        sock.send(b"", zmq.SNDMORE)
    sock.send(b"")
    assert sock.poll(30_000), "no reply"
    reply = decode(sock.recv_multipart(), "reply")
    assert reply["ok"] is False and reply["error"]["code"] == errors.TOO_LARGE
    assert reply["error"]["message"] == f"{count} frames; at most {limits.MAX_FRAMES}"
    jobs_ok(sock)


@pytest.mark.parametrize("kind", [zmq.DEALER, zmq.REQ])
def test_the_frame_limit_counts_the_requests_frames_not_the_envelope(endpoint, kind):
    """MAX_FRAMES frames are within the limit (the extra ones then are stray: bad_frame), one more is too_large,
    from a DEALER and from a REQ, whose empty delimiter frame is the envelope's."""
    s = zmq.Context.instance().socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    header = msgpack.packb({"v": 1, "op": "jobs", "id": 5})
    try:
        for count, code in ((limits.MAX_FRAMES, errors.BAD_FRAME), (limits.MAX_FRAMES + 1, errors.TOO_LARGE)):
            s.send_multipart([header] + [b""] * (count - 1))
            assert s.poll(TIMEOUT_MS), "no reply"
            reply = decode(s.recv_multipart(), "reply")
            assert reply["error"]["code"] == code, reply
    finally:
        s.close()


def test_recv_message_keeps_the_first_frames_and_counts_them_all():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://test-recv-message")
    b.connect("inproc://test-recv-message")
    try:
        a.send_multipart([b"first", *[b"x"] * 10, b"last"])
        a.send(b"alone")
        frames, count = recv_message(b, keep=3)
        assert count == 12 and [f.bytes for f in frames] == [b"first", b"x", b"x"]
        frames, count = recv_message(b, keep=3)  # the next message starts clean
        assert count == 1 and [f.bytes for f in frames] == [b"alone"]
    finally:
        a.close(linger=0)
        b.close(linger=0)


def test_req_socket_with_delimiter_frame_is_answered(endpoint):
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(endpoint)
    req.send(msgpack.packb({"v": 1, "op": "jobs", "id": 9}))
    assert req.poll(TIMEOUT_MS)
    assert decode(req.recv_multipart(), "reply")["id"] == 9
    req.close()


def test_echoed_non_ascii_text_stays_within_the_decoders_byte_limit(sock):
    """An unknown field whose name is 21840 characters but 65520 UTF-8 bytes: the error reply echoing it
    is clipped in bytes, so the client can read it, and it keeps the request's id."""
    key = "€" * 21840
    reply = ask(sock, list(pack({"v": 1, "op": "status", "id": 7, "job": "0" * 32, key: 1})))
    assert reply["ok"] is False and reply["id"] == 7 and reply["error"]["code"] == errors.BAD_FIELD
    assert reply["error"]["field"] == key  # 65520 bytes: fits
    message = reply["error"]["message"]
    assert len(message.encode()) <= limits.MAX_STR_BYTES and message.endswith("...") and key[:100] in message
    jobs_ok(sock)
