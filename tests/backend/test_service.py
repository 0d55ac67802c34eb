"""The service over real loopback sockets: the real codec, the real loop, a small real runner."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from backend.fileio import sha256_file
from backend.masks import capture_mask
from backend.progress import ProgressEvent
from backend.scene import load_scene
from backend.service import Service, ServiceConfig
from backend.service import worker as worker_module
from backend.service.probe import run as probe_runner
from backend.service.server import is_loopback
from backend.service.spawn import free_port, serve_command, serve_env
from backend.service.store import (
    ARTIFACTS_DIR,
    INTERRUPTED_REASON,
    JobStore,
    resolve_inside,
    scene_message,
    write_scene_message,
)
from protocol import errors, limits
from protocol.client import Client
from protocol.codec import decode, encode, pack
from protocol.errors import ProtocolError
from protocol.limits import check_artifact_name
from tests.backend._reliability import probe_scene, start_service, stop_service, wait_state
from tests.protocol.helpers import HEIGHT, WIDTH, camera, png_bytes, runner, running_service, scene_msg

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 5000
WAIT_S = 20


def start(data_dir: Path, **kwargs) -> tuple[Service, object]:
    """_reliability's service with this file's runner (tests.protocol.helpers) unless given."""
    return start_service(data_dir, **{"runner": runner, **kwargs})


@contextlib.contextmanager
def finished_job(data_dir: Path, run) -> Iterator[tuple[Client, str, list[dict]]]:
    """A job of ``scene_msg()`` run to its end by ``run`` on a service of its own: (client, job, its events)."""
    with running_service(data_dir, runner=run) as svc, Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
        job = c.submit(scene_msg())
        c.watch(job, since=0)
        yield c, job, list(c.events(job))


@pytest.fixture
def service(tmp_path):
    svc, thread = start(tmp_path / "jobs")
    yield svc
    stop_service(svc, thread)


@pytest.fixture
def client(service):
    with Client(service.endpoint, timeout_ms=TIMEOUT_MS, retries=1) as c:
        yield c


def test_hello_reports_version_generators_device_limits(client):
    info = client.hello()
    assert info["version"] == 1 and info["versions"] == [1]
    assert "reproject" in info["generators"]
    assert info["device"] == "cpu" and "gpu" not in info
    assert info["limits"]["max_image_side"] == 4096


def test_submit_events_fetch_with_sha256(client, service, tmp_path):
    job = client.submit(scene_msg(captures=3))
    assert len(job) == 32 and int(job, 16) >= 0
    client.watch(job, since=0)
    events = list(client.events(job))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["state"] == "queued" and events[-1]["state"] == "done"
    announced = [a["name"] for e in events for a in e["artifacts"]]
    assert announced[:3] == ["step0.bin", "step1.bin", "step2.bin"] and "times.json" in announced
    status = client.status(job)
    assert status["fraction"] == 1.0 and status["seq"] == len(events)
    job_dir = service.data_dir / job
    for entry in status["artifacts"]:
        path = job_dir / ARTIFACTS_DIR / entry["name"]
        got = client.fetch_to(job, entry["name"], tmp_path / "got" / entry["name"], chunk_bytes=300)
        assert got["sha256"] == entry["sha256"] == sha256_file(path)
        assert (tmp_path / "got" / entry["name"]).read_bytes() == path.read_bytes()
    # the store: journal, scene folder with written images (the only copy of the request), manifest
    assert not (job_dir / "request.msgpack").exists()
    journal = [json.loads(line) for line in (job_dir / "journal.jsonl").read_text().splitlines()]
    assert [j["state"] for j in journal][-1] == "done" and len(journal) == len(events)
    scene = json.loads((job_dir / "scene" / "scene.json").read_text())
    assert [c["image"] for c in scene["captures"]] == ["images/c0000.png", "images/c0001.jpg", "images/c0002.png"]
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert {a["name"] for a in manifest["artifacts"]} == {a["name"] for a in status["artifacts"]}
    assert json.loads(client.fetch_bytes(job, "times.json"))["captures"] == 3


def test_fetch_chunks_offsets_and_errors(client):
    job = client.submit(scene_msg())
    wait_state(client, job)
    whole = client.fetch_bytes(job, "step2.bin")
    part = client.request("fetch", job=job, name="step2.bin", offset=1000, length=10)
    assert part["total"] == 1002 and bytes(part["data"]) == bytes(whole[1000:])
    end = client.request("fetch", job=job, name="step2.bin", offset=1002)
    assert len(end["data"]) == 0 and end["sha256"] == hashlib.sha256(whole).hexdigest()
    for name in ("../meta.json", "nope.bin", "/etc/passwd", "manifest.json"):
        with pytest.raises(ProtocolError) as err:
            client.request("fetch", job=job, name=name)
        assert err.value.code == errors.NOT_FOUND, name
    with pytest.raises(ProtocolError) as err:
        client.request("fetch", job=job, name="step2.bin", offset=5000)
    assert err.value.code == errors.BAD_FIELD and err.value.field == "offset"
    with pytest.raises(ProtocolError) as err:
        client.status("0" * 32)
    assert err.value.code == errors.NOT_FOUND


def test_a_file_cut_short_in_place_while_fetched_fails_that_fetch_only(client, service):
    """An artifact truncated on the server's disk between two chunks (a runner that rewrites a listed file in
    place): that fetch is refused, and the service goes on (a memory map of it killed the process: SIGBUS)."""
    job = client.submit(scene_msg())
    wait_state(client, job)
    first = client.request("fetch", job=job, name="step2.bin", offset=0, length=10)
    assert len(first["data"]) == 10
    path = service.store.artifact_path(service.store.jobs[job], "step2.bin")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ProtocolError, match=r"fetch: step2.bin changed size since it was recorded") as err:
        client.request("fetch", job=job, name="step2.bin", offset=500, length=10)
    assert err.value.code == errors.INTERNAL
    assert client.status(job)["state"] == "done"  # still serving


def test_bad_scene_gets_bad_field_naming_the_field(client):
    scene = scene_msg()
    scene["captures"][1]["camera"]["K"] = np.array([[-50.0, 0, 32], [0, 50, 24], [0, 0, 1]])
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    assert err.value.code == errors.BAD_FIELD
    assert err.value.message.startswith("submit: scene.captures[1].camera.K: focal lengths must be positive")
    assert err.value.field == "scene.captures[1].camera.K"
    scene = scene_msg()
    scene["captures"][0]["camera"] = camera(width=65)
    with pytest.raises(ProtocolError, match=r"scene.captures\[0\].camera: size 65x48 does not match"):
        client.submit(scene)
    scene = scene_msg()  # several bad captures: each named with its wire path, the first is the reply's field
    scene["captures"][0]["camera"] = camera(width=65)
    scene["captures"][1]["camera"] = camera(width=66)
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    assert err.value.field == "scene.captures[0].camera" and err.value.message.startswith(
        "submit: scene.captures[0].camera: size 65x48 does not match"
    )
    assert "; scene.captures[1].camera: size 66x48 does not match" in err.value.message
    assert err.value.message.endswith(" (2 problems)")
    scene = scene_msg()
    scene["settings"] = {"width": "wide"}
    with pytest.raises(ProtocolError, match="scene.settings.width: must be an integer"):
        client.submit(scene)
    assert client.jobs() == []  # nothing half-made
    assert client.hello()["version"] == 1


def masked_scene_folder(root: Path) -> Path:
    """A scene folder whose captures 0-2 and held-out photo carry mask files (greyscale PNG, RGBA PNG, JPEG,
    greyscale PNG) and capture 3 none; names hold '/' and a mask shares a photo's file name."""
    from PIL import Image

    (root / "images" / "left").mkdir(parents=True)
    (root / "masks").mkdir()

    def cam(tz: float) -> dict:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in camera(tz=tz).items()}

    def mask(i: int) -> np.ndarray:
        m = np.zeros((HEIGHT, WIDTH), np.uint8)
        m[4 + i : 30 + i, 8 + 2 * i : 50 - i] = 255
        return m

    entries = []
    for i, kind in enumerate(("L", "RGBA", "jpeg", "L", None)):
        name = f"left/{i}"
        (root / "images" / f"{name}.png").write_bytes(png_bytes(seed=i))
        entry = {"name": name, "image": f"images/{name}.png", "camera": cam(float(i))}
        if kind == "RGBA":
            rgba = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
            rgba[..., 3] = mask(i)
            Image.fromarray(rgba, "RGBA").save(root / "masks" / f"{i}.png")
        elif kind == "jpeg":
            Image.fromarray(mask(i)).save(root / "masks" / f"{i}.jpg", quality=95)
        elif kind == "L":
            Image.fromarray(mask(i)).save(root / "masks" / f"{i}.png")
        if kind is not None:
            entry["mask"] = f"masks/{i}.{'jpg' if kind == 'jpeg' else 'png'}"
        entries.append(entry)
    held = entries.pop(3)
    data = {"version": 1, "captures": entries, "heldout": [held], "settings": {"seed": 0}}
    (root / "scene.json").write_text(json.dumps(data))
    return root


def test_masks_survive_scene_message_and_write_scene_message(tmp_path):
    """`reconloop submit`'s path: a loaded scene through scene_message, the codec and the service's
    write_scene_message keeps every capture's and held-out photo's mask file, byte for byte."""
    src = load_scene(masked_scene_folder(tmp_path / "src"))
    assert [c.mask is not None for c in src.captures + src.heldout] == [True, True, True, False, True]
    wire = {"v": 1, "op": "submit", "id": 1, "scene": scene_message(src)}
    got = write_scene_message(decode(encode(wire, "request"), "request")["scene"], tmp_path / "dst")
    for a, b in zip(src.captures + src.heldout, got.captures + got.heldout, strict=True):
        assert (a.mask is None) == (b.mask is None), a.name
        if a.mask is not None:
            assert b.mask.read_bytes() == a.mask.read_bytes(), a.name
            assert capture_mask(b).any() and np.array_equal(capture_mask(b), capture_mask(a)), a.name
    written = json.loads((tmp_path / "dst" / "scene.json").read_text())
    want = ["masks/c0000.png", "masks/c0001.png", "masks/c0002.jpg", None]
    assert [c.get("mask") for c in written["captures"]] == want
    assert written["heldout"][0]["mask"] == "masks/h0000.png"
    # raw pixels travel as a mask too (RGBA: the alpha is the mask), written as a PNG
    scene = scene_msg()
    alpha = np.zeros((HEIGHT, WIDTH), np.uint8)
    alpha[10:20, 5:40] = 255
    scene["captures"][1]["mask"] = np.dstack([np.zeros((HEIGHT, WIDTH, 3), np.uint8), alpha])
    raw = write_scene_message(scene, tmp_path / "raw")
    assert raw.captures[0].mask is None and raw.captures[1].mask.name == "c0001.png"
    assert np.array_equal(capture_mask(raw.captures[1]), alpha > 0)


def test_a_submitted_masked_scene_arrives_with_its_masks(client, service, tmp_path):
    src = load_scene(masked_scene_folder(tmp_path / "src"))
    job = client.submit(scene_message(src))
    arrived = load_scene(service.data_dir / job / "scene")
    assert [c.mask.read_bytes() if c.mask else None for c in arrived.captures + arrived.heldout] == [
        c.mask.read_bytes() if c.mask else None for c in src.captures + src.heldout
    ]
    assert wait_state(client, job)["state"] == "done"


def test_a_mask_of_another_size_is_refused_naming_the_capture_and_the_field(client):
    for key, index in (("captures", 1), ("heldout", 0)):
        scene = scene_msg()
        scene["heldout"] = [{"name": "held", "image": png_bytes(), "camera": camera()}]
        scene[key][index]["mask"] = png_bytes(width=WIDTH // 2, height=HEIGHT // 2)
        with pytest.raises(ProtocolError) as err:
            client.submit(scene)
        name = scene[key][index]["name"]
        assert err.value.code == errors.BAD_FIELD and err.value.field == f"scene.{key}[{index}].mask"
        noun = {"captures": "capture", "heldout": "held-out view"}[key]
        assert err.value.message == (
            f"submit: scene.{key}[{index}].mask: {noun} {name!r}'s mask is 32x24; its image is 64x48 "
            "(a mask has its photo's size)"
        )
    scene = scene_msg()  # every mask of another size named in one error with the scene's other problems, in order
    scene["heldout"] = [{"name": "held", "image": png_bytes(), "camera": camera()}]
    scene["captures"][1]["mask"] = png_bytes(width=WIDTH // 2, height=HEIGHT // 2)
    scene["heldout"][0]["mask"] = png_bytes(width=WIDTH, height=HEIGHT // 2)
    scene["captures"][0]["camera"] = camera(height=HEIGHT + 1)  # passes the codec, not load_scene
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    second = scene["captures"][1]["name"]
    assert err.value.field == "scene.captures[0].camera", err.value.message
    message = err.value.message
    assert message.startswith(f"submit: scene.captures[0].camera: size 64x{HEIGHT + 1} does not match the image ")
    assert message.endswith(
        f"; scene.captures[1].mask: capture {second!r}'s mask is 32x24; its image is 64x48 (a mask has its "
        "photo's size); scene.heldout[0].mask: held-out view 'held''s mask is 64x24; its image is 64x48 (a mask has "
        "its photo's size) (3 problems)"
    ), message
    assert message.count(".mask:") == 2  # not again with the service's file
    assert client.jobs() == []  # nothing half-made


def _png_with_a_garbled_chunk() -> bytes:
    """A white mask of the photo's size whose pixels span two IDAT chunks, the second's type garbled (a valid
    CRC): its header reads, its body raises SyntaxError in PIL."""
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    buf = io.BytesIO()
    Image.fromarray(np.full((HEIGHT, WIDTH), 255, np.uint8)).save(buf, format="PNG")
    data, pos, out = buf.getvalue(), 8, buf.getvalue()[:8]
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        half = len(body) // 2
        out += chunk(kind, body) if kind != b"IDAT" else chunk(b"IDAT", body[:half]) + chunk(b"\0\1\2\3", body[half:])
    return out


def test_a_mask_the_job_could_not_read_is_refused_at_submit(client):
    """A 0/1 label image passes the codec (a PNG of the right size) but keeps no pixel: refused by field and
    capture at submit, not as a failed job naming the service's file."""
    from PIL import Image

    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    labels[5:20, 5:30] = 1
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    scene = scene_msg()
    scene["captures"][0]["mask"] = buf.getvalue()
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    name = scene["captures"][0]["name"]
    assert err.value.code == errors.BAD_FIELD and err.value.field == "scene.captures[0].mask"
    assert err.value.message == (
        f"submit: scene.captures[0].mask: capture {name!r}'s mask keeps no pixel (its highest value 1 is not "
        "above 127 of 255); a mask is white (255) where the object is"
    )
    whole = png_bytes()  # a mask whose header is a PNG of the photo's size and whose pixels are cut off
    scene["captures"][0]["mask"] = whole[:60]
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    assert err.value.field == "scene.captures[0].mask" and "'s mask cannot be decoded (" in err.value.message
    scene["captures"][0]["mask"] = _png_with_a_garbled_chunk()  # PIL raises SyntaxError for it
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    assert err.value.code == errors.BAD_FIELD and err.value.field == "scene.captures[0].mask"
    assert err.value.message.endswith("'s mask cannot be decoded (SyntaxError)")
    # every mask the job could not read named in one error, beside a mask of another size and a camera's problem
    scene = scene_msg(captures=3)
    scene["captures"][0]["mask"] = whole[:60]
    scene["captures"][1]["mask"] = buf.getvalue()
    scene["captures"][2]["mask"] = png_bytes(width=WIDTH // 2, height=HEIGHT // 2)
    scene["captures"][2]["camera"] = camera(height=HEIGHT + 1)
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    message = err.value.message
    assert message.endswith("(4 problems)") and message.count(".mask:") == 3, message
    assert err.value.field == "scene.captures[0].mask"
    at = 0
    for part in (  # in the scene's order, whichever check found them
        f"submit: scene.captures[0].mask: capture {name!r}'s mask cannot be decoded (",
        f"; scene.captures[1].mask: capture {scene['captures'][1]['name']!r}'s mask keeps no pixel (",
        "; scene.captures[2].",
        "; scene.captures[2].",
    ):
        found = message.find(part, at)
        assert found >= at, (part, message)
        at = found + 1
    assert "scene.captures[2].mask: capture" in message and "scene.captures[2].camera: size 64x" in message
    assert client.jobs() == []


def test_jobs_run_in_order_one_at_a_time(client):
    jobs = [client.submit(scene_msg(delay_ms=30)) for _ in range(3)]
    assert [j["job"] for j in client.jobs()] == jobs
    times = []
    for job in jobs:
        assert wait_state(client, job)["state"] == "done"
        times.append(json.loads(client.fetch_bytes(job, "times.json")))
    for before, after in zip(times, times[1:]):
        assert after["start"] >= before["end"]


def test_failing_job_fails_and_worker_goes_on(client):
    bad = client.submit(scene_msg("fail"))
    good = client.submit(scene_msg())
    status = wait_state(client, bad)
    assert status["state"] == "failed"
    assert "RuntimeError" in status["message"] and "boom in the test runner" in status["message"]
    assert [a["name"] for a in status["artifacts"]] == ["step0.bin"]
    assert wait_state(client, good)["state"] == "done"


def test_cancel_between_steps_and_while_queued(client, service):
    running = client.submit(scene_msg("steps:20", delay_ms=50))
    queued = client.submit(scene_msg())
    client.watch(running, since=0)
    for event in client.events(running):
        if event["stage"] == "step":
            break
    waiting, busy = client.status(queued), client.status(running)  # typed place in the queue and worker
    assert (waiting["queue_position"], waiting["queue_length"], "worker" in waiting) == (1, 1, False), waiting
    assert busy["worker"].startswith("the service's worker thread") and "queue_position" not in busy, busy
    assert client.cancel(queued)["state"] == "cancelled"
    assert "queue_position" not in client.status(queued)
    assert client.cancel(running)["state"] == "running"  # it stops at its next step boundary (an event says so)
    status = wait_state(client, running)
    assert status["state"] == "cancelled"
    steps = sorted((service.data_dir / running / ARTIFACTS_DIR).glob("step*.bin"))
    assert 1 <= len(steps) < 20
    assert {a["name"] for a in status["artifacts"]} == {p.name for p in steps}  # every written step recorded
    assert client.status(queued)["state"] == "cancelled"
    assert not (service.data_dir / queued / ARTIFACTS_DIR / "times.json").exists()  # never ran
    assert client.cancel(running)["state"] == "cancelled"  # cancelling again is harmless


def test_two_watchers_get_the_same_events(client, service):
    with Client(service.endpoint, timeout_ms=TIMEOUT_MS) as other:
        job = client.submit(scene_msg("steps:5", delay_ms=20))
        client.watch(job, since=0)
        other.watch(job, since=0)
        a = [(e["seq"], e["state"], e["fraction"]) for e in client.events(job)]
        b = [(e["seq"], e["state"], e["fraction"]) for e in other.events(job)]
    assert a == b and a[-1][1] == "done" and len(a) == 8  # queued, started, 5 steps, done


def test_events_resume_after_reconnect(client):
    """The reopened socket is subscribed again at once: the missed events and the rest come without
    waiting for ``events``' idle status poll (which would also replay them, ``idle_ms`` later)."""
    idle_ms = 5000
    job = client.submit(scene_msg("steps:6", delay_ms=40))
    client.watch(job, since=0)
    seqs, reopened = [], None
    for event in client.events(job, idle_ms=idle_ms):
        seqs.append(event["seq"])
        if event["seq"] == 3:
            client._reopen()  # a lost connection: new socket, new identity
            reopened = time.monotonic()
            time.sleep(0.1)  # events pushed meanwhile go to the old, closed identity
    took_s = time.monotonic() - reopened
    assert seqs == list(range(1, 10)) and client.reconnects == 1
    assert took_s < idle_ms / 1000 / 2, f"the rest took {took_s:.1f} s: replayed by the idle poll, not the reconnect"


def test_lazy_pirate_retries_then_succeeds():
    """A server that ignores the first try: the client closes, reopens, resends and gets the reply."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    with Client(f"tcp://127.0.0.1:{port}", timeout_ms=300, retries=2) as c:
        c._send("hello", {"versions": [1]})  # a first try, swallowed below
        assert router.poll(TIMEOUT_MS)
        router.recv_multipart()
        c._reopen()
        rid = c._next_id
        import threading

        def answer():
            frames = router.recv_multipart()
            reply = {
                "v": 1,
                "op": "hello",
                "id": rid,
                "ok": True,
                "version": 1,
                "versions": [1],
                "server": "fake",
                "generators": [],
                "device": "cpu",
                "limits": {},
            }
            router.send_multipart([frames[0], *pack(reply)])

        t = threading.Thread(target=answer)
        t.start()
        assert c.request("hello", versions=[1])["server"] == "fake"
        t.join()
    with Client(f"tcp://127.0.0.1:{port}", timeout_ms=100, retries=2) as c:
        start_s = time.monotonic()
        with pytest.raises(TimeoutError, match="after 3 tries"):
            c.request("jobs")
        assert time.monotonic() - start_s < 2
    router.close(linger=0)


def test_shutdown_only_from_loopback(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.2") and not is_loopback(None) and not is_loopback("")
    svc, thread = start(tmp_path / "ipc-jobs", bind=f"ipc://{tmp_path}/svc.sock")
    with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:  # ipc: no peer address, so not loopback
        with pytest.raises(ProtocolError) as err:
            c.shutdown()
        assert err.value.code == errors.FORBIDDEN
    stop_service(svc, thread)
    svc, thread = start(tmp_path / "tcp-jobs")
    with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
        c.shutdown()
    thread.join(WAIT_S)
    assert not thread.is_alive()


def test_second_service_on_same_store_is_refused(service):
    other = Service(ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=service.data_dir, device="cpu"), runner=runner)
    with pytest.raises(RuntimeError, match="in use by another reconloop service"):
        other.start_thread()


def test_artifact_names_are_checked(tmp_path):
    for bad in ("", "/abs", "../up", "a/../b", "a//b", "a\\b", "c:x", "x\x00", "./a", "a" * 300):
        with pytest.raises(ValueError):
            check_artifact_name(bad)
    assert check_artifact_name("frames/0001.png") == "frames/0001.png"
    (tmp_path / "out").mkdir()
    (tmp_path / "secret").write_text("s")
    (tmp_path / "out" / "link").symlink_to(tmp_path / "secret")
    (tmp_path / "out" / "dir").symlink_to(tmp_path)
    for name in ("link", "dir/secret"):
        with pytest.raises(ValueError, match="symlink"):
            resolve_inside(tmp_path / "out", name)


@pytest.mark.xdist_group("service-subprocess")
def test_restart_after_kill9_marks_interrupted_and_keeps_finished_artifacts(tmp_path):
    data_dir = tmp_path / "jobs"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = serve_command(endpoint, data_dir, runner="tests.protocol.helpers:runner")
    proc = subprocess.Popen(cmd, cwd=REPO, env=serve_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with Client(endpoint, timeout_ms=TIMEOUT_MS, retries=3) as c:
            c.hello()
            finished = c.submit(scene_msg())
            assert wait_state(c, finished)["state"] == "done"
            shas = {a["name"]: a["sha256"] for a in c.status(finished)["artifacts"]}
            blocked = c.submit(scene_msg("block"))
            waiting = c.submit(scene_msg())
            wait_state(c, blocked, states=("running",))
            deadline = time.monotonic() + WAIT_S
            while c.status(blocked)["stage"] != "block" and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)
    svc, thread = start(data_dir)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            states = {j["job"]: j["state"] for j in c.jobs()}
            assert states[finished] == "done" and states[blocked] == "interrupted"
            assert c.status(blocked)["message"] == INTERRUPTED_REASON
            for name, sha in shas.items():
                assert hashlib.sha256(c.fetch_bytes(finished, name)).hexdigest() == sha
            assert wait_state(c, waiting)["state"] == "done"  # queued before the kill: runs after the restart
            c.watch(blocked, since=0)
            replay = list(c.events(blocked))
            assert [e["state"] for e in replay] == ["queued", "running", "running", "interrupted"]
    finally:
        stop_service(svc, thread)


def test_submit_with_same_key_is_one_job(client):
    scene = scene_msg()
    a = client.request("submit", scene=scene, key="k1")["job"]
    b = client.request("submit", scene=scene, key="k1")["job"]
    assert a == b and len(client.jobs()) == 1
    assert png_bytes()  # helper sanity: a real PNG


@pytest.fixture
def held_writes(monkeypatch):
    """A gate the service's job folders wait at (``write_scene_message`` holds until it is set): a submit
    whose photos take seconds to write; set at the end so no thread stays blocked. Yields (the gate, an event set
    when the first write reaches it, the names of the scenes' first captures whose writes reached it)."""
    import threading

    from backend.service import store as store_module

    gate, started, write = threading.Event(), threading.Event(), store_module.write_scene_message
    entered: list[str] = []

    def held(scene, folder):
        entered.append(scene["captures"][0]["name"])
        started.set()
        assert gate.wait(WAIT_S), "the test never let the write finish"
        return write(scene, folder)

    monkeypatch.setattr(store_module, "write_scene_message", held)
    yield gate, started, entered
    gate.set()


@pytest.fixture
def held_large(monkeypatch):
    """A gate the job folders of scenes whose first capture is named ``large`` wait at (a large scene of raw
    pixels); the others are written at once. Set at the end so no thread stays blocked."""
    import threading

    from backend.service import store as store_module

    gate, write = threading.Event(), store_module.write_scene_message

    def held(scene, folder):
        if scene["captures"][0]["name"] == "large":
            assert gate.wait(WAIT_S), "the test never let the write finish"
        return write(scene, folder)

    monkeypatch.setattr(store_module, "write_scene_message", held)
    yield gate
    gate.set()


def _submit_in_thread(endpoint: str, scene: dict, key: str | None = None) -> tuple[object, dict]:
    """Submit from a thread of its own (a client that waits for its reply): (the thread, what it got)."""
    import threading

    got: dict = {}

    def submit():
        with Client(endpoint, timeout_ms=4 * TIMEOUT_MS, retries=0) as c:
            try:
                got["reply"] = c.request("submit", scene=scene, key=key)
            except ProtocolError as err:
                got["error"] = err

    thread = threading.Thread(target=submit, daemon=True)
    thread.start()
    return thread, got


def test_a_submit_being_written_holds_up_no_other_request(service, client, held_writes):
    """The loop answers others while a submit's job folder is written (raw pixels encoded: 29 s for 805 MB)."""
    gate, started, _ = held_writes
    thread, got = _submit_in_thread(service.endpoint, scene_msg(), key="slow")
    assert started.wait(WAIT_S)
    with Client(service.endpoint, timeout_ms=2000, retries=0) as other:
        assert other.hello()["device"] == "cpu"
        assert other.jobs() == []  # not listed until its folder is whole
    resend, resent = _submit_in_thread(service.endpoint, scene_msg(), key="slow")  # a client's retry: the same job
    time.sleep(0.2)
    assert not got and not resent
    gate.set()
    thread.join(WAIT_S)
    resend.join(WAIT_S)
    job = got["reply"]["job"]
    assert resent["reply"]["job"] == job and [j["job"] for j in client.jobs()] == [job]
    assert wait_state(client, job)["state"] == "done"


def test_a_submit_being_written_counts_towards_the_queue_caps(tmp_path, held_writes):
    gate, started, _ = held_writes
    svc, thread = start(tmp_path / "jobs", job_limits=limits.JobLimits(max_queued_per_client=1))
    try:
        first, got = _submit_in_thread(svc.endpoint, scene_msg())
        assert started.wait(WAIT_S)
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS, retries=0) as c:
            with pytest.raises(ProtocolError) as err:
                c.request("submit", scene=scene_msg())
            assert err.value.code == errors.TOO_LARGE and "1 jobs waiting" in str(err.value)
            gate.set()
            first.join(WAIT_S)
            assert wait_state(c, got["reply"]["job"])["state"] == "done"
    finally:
        stop_service(svc, thread)


def test_submits_held_while_written_are_capped_in_bytes(tmp_path, held_writes):
    """Submits wait in memory for the writer threads; past ``max_writing_bytes`` the next is refused (memory stays
    bounded) and the service goes on: a submit that fits, or any once the writes are done, is taken."""
    gate, started, _ = held_writes
    small, large = scene_msg(), scene_msg(captures=30)  # 13 kB and 221 kB of frames
    cap = 300_000  # the large one and the small one, not two large ones
    svc, thread = start(tmp_path / "jobs", job_limits=limits.JobLimits(max_writing_bytes=cap))
    try:
        first, got = _submit_in_thread(svc.endpoint, large)
        assert started.wait(WAIT_S)
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS, retries=0) as c:
            with pytest.raises(ProtocolError) as err:
                c.request("submit", scene=large)
            assert err.value.code == errors.TOO_LARGE and "holds at most 0.3 MiB" in str(err.value)
            assert c.hello()["limits"]["max_writing_bytes"] == cap
            later, got_small = _submit_in_thread(svc.endpoint, small)  # a small one still fits beside the large one
            deadline = time.monotonic() + WAIT_S
            while len(svc._writing) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not got_small and len(svc._writing) == 2
            gate.set()
            first.join(WAIT_S)
            later.join(WAIT_S)
            jobs = [got["reply"]["job"], got_small["reply"]["job"], c.submit(large)]
            assert all(wait_state(c, job)["state"] == "done" for job in jobs)
    finally:
        gate.set()
        stop_service(svc, thread)


def test_a_scene_refused_while_written_is_answered_with_its_field(service, client, held_writes):
    gate, started, _ = held_writes
    scene = scene_msg()
    scene["captures"][1]["mask"] = png_bytes()[:60]  # a PNG of the photo's size whose pixels are cut off
    thread, got = _submit_in_thread(service.endpoint, scene)
    assert started.wait(WAIT_S)
    gate.set()
    thread.join(WAIT_S)
    assert got["error"].code == errors.BAD_FIELD and got["error"].field == "scene.captures[1].mask"
    assert client.jobs() == [] and not list((service.data_dir).glob(".tmp-*"))


def test_a_stop_during_a_write_lists_its_job_and_refuses_the_next(tmp_path, held_writes):
    """Stopping waits for the folders being written (their jobs listed, queued: the next start runs them) and answers
    a submit not begun with an error to send it again."""
    from backend.service.server import WRITER_THREADS

    gate, started, entered = held_writes
    svc, thread = start(tmp_path / "jobs")
    keys = [f"k{n}" for n in range(WRITER_THREADS + 1)]  # one more than there are writers: it waits its turn
    submits = [_submit_in_thread(svc.endpoint, scene_msg(), key=k) for k in keys]
    assert started.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while (len(svc._writing) < len(keys) or len(entered) < WRITER_THREADS) and time.monotonic() < deadline:
        time.sleep(0.01)
    svc.stop()
    time.sleep(0.2)
    gate.set()
    thread.join(WAIT_S)
    for submitter, _ in submits:
        submitter.join(WAIT_S)
    answers = [got for _, got in submits]
    refused = [got["error"] for got in answers if "error" in got]
    jobs = sorted(got["reply"]["job"] for got in answers if "reply" in got)
    assert len(jobs) == WRITER_THREADS and len(refused) == 1
    assert refused[0].code == errors.INTERNAL and "stopped before this job was written" in str(refused[0])
    svc, thread = start(tmp_path / "jobs")
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            assert sorted(j["job"] for j in c.jobs()) == jobs
            assert all(wait_state(c, job)["state"] == "done" for job in jobs)
    finally:
        stop_service(svc, thread)


def test_one_connections_submits_are_answered_and_queued_in_their_order(service, held_large):
    """A client that sends a large submit and then a small one on one connection, without waiting: the small one's
    folder is written first (two writers), but its reply and its job come after the large one's."""
    from tests.protocol.helpers import dealer

    gate = held_large
    sock = dealer(service.endpoint)
    try:
        for rid, name in ((1, "large"), (2, "small")):
            scene = scene_msg()
            scene["captures"][0]["name"] = name
            sock.send_multipart(encode({"v": 1, "op": "submit", "id": rid, "scene": scene}, "request"))
        deadline = time.monotonic() + WAIT_S
        while not (len(service._writing) == 2 and service._writing[1].future.done()) and time.monotonic() < deadline:
            time.sleep(0.01)  # the small one's folder is whole, the large one's is not
        assert not sock.poll(300), "the small submit was answered before the large one"
        gate.set()
        replies = []
        while len(replies) < 2:
            assert sock.poll(WAIT_S * 1000), "no reply"
            msg = decode(sock.recv_multipart(copy=False), "reply")
            if msg["op"] == "submit":
                replies.append(msg)
    finally:
        gate.set()
        sock.close(linger=0)
    assert [r["id"] for r in replies] == [1, 2] and all(r["ok"] for r in replies)
    started_at = []
    with Client(service.endpoint, timeout_ms=TIMEOUT_MS) as c:
        for reply in replies:  # the one worker runs them in the order they were queued
            c.watch(reply["job"], since=0)
            started_at.append(next(e["time"] for e in c.events(reply["job"]) if e["state"] == "running"))
    assert started_at[0] < started_at[1]


def test_a_small_submit_is_not_held_up_by_a_large_ones_write(service, client, held_large):
    """Two writers: a submit whose folder takes long (a large scene of raw pixels) leaves another writer for the next
    submit, which is queued and answered first."""
    gate = held_large
    large = scene_msg()
    large["captures"][0]["name"] = "large"
    try:
        slow, got = _submit_in_thread(service.endpoint, large)
        deadline = time.monotonic() + WAIT_S
        while not service._writing and time.monotonic() < deadline:
            time.sleep(0.01)
        small = client.submit(scene_msg())  # answered while the large one's folder is still being written
        assert not got and [j["job"] for j in client.jobs()] == [small]
    finally:
        gate.set()
    slow.join(WAIT_S)
    assert [j["job"] for j in client.jobs()] == [small, got["reply"]["job"]]


# ----------------------------------------------------------------------------------------------
# Handing jobs to the worker


def test_job_queued_before_a_restart_runs_when_the_worker_connects_late(tmp_path, monkeypatch):
    """After a restart the first loop pass hands the queued job over: the worker must be connected by then."""
    job = JobStore(tmp_path / "jobs").create({"scene": scene_msg(), "key": None}).job  # queued when it stopped
    run, pool_start, send = worker_module.Worker.run, worker_module.ThreadPool.start, Service._send
    connected, sent = [], []

    def late(self):
        time.sleep(0.05)  # a loaded machine: the thread connects after the loop's first pass
        run(self)

    def start_pool(self):
        slots = pool_start(self)
        # start() returns once the worker connected: ready, and its PAIR takes a message now
        connected.extend((s.ready, bool(s.pair.poll(0, zmq.POLLOUT))) for s in slots)
        return slots

    def spy_send(slot, body):
        delivered = send(slot, body)
        sent.append((body["cmd"], body.get("job"), delivered))
        return delivered

    monkeypatch.setattr(worker_module.Worker, "run", late)
    monkeypatch.setattr(worker_module.ThreadPool, "start", start_pool)
    monkeypatch.setattr(Service, "_send", staticmethod(spy_send))
    svc, thread = start(tmp_path / "jobs")
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            assert wait_state(c, job)["state"] == "done"
    finally:
        stop_service(svc, thread)
    assert connected == [(True, True)]
    assert sent[0] == ("run", job, True)  # the first run went out, to a connected worker


def test_run_not_delivered_keeps_the_job_first_in_line(service, client, monkeypatch):
    """A run message the worker's socket refused (zmq.Again) leaves the job queued, first, and the slot free."""
    send, refused = Service._send, []

    def refuse_first_run(slot, body):
        if body["cmd"] == "run" and not refused:
            refused.append(body["job"])
            return False
        return send(slot, body)

    monkeypatch.setattr(Service, "_send", staticmethod(refuse_first_run))
    first, second = client.submit(scene_msg()), client.submit(scene_msg())
    assert wait_state(client, first)["state"] == wait_state(client, second)["state"] == "done"
    assert refused == [first]
    times = [json.loads(client.fetch_bytes(job, "times.json")) for job in (first, second)]
    assert times[0]["end"] <= times[1]["start"]  # put back first in line: it still ran first


# ----------------------------------------------------------------------------------------------
# Jobs with many artifacts


def frames_runner(scene, out_dir, *, device, progress):
    """The most files a legal job lists: MAX_OTHER_ARTIFACTS announced in batches, then two per frame of
    the longest trajectory left for the worker to find (its "finished" message carries them all)."""
    batch = []
    for i in range(limits.MAX_OTHER_ARTIFACTS):
        (out_dir / f"other_{i:04d}.bin").write_bytes(b"o")
        batch.append(f"other_{i:04d}.bin")
        if len(batch) == 256:
            progress(ProgressEvent("other", (i + 1) / limits.MAX_ARTIFACTS, f"{i + 1} files", tuple(batch)))
            batch = []
    (out_dir / "frames").mkdir()
    for f in range(limits.MAX_TRAJECTORY):
        (out_dir / "frames" / f"frame_{f:04d}.png").write_bytes(b"f")
        (out_dir / "frames" / f"confidence_{f:04d}.png").write_bytes(f"{f}".encode())


def test_job_with_the_most_artifacts_can_be_watched_queried_and_fetched(tmp_path):
    with finished_job(tmp_path / "jobs", frames_runner) as (c, job, events):
        assert events[-1]["state"] == "done"
        assert len(events[-1]["artifacts"]) == limits.MAX_FILES_PER_FRAME * limits.MAX_TRAJECTORY
        status = c.status(job)
        assert len(status["artifacts"]) == limits.MAX_ARTIFACTS
        last = limits.MAX_TRAJECTORY - 1
        assert c.fetch_bytes(job, f"frames/confidence_{last:04d}.png") == f"{last}".encode()


def test_a_runners_long_texts_are_clipped_where_events_are_made(tmp_path):
    """A runner's stage and message over the protocol's limits (in UTF-8 bytes) are clipped by the store,
    so the push to watchers, status and replays all carry them; the job and its later events go on."""

    def long_message_runner(scene, out_dir, *, device, progress):
        progress(ProgressEvent("s" * (limits.MAX_NAME_BYTES + 10), 0.5, "€" * (limits.MAX_STR_BYTES // 3 + 1)))
        progress(ProgressEvent("step", 0.9, "a plain message"))

    with finished_job(tmp_path / "jobs", long_message_runner) as (c, job, events):
        assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
        long = events[2]
        assert long["message"].endswith("...") and limits.utf8_len(long["message"]) <= limits.MAX_STR_BYTES
        assert long["stage"].endswith("...") and limits.utf8_len(long["stage"]) <= limits.MAX_NAME_BYTES
        assert [e["message"] for e in events[-2:]] == ["a plain message", "finished"]
        assert c.status(job)["state"] == "done"
        assert c.request("status", job=job, since=0)["ok"]  # the replay carries the clipped event too


# ----------------------------------------------------------------------------------------------
# Keeping the store small (--keep-days)


def test_only_ended_jobs_older_than_the_age_expire_and_only_ended_jobs_are_deleted(tmp_path):
    store = JobStore(tmp_path / "jobs")
    old_done = store.create({"scene": scene_msg(), "key": "k-old"})
    store.append(old_done, "done", "done", 1.0, "finished")
    old_queued = store.create({"scene": scene_msg(), "key": None})
    old_running = store.create({"scene": scene_msg(), "key": None})
    store.append(old_running, "running", "fit", 0.5, "fitting")
    new_failed = store.create({"scene": scene_msg(), "key": None})
    store.append(new_failed, "failed", "fit", 0.5, "boom")
    assert store.keys[(None, "k-old")] == old_done.job
    now = time.time()
    for record in (old_done, old_queued, old_running):
        record.updated -= 3 * 86_400  # their last events three days ago
    assert store.expired(2 * 86_400, now) == [old_done]  # waiting, running, recent: kept
    store.delete(old_done)
    assert not old_done.dir.exists() and (None, "k-old") not in store.keys and old_done.job not in store.jobs
    assert set(store.jobs) == {old_queued.job, old_running.job, new_failed.job}
    with pytest.raises(ValueError, match=rf"JobStore.delete: job {old_running.job} is running; only an ended job"):
        store.delete(old_running)
    assert old_running.dir.exists()
    with pytest.raises(ValueError, match=r"ServiceConfig.keep_days must be > 0 or None; got 0"):
        Service(ServiceConfig(data_dir=tmp_path / "other", keep_days=0))


def test_a_clients_list_is_capped_among_its_own_jobs_not_everyones(tmp_path, monkeypatch):
    """jobs: the newest MAX_JOBS_LISTED of the asking client's jobs. Another client's many jobs used to push
    one's own off the list (the cap was taken over every client's jobs, the owner filter after it)."""
    monkeypatch.setattr(limits, "MAX_JOBS_LISTED", 3)
    store = JobStore(tmp_path / "jobs")
    alice = store.create({"scene": scene_msg(), "key": None}, owner="alice")
    bobs = [store.create({"scene": scene_msg(), "key": None}, owner="bob") for _ in range(4)]
    assert store.listed("alice") == [alice]
    assert store.listed("bob") == bobs[1:]  # the newest 3, oldest first
    assert store.listed("carol") == []


def test_a_client_deletes_an_ended_job_and_only_an_ended_one(tmp_path):
    """delete: an ended job's folder, listing and submit key go; a running or queued job is refused, naming the
    field and what to do; a second delete, and any later request for it, get not_found."""
    data_dir = tmp_path / "jobs"
    svc, thread = start(data_dir, runner=probe_runner)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            done = c.request("submit", scene=probe_scene("steps=1"), key="first")["job"]
            assert wait_state(c, done)["state"] == "done"
            running = c.submit(probe_scene("steps=100 delay_ms=100"))  # 10 s, cancelled at a step boundary
            queued = c.submit(probe_scene("steps=1"))
            wait_state(c, running, ("running",))
            for job, state in ((running, "running"), (queued, "queued")):
                with pytest.raises(ProtocolError, match=rf"delete: job {job} is {state}; .*cancel it and wait") as err:
                    c.delete(job)
                assert (err.value.code, err.value.field) == (errors.BAD_FIELD, "job")
            assert (data_dir / done).is_dir()
            c.request("fetch", job=done, name="summary.json", offset=0, length=8)  # a download under way (mapped)
            assert c.delete(done)["state"] == "done"
            assert not (data_dir / done).exists() and done not in {j["job"] for j in c.jobs()}
            for op, fields in (("delete", {}), ("status", {}), ("fetch", {"name": "summary.json"})):
                with pytest.raises(ProtocolError) as err:
                    c.request(op, job=done, **fields)
                assert err.value.code == errors.NOT_FOUND
            again = c.request("submit", scene=probe_scene("steps=1"), key="first")["job"]  # the key went with it
            assert again != done
            c.cancel(running)
            assert wait_state(c, running)["state"] == "cancelled"
            assert c.delete(running)["state"] == "cancelled" and not (data_dir / running).exists()
    finally:
        stop_service(svc, thread)
    assert {p.name for p in data_dir.iterdir() if not p.name.startswith(".")} >= {queued, again}
    svc, thread = start(data_dir, runner=probe_runner)  # after a restart: still gone, its key still free
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            assert {done, running} & {j["job"] for j in c.jobs()} == set()
            assert c.request("submit", scene=probe_scene("steps=1"), key="first")["job"] == again
        assert not [p for p in data_dir.iterdir() if p.name.startswith(".tmp-")]
    finally:
        stop_service(svc, thread)


def test_a_delete_whose_folder_cannot_move_answers_internal_and_keeps_the_job(tmp_path, monkeypatch):
    svc, thread = start(tmp_path / "jobs", runner=probe_runner)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            job = c.submit(probe_scene("steps=1"))
            wait_state(c, job)

            def busy(record):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(record.dir))

            monkeypatch.setattr(svc.store, "delete", busy)
            with pytest.raises(
                ProtocolError, match=rf"delete: job {job}'s folder cannot be moved \(Device or resource"
            ):
                c.delete(job)
            assert job in {j["job"] for j in c.jobs()} and c.status(job)["state"] == "done"
    finally:
        stop_service(svc, thread)


def test_a_service_with_keep_days_deletes_old_ended_jobs_at_start(tmp_path):
    """A job that ended before the service started, older than --keep-days, is gone from the store and the list."""
    data_dir = tmp_path / "jobs"
    with finished_job(data_dir, runner) as (_, job, events):
        assert events[-1]["state"] == "done"
    time.sleep(0.01)
    svc, thread = start(data_dir, keep_days=1e-7)  # 8.6 ms
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            assert c.jobs() == []
        assert not (data_dir / job).exists()
    finally:
        stop_service(svc, thread)


@pytest.mark.parametrize("manifest", ['{"artifacts": [', '{"artifacts": [{"size": 3}]}', "[]"])
def test_a_job_whose_manifest_is_damaged_stays_listed_with_its_files(tmp_path, manifest):
    """manifest.json damaged on disk or edited by hand: the job is listed at the next start, its files as its events
    listed them (each checked against the output folder), not skipped as unreadable."""
    data_dir = tmp_path / "jobs"
    with finished_job(data_dir, runner) as (c, job, events):
        before = c.status(job)["artifacts"]
        assert events[-1]["state"] == "done" and before
    (data_dir / job / "manifest.json").write_text(manifest)
    gone = before[0]["name"]  # a file deleted as well: not listed
    (data_dir / job / ARTIFACTS_DIR / gone).unlink()
    svc, thread = start(data_dir)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            assert [j["job"] for j in c.jobs()] == [job]
            assert c.status(job)["artifacts"] == before[1:]
            kept = before[1]
            data = c.fetch_bytes(job, kept["name"])
            assert len(data) == kept["size"] and hashlib.sha256(data).hexdigest() == kept["sha256"]
    finally:
        stop_service(svc, thread)


def test_a_submit_of_raw_pixels_waits_for_the_service_to_write_them(service, monkeypatch):
    """The client's try waits longer for a scene of raw pixels, which the service PNG-encodes before it answers: a
    write slower than the client's timeout is no TimeoutError (the job was made and the client gave up on it)."""
    import protocol.client as client_module
    from backend.service import store as store_module

    write = store_module.write_scene_message

    def slow(scene, folder):
        time.sleep(1.5)  # the encoding of a large scene
        return write(scene, folder)

    monkeypatch.setattr(store_module, "write_scene_message", slow)
    scene = scene_msg()
    scene["captures"][0]["image"] = np.zeros((HEIGHT, WIDTH, 3), np.uint8)  # raw pixels
    raw = scene["captures"][0]["image"].nbytes
    monkeypatch.setattr(client_module, "RAW_SUBMIT_BYTES_PER_S", raw / 3.0)  # 3 s more a try for this scene
    with Client(service.endpoint, timeout_ms=1000, retries=0) as c:
        job = c.submit(scene)
        assert wait_state(c, job)["state"] == "done"
