"""Limits: per-job limits and their settings, the socket's frame limit, memory bounds, artifact names."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from backend.service.spawn import free_port, wait_answering
from backend.service.store import ARTIFACTS_DIR, MANIFEST_FILE, Manifest, resolve_inside
from protocol import errors, limits
from protocol.client import Client
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.limits import check_artifact_name
from tests.backend._reliability import (
    TIMEOUT_MS,
    WAIT_S,
    finished_probe_job,
    probe_scene,
    row,
    spawn_serve,
    start_service,
    stop_service,
    wait_state,
)
from tests.protocol.helpers import camera, png_bytes

SMALL = limits.JobLimits(
    max_captures=3,
    max_heldout=1,
    max_trajectory=2,
    max_image_side=100,
    max_frame_bytes=256 * 1024,
    max_request_bytes=200 * 1024,
    max_queued_jobs=2,
)
PAD_BYTES = 100 * 1024  # junk after a PNG's end: a legal file, a bigger frame
HUGE_FRAME_BYTES = 256 * 1024 * 1024
RSS_SLACK_BYTES = 48 * 1024 * 1024
KIB = 1024


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc, thread = start_service(tmp_path_factory.mktemp("limits") / "jobs", job_limits=SMALL)
    yield svc
    stop_service(svc, thread)


@pytest.fixture
def client(service):
    with Client(service.endpoint, timeout_ms=TIMEOUT_MS) as c:
        yield c


def _small_scene(plan: str = "steps=1") -> dict:
    scene = probe_scene(plan, captures=2)
    scene["trajectory"] = scene["trajectory"][:2]
    return scene


def _refused(client: Client, scene: dict) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    assert err.value.code == errors.TOO_LARGE
    return err.value


def test_hello_reports_this_servers_limits(client):
    got = client.request("hello", versions=[1])["limits"]
    assert got["max_captures"] == 3 and got["max_trajectory"] == 2 and got["max_image_side"] == 100
    assert got["max_frame_bytes"] == SMALL.max_frame_bytes and got["max_message_bytes"] == SMALL.max_request_bytes


def test_per_job_limits_refuse_with_the_field_and_the_limit(client, record_property):
    assert wait_state(client, client.submit(_small_scene()))["state"] == "done"  # within every limit
    cases = []
    scene = _small_scene()
    scene["captures"] = scene["captures"] * 2
    for i, c in enumerate(scene["captures"]):
        c["name"] = f"c{i}"
    cases.append((scene, "scene.captures", "at most 3 items"))
    scene = _small_scene()
    scene["trajectory"] = scene["trajectory"] + scene["trajectory"]
    cases.append((scene, "scene.trajectory", "at most 2 items"))
    big = camera(128, 128)
    scene = _small_scene()
    scene["captures"][0] = {"name": "big", "image": png_bytes(128, 128), "camera": big}
    cases.append((scene, "scene.captures[0].image", "at most 100 px a side on this server; got 128x128"))
    scene = _small_scene()
    scene["captures"][1] = {"name": "raw", "image": np.zeros((90, 120, 3), np.uint8)}
    cases.append((scene, "scene.captures[1].image", "got 120x90"))
    scene = _small_scene()
    scene["trajectory"][0]["camera"] = camera(400, 50)
    cases.append((scene, "scene.trajectory[0].camera", "got 400x50"))
    scene = _small_scene()
    scene["settings"]["width"] = 640
    cases.append((scene, "scene.settings.width", "at most 100"))
    scene = _small_scene()
    padded = np.frombuffer(png_bytes() + bytes(PAD_BYTES), np.uint8)
    scene["captures"] = [{"name": f"p{i}", "image": padded, "camera": camera()} for i in range(3)]
    cases.append((scene, "scene", "at most 204800 bytes in all"))
    for scene, field, text in cases:
        err = _refused(client, scene)
        assert err.field == field and text in err.message, (field, err.message)
    assert wait_state(client, client.submit(_small_scene()))["state"] == "done"
    row(
        record_property,
        "bad input",
        "per-job limits (serve --max-captures 3 --max-trajectory 2 --max-image-side 100 --max-request-mib ...): "
        "6 captures, 4 trajectory cameras, a 128x128 PNG, a 120x90 raw image, a 400x50 camera, settings width 640, 300 KB in all",
        "each refused too_large naming the field and the limit, before anything is written; a job within the limits done",
    )


def test_queue_limit(client):
    running = client.submit(_small_scene("steps=500 delay_ms=10"))
    wait_state(client, running, states=("running",))
    queued = [client.submit(_small_scene()) for _ in range(SMALL.max_queued_jobs)]
    err = _refused(client, _small_scene())
    assert "the queue is full (2 jobs waiting)" in err.message
    for job in (*queued, running):
        client.cancel(job)
    assert wait_state(client, running)["state"] == "cancelled"


def test_frame_over_the_socket_limit(service, client, record_property):
    """libzmq drops the connection of a frame over ZMQ_MAXMSGSIZE; the client refuses it before sending."""
    client.hello()
    scene = _small_scene()
    scene["captures"][0]["image"] = np.frombuffer(png_bytes() + bytes(SMALL.max_frame_bytes), np.uint8)
    with pytest.raises(ProtocolError) as err:
        client.submit(scene)
    assert err.value.code == errors.TOO_LARGE and "at most 262144 bytes a frame" in err.value.message
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(service.endpoint)
    try:
        sock.send_multipart([encode({"v": 1, "op": "jobs", "id": 1}, "request")[0], bytes(SMALL.max_frame_bytes + 1)])
        assert not sock.poll(500), "an oversized frame must not be answered (the connection is dropped)"
    finally:
        sock.close()
    assert client.jobs() is not None  # the service goes on
    row(
        record_property,
        "bad input",
        "a frame 1 byte over the socket's limit (ZMQ_MAXMSGSIZE, serve --max-frame-mib)",
        "dropped by libzmq with the connection, unanswered; the Client refuses it locally with too_large; service goes on",
    )


def _hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KIB
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for the peak memory")
@pytest.mark.xdist_group("service-subprocess")
def test_oversized_input_costs_no_memory(tmp_path, record_property):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = spawn_serve(tmp_path / "jobs", endpoint, "--max-frame-mib", "1")
    try:
        wait_answering(endpoint, WAIT_S)
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as c:
            c.jobs()
            before = _hwm_bytes(proc.pid)
            ctx = zmq.Context.instance()
            huge = np.zeros(HUGE_FRAME_BYTES, np.uint8)  # untouched zero pages: cheap here too
            headers = [
                b"\xdd\xff\xff\xff\xff",  # msgpack array of 2^32-1 items, none sent
                b"\xdb\xff\xff\xff\xff" + b"x" * 16,  # a string claiming 4 GiB
                b"\xc6\x7f\xff\xff\xff",  # bin of 2 GiB
                b"\x91" * 100_000,  # 100,000 nested arrays
            ]
            for _ in range(3):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.connect(endpoint)
                sock.send_multipart([b"\x80", huge], copy=False)
                time.sleep(0.2)
                sock.close()
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(endpoint)
            codes = []
            for h in headers:
                sock.send(h)
                assert sock.poll(TIMEOUT_MS)
                codes.append(decode(sock.recv_multipart(), "reply")["error"]["code"])
            sock.send_multipart(
                [encode({"v": 1, "op": "jobs", "id": 1}, "request")[0]] + [b""] * (limits.MAX_FRAMES + 1)
            )
            assert sock.poll(TIMEOUT_MS)
            codes.append(decode(sock.recv_multipart(), "reply")["error"]["code"])
            sock.close()
            del huge
            assert codes == [errors.BAD_MSGPACK] * 4 + [errors.TOO_LARGE]
            grew = _hwm_bytes(proc.pid) - before
            assert grew < RSS_SLACK_BYTES, f"peak memory grew {grew / 2**20:.1f} MiB"
            assert wait_state(c, c.submit(probe_scene("steps=1")))["state"] == "done"
    finally:
        proc.kill()
        proc.wait()
    record_property("peak_growth_mib", round(grew / 2**20, 1))
    row(
        record_property,
        "bad input",
        "3 frames of 256 MiB to a --max-frame-mib 1 service; msgpack headers claiming 4G items, 4 GiB str, "
        "2 GiB bin; 100,000 nested arrays; 16,386 frames",
        f"big frames dropped by libzmq unread; headers refused bad_msgpack, frames too_large; service peak memory grew {grew / 2**20:.1f} MiB; next job done",
    )


# ----------------------------------------------------------------------------------------------
# Artifact names


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a\\b", "C:x", "a\x00b", "a\nb", "x" * 256, ".."]
    + ["é" * 128]  # 128 characters, 256 UTF-8 bytes: over the limit in the protocol's unit
    + [".. /x.ply", "...", "frames./a.png", "x. "],  # Windows drops a part's trailing dots and spaces
)
def test_bad_artifact_names_are_refused(name):
    with pytest.raises(ValueError):
        check_artifact_name(name)


def test_good_artifact_names(tmp_path):
    for name in ("points.ply", "frames/0001.png", "a b/c-d_e.json"):
        assert check_artifact_name(name) == name
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0001.png").write_bytes(b"x")
    assert resolve_inside(tmp_path, "frames/0001.png") == (tmp_path / "frames" / "0001.png").resolve()


def test_a_job_lists_at_most_max_artifacts_files(tmp_path, monkeypatch):
    """Past the cap nothing of the batch is recorded, and the error names the limit and the count."""
    monkeypatch.setattr(limits, "MAX_ARTIFACTS", 3)
    (tmp_path / ARTIFACTS_DIR).mkdir()
    for i in range(5):
        (tmp_path / ARTIFACTS_DIR / f"f{i}").write_bytes(b"x")
    manifest = Manifest(tmp_path)
    assert len(manifest.add(["f0", "f1"])) == 2
    assert manifest.add(["f0", "f1"]) == []  # unchanged files are not counted twice
    with pytest.raises(ValueError, match="at most 3 output files .* this one has 4"):
        manifest.add(["f2", "f3"])
    assert sorted(manifest.entries) == ["f0", "f1"] == [a["name"] for a in read_json(tmp_path / MANIFEST_FILE)]
    assert [e["name"] for e in manifest.add(["f2"])] == ["f2"]


def read_json(path: Path) -> list:
    return json.loads(path.read_text())["artifacts"]


def test_symlinks_out_of_the_job_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    root = tmp_path / "job"
    root.mkdir()
    os.symlink(outside, root / "dir")
    os.symlink(outside / "secret.txt", root / "file.txt")
    for name in ("dir/secret.txt", "file.txt"):
        with pytest.raises(ValueError, match="symlink"):
            resolve_inside(root, name)


def test_tampered_manifest_entries_are_dropped_at_restart(tmp_path, record_property):
    job = finished_probe_job(tmp_path / "jobs", "steps=1")
    job_dir = tmp_path / "jobs" / job
    os.symlink("/etc/hostname", job_dir / ARTIFACTS_DIR / "link.txt")
    manifest = json.loads((job_dir / MANIFEST_FILE).read_text())
    fake = {"size": 1, "sha256": "0" * 64}
    manifest["artifacts"] += [{"name": n, **fake} for n in ("../meta.json", "/etc/hostname", "link.txt", "missing.bin")]
    (job_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    svc, thread = start_service(tmp_path / "jobs")
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            names = {a["name"] for a in c.status(job)["artifacts"]}
            assert names == {"step0.json", "summary.json"}
            for name in ("../meta.json", "/etc/hostname", "link.txt"):
                with pytest.raises(ProtocolError) as err:
                    c.fetch_bytes(job, name)
                assert err.value.code == errors.NOT_FOUND
    finally:
        stop_service(svc, thread)
    row(
        record_property,
        "bad input",
        "manifest on disk edited to list ../meta.json, /etc/hostname, a symlink, a missing file; fetch of each",
        "entries dropped at restart (logged); fetch answers not_found; real artifacts still listed",
    )


def test_png_with_lying_header_is_refused_or_fails_plainly(client):
    """A PNG whose IHDR says 64x48 but whose data is garbage: accepted by size, then the job fails plainly."""
    good = png_bytes()
    broken = good[:33] + bytes(len(good) - 33)
    scene = _small_scene()
    scene["captures"][0]["image"] = broken
    try:
        job = client.submit(scene)
    except ProtocolError as err:
        assert err.code == errors.BAD_FIELD and "scene.captures" in (err.field or "")
        return
    status = wait_state(client, job)
    assert status["state"] == "failed" and status["message"]


def test_image_helper_sizes():
    buf = io.BytesIO()
    Image.new("RGB", (7, 5)).save(buf, "JPEG")
    from protocol.images import encoded_image_size

    assert encoded_image_size(buf.getvalue()) == ("jpeg", 7, 5)
