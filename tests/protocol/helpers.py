"""Helpers shared by the protocol, service and CLI tests: tiny scenes and a small real job runner."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq
from PIL import Image

from backend.progress import ProgressEvent
from protocol.codec import decode, encode

WIDTH, HEIGHT = 64, 48
FOCAL = 50.0
MS = 1e-3


def dealer(endpoint: str) -> Any:
    """A DEALER connected to ``endpoint`` with LINGER 0, as the README's clients use (closed by the caller)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def ask(sock: Any, frames: list[Any], timeout_ms: int = 5000) -> dict[str, Any]:
    """Send ``frames`` on ``sock`` (a DEALER) and return the decoded reply."""
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), "no reply"
    return decode(sock.recv_multipart(), "reply")


def png_bytes(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    return buf.getvalue()


def camera(width: int = WIDTH, height: int = HEIGHT, tz: float = 0.0) -> dict[str, Any]:
    w2c = np.eye(4)
    w2c[2, 3] = tz
    K = np.array([[FOCAL, 0, width / 2], [0, FOCAL, height / 2], [0, 0, 1]])
    return {"w2c": w2c, "K": K, "width": width, "height": height}


def scene_msg(prompt: str = "", *, delay_ms: int = 0, captures: int = 2) -> dict[str, Any]:
    """A valid submit ``scene``: PNG, JPEG and raw-pixel captures, a 3-camera trajectory.

    ``prompt`` and ``delay_ms`` steer ``runner`` below (settings travel with the job).
    """
    caps = []
    for i in range(captures):
        image: Any = [png_bytes(seed=i), jpeg_bytes(seed=i), np.zeros((HEIGHT, WIDTH, 3), np.uint8)][i % 3]
        caps.append({"name": f"cap{i}", "image": image, "camera": camera(tz=float(i))})
    return {
        "captures": caps,
        "trajectory": [{"frame": f, "camera": camera(tz=0.5 * f)} for f in range(1, 4)],
        "settings": {"prompt": prompt, "seed": delay_ms},
    }


def runner(scene: Any, out_dir: Path, *, device: str, progress: Any) -> None:
    """A small real runner for service tests (not the loop). Behaviour from ``scene.settings``:

    prompt ``""`` or ``"steps:N"`` (default 3): N steps, each writing ``step{i}.bin`` and announcing it;
    ``"fail"``: one step, then RuntimeError; ``"block"``: sleeps forever without reporting (kill tests).
    ``settings.seed``: milliseconds each step sleeps. Always writes ``times.json`` (start, end).
    """
    prompt, delay_s = scene.settings.prompt, scene.settings.seed * MS
    start = time.time()
    steps = int(prompt.split(":")[1]) if prompt.startswith("steps:") else 3
    if prompt == "block":
        progress(ProgressEvent("block", 0.1, "blocking"))
        while True:
            time.sleep(0.05)
    for i in range(steps):
        time.sleep(delay_s)
        name = f"step{i}.bin"
        (out_dir / name).write_bytes(np.random.default_rng(i).bytes(1000 + i))
        progress(ProgressEvent("step", (i + 1) / steps, f"step {i + 1} of {steps}", (name,)))
        if prompt == "fail":
            raise RuntimeError("boom in the test runner")
    (out_dir / "times.json").write_text(
        json.dumps({"start": start, "end": time.time(), "captures": len(scene.captures)})
    )


SERVICE_STOP_S = 20

HELLO_REPLY = {"version": 1, "versions": [1], "server": "scripted", "generators": [], "device": "cpu", "limits": {}}


def artifact(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def status_reply(job: str, state: str, seq: int, artifacts: list[dict[str, Any]] = ()) -> dict[str, Any]:
    now = time.time()
    return {
        "job": job,
        "state": state,
        "stage": "",
        "fraction": 0.0,
        "message": "",
        "seq": seq,
        "created": now,
        "updated": now,
        "artifacts": list(artifacts),
    }


def fetch_reply(job: str, name: str, data: bytes, offset: int, length: int) -> dict[str, Any]:
    chunk = np.frombuffer(data[offset : offset + length], np.uint8)
    return {
        "job": job,
        "name": name,
        "offset": offset,
        "data": chunk,
        "total": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


class ScriptedService:
    """The test plays the service on a loopback ROUTER (conftest's ``loopback_router``): it reads each
    request and answers it when it chooses, or never (a service gone silent in the middle of a job)."""

    def __init__(self, router: Any) -> None:
        self.router = router
        self.ident = b""  # the identity of the client's latest request (events go there)

    def request(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The next request's header (its array frames are dropped)."""
        assert self.router.poll(int(timeout_s * 1000)), f"no request came within {timeout_s} s"
        self.ident, header, *_ = self.router.recv_multipart()
        return msgpack.unpackb(header, raw=False)

    def pending(self) -> bool:
        """Whether a request came that was not read yet."""
        return bool(self.router.poll(0))

    def drain(self) -> None:
        while self.router.poll(0):
            self.router.recv_multipart()

    @property
    def endpoint(self) -> str:
        """Where the client connects."""
        return self.router.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, msg: dict[str, Any]) -> None:
        """A reply or event to the latest request's client."""
        self.router.send_multipart([self.ident, *encode(msg, "reply")])

    def answer(self, request: dict[str, Any], **fields: Any) -> None:
        """``request``'s reply (ok) with ``fields``; a field given overrides the echoed op or id."""
        self.send({"v": 1, "ok": True, "op": request["op"], "id": request["id"], **fields})

    def fail(self, request: dict[str, Any], code: str, message: str, **fields: Any) -> None:
        """``request``'s error reply (``id``/``op`` may be overridden, e.g. nil)."""
        error = {"code": code, "message": message}
        self.send({"v": 1, "ok": False, "op": request["op"], "id": request["id"], "error": error, **fields})

    def event(self, job: str, seq: int, state: str, fraction: float = 0.0, message: str = "") -> None:
        msg = {"v": 1, "ok": True, "op": "event", "job": job, "seq": seq, "time": time.time(), "state": state}
        msg.update(stage="", fraction=fraction, message=message, artifacts=[])
        self.send(msg)


@contextlib.contextmanager
def running_service(data_dir: Path, bind: str = "tcp://127.0.0.1:*", runner: Any = runner) -> Iterator[Any]:
    """The real service with ``runner`` (this module's, unless given), in a thread on a random loopback
    port; stopped on exit."""
    from backend.service import Service, ServiceConfig

    svc = Service(ServiceConfig(bind=bind, data_dir=data_dir, device="cpu"), runner=runner)
    thread = svc.start_thread()
    try:
        yield svc
    finally:
        svc.stop()
        thread.join(SERVICE_STOP_S)
