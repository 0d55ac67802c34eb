"""Benchmark the service on a Ray pool: throughput with 1 and 2 workers, event latency, and the Ray path's overhead.

``throughput`` (CPU, any machine): a local Ray; the same batch of jobs through ``reconloop serve`` with 1
worker, then with 2, in one run; reports jobs finished per minute for each and their ratio, and the
latency of progress events (the worker's clock when it reports, against the front end's journal time;
one machine, one clock). Each job burns ``--work-ms`` of CPU per step in a worker process.

``overhead`` (one GPU): the real loop on a scene folder three ways, ``--repeats`` times each after a
warm-up: ``run_loop`` in this process, the service with its worker thread (submit to done), the service
on a one-worker Ray pool (a GPU actor; one run more, its first not counted: the actor starts CUDA and
loads the kernels). Reports the medians, the Ray path's overhead against the worker thread (the same
service, jobs stored and loaded the same way) and against ``run_loop``, each as a share of the job, and every job's stage seconds.

Usage::

    python scripts/bench_cluster.py throughput --workers 0 1 2 --out out/cluster  # CPU: jobs/min, 1 vs 2 workers
    python scripts/bench_loop.py --data .device_data/middlebury_temple --out $OUT --save-scene /tmp/bl  # its job
    python scripts/bench_cluster.py overhead --scene /tmp/bl --repeats 3 --out $OUT   # GPU: Ray vs in-process

Writes ``bench_cluster_<mode>.json`` into ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.progress import ProgressEvent  # noqa: E402
from backend.service import Service, ServiceConfig  # noqa: E402
from backend.service.ray_pool import RayConfig, checkout_runtime_env  # noqa: E402
from protocol.client import Client  # noqa: E402
from tests.protocol.helpers import scene_msg  # noqa: E402

TIMEOUT_MS = 30_000
MS = 1e-3


def cpu_job(scene: Any, out_dir: Path, *, device: str, progress: Any) -> None:
    """A job for the throughput run: ``settings.seed`` steps of ``settings.prompt`` ms of CPU work each.

    Each progress message is the worker's ``time.time()`` when it reports (for the event latency).
    """
    steps, work_s = scene.settings.seed, float(scene.settings.prompt) * MS
    total = 0
    for i in range(steps):
        end = time.perf_counter() + work_s
        while time.perf_counter() < end:
            total += sum(range(1000))
        (out_dir / f"step{i}.txt").write_text(str(total))
        progress(ProgressEvent("work", (i + 1) / steps, f"{time.time():.6f}", (f"step{i}.txt",)))


def _start(data_dir: Path, workers: int, device: str, runner: Any = None) -> tuple[Service, Any]:
    ray = RayConfig(workers=workers, host="127.0.0.1") if workers else None  # 0: the worker thread, no Ray
    svc = Service(ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=data_dir, device=device, ray=ray), runner=runner)
    return svc, svc.start_thread(timeout_s=300)


def _wait_done(c: Client, job: str) -> list[dict[str, Any]]:
    c.watch(job, since=0)
    events = list(c.events(job))
    if events[-1]["state"] != "done":
        raise RuntimeError(f"job {job} ended {events[-1]['state']}: {events[-1]['message']}")
    return events


def throughput(a: argparse.Namespace) -> dict[str, Any]:
    import ray

    ours = not ray.is_initialized()  # a test may have started Ray already
    if ours:
        ray.init(
            num_cpus=max(max(a.workers), 1),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            runtime_env=checkout_runtime_env(),
        )
    rows = []
    try:
        for workers in a.workers:
            with tempfile.TemporaryDirectory() as tmp:
                svc, thread = _start(Path(tmp) / "jobs", workers, "cpu", runner=cpu_job)
                try:
                    with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
                        scene = scene_msg(str(a.work_ms), delay_ms=a.steps, captures=1)  # prompt: ms, seed: steps
                        t0 = time.perf_counter()
                        jobs = [c.submit(scene) for _ in range(a.jobs)]
                        latencies = []
                        for job in jobs:
                            for e in _wait_done(c, job):
                                if e["stage"] == "work":
                                    latencies.append(e["time"] - float(e["message"].split()[0]))
                        wall_s = time.perf_counter() - t0
                finally:
                    svc.stop()
                    thread.join(60)
            latencies.sort()
            rows.append(
                {
                    "workers": workers,
                    "jobs": a.jobs,
                    "wall_s": round(wall_s, 3),
                    "jobs_per_min": round(60 * a.jobs / wall_s, 2),
                    "event_latency_ms_median": round(1000 * latencies[len(latencies) // 2], 3),
                    "event_latency_ms_p95": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 3),
                    "events": len(latencies),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if ours:
            ray.shutdown()
    base = next(r["jobs_per_min"] for r in rows if r["workers"] == 1)
    return {
        "job": f"{a.steps} steps x {a.work_ms} ms CPU",
        "rows": rows,
        "ratio": [r["jobs_per_min"] / base for r in rows],
    }


def _stage_seconds(out_dir: Path) -> dict[str, float]:
    """The loop's seconds per stage in a job's output folder (its metrics.json), {} when absent."""
    path = out_dir / "metrics.json"
    if not path.is_file():
        return {}
    stages = json.loads(path.read_text())["timing"]["stages"]
    return {name: round(v["seconds"], 2) for name, v in stages.items()}


def _served(scene: Any, data_dir: Path, workers: int, device: str, runs: int, label: str) -> dict[str, Any]:
    """``runs`` submissions of ``scene`` to a service (``workers`` 0: its worker thread, else a Ray pool),
    one after the other: submit-to-done and the worker's starting-to-done seconds, each job's stages."""
    from backend.service.store import scene_message

    served, started_to_done, stages = [], [], []
    svc, thread = _start(data_dir, workers, device)
    try:
        with Client(svc.endpoint, timeout_ms=TIMEOUT_MS) as c:
            info = c.hello()
            msg = scene_message(scene)
            for i in range(runs):
                t0 = time.perf_counter()
                job = c.submit(msg)
                events = _wait_done(c, job)
                served.append(time.perf_counter() - t0)
                started = next(e["time"] for e in events if e["stage"] == "starting")
                started_to_done.append(events[-1]["time"] - started)
                stages.append(_stage_seconds(data_dir / job / "artifacts"))
                print(f"{label} run {i}: {served[-1]:.2f} s (worker: {started_to_done[-1]:.2f} s)", flush=True)
    finally:
        svc.stop()
        thread.join(60)
    return {
        "service_device": info["device"],
        "submit_to_done_s": [round(t, 3) for t in served],
        "started_to_done_s": [round(t, 3) for t in started_to_done],
        "stages_s": stages,
    }


def overhead(a: argparse.Namespace) -> dict[str, Any]:
    """The same job three ways, warm: ``run_loop`` in this process (after a warm-up that builds the
    rasterizer's kernels), through the service's worker thread, and through a one-worker Ray pool (its
    first job, which starts CUDA and loads the kernels in the actor, not counted)."""
    import ray
    import torch

    from backend.loop import run_loop
    from backend.scene import load_scene

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_loop import warm_up

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scene = load_scene(a.scene)
    warm_up(torch.device(device))
    direct, direct_stages = [], []
    for i in range(a.repeats if "direct" in a.paths else 0):
        t0 = time.perf_counter()
        run_loop(scene, a.out / f"direct{i}", device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        direct.append(time.perf_counter() - t0)
        direct_stages.append(_stage_seconds(a.out / f"direct{i}"))
        print(f"direct run {i}: {direct[-1]:.2f} s", flush=True)
    threaded = (
        _served(scene, a.out / "jobs_thread", 0, device, a.repeats, "worker thread") if "thread" in a.paths else {}
    )
    ray.init(
        include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, runtime_env=checkout_runtime_env()
    )
    try:
        pooled = _served(scene, a.out / "jobs_ray", 1, device, a.repeats + 1, "Ray")
    finally:
        ray.shutdown()
    thread_s = statistics.median(threaded["submit_to_done_s"]) if threaded else float("nan")
    ray_s = statistics.median(pooled["submit_to_done_s"][1:])
    direct_s = statistics.median(direct) if direct else float("nan")
    return {
        "scene": str(a.scene),
        "device": device,
        "repeats": a.repeats,
        "direct_s": [round(t, 3) for t in direct],
        "direct_stages_s": direct_stages,
        "thread": threaded,
        "ray": pooled,
        "direct_median_s": round(direct_s, 3),
        "thread_median_s": round(thread_s, 3),
        "ray_warm_median_s": round(ray_s, 3),
        "ray_over_thread_pct": round(100 * (ray_s - thread_s) / thread_s, 2),
        "ray_over_direct_pct": round(100 * (ray_s - direct_s) / direct_s, 2),
        "target_pct": 5.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("throughput", help="CPU: jobs per minute with 1 and 2 workers")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes; 0: the service without Ray")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--work-ms", type=int, default=200, help="CPU milliseconds per step")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("overhead", help="one GPU: the loop through the Ray pool against in-process")
    p.add_argument("--scene", type=Path, required=True, help="scene folder (scene.json)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each path (Ray: one more, not counted)")
    p.add_argument("--paths", default="direct,thread", help="which of direct, thread run beside Ray (always run)")
    p.add_argument("--device", default=None, help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    result = throughput(a) if a.mode == "throughput" else overhead(a)
    result.update(machine=f"{platform.node()} {platform.processor() or platform.machine()}", date=time.strftime("%F"))
    (a.out / f"bench_cluster_{a.mode}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
