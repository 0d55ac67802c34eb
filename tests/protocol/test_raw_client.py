"""A client written from protocol/README.md alone: pyzmq, msgpack, numpy, hashlib. No protocol.client,
no protocol.codec. It does hello -> submit -> events -> fetch against the real service."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from protocol.schemas import BEGIN_MARK, END_MARK, schema_markdown
from tests.protocol.helpers import dealer, png_bytes, running_service

README = Path(__file__).resolve().parents[2] / "protocol" / "README.md"
TIMEOUT_MS = 20_000


def test_readme_tables_match_schemas():
    text = README.read_text()
    block = text.split(BEGIN_MARK, 1)[1].split(END_MARK, 1)[0]
    assert block.strip() == schema_markdown().strip(), "run: python -m protocol"


class RawClient:
    """Follows the README: DEALER, header map + one frame per array, poll before every receive."""

    def __init__(self, endpoint: str) -> None:
        self.sock = dealer(endpoint)
        self.next_id = 1
        self.events: list[dict] = []

    def send(self, header: dict, arrays=()) -> int:
        header = {"v": 1, "id": self.next_id, **header}
        self.next_id += 1
        frames = [msgpack.packb(header, use_bin_type=True)] + [
            np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays
        ]
        self.sock.send_multipart(frames)
        return header["id"]

    def recv(self) -> dict:
        assert self.sock.poll(TIMEOUT_MS), "no message from the server"
        frames = self.sock.recv_multipart()
        return self.resolve(msgpack.unpackb(frames[0], raw=False), frames[1:])

    def resolve(self, value, frames):
        if isinstance(value, dict):
            if "__array__" in value:
                return np.frombuffer(
                    frames[value["__array__"]], dtype=np.dtype(value["dtype"]).newbyteorder("<")
                ).reshape(value["shape"])
            return {k: self.resolve(v, frames) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, frames) for v in value]
        return value

    def call(self, header: dict, arrays=()) -> dict:
        rid = self.send(header, arrays)
        while True:
            msg = self.recv()
            if msg["op"] == "event":
                self.events.append(msg)
            elif msg["id"] == rid:
                return msg


def array_ref(arrays: list, a: np.ndarray) -> dict:
    arrays.append(a)
    return {"__array__": len(arrays) - 1, "dtype": a.dtype.name, "shape": list(a.shape)}


@pytest.fixture
def service(tmp_path):
    with running_service(tmp_path / "jobs") as svc:
        yield svc


def test_raw_client_hello_submit_events_fetch(service):
    c = RawClient(service.endpoint)
    hello = c.call({"op": "hello", "versions": [1]})
    assert hello["ok"] and hello["version"] == 1

    arrays: list[np.ndarray] = []
    K = np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]])
    w2c = np.eye(4)

    def cam():
        return {"w2c": array_ref(arrays, w2c), "K": array_ref(arrays, K), "width": 64, "height": 48}

    scene = {
        "captures": [
            {"name": "png", "image": png_bytes(), "camera": cam()},  # a PNG file as msgpack bin
            {"name": "raw", "image": array_ref(arrays, np.zeros((48, 64, 3), np.uint8)), "camera": cam()},
        ],
        "trajectory": [{"frame": 1, "camera": cam()}],
        "settings": {"prompt": "steps:4"},
    }
    sub = c.call({"op": "submit", "scene": scene, "key": "raw-1"}, arrays)
    assert sub["ok"], sub.get("error")
    job = sub["job"]
    status = c.call({"op": "status", "job": job, "watch": True, "since": 0})
    assert status["ok"]
    deadline = time.monotonic() + 20
    while not any(e["state"] == "done" for e in c.events) and time.monotonic() < deadline:
        c.events.append(c.recv())
    seqs = [e["seq"] for e in c.events]
    assert seqs == list(range(1, len(seqs) + 1)) and c.events[-1]["state"] == "done"
    names = [a["name"] for e in c.events for a in e["artifacts"]]
    assert "step3.bin" in names

    for entry in [a for e in c.events for a in e["artifacts"]]:
        data, offset, total = bytearray(), 0, None
        while total is None or offset < total:
            r = c.call({"op": "fetch", "job": job, "name": entry["name"], "offset": offset, "length": 256})
            assert r["ok"], r.get("error")
            data += r["data"].tobytes()
            offset += len(r["data"])
            total = r["total"]
        assert hashlib.sha256(data).hexdigest() == r["sha256"] == entry["sha256"]
        assert len(data) == entry["size"]

    bad = c.call({"op": "fetch", "job": job, "name": "../meta.json"})
    assert bad["ok"] is False and bad["error"]["code"] == "not_found"
    c.sock.close()
