"""Who may connect and whose jobs are whose: CurveZMQ keys, the ZAP allow-list, the bind policy, owners."""

from __future__ import annotations

import hashlib
import re
import shutil
import stat

import pytest
import zmq
import zmq.auth

from backend.cli import main as cli_main
from backend.service.auth import LOCAL_OWNER, AuthConfig, AuthError, endpoint_is_local, generate_keys
from backend.service.store import write_scene_message
from protocol import errors
from protocol.client import Client
from protocol.errors import ProtocolError
from protocol.limits import is_job_id
from tests.backend._reliability import TIMEOUT_MS, probe_scene, row, start_service, stop_service, wait_state

REFUSED_TIMEOUT_MS = 400  # a refused CurveZMQ handshake never answers: the client times out
Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    pairs = {name: generate_keys(folder / "all", name) for name in ("server", "alice", "bob", "mallory")}
    allowed = folder / "allowed"
    allowed.mkdir()
    for name in ("alice", "bob"):
        shutil.copy(pairs[name].public_file, allowed)
    return pairs, allowed


@pytest.fixture(scope="module")
def curve_service(tmp_path_factory, keys):
    pairs, allowed = keys
    svc, thread = start_service(tmp_path_factory.mktemp("jobs"), auth=AuthConfig(pairs["server"].secret_file, allowed))
    yield svc
    stop_service(svc, thread)


def curve_client(svc, keys, name: str, **kw) -> Client:
    pairs, _ = keys
    return Client(svc.endpoint, server_key=pairs["server"].public_file, client_key=pairs[name].secret_file, **kw)


def test_keys_command_writes_a_pair_and_refuses_to_overwrite(tmp_path, capsys):
    assert cli_main(["keys", str(tmp_path / "k"), "--name", "studio"]) == 0
    public, secret = tmp_path / "k" / "studio.key", tmp_path / "k" / "studio.key_secret"
    assert public.is_file() and secret.is_file()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text() and "secret-key" in secret.read_text()
    first_line = capsys.readouterr().out.splitlines()[0]
    key = zmq.auth.load_certificate(str(public))[0].decode()
    assert Z85.match(key) and first_line.endswith(f"({key})")
    assert cli_main(["keys", str(tmp_path / "k"), "--name", "studio"]) == 2  # exists: refused, untouched
    assert "exists" in capsys.readouterr().err
    with pytest.raises(AuthError, match="plain file name"):
        generate_keys(tmp_path, "../escape")


@pytest.mark.parametrize(
    "endpoint, local",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.2:*", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///tmp/reconloop.sock", True),
        ("inproc://reconloop", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://192.168.1.10:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://gpu-box.example:5555", False),
    ],
)
def test_endpoint_locality(endpoint, local):
    assert endpoint_is_local(endpoint) is local


def test_network_bind_without_keys_is_refused(tmp_path, record_property):
    with pytest.raises(AuthError, match="refusing to bind tcp://0.0.0.0:.* without authentication"):
        start_service(tmp_path / "jobs", bind="tcp://0.0.0.0:*")
    rc = cli_main(["serve", "--bind", "tcp://*:0", "--data-dir", str(tmp_path / "jobs2"), "--device", "cpu"])
    assert rc == 2
    row(
        record_property,
        "access",
        "serve --bind tcp://0.0.0.0 / tcp://* without --curve-secret",
        "refused at start (exit 2, message names the options)",
    )


def test_network_bind_with_keys_is_served(tmp_path, keys):
    pairs, allowed = keys
    svc, thread = start_service(
        tmp_path / "jobs", bind="tcp://0.0.0.0:*", auth=AuthConfig(pairs["server"].secret_file, allowed)
    )
    try:
        port = svc.endpoint.rsplit(":", 1)[1]
        with Client(
            f"tcp://127.0.0.1:{port}",
            server_key=pairs["server"].public_file,
            client_key=pairs["alice"].secret_file,
            timeout_ms=TIMEOUT_MS,
        ) as c:
            assert c.jobs() == []
    finally:
        stop_service(svc, thread)


def test_clients_see_and_control_only_their_own_jobs(curve_service, keys, record_property):
    with (
        curve_client(curve_service, keys, "alice", timeout_ms=TIMEOUT_MS) as alice,
        curve_client(curve_service, keys, "bob", timeout_ms=TIMEOUT_MS) as bob,
    ):
        job = alice.submit(probe_scene("steps=2"))
        assert is_job_id(job)
        done = wait_state(alice, job)
        assert done["state"] == "done"
        assert job in {j["job"] for j in alice.jobs()}
        assert job not in {j["job"] for j in bob.jobs()}
        for op, fields in (
            ("status", {}),
            ("cancel", {}),
            ("delete", {}),
            ("fetch", {"name": "summary.json"}),
            ("status", {"watch": True, "since": 0}),
        ):
            with pytest.raises(ProtocolError) as err:
                bob.request(op, job=job, **fields)
            assert err.value.code == errors.NOT_FOUND
        data = alice.fetch_bytes(job, "summary.json")
        sha = {a["name"]: a["sha256"] for a in done["artifacts"]}["summary.json"]
        assert hashlib.sha256(data).hexdigest() == sha
        # the same idempotency key from two clients makes two jobs, each its owner's
        a2 = alice.request("submit", scene=probe_scene(), key="shared-key")["job"]
        b2 = bob.request("submit", scene=probe_scene(), key="shared-key")["job"]
        assert a2 != b2
        assert alice.request("submit", scene=probe_scene(), key="shared-key")["job"] == a2
        assert wait_state(bob, b2)["state"] == "done"
    row(
        record_property,
        "access",
        "client B asks status/cancel/delete/fetch/watch of client A's job id",
        "not_found for each; A's job unaffected; same submit key from A and B gives two jobs",
    )


def test_unknown_key_plain_client_and_wrong_server_key_get_nothing(curve_service, keys, tmp_path, record_property):
    pairs, allowed = keys
    with curve_client(curve_service, keys, "mallory", timeout_ms=REFUSED_TIMEOUT_MS, retries=0) as mallory:
        with pytest.raises(TimeoutError):
            mallory.hello()
    with Client(curve_service.endpoint, timeout_ms=REFUSED_TIMEOUT_MS, retries=0) as plain:
        with pytest.raises(TimeoutError):
            plain.hello()
    impostor = generate_keys(tmp_path, "impostor")
    with Client(
        curve_service.endpoint,
        server_key=impostor.public_file,
        client_key=pairs["alice"].secret_file,
        timeout_ms=REFUSED_TIMEOUT_MS,
        retries=0,
    ) as c:
        with pytest.raises(TimeoutError):
            c.hello()
    # the allow-list is re-read when its folder changes: mallory's key added at run time is let in
    shutil.copy(pairs["mallory"].public_file, allowed)
    try:
        with curve_client(curve_service, keys, "mallory", timeout_ms=TIMEOUT_MS) as mallory:
            assert mallory.jobs() == []  # answered, and sees nobody else's jobs
    finally:
        (allowed / pairs["mallory"].public_file.name).unlink()
    with curve_client(curve_service, keys, "mallory", timeout_ms=REFUSED_TIMEOUT_MS, retries=0) as mallory:
        with pytest.raises(TimeoutError):
            mallory.hello()  # removed again: refused again
    row(
        record_property,
        "access",
        "key not in the allow-list; no CurveZMQ; wrong server key; key added then removed at run time",
        "handshake refused, no reply (client times out); added key admitted without restart, removed key refused again",
    )


def test_raw_socket_with_curve_and_user_id_owner(curve_service, keys):
    """A raw pyzmq DEALER with CurveZMQ options (what the README tells other clients to do) is served."""
    from protocol.codec import decode, encode

    pairs, _ = keys
    server_public, _ = zmq.auth.load_certificate(str(pairs["server"].public_file))
    public, secret = zmq.auth.load_certificate(str(pairs["bob"].secret_file))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
    sock.connect(curve_service.endpoint)
    try:
        sock.send_multipart(encode({"v": 1, "op": "jobs", "id": 1}, "request"))
        assert sock.poll(TIMEOUT_MS)
        reply = decode(sock.recv_multipart(), "reply")
        assert reply["ok"] and all(j["job"] for j in reply["jobs"])
    finally:
        sock.close()


def test_job_ids_are_unguessable(tmp_path):
    svc, thread = start_service(tmp_path / "jobs")
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            ids = [c.submit(probe_scene("steps=1")) for _ in range(8)]
            assert len(set(ids)) == len(ids) and all(is_job_id(j) for j in ids)
            assert len({int(j, 16) >> 64 for j in ids}) == len(ids)  # no shared prefix: not a counter
            for guess in ("0" * 32, ids[0][:-1] + ("0" if ids[0][-1] != "0" else "1"), "../" + ids[0]):
                with pytest.raises(ProtocolError) as err:
                    c.status(guess)
                assert err.value.code == errors.NOT_FOUND
    finally:
        stop_service(svc, thread)


def test_loopback_without_keys_is_one_local_owner_and_owners_survive_restart(tmp_path, keys):
    pairs, allowed = keys
    svc, thread = start_service(tmp_path / "jobs")
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c1, Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c2:
            job = c1.submit(probe_scene("steps=1"))
            assert wait_state(c2, job)["state"] == "done"  # another local client sees and reads it
            assert c2.fetch_bytes(job, "summary.json")
    finally:
        stop_service(svc, thread)
    meta = (tmp_path / "jobs" / job / "meta.json").read_text()
    assert f'"owner": "{LOCAL_OWNER}"' in meta
    # the same store served with keys: alice's job stays alice's after a restart; the local job is no one's key
    auth = AuthConfig(pairs["server"].secret_file, allowed)
    svc, thread = start_service(tmp_path / "jobs", auth=auth)
    try:
        with curve_client(svc, keys, "alice", timeout_ms=TIMEOUT_MS) as alice:
            assert alice.jobs() == []
            mine = alice.submit(probe_scene("steps=1"))
            wait_state(alice, mine)
    finally:
        stop_service(svc, thread)
    svc, thread = start_service(tmp_path / "jobs", auth=auth)
    try:
        with (
            curve_client(svc, keys, "alice", timeout_ms=TIMEOUT_MS) as alice,
            curve_client(svc, keys, "bob", timeout_ms=TIMEOUT_MS) as bob,
        ):
            assert [j["job"] for j in alice.jobs()] == [mine]
            assert bob.jobs() == []
    finally:
        stop_service(svc, thread)


def test_cli_serve_and_submit_with_keys(tmp_path, keys, capsys):
    """`reconloop serve --curve-secret --allow-keys` in a thread-free subprocess and `submit --server-key --client-key`."""
    from backend.service.spawn import free_port, wait_answering
    from tests.backend._reliability import WAIT_S, spawn_serve

    pairs, allowed = keys
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = spawn_serve(
        tmp_path / "jobs",
        endpoint,
        "--curve-secret",
        str(pairs["server"].secret_file),
        "--allow-keys",
        str(allowed),
        "--max-captures",
        "4",
    )
    try:
        client_kw = {"server_key": pairs["server"].public_file, "client_key": pairs["alice"].secret_file}
        wait_answering(endpoint, WAIT_S, **client_kw)
        with Client(endpoint, timeout_ms=TIMEOUT_MS, **client_kw) as c:
            assert c.hello()["limits"]["max_captures"] == 4
        write_scene_message(probe_scene("steps=2"), tmp_path / "scene")
        rc = cli_main(
            [
                "submit",
                str(tmp_path / "scene"),
                "--server",
                endpoint,
                "--out",
                str(tmp_path / "out"),
                "--server-key",
                str(pairs["server"].public_file),
                "--client-key",
                str(pairs["alice"].secret_file),
            ]
        )
        assert rc == 0, capsys.readouterr().err
        assert (tmp_path / "out" / "summary.json").is_file()
    finally:
        proc.kill()
        proc.wait()
