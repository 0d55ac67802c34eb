"""Load test: many concurrent clients against a real `reconloop serve` on loopback.

Starts ``reconloop serve`` (the probe runner: real file work in milliseconds, see
``backend/service/probe.py``) in a subprocess, then runs N client threads, each with its own socket.
Each client, per job: submits (with an idempotency key, then resubmits the same key to catch
duplicates), watches the job's events while timing ``status`` requests, cancels every k-th job, and
fetches every artifact of finished jobs with sha256 checked. At the end the script compares what the
clients were told with the server's ``jobs`` listing and reports:

- completed / cancelled / failed jobs; **lost** (acknowledged but missing from the listing, not ended,
  an event stream without its end, or an artifact missing or with the wrong sha256): must be 0;
  **duplicated** (a resubmitted key that made a second job, or more jobs listed than submitted): must be 0;
- p50 / p99 latency of ``status`` while the service is busy; peak RSS (VmHWM) of the service process.

Usage::

    python scripts/load_test.py --clients 20 --jobs-per-client 5            # prints a JSON summary
    python scripts/load_test.py --clients 40 --jobs-per-client 10 --json out.json
    python scripts/load_test.py --clients 20 --curve     # one CurveZMQ key per client: isolation under load
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from backend.service.spawn import free_port, serve_command, serve_env, wait_answering  # noqa: E402
from protocol.client import Client  # noqa: E402
from protocol.schemas import TERMINAL_STATES  # noqa: E402

KIB = 1024
MIB = 1 << 20
STARTUP_S = 60.0
EVENT_WAIT_MS = 20
PERCENTILES = (50, 99)
IMAGE_SIDE = 32
FOCAL = 40.0


@dataclass
class ClientLog:
    """What one client was told and saw."""

    submitted: dict[str, str] = field(default_factory=dict)  # key -> job
    ended: dict[str, str] = field(default_factory=dict)  # job -> final state
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)  # reasons
    status_ms: list[float] = field(default_factory=list)
    fetched_bytes: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class LoadResult:
    clients: int
    jobs_per_client: int
    submitted: int
    completed: int
    cancelled: int
    failed: int
    lost: int
    duplicated: int
    status_requests: int
    status_p50_ms: float
    status_p99_ms: float
    start_rss_mib: float  # the service's RSS once up, before the clients (libraries loaded at start-up)
    peak_rss_mib: float
    fetched_mib: float
    wall_s: float
    errors: list[str]


def _scene(client: int, job: int, plan: str) -> dict[str, Any]:
    rng = np.random.default_rng(client * 1000 + job)
    K = np.array([[FOCAL, 0, IMAGE_SIDE / 2], [0, FOCAL, IMAGE_SIDE / 2], [0, 0, 1]])
    cam = {"w2c": np.eye(4), "K": K, "width": IMAGE_SIDE, "height": IMAGE_SIDE}
    caps = [
        {"name": f"c{i}", "image": rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8), "camera": cam}
        for i in range(2)
    ]
    return {"captures": caps, "trajectory": [{"frame": 1, "camera": cam}], "settings": {"prompt": f"probe {plan}"}}


def _client_thread(
    endpoint: str, index: int, jobs: int, cancel_every: int, deadline: float, log: ClientLog, client_kw: dict[str, Any]
) -> None:
    try:
        with Client(endpoint, timeout_ms=10_000, retries=3, name=f"load-{index}", **client_kw) as c:
            for j in range(jobs):
                if time.monotonic() > deadline:
                    log.errors.append(f"client {index}: out of time before job {j}")
                    return
                cancel = cancel_every > 0 and (index + j) % cancel_every == 0
                plan = "steps=200 delay_ms=10" if cancel else "steps=3 delay_ms=2"
                key = f"load-{index}-{j}"
                scene = _scene(index, j, plan)
                job = c.request("submit", scene=scene, key=key)["job"]
                log.submitted[key] = job
                if c.request("submit", scene=scene, key=key)["job"] != job:  # a resent submit must not double
                    log.duplicates += 1
                c.watch(job, since=0)
                seqs: list[int] = []
                final = None
                cancelled_sent = False
                while final is None and time.monotonic() < deadline:
                    for event in c.poll_events(EVENT_WAIT_MS):
                        if event["job"] != job:
                            continue
                        seqs.append(event["seq"])
                        if event["state"] in TERMINAL_STATES:
                            final = event["state"]
                    t0 = time.perf_counter()
                    status = c.status(job)
                    log.status_ms.append((time.perf_counter() - t0) * 1000)
                    if cancel and not cancelled_sent and status["state"] in ("queued", "running"):
                        c.cancel(job)
                        cancelled_sent = True
                    if (
                        final is None
                        and status["state"] in TERMINAL_STATES
                        and status["seq"] == (seqs[-1] if seqs else 0)
                    ):
                        final = status["state"]
                if final is None:
                    log.lost.append(f"{job}: no end within the time limit")
                    continue
                if seqs != list(range(1, len(seqs) + 1)):
                    log.lost.append(f"{job}: event seqs {seqs} have a gap or a duplicate")
                log.ended[job] = final
                if final == "done":
                    for a in c.status(job)["artifacts"]:
                        data = c.fetch_bytes(job, a["name"])
                        log.fetched_bytes += len(data)
                        if hashlib.sha256(data).hexdigest() != a["sha256"]:
                            log.lost.append(f"{job}/{a['name']}: sha256 mismatch")
                    if "summary.json" not in {a["name"] for a in c.status(job)["artifacts"]}:
                        log.lost.append(f"{job}: done without summary.json")
    except Exception as err:  # counted, reported; the other clients go on
        log.errors.append(f"client {index}: {type(err).__name__}: {err}")


def _peak_rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    except OSError:
        pass
    return 0


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _curve_keys(folder: Path, clients: int) -> tuple[list[str], list[dict[str, Any]]]:
    """A server key pair and one key pair per client, all allowed: (serve arguments, Client keyword arguments per client)."""
    from backend.service.auth import generate_keys

    server = generate_keys(folder / "keys", "server")
    allowed = folder / "allowed"
    allowed.mkdir()
    kws = []
    for i in range(clients):
        pair = generate_keys(folder / "keys", f"client{i}")
        (allowed / pair.public_file.name).write_bytes(pair.public_file.read_bytes())
        kws.append({"server_key": server.public_file, "client_key": pair.secret_file})
    return ["--curve-secret", str(server.secret_file), "--allow-keys", str(allowed)], kws


def run_load(
    clients: int = 20,
    jobs_per_client: int = 3,
    cancel_every: int = 4,
    time_limit_s: float = 120.0,
    data_dir: Path | None = None,
    curve: bool = False,
) -> LoadResult:
    """Start a service, run the clients, check the result against the server's listing.

    With ``curve`` every client has its own CurveZMQ key; each must then see exactly its own jobs
    (another client's job in its listing counts as lost isolation, reported under ``errors``).
    """
    tmp = tempfile.TemporaryDirectory(prefix="reconloop-load-")
    data_dir = Path(tmp.name) / "jobs" if data_dir is None else Path(data_dir)
    serve_args, client_kws = _curve_keys(Path(tmp.name), clients) if curve else ([], [{} for _ in range(clients)])
    client_kw = client_kws[0]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = serve_command(endpoint, data_dir, runner="backend.service.probe:run", extra=serve_args)
    proc = subprocess.Popen(cmd, cwd=REPO, env=serve_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    isolation: list[str] = []
    try:
        wait_answering(endpoint, STARTUP_S, proc=proc, **client_kw)
        start_rss = _peak_rss_bytes(proc.pid)
        logs = [ClientLog() for _ in range(clients)]
        t0 = time.monotonic()
        deadline = t0 + time_limit_s
        threads = [
            threading.Thread(
                target=_client_thread,
                args=(endpoint, i, jobs_per_client, cancel_every, deadline, logs[i], client_kws[i]),
            )
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.monotonic() - t0
        listed: dict[str, str] = {}
        for i, kw in enumerate(client_kws if curve else client_kws[:1]):
            with Client(endpoint, timeout_ms=10_000, **kw) as c:
                seen = {j["job"]: j["state"] for j in c.jobs()}
            if curve and set(seen) != set(logs[i].submitted.values()):
                isolation.append(f"client {i} lists {len(seen)} jobs, submitted {len(logs[i].submitted)}")
            listed.update(seen)
        peak = _peak_rss_bytes(proc.pid)
        with Client(endpoint, timeout_ms=10_000, **client_kw) as c:
            c.shutdown()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    submitted = {job for log in logs for job in log.submitted.values()}
    lost_reasons = [r for log in logs for r in log.lost]
    for job in submitted:
        if job not in listed:
            lost_reasons.append(f"{job}: acknowledged but not listed by the server")
        elif listed[job] not in TERMINAL_STATES:
            lost_reasons.append(f"{job}: still {listed[job]} at the end")
    ended = {job: state for log in logs for job, state in log.ended.items()}
    duplicated = sum(log.duplicates for log in logs) + max(0, len(listed) - len(submitted))
    status_ms = [ms for log in logs for ms in log.status_ms]
    result = LoadResult(
        clients=clients,
        jobs_per_client=jobs_per_client,
        submitted=len(submitted),
        completed=sum(s == "done" for s in ended.values()),
        cancelled=sum(s == "cancelled" for s in ended.values()),
        failed=sum(s == "failed" for s in ended.values()),
        lost=len({r.split(":")[0] for r in lost_reasons}),
        duplicated=duplicated,
        status_requests=len(status_ms),
        status_p50_ms=round(_percentile(status_ms, PERCENTILES[0]), 2),
        status_p99_ms=round(_percentile(status_ms, PERCENTILES[1]), 2),
        start_rss_mib=round(start_rss / MIB, 1),
        peak_rss_mib=round(peak / MIB, 1),
        fetched_mib=round(sum(log.fetched_bytes for log in logs) / MIB, 2),
        wall_s=round(wall_s, 1),
        errors=[e for log in logs for e in log.errors] + isolation + lost_reasons[:20],
    )
    tmp.cleanup()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--clients", type=int, default=20, help="concurrent clients, one thread and socket each (default %(default)s)"
    )
    p.add_argument(
        "--jobs-per-client", type=int, default=5, help="jobs each client submits in turn (default %(default)s)"
    )
    p.add_argument("--cancel-every", type=int, default=4, help="cancel every k-th job (0: none; default %(default)s)")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=120.0,
        help="stop after this long; unfinished jobs count as lost (default %(default)s)",
    )
    p.add_argument(
        "--curve", action="store_true", help="CurveZMQ with one key per client; check each sees only its own jobs"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    result = run_load(args.clients, args.jobs_per_client, args.cancel_every, args.time_limit_s, curve=args.curve)
    text = json.dumps(asdict(result), indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if result.lost == 0 and result.duplicated == 0 and not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
