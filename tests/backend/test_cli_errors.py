"""The reconloop command line's one-line errors for what a new user gets wrong (docs and walkthrough):
a port in use, an endpoint without tcp://, a job store in use, ``--ray auto`` without a cluster, ``--out``
on a file, ``demo`` without bpy, and the docs' examples and section references."""

from __future__ import annotations

import re
import shlex
import socket
import sys

import pytest

import backend.cli as cli
from backend.cli import EPILOG, build_parser, main
from tests.backend.test_cli import write_scene
from tests.conftest import REPO, require_module, require_shared_data
from tests.protocol.helpers import running_service

# `serve` with the tests' small runner: no generator weights, no loop
SERVE = ["serve", "--device", "cpu", "--runner", "tests.protocol.helpers:runner"]


def test_serve_on_a_port_in_use_names_bind_and_the_reason(silent_endpoint, tmp_path, capsys):
    """A second bind of a port (another program listens there): one line naming --bind, not ZMQError."""
    assert main([*SERVE, "--bind", silent_endpoint, "--data-dir", str(tmp_path / "jobs")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"reconloop serve: --bind {silent_endpoint}: address already in use "
        "(another service on this port? stop it, or pick another port)"
    ), err


@pytest.mark.parametrize("command, option", [("submit", "--server"), ("serve", "--bind")])
def test_an_endpoint_without_a_transport_is_named_by_its_option(command, option, capsys):
    """``127.0.0.1:5555`` (no tcp://) is refused as the option's argument, by the service's bind check."""
    given = ["scene", "--out", "o"] if command == "submit" else []
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, *given, option, "127.0.0.1:5555"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be a ZeroMQ endpoint like tcp://127.0.0.1:5555" in err, err
    assert "got '127.0.0.1:5555'" in err


def test_a_port_past_65535_is_named_by_its_option(capsys):
    """``tcp://127.0.0.1:99999``: ZeroMQ connected to it and the client waited out its retries without a word."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["submit", "scene", "--out", "o", "--server", "tcp://127.0.0.1:99999"])
    assert exit_.value.code == 2
    assert "argument --server: the port must be at most 65535; got 99999" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--bind", "tcp://127.0.0.1:0"]).bind == "tcp://127.0.0.1:0"  # any


def test_submit_to_a_malformed_endpoint_names_server_and_the_reason(tmp_path, capsys):
    """A transport but no port: ZeroMQ's connect refuses it; one line naming --server, not ZMQError."""
    scene = write_scene(tmp_path / "scene")
    assert main(["submit", str(scene), "--server", "tcp://127.0.0.1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "reconloop submit: --server tcp://127.0.0.1: invalid argument (write tcp://HOST:PORT or ipc://PATH)"
    ), err


def test_a_second_service_on_the_same_store_says_what_to_do(tmp_path, capsys):
    """`reconloop serve` twice with the same (default) store: one line saying to stop the other or pass
    --data-dir, not a RuntimeError traceback."""
    with running_service(tmp_path / "jobs") as svc:
        assert main([*SERVE, "--bind", "tcp://127.0.0.1:*", "--data-dir", str(svc.data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"reconloop serve: the job store {svc.data_dir} is in use by another reconloop service: "
        "stop that service, or pass --data-dir DIR to give this one its own store"
    ), err


def test_ray_auto_without_a_cluster_names_the_options_to_use(monkeypatch, tmp_path, capsys):
    """``--ray auto`` where no `ray start` ran: reconloop's options in the advice, not Ray's `--address`
    flag (Ray's ConnectionError, as ``ray.init(address="auto")`` raises it; no cluster is started)."""
    ray = require_module("ray")

    def no_cluster(**kwargs):
        assert kwargs["address"] == "auto"
        raise ConnectionError(
            "Could not find any running Ray instance. Please specify the one to connect to by setting the "
            "`--address` flag or `RAY_ADDRESS` environment variable."
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    argv = [*SERVE, "--ray", "auto", "--bind", "tcp://127.0.0.1:*", "--data-dir", str(tmp_path / "jobs")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "reconloop serve: --ray auto: no Ray cluster on this node: start one with `ray start --head`, "
        "or use --ray local / --ray HOST:PORT"
    ), err


def test_ray_at_an_address_without_a_head_is_one_line_at_once(monkeypatch, tmp_path, capsys):
    """``--ray HOST:PORT`` where nothing listens: ``ray.init`` would retry for minutes with only Ray's warnings;
    the service refuses before calling it, naming the option."""
    ray = require_module("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail(f"ray.init called with {kwargs}"))
    with socket.socket() as held:  # bound, never listening: connecting is refused, and no other test takes it
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        argv = [*SERVE, "--ray", address, "--bind", "tcp://127.0.0.1:*", "--data-dir", str(tmp_path / "jobs")]
        assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        rf"reconloop serve: --ray {address}: no Ray cluster there \(ConnectionRefusedError: .*\): start its head "
        r"with `ray start --head`, or use --ray local",
        err,
    ), err


def test_submit_refuses_an_out_file_before_submitting(tmp_path, silent_endpoint, capsys):
    """``--out`` on a file is refused before the job is sent (the service never answers here: without the
    check the command would wait for it, then lose the results)."""
    scene = write_scene(tmp_path / "scene")
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    argv = ["submit", str(scene), "--server", silent_endpoint, "--out", str(afile), "--timeout-ms", "100"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"reconloop submit: --out {afile}: exists and is not a folder"


def test_a_service_that_does_not_answer_is_said_at_each_retry(silent_endpoint, capsys):
    """A wrong port or a dead service: each try that gets no reply is one line on stderr as the request is sent
    again (it was 3 tries of 30 s in silence), then the timeout's line; a library's Client stays silent."""
    from protocol.client import Client

    assert main(["jobs", "--server", silent_endpoint, "--timeout-ms", "200"]) == 1
    lines = capsys.readouterr().err.splitlines()
    for line, attempt in zip(lines[:2], (2, 3), strict=True):  # after about 0.2 s, then 0.4 s
        said = rf"no reply from {re.escape(silent_endpoint)} after \d\.\d s; retrying \({attempt} of 3\) \.\.\."
        assert re.fullmatch(said, line), lines
    assert lines[2].startswith("reconloop jobs: jobs: no reply from") and len(lines) == 3, lines
    retried = []
    with Client(silent_endpoint, timeout_ms=50, retries=1) as client, pytest.raises(TimeoutError):
        client.jobs()
    with Client(silent_endpoint, timeout_ms=50, retries=1, on_retry=lambda *a: retried.append(a)) as client:
        with pytest.raises(TimeoutError):
            client.jobs()
    assert capsys.readouterr().err == "" and [a[:3] for a in retried] == [("jobs", 2, 2)]


def test_an_on_retry_that_raises_ends_the_request_for_good(silent_endpoint):
    """What on_retry raises ends the request: a later wait raises it again, not a second call of on_retry on
    a request whose socket is gone."""
    from protocol.client import Client

    calls = []

    def stop(*args):
        calls.append(args)
        raise KeyboardInterrupt

    with Client(silent_endpoint, timeout_ms=50, retries=2, on_retry=stop) as client:
        request = client.begin_hello()
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                request.wait()
    assert len(calls) == 1


def test_demo_without_bpy_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    """The built-in scene needs bpy: without it, a hint before any child process (its ImportError traceback)."""

    def no_child(*args, **kwargs):
        raise AssertionError("the demo scene script ran without bpy")

    monkeypatch.setitem(sys.modules, "bpy", None)  # find_spec("bpy") is None, as when the wheel is missing
    monkeypatch.setattr(cli.subprocess, "run", no_child)
    assert main(["demo", "--out", str(tmp_path / "d"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "bpy module, which is not installed: pip install -e '.[dev]'" in err and "or pass --scene DIR" in err


def test_demo_keeps_every_capture_of_a_colmap_model_too_small_to_split(tmp_path, capsys):
    """A COLMAP model of 4 photos does not fit the 3-view ring-arc split: the demo runs on all of them
    (the help says so) instead of failing on the split."""
    import dataclasses
    import shutil

    from backend.formats import export_scene, import_scene
    from backend.scene import load_scene

    temple = import_scene("middlebury", require_shared_data("middlebury_temple"), tmp_path / "temple")
    small = dataclasses.replace(temple, captures=temple.captures[:4], heldout=[])
    (tmp_path / "model" / "images").mkdir(parents=True)
    for capture in small.captures:
        shutil.copy(capture.image, tmp_path / "model" / "images" / capture.image.name)
    export_scene("colmap", small, tmp_path / "model" / "sparse")
    cli.import_demo_scene(tmp_path / "model", tmp_path / "scene")
    assert "do not fit a ring of 4: the demo keeps every capture" in capsys.readouterr().out
    assert len(load_scene(tmp_path / "scene").captures) == 4


def test_help_examples_name_data_that_exists():
    """Every dataset path in ``reconloop --help``'s examples exists (run from the repository root)."""
    paths = re.findall(r"\.\./\S+", EPILOG)
    assert paths
    require_shared_data()
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing


SECTION_REFERENCE = re.compile(r"`?((?:docs/)?[\w.-]+\.md)`?, \"([^\"]+)\"")


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
def test_section_references_name_existing_headings(doc):
    """A reference like (`docs/x.md`, "Title") points at a heading of that file holding Title."""
    refs = SECTION_REFERENCE.findall((REPO / doc).read_text())
    assert refs
    missing = []
    for target, title in refs:
        headings = [line for line in (REPO / target).read_text().splitlines() if line.startswith("#")]
        title = " ".join(title.split())  # a title wrapped over two lines
        if not any(title in h for h in headings):
            missing.append(f"{target}, {title!r}")
    assert not missing, f"{doc}: {missing}"


def test_readme_keys_commands_parse():
    """The README's Keys section: its reconloop commands are ones the parser takes."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Keys", 1)[1].split("\n#", 1)[0]
    lines = re.findall(r"^reconloop (?:.*\\\n)*.*", section, re.MULTILINE)  # with continuation lines
    commands = [shlex.split(line.replace("\\\n", " "), comments=True) for line in lines]
    assert {c[1] for c in commands} == {"keys", "serve", "submit"}, commands
    for command in commands:
        build_parser().parse_args(command[1:])


def test_readme_install_says_how_to_get_the_cpu_torch():
    """pypi.org's Linux torch wheel is the CUDA build: the install section says how CPU-only users avoid it."""
    install = (REPO / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "`pip install torch==2.13.0` pulls the CUDA build" in install
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
