"""What protocol/README.md says about the service beyond the tables, checked against the real service:
nil op/id in error replies, submit keys matched alone, the cancel reply's state, settings given as nil,
and that the limits table documents every ``hello`` limit."""

from __future__ import annotations

import time

import msgpack
import pytest

from protocol import limits, settings
from protocol.codec import decode, encode
from tests.protocol.helpers import dealer, running_service, scene_msg

TIMEOUT_MS = 20_000
WAIT_S = 20.0


def test_limit_docs_cover_every_hello_limit():
    assert set(limits.LIMIT_DOCS) == set(limits.JobLimits().as_dict())


def test_settings_table_rows_read_as_the_readme_shows_them():
    assert "| `width` (Width) | int | 16..4096 | 320 |" in settings.settings_markdown()


class Conn:
    """One DEALER connection; replies in request order, events kept aside."""

    def __init__(self, endpoint: str) -> None:
        self.sock = dealer(endpoint)
        self.next_id = 1
        self.events: list[dict] = []

    def send_raw(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def recv(self) -> dict:
        assert self.sock.poll(TIMEOUT_MS), "no message from the server"
        return decode(self.sock.recv_multipart(), "reply")

    def reply(self) -> dict:
        while True:
            msg = self.recv()
            if msg["op"] != "event":
                return msg
            self.events.append(msg)

    def call(self, op: str, **fields) -> dict:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.send_raw(encode({"v": 1, "op": op, "id": rid, **fields}, "request"))
        msg = self.reply()
        assert msg["id"] == rid
        return msg

    def wait_state(self, job: str, states: tuple[str, ...]) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            state = self.call("status", job=job)["state"]
            if state in states:
                return state
            time.sleep(0.02)
        raise AssertionError(f"job {job} not in {states} within {WAIT_S} s")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn(tmp_path):
    with running_service(tmp_path / "jobs") as svc:
        c = Conn(svc.endpoint)
        yield c
        c.close()


def test_unreadable_requests_get_nil_op_and_id(conn):
    conn.send_raw([msgpack.packb({"v": 1, "op": "frobnicate", "id": 7})])
    unknown = conn.reply()
    assert unknown["error"]["code"] == "unknown_op" and unknown["op"] is None and unknown["id"] == 7

    conn.send_raw([b"\xc1 not msgpack"])
    bad = conn.reply()
    assert bad["error"]["code"] == "bad_msgpack" and bad["op"] is None and bad["id"] is None

    conn.send_raw([msgpack.packb({"v": 1, "op": "jobs", "id": True})])
    bad_id = conn.reply()
    assert bad_id["error"]["code"] == "bad_field" and bad_id["op"] == "jobs" and bad_id["id"] is None


def test_submit_key_is_matched_alone_and_after_the_job_ended(conn):
    first = conn.call("submit", scene=scene_msg("steps:1", captures=3), key="k-1")
    job = first["job"]
    assert conn.wait_state(job, ("done",)) == "done"
    other_scene = conn.call("submit", scene=scene_msg("steps:2", captures=2), key="k-1")
    assert other_scene["ok"] and other_scene["job"] == job and other_scene["state"] == "done"
    assert conn.call("submit", scene=scene_msg("steps:1"), key="k-2")["job"] != job


def test_cancel_reply_state_is_the_state_when_handled(conn):
    running = conn.call("submit", scene=scene_msg("steps:200", delay_ms=50))["job"]
    conn.wait_state(running, ("running",))
    waiting = conn.call("submit", scene=scene_msg("steps:1"))["job"]

    assert conn.call("cancel", job=waiting)["state"] == "cancelled"  # no worker had it: at once
    assert conn.call("cancel", job=waiting)["state"] == "cancelled"  # again: not an error
    assert conn.call("cancel", job=running)["state"] == "running"  # on the worker: an event ends it
    assert conn.wait_state(running, ("cancelled", "done", "failed")) == "cancelled"
    assert conn.call("fetch", job=running, name="step0.bin")["ok"]  # a cancelled job keeps its files

    done = conn.call("submit", scene=scene_msg("steps:1"))["job"]
    conn.wait_state(done, ("done",))
    reply = conn.call("cancel", job=done)
    assert reply["ok"] and reply["state"] == "done"


def test_a_setting_given_as_nil_is_refused(conn):
    scene = scene_msg()
    scene["settings"]["width"] = None
    reply = conn.call("submit", scene=scene)
    assert reply["error"]["code"] == "bad_field" and "settings.width" in reply["error"]["message"]
