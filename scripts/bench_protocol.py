"""Protocol throughput: 100 frames of 512x896 RGB (uint8) through the real service path over loopback.

The hot path measured is ``fetch``: generated frames come back from the GPU service to Blender as an
artifact of the job, read in chunks (pipelined requests, zero-copy frames: the server sends slices of a
memory-mapped file, the client reads numpy views of the received frames). The service runs as
``reconloop serve`` in its own process (the real ROUTER loop, codec, job store and worker); a job
whose runner writes the 100 frames (137.6 MB) as one artifact is submitted, then fetched into a
preallocated buffer. Reported: medians of several runs, GB/s, and the ratio to a plain in-process
memory copy of the same bytes (``numpy.copyto``), for several chunk sizes and pipeline windows, with
and without the client's sha256 check of the whole artifact.

Usage::

    python scripts/bench_protocol.py [--runs 5] [--frames 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol.client import Client  # noqa: E402

FRAME_SHAPE = (512, 896, 3)  # AnyRecon's working resolution, RGB
ARTIFACT = "frames.u8"
MIB = 1 << 20
GB = 1e9
CHUNKS_MIB = (1, 4, 16, 64)
WINDOWS = (1, 2, 4)
START_TIMEOUT_MS = 20_000


def runner(scene: Any, out_dir: Path, *, device: str, progress: Any) -> None:
    """Job runner of the benchmark's service: writes ``settings.seed`` frames as one raw artifact."""
    from backend.progress import ProgressEvent

    frames = scene.settings.seed
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (frames, *FRAME_SHAPE), dtype=np.uint8)
    data.tofile(out_dir / ARTIFACT)
    progress(ProgressEvent("outputs", 1.0, f"{frames} frames", (ARTIFACT,)))


def median_gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / GB


def bench_copy(src: np.ndarray, runs: int) -> list[float]:
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages once
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return times


def bench_fetch(client: Client, job: str, dst: np.ndarray, chunk: int, window: int, verify: bool, runs: int) -> list[float]:
    def sink(offset: int, data: np.ndarray) -> None:
        dst[offset : offset + len(data)] = data

    times = []
    for _ in range(runs + 1):  # the first run warms up
        t = time.perf_counter()
        client.fetch_chunks(job, ARTIFACT, sink, chunk_bytes=chunk, window=window, verify=verify)
        times.append(time.perf_counter() - t)
    return times[1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median reported)")
    ap.add_argument("--frames", type=int, default=100, help="frames of 512x896x3 uint8")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    data_dir = Path(tempfile.mkdtemp(prefix="bench-protocol-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "scripts")])}
    server = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--bind", endpoint, "--data-dir", str(data_dir), "--device", "cpu",
         "--runner", "bench_protocol:runner"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    results: dict[str, Any] = {
        "frames": args.frames,
        "frame_shape": list(FRAME_SHAPE),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "runs": args.runs,
        "rows": [],
    }
    try:
        with Client(endpoint, timeout_ms=START_TIMEOUT_MS) as client:
            client.hello()
            png = _tiny_png()
            job = client.submit({"captures": [{"name": "a", "image": png}], "settings": {"seed": args.frames}})
            client.watch(job, since=0)
            for event in client.events(job):
                if event["state"] in ("failed", "cancelled", "interrupted"):
                    raise RuntimeError(f"benchmark job {event['state']}: {event['message']}")
            total = client.status(job)["artifacts"][0]["size"]
            src = np.fromfile(data_dir / job / "artifacts" / ARTIFACT, dtype=np.uint8)
            copy_s = bench_copy(src, args.runs)
            copy_gbps = median_gbps(total, copy_s)
            results.update(bytes=total, copy_gbps=copy_gbps)
            dst = np.empty(total, np.uint8)
            dst[:] = 0
            print(f"{args.frames} frames of {FRAME_SHAPE}: {total / MIB:.1f} MiB; memory copy {copy_gbps:.2f} GB/s (median of {args.runs})")
            print(f"{'chunk MiB':>9} {'window':>6} {'sha256':>6} {'GB/s':>6} {'copy/fetch':>10}")
            for verify in (False, True):
                for chunk_mib in CHUNKS_MIB:
                    for window in WINDOWS:
                        times = bench_fetch(client, job, dst, chunk_mib * MIB, window, verify, args.runs)
                        gbps = median_gbps(total, times)
                        row = {"chunk_mib": chunk_mib, "window": window, "sha256": verify, "gbps": gbps, "ratio_to_copy": copy_gbps / gbps}
                        results["rows"].append(row)
                        print(f"{chunk_mib:>9} {window:>6} {'yes' if verify else 'no':>6} {gbps:>6.2f} {copy_gbps / gbps:>10.2f}")
            if not np.array_equal(dst, src):
                raise RuntimeError("fetched bytes differ from the artifact")
            client.shutdown()
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
