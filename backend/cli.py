"""``reconloop``: run the service, run the loop in-process, submit to a service and list, fetch or cancel its
jobs, make keys, import scenes, evaluate at held-out views, demo.

Heavy packages (torch, the loop) are imported only by the commands that need them, so ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .devices import DEVICE_HELP, is_out_of_memory

if TYPE_CHECKING:
    import zmq

    from .scene import Scene

REPO = Path(__file__).resolve().parents[1]
DEMO_SCRIPT = REPO / "scripts" / "make_demo_scene.py"
DEFAULT_SERVER = "tcp://127.0.0.1:5555"
PERCENT = 100
MAX_PORT = 65535
EXIT_BAD_INPUT = 2
EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, a shell tool's status when its reader goes

log = logging.getLogger("reconloop")

DESCRIPTION = """\
ReconLoop: a few photos to a 3D scene. Builds a point-cloud memory from the captures, renders it along
a camera trajectory, lets a generator fill what the captures never saw, feeds the generated frames back
into the memory and fits 3D Gaussians. Outputs: point cloud .ply, generated frames, Gaussians .ply.

A scene is a folder with scene.json and images (see backend/scene.py); `reconloop import` makes one
from COLMAP, LLFF, Middlebury, NeRF/nerfstudio or DTU data.
"""

EPILOG = """\
examples:
  reconloop import colmap ../shared/data/lund_door scene/   make a scene folder from a COLMAP model
  reconloop run scene/ --out result/                        run the loop here, no service
  reconloop serve                                           serve on tcp://127.0.0.1:5555 (for Blender)
  reconloop serve --ray auto --data-dir /shared/jobs        jobs on the Ray cluster, one per GPU (docs/cluster.md)
  reconloop submit scene/ --server tcp://gpu:5555 --out result/
  reconloop demo --out demo_out                             render the built-in scene, then run the loop
  reconloop demo --scene ../shared/data/middlebury_temple   the loop on 3 captures of a dataset
"""


# ----------------------------------------------------------------------------------------------
# Progress


SERVICE_STAGES = ("queued", "starting", "done")  # the service's own stages: its waiting, not the loop's work


class ProgressBar:
    """A tqdm bar driven by ProgressEvents (fraction 0..1; the stage and message as its text). The bar shows the
    start of the latest message; each stage's last message is written whole above it when the next stage begins
    (what the time budget chose, cameras SfM could not place). While it is shown, log lines go above it (tqdm's
    ``logging_redirect_tqdm`` of the console handlers), not into its line."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._logs = contextlib.ExitStack()
        self._logs.enter_context(logging_redirect_tqdm())
        self.bar = tqdm(
            total=PERCENT, desc=desc, unit="%", bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} {postfix}"
        )
        self.stage, self.message = desc, ""

    def update(self, stage: str, fraction: float, message: str = "") -> None:
        if stage != self.stage:
            self._write_stage()
        self.stage, self.message = stage, message
        self.bar.n = round(fraction * PERCENT, 1)
        self.bar.set_description_str(stage, refresh=False)
        self.bar.set_postfix_str(message[:60], refresh=False)
        self.bar.refresh()

    def _write_stage(self) -> None:
        if self.message and self.stage not in SERVICE_STAGES:
            self.bar.write(f"{self.stage}: {self.message}", file=sys.stderr)  # beside the bar, not in stdout
        self.message = ""

    def __call__(self, event: Any) -> None:  # a ProgressFn
        self.update(event.stage, event.fraction, event.message)

    def close(self, *, write_last: bool = True) -> None:
        """Close the bar; ``write_last=False``: without the last stage's line (``submit`` says how a job ended
        on a line of its own)."""
        if write_last:
            self._write_stage()
        self.bar.close()
        self._logs.close()  # log lines go to the console again (closing twice is harmless)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(write_last=exc[0] is None)


def print_notes(notes: Sequence[str]) -> None:
    """The job's notes (``metrics.json``'s: what the loop fell back to and why) under its results."""
    for note in notes:
        print(f"note: {note}")


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from .devices import pick_device
    from .generators import GeneratorCache
    from .service import Service, ServiceConfig
    from .service.options import GeneratorLoopRunner, serve_generator_weights, serve_security
    from .service.server import StoreInUseError

    weights = serve_generator_weights(args)
    runner = _import_object(args.runner) if args.runner else GeneratorLoopRunner(GeneratorCache(weights))
    ray = _ray_config(args)
    # A Ray pool's workers resolve the device on their own nodes (each actor checks it as it starts): the front
    # end may run on a head or login node without a GPU, whose "auto" would send every job to the CPU.
    device = args.device if ray is not None else pick_device(args.device)
    runner = _budget_runner(runner, args.budget)
    config = ServiceConfig(
        bind=args.bind,
        data_dir=args.data_dir,
        device=device,
        ray=ray,
        keep_days=args.keep_days,
        **serve_security(args),
    )
    service = Service(config, runner=runner)
    terminated = []

    def on_sigterm(signum: int, frame: Any) -> None:  # systemd, docker stop, kill: stop as Ctrl-C does
        terminated.append(signum)
        # In the loop, a flag it reads within its poll (no lock: the handler runs in the loop's thread). Not Ctrl-C's
        # KeyboardInterrupt there: raised anywhere, in a zmq Frame's __dealloc__ it was ignored ("Exception ignored
        # in") and the service went on. During start-up (the store's recovery, up to 120 s of waiting for Ray's
        # workers) nothing reads the flag yet: KeyboardInterrupt, as Ctrl-C, ends it there.
        if not service.serving:
            raise KeyboardInterrupt
        service.stop()

    in_main = threading.current_thread() is threading.main_thread()  # signal handlers are set there only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    failure: BaseException | None = None  # what ended the service, other than a stop
    try:
        service.serve_forever()
        if terminated:
            log.info("stopped by SIGTERM")
    except KeyboardInterrupt:
        log.info("stopped by %s", "SIGTERM" if terminated else "Ctrl-C")
    except BaseException as err:
        failure = err
        if isinstance(err, StoreInUseError):
            raise ValueError(
                f"{err}: stop that service, or pass --data-dir DIR to give this one its own store"
            ) from None
        if isinstance(err, zmq.ZMQError) and service.endpoint is None:  # not bound: --bind's error
            raise endpoint_error("--bind", args.bind, err) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if service.worker_still_running():
            _exit_past_running_step(failure)
    return 0


def _exit_past_running_step(err: BaseException | None) -> NoReturn:
    """Leave the process while a worker thread is still inside a job step (past the stop's wait, in native
    code: torch, numba). Its job is marked interrupted; the interpreter's exit can abort on the (daemon)
    thread (exit 134). Exit 0 after a stop; after ``err``, an error that ended the service, log it (the
    CLI's own report of it is skipped) and exit 1."""
    if err is None:
        log.info("a job step was still running; exiting without waiting for it")
    else:
        log.error(
            "the service stopped on an error; a job step was still running, exiting without waiting for it",
            exc_info=err,
        )
    sys.stdout.flush()
    logging.shutdown()
    os._exit(0 if err is None else 1)


def zmq_endpoint(text: str) -> str:
    """argparse type of ``serve --bind`` and ``submit --server``: a ZeroMQ endpoint (``tcp://HOST:PORT``,
    ``ipc://PATH``), by the check the service makes of its bind (``auth.endpoint_is_local``), so that
    ``127.0.0.1:5555`` is named here and not as ZeroMQ's "Invalid argument" traceback."""
    from protocol.curve import AuthError, endpoint_is_local

    try:
        endpoint_is_local(text)
    except AuthError:
        raise argparse.ArgumentTypeError(
            f"must be a ZeroMQ endpoint like {DEFAULT_SERVER} (tcp://HOST:PORT or ipc://PATH); got {text!r}"
        ) from None
    port = text.rpartition(":")[2] if text.startswith("tcp://") else ""
    if port.isdigit() and int(port) > MAX_PORT:  # ZeroMQ would connect, and wait, without a word (0: bind's any)
        raise argparse.ArgumentTypeError(f"the port must be at most {MAX_PORT}; got {port} in {text!r}")
    return text


def endpoint_error(option: str, endpoint: str, err: zmq.ZMQError) -> ValueError:
    """ZeroMQ's error binding or connecting ``endpoint`` as one line naming ``option``, the reason and
    what to do (a port in use, an address not of this machine, a malformed endpoint)."""
    import zmq

    hints = {
        zmq.EADDRINUSE: "another service on this port? stop it, or pick another port",
        zmq.EADDRNOTAVAIL: "not an address of this machine",
        zmq.EINVAL: "write tcp://HOST:PORT or ipc://PATH",
        zmq.EPROTONOSUPPORT: "write tcp://HOST:PORT or ipc://PATH",
    }
    hint = hints.get(err.errno)
    return ValueError(f"{option} {endpoint}: {zmq.strerror(err.errno).lower()}" + (f" ({hint})" if hint else ""))


def _ray_config(args: argparse.Namespace) -> Any:
    """``--ray [ADDRESS]`` / ``--workers N`` as a RayConfig, or None (one worker thread, no Ray)."""
    if args.ray is None and args.workers is None:
        if args.ray_host is not None:
            raise ValueError("--ray-host needs --ray or --workers")
        return None
    try:
        import ray  # noqa: F401

        from .service.ray_pool import RayConfig
    except ImportError:
        raise ValueError("--ray and --workers need Ray: pip install 'reconloop[cluster]'") from None
    return RayConfig(address=args.ray, workers=args.workers, host=args.ray_host)


def ray_address(text: str) -> str:
    """argparse type of ``serve --ray``: ``auto``, ``local`` or a Ray head's ``[ray://]HOST:PORT``."""
    if text in ("auto", "local"):
        return text
    from .service.ray_pool import head_address

    try:
        head_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def positive_days(text: str) -> float:
    """argparse type of ``serve --keep-days``: a finite number of days above 0."""
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not 0 < days < math.inf:  # nan fails it too
        raise argparse.ArgumentTypeError(f"must be a number of days above 0; got {text!r}")
    return days


def budget_minutes(text: str) -> int:
    """argparse type of ``--budget``: whole minutes within the range of the job setting it becomes
    (``time_budget_min`` in protocol.settings, an int), so that a bad value is named here and not as a setting's
    error later (5000), and a fraction is not rounded away (0.4 became 0: no budget at all)."""
    from protocol.settings import BY_NAME

    lo, hi = BY_NAME["time_budget_min"].range
    try:
        minutes = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of minutes in [{lo}, {hi}]; got {text!r}") from None
    if not lo <= minutes <= hi:
        raise argparse.ArgumentTypeError(f"must be a whole number of minutes in [{lo}, {hi}]; got {text!r}")
    return minutes


def budget_for(option: int | None, device: str) -> int:
    """Minutes of the ``--budget`` option, or the device's default (backend.budget); 0: none."""
    from .devices import default_budget_min

    minutes = option if option is not None else default_budget_min(device)
    return max(0, int(minutes or 0))


def with_budget(scene: Scene, budget_min: int) -> Scene:
    """The scene with ``settings.time_budget_min`` set to ``budget_min`` unless it sets its own."""
    from dataclasses import replace

    if scene.settings.time_budget_min or not budget_min:
        return scene
    return replace(scene, settings=replace(scene.settings, time_budget_min=budget_min))


def _budget_runner(runner: Any, option: int | None) -> Any:
    """A job runner that gives every job without a budget of its own ``--budget``'s minutes, else the default
    of the device the job runs on (:func:`budget_for`; a Ray worker's, not the front end's)."""

    def run(scene: Scene, out_dir: Path, *, device: str, **kwargs: Any) -> Any:
        return runner(with_budget(scene, budget_for(option, device)), out_dir, device=device, **kwargs)

    return run


def _import_object(spec: str) -> Any:
    """``package.module:function`` -> the function."""
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"--runner must be module:function; got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that exists and is not a folder, before any work whose results it would lose."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")


def _run_loop(
    scene_dir: Path | Scene, out: Path, device: str, budget: int | None = None, refiner_out: Path | None = None
) -> int:
    """Run the loop in this process on a scene folder (or a loaded Scene) with a progress bar;
    ``budget``: minutes (None: the device's default, backend.budget); ``refiner_out``: also save the
    ``refine`` generator's trained weights there. A previous run's outputs in ``out`` are replaced
    (``run_loop``); other files there stay."""
    from .scene import Scene, load_scene

    check_out_folder(out)
    scene = scene_dir if isinstance(scene_dir, Scene) else load_scene(scene_dir)
    from .devices import pick_device
    from .generators import GeneratorCache, GeneratorConfig
    from .loop import LoopConfig, run_loop
    from .outputs import earlier_outputs

    device = pick_device(device)
    scene = with_budget(scene, budget_for(budget, device))
    # missing weights are said before any work, the budget's probe included (the plan does not change them)
    with GeneratorCache() as cache:  # what it loads is let go of when the run ends, however it ends
        generator = cache.get(GeneratorConfig.from_settings(scene.settings), device)
        if refiner_out is not None and not hasattr(generator, "save"):
            raise SystemExit(
                f"--refiner-out: generator {scene.settings.generator!r} trains no weights to save; "
                "set the scene's generator to 'refine'"
            )
        if scene.settings.time_budget_min and scene.settings.gaussian_iterations:  # seconds of silence otherwise
            print(
                f"planning a {scene.settings.time_budget_min}-minute job on {device} ...", file=sys.stderr, flush=True
            )
        config = LoopConfig.from_settings(scene.settings, device=device, num_captures=len(scene.captures))
        if earlier_outputs(out):
            print(f"{out} holds an earlier run's results: this run replaces them (other files there stay)")
        out.mkdir(parents=True, exist_ok=True)
        bar = ProgressBar("loop")
        try:
            result = run_loop(scene, out, device=device, progress=bar, config=config, generator=generator)
        except KeyboardInterrupt:
            bar.close()
            print(
                f"interrupted: {out} holds what was written before, an unfinished job; run again to redo it",
                file=sys.stderr,
            )
            raise
        finally:
            bar.close()
        print_notes(result.metrics.get("notes", []))
        if refiner_out is not None:
            generator.save(refiner_out)
            print(f"refiner weights written to {refiner_out}")
        files = sorted(set(result.artifacts))
        print(f"{len(files)} files in {out}: {', '.join(files[:12])}{' ...' if len(files) > 12 else ''}")
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _run_loop(args.scene, args.out, args.device, args.budget, args.refiner_out)


def service_client(args: argparse.Namespace) -> Any:
    """A ``protocol.client.Client`` of ``--server`` with ``--timeout-ms`` and the client's keys; a bad
    address is a ValueError naming ``--server``. A request without a reply says so on stderr each time it is
    resent (a dead service or a wrong port is otherwise minutes of silence)."""
    import zmq

    from protocol.client import Client

    from .service.options import client_keys

    def on_retry(op: str, attempt: int, attempts: int, waited_s: float) -> None:
        from tqdm import tqdm  # above a progress bar when one is shown

        waited = f"{waited_s:.0f}" if waited_s >= 10 else f"{waited_s:.1f}"
        tqdm.write(
            f"no reply from {args.server} after {waited} s; retrying ({attempt} of {attempts}) ...", file=sys.stderr
        )

    try:
        return Client(
            args.server, timeout_ms=args.timeout_ms, name="reconloop-cli", on_retry=on_retry, **client_keys(args)
        )
    except zmq.ZMQError as err:
        raise endpoint_error("--server", args.server, err) from None


def add_service_client_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``service_client`` reads: ``--server``, ``--timeout-ms`` and the client's keys."""
    from .evaluate_args import positive_int
    from .service.options import add_client_arguments

    p.add_argument("--server", type=zmq_endpoint, default=DEFAULT_SERVER, help="service endpoint (default %(default)s)")
    p.add_argument(
        "--timeout-ms",
        type=positive_int,
        default=30_000,
        help="per-request timeout before a retry (default %(default)s)",
    )
    add_client_arguments(p)


def cmd_jobs(args: argparse.Namespace) -> int:
    """List the service's jobs (this client's), oldest first, after ``--cancel`` and ``--delete``."""
    import time

    with service_client(args) as client:
        for job in args.cancel:
            state = client.cancel(job)["state"]
            said = {"queued": "cancel sent", "running": "cancel sent (it stops at its next step)", "cancelled": state}
            print(f"job {job}: {said.get(state, f'already {state}')}")
        for job in args.delete:
            client.delete(job)
            print(f"job {job}: deleted")
        jobs = client.jobs()
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created"]))
        print(f"{j['job']}  {when}  {j['state']:<11}  {j['message']}")
    if not jobs:
        print(f"no jobs on {args.server}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .scene import load_scene
    from .service.store import scene_message

    check_out_folder(args.out)  # before the job runs: its results would have nowhere to go
    scene = load_scene(args.scene, registered=False)  # the service checks the generator against its own registry
    with service_client(args) as client:  # a malformed --server is refused here, before saying anything else
        print(f"connecting to {args.server} ...", file=sys.stderr, flush=True)
        info = client.hello()
        log.info("server %s on %s, device %s", info["server"], args.server, info["device"])
        job = client.submit(scene_message(scene))
        print(f"job {job} submitted to {args.server}")
        client.watch(job, since=0)
        bar = ProgressBar("queued")
        last: dict[str, Any] = {}
        try:
            for event in client.events(job):
                last = event
                bar.update(event["stage"], event["fraction"], event["message"])
        except KeyboardInterrupt:
            bar.close(write_last=False)
            client.cancel(job)
            print(f"job {job}: cancel sent")
            return EXIT_INTERRUPTED
        except TimeoutError:  # the service is gone mid-job (killed, its machine down): say how to get the results
            bar.close(write_last=False)
            print(f"job {job}: the service stopped answering; {fetch_later(args, job)}", file=sys.stderr)
            raise
        finally:
            bar.close(write_last=False)
        if last.get("state") == "interrupted":  # the service stopped: asking it for the status would wait in vain
            print(f"job {job}: interrupted ({last['message']}); {fetch_later(args, job)}", file=sys.stderr)
            return EXIT_JOB_FAILED
        return fetch_results(client, job, args.out)


def fetch_later(args: argparse.Namespace, job: str) -> str:
    """How to download what ``job`` finished once the service is back: the ``fetch`` command, with
    ``submit``'s server, keys and output folder."""
    import shlex

    words = ["reconloop", "fetch", job, "--out", str(args.out), "--server", args.server]
    for option, value in (("--server-key", args.server_key), ("--client-key", args.client_key)):
        if value is not None:
            words += [option, str(value)]
    return f"once the service is back, `{shlex.join(words)}` downloads what it finished"


def fetch_results(client: Any, job: str, out: Path, status: dict[str, Any] | None = None) -> int:
    """Download every artifact of ``job`` into ``out`` (sha256 checked), print the job's notes and how it ended;
    the exit status: 0 for a done job, 1 for one that failed or was cancelled (what it finished still comes)."""
    from protocol.errors import listed
    from protocol.limits import check_artifact_name

    from .outputs import METRICS_FILE

    status = status or client.status(job)
    out.mkdir(parents=True, exist_ok=True)
    names, refused = [], []
    for entry in status["artifacts"]:
        try:  # joined to ``out`` below: a wrong or hostile service's name must not write outside it
            names.append(check_artifact_name(entry["name"]))
        except ValueError as err:  # the others still come
            refused.append(str(err))
    for name in names:
        client.fetch_to(job, name, out / name)
    if METRICS_FILE in names:  # not an earlier job's, left in the folder by a job that failed before writing one
        with contextlib.suppress(OSError, ValueError):
            print_notes(json.loads((out / METRICS_FILE).read_text()).get("notes", []))
    print(f"job {job}: {status['state']} ({status['message']}); {len(names)} artifacts in {out}, sha256 verified")
    if refused:
        print(f"error: output files of job {job} were not written: {listed(refused)}", file=sys.stderr)
    return 0 if status["state"] == "done" and not refused else EXIT_JOB_FAILED


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download a job's results: one submitted from elsewhere, or whose ``submit`` was stopped."""
    check_out_folder(args.out)
    with service_client(args) as client:
        from protocol.schemas import TERMINAL_STATES

        status = client.status(args.job)
        if status["state"] not in TERMINAL_STATES:
            raise ValueError(
                f"job {args.job} is {status['state']}: fetch it once it has ended (`reconloop jobs` shows it)"
            )
        return fetch_results(client, args.job, args.out, status)


def cmd_import(args: argparse.Namespace) -> int:
    from .formats import run_import

    try:
        return run_import(args)
    except KeyboardInterrupt:  # scene.json is written last: a folder without it is never read as a scene
        if (Path(args.dst) / "scene.json").is_file():
            left = "its scene.json is an earlier import's, and files written since may not match it"
        else:
            left = "it holds a partial import (no scene.json)"
        print(f"interrupted: {args.dst}: {left}; run again to redo it", file=sys.stderr)
        raise


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EVAL_FILE, run_eval

    out = Path(args.out)
    check_out_folder(out)
    try:
        return run_eval(args)
    except KeyboardInterrupt:
        print(
            f"interrupted: {out} holds an unfinished evaluation (no {EVAL_FILE}); run again to redo it", file=sys.stderr
        )
        raise


# `reconloop demo --scene DATASET`: the sparse-view split of ../shared/data/README.md per format (a COLMAP
# model's photos as the benchmarks split the door's, scripts/bench_loop_quality.py), and the sizes of
# `make demo` (scripts/demo.py), so that it runs in minutes on a 2-core CPU.
DEMO_PROTOCOLS = {"middlebury": "ring-arc", "llff": "llff", "colmap": "ring-arc"}
DEMO_TRAIN_VIEWS = 3
# The demo's CPU-sized job: a 3-minute budget that affords its 400 steps with the guide, 3 frames a step:
# 29.5 dB in 2-2.5 minutes (seeds 0-2; 28.8 dB without the guide; one frame a step 26.1 dB in 1 minute;
# docs/benchmarks.md, "3 frames a step on the CPU"). Before the CPU compositing ran in numba the guide did
# not fit in the budget (on the demo scene the guided loop needed 6 minutes for what the unguided one
# scored in 4).
DEMO_SETTINGS = {
    "width": 160,
    "height": 120,
    "gaussian_iterations": 400,
    "segment_length": 12,
    "retrieval_k": 4,
    "time_budget_min": 3,
    "guide": True,
}


def import_demo_scene(src: Path, dst: Path, fmt: str | None = None) -> Any:
    """Import a dataset folder (format detected unless given) into ``dst`` for the demo: 3 captures
    by the format's sparse-view protocol where it has one and the captures fit it (the rest held out),
    CPU-sized settings."""
    from .evaluate import split_protocol
    from .formats import detect_format, import_scene
    from .scene import Settings, save_scene

    fmt = fmt or detect_format(src)
    scene = import_scene(fmt, src, dst, settings=Settings(**DEMO_SETTINGS))
    if fmt in DEMO_PROTOCOLS:
        try:
            scene = split_protocol(scene, DEMO_PROTOCOLS[fmt], train_views=DEMO_TRAIN_VIEWS)
        except ValueError as err:  # too few photos for the split (a small COLMAP model): the loop on them all
            print(f"{err}: the demo keeps every capture")
        else:
            save_scene(scene, dst)
    print(f"imported {fmt} {src} into {dst}: {len(scene.captures)} captures ({len(scene.heldout)} held out)")
    return scene


def require_bpy() -> None:
    """Refuse to render the built-in demo scene without Blender's ``bpy`` module (the script's child
    process would end in an ImportError traceback), saying how to get it or what to pass instead."""
    import importlib.util

    if importlib.util.find_spec("bpy") is None:
        raise ValueError(
            "the built-in demo scene is rendered with Blender's bpy module, which is not installed: "
            "pip install -e '.[dev]' (the bpy wheel, Python 3.11), or pass --scene DIR (a scene or dataset folder)"
        )


def cmd_demo(args: argparse.Namespace) -> int:
    scene_dir = args.scene
    if scene_dir is not None and not (scene_dir / "scene.json").is_file():
        return _run_loop(
            import_demo_scene(scene_dir, args.out / "scene", args.format), args.out / "output", args.device
        )
    if scene_dir is None:
        scene_dir = args.out / "scene"
        if not (scene_dir / "scene.json").is_file():
            if not DEMO_SCRIPT.is_file():
                raise FileNotFoundError(
                    f"the demo scene script {DEMO_SCRIPT} is missing (run from a clone of the repository)"
                )
            require_bpy()
            print(f"rendering the demo scene into {scene_dir} (Blender, Cycles on CPU) ...")
            subprocess.run([sys.executable, str(DEMO_SCRIPT), "--out", str(scene_dir)], check=True)
        from dataclasses import replace

        from .scene import load_scene

        scene = load_scene(scene_dir)  # the procedural scene with the settings `make demo` gives it
        return _run_loop(
            replace(scene, settings=replace(scene.settings, **DEMO_SETTINGS)), args.out / "output", args.device
        )
    return _run_loop(scene_dir, args.out / "output", args.device)


# ----------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconloop", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    budget_help = (
        "about this many whole minutes per job: the working size, Gaussians and steps are sized to it from measured "
        "step costs (default: 4 on cpu, 5 on mps, none on cuda; 0: none; a scene's own time_budget_min wins)"
    )

    p = sub.add_parser(
        "serve",
        help="run the service Blender and `submit` talk to",
        description=(
            "Run the ReconLoop service: a ZeroMQ ROUTER answering the protocol of protocol/README.md. Jobs run one "
            "at a time, in submission order (with --ray or --workers: one per Ray worker at once, FIFO per client, "
            "clients in turn); each is a folder under the data dir and survives restarts."
        ),
    )
    p.add_argument(
        "--bind",
        type=zmq_endpoint,
        default=DEFAULT_SERVER,
        help="ZeroMQ endpoint (default %(default)s; loopback only by default)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="job store folder (default: the user cache dir, reconloop/jobs)"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--budget", type=budget_minutes, default=None, metavar="MINUTES", help=budget_help)
    p.add_argument(
        "--keep-days",
        type=positive_days,
        default=None,
        metavar="DAYS",
        help="delete an ended job's folder from the store DAYS after its last event (default: keep every job)",
    )
    p.add_argument("--runner", default=None, metavar="MODULE:FUNC", help="job runner instead of the loop (for tests)")
    g = p.add_argument_group("Ray cluster (pip install 'reconloop[cluster]'; see docs/cluster.md)")
    g.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        type=ray_address,
        metavar="ADDRESS",
        help="run jobs on Ray actors, one per GPU: 'auto' (the cluster this node joined with `ray start`; the "
        "default when the option has no value), 'local' (start Ray here), or the head's HOST:PORT",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="number of Ray workers (default: one per GPU of the cluster, or one per CPU without GPUs); "
        "alone, without --ray: N workers on a Ray started on this machine",
    )
    g.add_argument(
        "--ray-host",
        default=None,
        metavar="IP",
        help="this machine's private address that workers connect back to (default: Ray's node IP; "
        "127.0.0.1 for a local Ray)",
    )
    from .service.options import add_generator_arguments, add_keys_command, add_serve_arguments

    add_serve_arguments(p)
    add_generator_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "run",
        help="run the loop on a scene folder in this process",
        description=(
            "Run the whole loop on SCENE (a folder with scene.json) in this process, no service. Writes the point "
            "cloud, generated frames and Gaussians into --out."
        ),
    )
    p.add_argument("scene", type=Path, metavar="SCENE", help="scene folder (scene.json + images)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--budget", type=budget_minutes, default=None, metavar="MINUTES", help=budget_help)
    p.add_argument(
        "--refiner-out",
        type=Path,
        default=None,
        metavar="FILE",
        help="with generator 'refine': save its network's weights (trained on this scene's captures) here",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "submit",
        help="send a scene to a service, show progress, fetch the results",
        description=(
            "Submit SCENE to a running service, follow its progress, then download every artifact into --out, "
            "checking each file's sha256. Ctrl-C cancels the job."
        ),
    )
    p.add_argument("scene", type=Path, metavar="SCENE", help="scene folder (scene.json + images)")
    p.add_argument("--out", type=Path, required=True, help="folder for the downloaded artifacts")
    add_service_client_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "jobs",
        help="list a service's jobs; cancel them, or delete ended ones",
        description=(
            "List the jobs a running service keeps for this client (oldest first: id, created, state, message). "
            "--cancel JOB asks a queued or running job to stop (a running one stops at its next step); --delete "
            "JOB deletes an ended job and its files from the service (a queued or running one is refused)."
        ),
    )
    p.add_argument("--cancel", action="append", default=[], metavar="JOB", help="cancel this job (repeat for more)")
    p.add_argument(
        "--delete", action="append", default=[], metavar="JOB", help="delete this ended job (repeat for more)"
    )
    add_service_client_arguments(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "fetch",
        help="download an ended job's results from a service",
        description=(
            "Download every artifact of JOB (an id `reconloop jobs` lists) into --out, checking each file's sha256: "
            "the results of a job whose `submit` was stopped, or one submitted from Blender."
        ),
    )
    p.add_argument("job", metavar="JOB", help="the job's id")
    p.add_argument("--out", type=Path, required=True, help="folder for the downloaded artifacts")
    add_service_client_arguments(p)
    p.set_defaults(func=cmd_fetch)
    add_keys_command(sub)

    p = sub.add_parser(
        "import",
        help="make a scene folder from COLMAP, LLFF, Middlebury, NeRF or DTU data",
        description="Convert a dataset's cameras and images into a scene folder (scene.json).",
    )
    from .formats import add_import_arguments

    add_import_arguments(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "eval",
        help="score held-out views: point render, captures-only Gaussians, full loop",
        description=(
            "Hold out views (scene.heldout, or --protocol llff|ring|ring-arc|dtu on imported data) and report "
            "PSNR/SSIM at them for the point render alone, Gaussians fitted on the captures "
            "alone, and the full loop; with time and peak memory per stage (eval.json)."
        ),
    )
    from .evaluate_args import add_eval_arguments

    add_eval_arguments(p)
    p.add_argument("--budget", type=budget_minutes, default=None, metavar="MINUTES", help=budget_help)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo",
        help="render the built-in demo scene (or use --scene) and run the loop",
        description=(
            "Without --scene: render a procedural Blender scene with Cycles on CPU into OUT/scene (bpy needed), "
            "then run the loop into OUT/output. With --scene: run the loop on that scene folder, or on a dataset "
            "folder (middlebury, llff, nerf, dtu, colmap; detected) imported into OUT/scene with the demo's "
            "CPU-sized settings: 3 captures for middlebury and colmap (ring-arc split) and llff (LLFF split), "
            "the rest held out; every capture for nerf and dtu, and for a COLMAP model of too few photos to split."
        ),
    )
    p.add_argument(
        "--scene",
        type=Path,
        default=None,
        help="scene folder (scene.json) or dataset folder to use instead of the built-in one",
    )
    p.add_argument(
        "--format", default=None, help="the dataset's format when --scene has no scene.json (default: detected)"
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from protocol.errors import ProtocolError

    from .scene import SceneError

    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone: said here (below), not as noise at the interpreter's exit
        return code
    except (SceneError, ProtocolError, ValueError, FileNotFoundError) as err:
        print(f"reconloop {args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TimeoutError as err:
        server = getattr(args, "server", None)
        hint = f"; is `reconloop serve` running at {server}?" if server else ""
        print(f"reconloop {args.command}: {err}{hint}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except subprocess.CalledProcessError as err:
        print(f"reconloop {args.command}: {err}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except BrokenPipeError:  # a reader such as `head` closed the pipe: end quietly, as a shell tool does
        with contextlib.suppress(AttributeError, ValueError, OSError):  # stdout without a file descriptor
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again
            os.close(devnull)
        return EXIT_BROKEN_PIPE
    except OSError as err:  # after TimeoutError, one of its kind: a file not read or written (full disk, no permission)
        where = f"{err.filename}: " if err.filename else ""
        print(f"reconloop {args.command}: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (RuntimeError, MemoryError) as err:  # out of memory in any command's job: a sentence, not a traceback
        if not is_out_of_memory(err):
            raise
        from .service.faults import describe_failure

        print(f"reconloop {args.command}: {describe_failure(err)}", file=sys.stderr)
        return EXIT_JOB_FAILED


if __name__ == "__main__":
    sys.exit(main())
