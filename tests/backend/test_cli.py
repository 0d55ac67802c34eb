"""The reconloop command line: help texts, and `submit` against a live service."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backend.cli import build_parser, main
from protocol.client import Client
from tests.protocol.helpers import jpeg_bytes, png_bytes, running_service, scene_msg

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("serve", "run", "submit", "jobs", "fetch", "import", "demo")


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from backend.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "reconloop" in out and all(c in out for c in COMMANDS)
    assert out.strip().endswith("False")


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"reconloop {command}" in text and len(text) > 200


def write_scene(folder: Path, prompt: str = "") -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png_bytes())
    (folder / "images" / "b.jpg").write_bytes(jpeg_bytes())
    K = [[50.0, 0, 32], [0, 50, 24], [0, 0, 1]]
    cam = {"w2c": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "K": K, "width": 64, "height": 48}
    scene = {
        "version": 1,
        # b without a camera (the service's SfM would place it), and so no trajectory: it would not be in SfM's frame
        "captures": [{"name": "a", "image": "images/a.png", "camera": cam}, {"name": "b", "image": "images/b.jpg"}],
        "settings": {"prompt": prompt},
    }
    (folder / "scene.json").write_text(json.dumps(scene))
    return folder


@pytest.fixture
def service(tmp_path):
    with running_service(tmp_path / "jobs") as svc:
        yield svc


def test_eval_size_is_parsed_or_named_in_the_error(capsys):
    """``--size WxH`` (``evaluate_args.size_wxh``, shared by the eval CLI and the bench scripts)."""
    args = build_parser().parse_args(["eval", "scene", "--out", "o", "--size", "640X480"])
    assert args.size == (640, 480)
    for bad in ("640", "0x480", "axb", "10x10", "10000x10000"):  # the last two: the fit's SSIM, out of memory
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", "scene", "--out", "o", "--size", bad])
        assert "--size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "scene", "--out", "o", "--size", "4097x300"])
    assert "width must be in [16, 4096] and height in [16, 4096]; got '4097x300'" in capsys.readouterr().err


def test_submit_fetches_every_artifact(service, tmp_path, capsys):
    scene = write_scene(tmp_path / "scene", prompt="steps:4")
    out = tmp_path / "out"
    assert main(["submit", str(scene), "--server", service.endpoint, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "done" in text and "sha256 verified" in text
    job = text.split()[1]
    produced = service.data_dir / job / "artifacts"
    names = sorted(p.name for p in produced.iterdir())
    assert names == ["step0.bin", "step1.bin", "step2.bin", "step3.bin", "times.json"]
    for name in names:
        assert (out / name).read_bytes() == (produced / name).read_bytes()
    # `reconloop fetch`: the same results again, for a job whose submit was stopped or ran elsewhere
    again = tmp_path / "again"
    assert main(["fetch", job, "--server", service.endpoint, "--out", str(again)]) == 0
    assert f"job {job}: done" in capsys.readouterr().out
    assert sorted(p.name for p in again.iterdir()) == names
    with Client(service.endpoint) as c:
        running = c.submit(scene_msg("steps:200", delay_ms=50))
        assert main(["fetch", running, "--server", service.endpoint, "--out", str(again)]) == 2
        c.cancel(running)
    assert f"job {running} is " in capsys.readouterr().err


def test_fetch_writes_the_safe_outputs_of_a_service_that_names_one_unsafely(tmp_path, capsys):
    """A wrong or hostile service's name that would write outside the folder is refused, named, and the
    exit status says so; the job's other outputs still come."""
    from backend.cli import fetch_results

    class Service:  # what fetch_results asks of a Client
        def status(self, job):
            names = ("points.ply", "../escape.txt", "frames/0001.png")
            return {"state": "done", "message": "ok", "artifacts": [{"name": n} for n in names]}

        def fetch_to(self, job, name, path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)

    out = tmp_path / "job" / "out"
    assert fetch_results(Service(), "j1", out) == 1
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["frames/0001.png", "points.ply"]
    assert not (tmp_path / "job" / "escape.txt").exists()
    captured = capsys.readouterr()
    assert "job j1: done (ok); 2 artifacts in" in captured.out
    assert (
        "error: output files of job j1 were not written: artifact name must not hold empty, '.' or '..' parts; "
        "got '../escape.txt'" in captured.err
    )


def test_submit_of_failing_job_exits_1(service, tmp_path, capsys):
    scene = write_scene(tmp_path / "scene", prompt="fail")
    assert main(["submit", str(scene), "--server", service.endpoint, "--out", str(tmp_path / "out")]) == 1
    assert "failed" in capsys.readouterr().out
    assert (tmp_path / "out" / "step0.bin").is_file()  # what was finished still comes back


def test_submit_of_a_job_the_service_stopped_on_ends_at_once_with_the_fetch_command(tmp_path, capsys):
    """The service stops mid-job (the job's last event: interrupted): `submit` says so at once, with the job's id
    and the `fetch` command that downloads what it finished once the service is back, exit 1. It used to ask the
    stopped service for the job's status and wait 3 tries of --timeout-ms (90 s by default) for nothing."""
    scene = write_scene(tmp_path / "scene", prompt="steps:400")
    meta = json.loads((scene / "scene.json").read_text())
    meta["settings"]["seed"] = 50  # ms a step: 20 s unless the service stops
    (scene / "scene.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    stopped: list[float] = []
    with running_service(tmp_path / "jobs") as svc:

        def stop_once_running() -> None:
            with Client(svc.endpoint) as c:
                while not any(j["state"] == "running" for j in c.jobs()):
                    time.sleep(0.02)
            time.sleep(0.2)  # a few steps, a few events
            stopped.append(time.monotonic())
            svc.stop()

        stopper = threading.Thread(target=stop_once_running, daemon=True)
        stopper.start()
        argv = ["submit", str(scene), "--server", svc.endpoint, "--out", str(out), "--timeout-ms", "3000"]
        assert main(argv) == 1
        ended = time.monotonic()
        stopper.join(5)
    assert ended - stopped[0] < 2.5  # not a try of --timeout-ms on a service that is gone
    captured = capsys.readouterr()
    job = captured.out.split()[1]
    assert (
        f"job {job}: interrupted (the service stopped during this job; submit it again to rerun); once the service "
        f"is back, `reconloop fetch {job} --out {out} --server {svc.endpoint}` downloads what it finished"
    ) in captured.err, captured.err
    assert "no reply" not in captured.err


@pytest.mark.xdist_group("service-subprocess")
def test_submit_to_a_service_killed_mid_job_says_each_retry_and_how_to_fetch_later(tmp_path, capsys):
    """The service dies without a word (kill -9, its machine down): `submit` says each retry of the request that
    gets no reply, then that the service stopped answering, with the `fetch` command for later, exit 1."""
    from backend.service.spawn import wait_answering
    from tests.backend._reliability import WAIT_S, serve_processes

    scene = write_scene(tmp_path / "scene", prompt="probe steps=400 delay_ms=50")
    out = tmp_path / "out"
    with serve_processes(tmp_path / "jobs") as (endpoint, spawn):
        proc = spawn()
        wait_answering(endpoint, WAIT_S, proc=proc)

        def kill_once_running() -> None:
            with Client(endpoint) as c:
                while not any(j["state"] == "running" for j in c.jobs()):
                    time.sleep(0.02)
            proc.kill()

        killer = threading.Thread(target=kill_once_running, daemon=True)
        killer.start()
        argv = ["submit", str(scene), "--server", endpoint, "--out", str(out), "--timeout-ms", "300"]
        assert main(argv) == 1
        killer.join(5)
    captured = capsys.readouterr()
    job = captured.out.split()[1]
    err = captured.err
    assert f"no reply from {endpoint} after " in err and "s; retrying (3 of 3) ..." in err, err
    assert (
        f"job {job}: the service stopped answering; once the service is back, "
        f"`reconloop fetch {job} --out {out} --server {endpoint}` downloads what it finished"
    ) in err, err
    assert f"is `reconloop serve` running at {endpoint}?" in err


def test_jobs_lists_cancels_and_deletes(service, tmp_path, capsys):
    scene = write_scene(tmp_path / "scene", prompt="steps:1")
    assert main(["submit", str(scene), "--server", service.endpoint, "--out", str(tmp_path / "out")]) == 0
    job = capsys.readouterr().out.split()[1]
    assert main(["jobs", "--server", service.endpoint]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{job}  ") and "  done  " in line
    with Client(service.endpoint) as c:
        running = c.submit(scene_msg("steps:200", delay_ms=50))  # 10 s unless cancelled
        while c.status(running)["state"] != "running":
            time.sleep(0.02)
    assert main(["jobs", "--server", service.endpoint, "--delete", running]) == 2
    assert f"delete: job {running} is running; only an ended job is deleted" in capsys.readouterr().err
    assert main(["jobs", "--server", service.endpoint, "--cancel", running, "--cancel", job]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"job {running}: cancel sent (it stops at its next step)", f"job {job}: already done"]
    assert main(["jobs", "--server", service.endpoint, "--delete", job]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"job {job}: deleted"
    assert not (service.data_dir / job).exists()
    assert main(["jobs", "--server", service.endpoint, "--delete", job]) == 2
    assert f"reconloop jobs: not_found: delete: no job '{job}'" in capsys.readouterr().err


def test_bad_scene_exits_2_with_the_field(tmp_path, capsys):
    scene = write_scene(tmp_path / "scene")
    data = json.loads((scene / "scene.json").read_text())
    data["captures"][0]["camera"]["K"][0][0] = -5
    (scene / "scene.json").write_text(json.dumps(data))
    assert main(["submit", str(scene), "--server", "tcp://127.0.0.1:9", "--out", str(tmp_path / "o")]) == 2
    assert "captures[0].camera.K: focal lengths must be positive" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("command", ["run", "serve"])
def test_budget_is_a_whole_number_of_minutes_in_the_settings_range(command, capsys):
    """``--budget`` takes what ``time_budget_min`` takes (whole minutes in its range from protocol.settings),
    named in the error, not a job setting past its range (5000), and no fraction rounded away (0.4 was 0: no
    budget at all)."""
    from protocol.settings import BY_NAME

    lo, hi = BY_NAME["time_budget_min"].range
    given = ["scene", "--out", "o"] if command == "run" else []
    assert build_parser().parse_args([command, *given, "--budget", "2"]).budget == 2
    assert build_parser().parse_args([command, *given, "--budget", str(hi)]).budget == hi
    for bad in ("inf", "nan", "-inf", str(hi + 1), "5000", "-1", "soon", "0.4", "2.5"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, *given, f"--budget={bad}"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--budget: must be a whole number of minutes in [{lo}, {hi}]; got '{bad}'" in err, err


def write_posed_scene(folder: Path, image: bytes) -> Path:
    """A scene of one capture with its camera (no SfM) and one trajectory frame."""
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(image)
    cam = {"w2c": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "width": 64, "height": 48}
    cam["K"] = [[50.0, 0, 32], [0, 50, 24], [0, 0, 1]]
    scene = {
        "version": 1,
        "captures": [{"name": "a", "image": "images/a.png", "camera": cam}],
        "trajectory": [{"frame": 1, "camera": cam}],
    }
    (folder / "scene.json").write_text(json.dumps(scene))
    return folder


def test_run_to_the_end_twice_into_one_folder(tmp_path, capsys):
    """`reconloop run` of a tiny posed scene ends with 0 and its files; a second run says it replaces them."""
    scene = write_posed_scene(tmp_path / "scene", png_bytes())
    meta = json.loads((scene / "scene.json").read_text())
    meta["settings"] = {"width": 32, "height": 24, "gaussian_iterations": 2, "guide": False}
    (scene / "scene.json").write_text(json.dumps(meta))
    argv = ["run", str(scene), "--out", str(tmp_path / "o"), "--device", "cpu", "--budget", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"files in {tmp_path / 'o'}: " in out and "gaussians.ply" in out and "earlier run" not in out
    assert main(argv) == 0
    assert f"{tmp_path / 'o'} holds an earlier run's results: this run replaces them" in capsys.readouterr().out
    assert main([*argv[:-1], "1"]) == 0  # a budget: the probe's seconds are announced, not silent
    assert "planning a 1-minute job on cpu ..." in capsys.readouterr().err


def test_run_lets_go_of_its_generator_however_it_ends(tmp_path, monkeypatch, capsys):
    """`reconloop run` holds the generator in a GeneratorCache block: what it loaded is let go of (a
    multi-GPU group's processes stopped) when the run stops on an error and when it ends."""
    from backend.generators import GeneratorCache

    cleared: list[GeneratorCache] = []
    clear = GeneratorCache.clear
    monkeypatch.setattr(GeneratorCache, "clear", lambda self: cleared.append(self) or clear(self))
    scene = write_posed_scene(tmp_path / "scene", png_bytes())
    meta = json.loads((scene / "scene.json").read_text())
    meta["settings"] = {"width": 32, "height": 24, "gaussian_iterations": 2, "guide": False}
    (scene / "scene.json").write_text(json.dumps(meta))
    argv = ["run", str(scene), "--out", str(tmp_path / "o"), "--device", "cpu", "--budget", "0"]
    with pytest.raises(SystemExit, match="--refiner-out: generator 'reproject' trains no weights to save"):
        main([*argv, "--refiner-out", str(tmp_path / "weights")])
    assert len(cleared) == 1
    assert main(argv) == 0, capsys.readouterr().err
    assert len(cleared) == 2 and cleared[0] is not cleared[1]


def test_run_names_a_bad_out_or_a_broken_photo(tmp_path, capsys):
    """``--out`` on a file and a truncated capture PNG: exit 2 with the option or the capture and its file
    named, not a FileExistsError or Pillow's "image file is truncated" traceback."""
    image = png_bytes()
    scene = write_posed_scene(tmp_path / "scene", image[: len(image) // 2])
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert main(["run", str(scene), "--out", str(afile), "--device", "cpu", "--budget", "0"]) == 2
    assert f"reconloop run: --out {afile}: exists and is not a folder" in capsys.readouterr().err
    assert main(["run", str(scene), "--out", str(tmp_path / "o"), "--device", "cpu", "--budget", "0"]) == 2
    err = capsys.readouterr().err
    assert f"reconloop run: capture 'a': cannot read the image {scene / 'images' / 'a.png'}: " in err, err
    assert "truncated" in err and "Traceback" not in err


def test_an_os_error_is_named_without_a_traceback(monkeypatch, capsys):
    """A file the command cannot write (a full disk, no permission): its name and the reason, exit 1."""
    import backend.cli as cli

    def no_space(args):
        raise OSError(28, "No space left on device", "/full/disk/points.ply")

    monkeypatch.setattr(cli, "cmd_run", no_space)
    assert main(["run", "scene", "--out", "o"]) == 1
    assert "reconloop run: /full/disk/points.ply: No space left on device" in capsys.readouterr().err


def test_submit_to_no_server_times_out(tmp_path, capsys):
    scene = write_scene(tmp_path / "scene")
    assert (
        main(
            ["submit", str(scene), "--server", "tcp://127.0.0.1:9", "--out", str(tmp_path / "o"), "--timeout-ms", "100"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "no reply" in err and "is `reconloop serve` running at tcp://127.0.0.1:9?" in err


def test_the_bar_writes_each_stages_last_message_whole_and_run_prints_the_notes(tmp_path, capsys):
    """The bar cuts its message at 60 characters: what the time budget chose, or that SfM left photos out, is
    written whole when its stage ends; the job's notes (metrics.json) come after the results."""
    from backend.cli import ProgressBar, print_notes

    budget = "time budget 4 min: 320x240, 400 steps, 15,000 Gaussians (measured: 3.1 ms a step at 160x120)"
    bar = ProgressBar("loop")
    bar.update("cameras", 0.0, budget)
    bar.update("cameras", 0.01, "3 captures at 320x240; 3 cameras estimated; 24 trajectory frames")
    bar.update("memory", 0.1, "memory: 12,000 points")
    bar.close()
    err = capsys.readouterr().err
    assert "cameras: 3 captures at 320x240; 3 cameras estimated; 24 trajectory frames\n" in err
    assert "memory: memory: 12,000 points\n" in err and budget not in err  # each stage's last message
    print_notes(["SfM could not place 4 of 7 photos; left out: a, b, c, d"])
    print_notes([])
    assert capsys.readouterr().out == "note: SfM could not place 4 of 7 photos; left out: a, b, c, d\n"


def test_log_lines_go_above_the_bar_not_into_its_line(capsys):
    """A log line while the bar is shown is a line of its own (`logging.basicConfig`'s console handler goes
    through tqdm.write), not glued to the bar's text ("... 24575 pointsINFO backend.stages.fit: ..."); once the
    bar is closed, the console handler is back."""
    import logging
    import re

    from backend.cli import ProgressBar

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)  # what main()'s logging.basicConfig sets
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    fit = logging.getLogger("backend.stages.fit")
    try:
        bar = ProgressBar("loop")
        bar.update("memory", 0.13, "initial memory: 24575 points")
        fit.warning("fit: 24575 Gaussians")
        bar.close()
        assert console in root.handlers
        fit.warning("after the bar")
    finally:
        root.removeHandler(console)
    err = capsys.readouterr().err
    lines = re.split(r"[\r\n]", err)
    assert "WARNING backend.stages.fit: fit: 24575 Gaussians" in lines, err
    assert err.endswith("\nWARNING backend.stages.fit: after the bar\n"), err


def test_a_closed_pipe_ends_the_command_quietly():
    """`reconloop jobs | head -1`: the reader goes, the command ends with a shell tool's status (141), not with
    "reconloop jobs: Broken pipe" and exit 1."""
    child = subprocess.Popen(
        [sys.executable, "-c", FLOODING_COMMAND], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout.readline() == b"line 0\n"
    child.stdout.close()
    assert child.wait(60) == 141
    assert child.stderr.read() == b""


FLOODING_COMMAND = """
import sys
from backend import cli

def flood(args):
    for i in range(1_000_000):
        print("line", i)
    return 0

cli.cmd_import = flood
sys.exit(cli.main(["import", "colmap", "a", "b"]))
"""


@pytest.mark.parametrize(
    "folder, fmt", [("middlebury_temple", "middlebury"), ("llff_fern", "llff"), ("lund_door", "colmap")]
)
def test_demo_scene_from_a_dataset_folder(folder, fmt, tmp_path):
    """`reconloop demo --scene DATASET`: the format is detected, 3 captures kept by the format's protocol
    (the door's COLMAP model by ring-arc, as the benchmarks split it; the help promises 3 captures)."""
    from backend.cli import DEMO_SETTINGS, import_demo_scene
    from backend.formats import detect_format
    from backend.scene import load_scene
    from tests.conftest import require_shared_data

    src = require_shared_data(folder)
    assert detect_format(src) == fmt
    import_demo_scene(src, tmp_path / "scene")
    scene = load_scene(tmp_path / "scene")
    assert (
        scene.settings.width == DEMO_SETTINGS["width"]
        and scene.settings.gaussian_iterations == DEMO_SETTINGS["gaussian_iterations"]
    )
    assert len(scene.captures) == 3 and scene.heldout


def test_demo_scene_names_what_it_looked_for(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert main(["demo", "--scene", str(tmp_path / "photos"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds no scene.json" in err and "poses_bounds.npy" in err


def test_keep_days_is_a_positive_number_of_days(capsys):
    assert build_parser().parse_args(["serve", "--keep-days", "30"]).keep_days == 30.0
    assert build_parser().parse_args(["serve"]).keep_days is None
    for bad in ("0", "-1", "nan", "inf", "month"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", f"--keep-days={bad}"])
        assert f"argument --keep-days: must be a number of days above 0; got '{bad}'" in capsys.readouterr().err


def test_ray_address_and_timeout_are_checked_before_anything_starts(capsys):
    for ok in ("auto", "local", "10.0.0.5:6379", "ray://head:10001", "[::1]:6379"):
        assert build_parser().parse_args(["serve", "--ray", ok]).ray == ok
    assert build_parser().parse_args(["serve", "--ray"]).ray == "auto"
    for bad in ("foo", "head:", "head:port", "[::1]:70000"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", f"--ray={bad}"])
        assert f"argument --ray: must be auto, local or HOST:PORT of a Ray head; got '{bad}'" in capsys.readouterr().err
    for command in (["jobs"], ["submit", "scene", "--out", "o"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--timeout-ms", "-5"])
        assert "argument --timeout-ms: must be a whole number >= 1; got '-5'" in capsys.readouterr().err


def test_run_out_of_memory_is_a_sentence_naming_the_stage(tmp_path, monkeypatch, capsys):
    """torch's CPU allocator failing mid-job: one line naming the stage and what to try, exit 1, no traceback."""
    import backend.loop
    from backend.progress import mark_stage

    def out_of_memory(*args, **kwargs):
        err = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes.")
        mark_stage(err, "render")
        raise err

    monkeypatch.setattr(backend.loop, "run_loop", out_of_memory)
    scene = write_posed_scene(tmp_path / "scene", png_bytes())
    assert main(["run", str(scene), "--out", str(tmp_path / "o"), "--device", "cpu", "--budget", "0"]) == 1
    err = capsys.readouterr().err
    assert "reconloop run: out of memory in stage 'render': DefaultCPUAllocator: can't allocate memory" in err, err
    assert "try a smaller resolution or fewer frames" in err
    assert "Traceback" not in err
