"""Protocol throughput: 100 frames of 512x896 RGB (uint8) through the real service path over loopback.

The hot path measured is ``fetch``: generated frames come back from the GPU service to Blender as an
artifact of the job, read in chunks (pipelined requests; zero-copy frames: the server sends slices of a
memory-mapped file, the client gets numpy views of the received frames). The service runs as
``reconloop serve`` in its own process (the real ROUTER loop, codec, validation, job store, worker); a
job whose runner writes the 100 frames (131 MiB) as one artifact is submitted, then fetched with
``protocol.client.Client.fetch_chunks`` into a preallocated buffer.

Reported, as medians of several runs: GB/s, and the ratio of its time to that of a plain in-process
memory copy of the same bytes (``numpy.copyto``, timed in turns with it so that both see the same
machine load); for several chunk sizes and pipeline windows; with and without the client's sha256
check; and, as the transport's ceiling, the same chunked transfer between two bare pyzmq sockets (no
protocol, no service) on the same machine.

Usage::

    python scripts/bench_protocol.py [--runs 5] [--frames 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.service.spawn import free_port, serve_command, serve_env  # noqa: E402
from protocol.client import Client  # noqa: E402

FRAME_SHAPE = (512, 896, 3)  # AnyRecon's working resolution, RGB
ARTIFACT = "frames.u8"
MIB = 1 << 20
GB = 1e9
CHUNKS_MIB = (1, 4, 16)
WINDOWS = (1, 2, 4)
TIMEOUT_MS = 20_000
STOP = b"stop"


def runner(scene: Any, out_dir: Path, *, device: str, progress: Any) -> None:
    """Job runner of the benchmark's service: writes ``settings.seed`` frames as one raw artifact."""
    from backend.progress import ProgressEvent

    frames = scene.settings.seed
    data = np.random.default_rng(0).integers(0, 256, (frames, *FRAME_SHAPE), dtype=np.uint8)
    data.tofile(out_dir / ARTIFACT)
    progress(ProgressEvent("outputs", 1.0, f"{frames} frames", (ARTIFACT,)))


def bare_server(endpoint: str, path: str) -> None:
    """The transport's ceiling: a bare ROUTER answering b"offset,length" with a slice of a mapped file."""
    import zmq

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        ident, body = sock.recv_multipart()
        if body == STOP:
            break
        offset, length = map(int, body.split(b","))
        sock.send_multipart([ident, view[offset : offset + length]], copy=False)
    sock.close(linger=0)


def bare_fetch(endpoint: str, total: int, dst: np.ndarray, chunk: int, window: int) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    done = sent = inflight = 0
    while done < total:
        while inflight < window and sent < total:
            sock.send(f"{sent},{chunk}".encode())
            sent += chunk
            inflight += 1
        if not sock.poll(TIMEOUT_MS):
            raise TimeoutError("bare server did not answer")
        data = np.frombuffer(sock.recv(copy=False).buffer, np.uint8)
        inflight -= 1
        dst[done : done + len(data)] = data
        done += len(data)
    sock.close()


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def paired(fn: Callable[[], Any], copy: Callable[[], Any], runs: int) -> tuple[list[float], list[float]]:
    """Times of ``fn`` and of the memory copy, run in turns, so both see the same machine load."""
    fn()  # warm-up
    copy()
    fn_s, copy_s = [], []
    for _ in range(runs):
        for f, out in ((fn, fn_s), (copy, copy_s)):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
    return fn_s, copy_s


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median reported)")
    ap.add_argument("--frames", type=int, default=100, help="frames of 512x896x3 uint8")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--bare-server", nargs=2, metavar=("ENDPOINT", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        bare_server(*args.bare_server)
        return 0

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    data_dir = Path(tempfile.mkdtemp(prefix="bench-protocol-"))
    env = serve_env(REPO / "scripts")
    service = subprocess.Popen(
        serve_command(endpoint, data_dir, runner="bench_protocol:runner"),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict[str, Any] = {
        "frames": args.frames,
        "frame_shape": list(FRAME_SHAPE),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": os.getloadavg()[0],
        "runs": args.runs,
        "rows": [],
    }
    try:
        with Client(endpoint, timeout_ms=TIMEOUT_MS) as client:
            client.hello()
            job = client.submit({"captures": [{"name": "a", "image": _tiny_png()}], "settings": {"seed": args.frames}})
            client.watch(job, since=0)
            for event in client.events(job):
                if event["state"] in ("failed", "cancelled", "interrupted"):
                    raise RuntimeError(f"benchmark job {event['state']}: {event['message']}")
            artifact = data_dir / job / "artifacts" / ARTIFACT
            total = artifact.stat().st_size
            src = np.fromfile(artifact, dtype=np.uint8)
            dst = np.zeros(total, np.uint8)
            copy_gbps = total / statistics.median(timed(lambda: np.copyto(dst, src), args.runs)) / GB
            results.update(bytes=total, copy_gbps=copy_gbps)
            print(
                f"{args.frames} frames {FRAME_SHAPE} uint8 = {total / MIB:.1f} MiB; in-process memory copy {copy_gbps:.2f} GB/s"
            )
            print(f"medians of {args.runs} runs; load average before: {results['load_average_before']:.2f}")
            print(f"{'path':<22} {'chunk MiB':>9} {'window':>6} {'GB/s':>6} {'copy GB/s':>9} {'x copy':>7}")

            def sink(offset: int, data: np.ndarray) -> None:
                dst[offset : offset + len(data)] = data

            bare_endpoint = f"tcp://127.0.0.1:{free_port()}"
            bare = subprocess.Popen([sys.executable, __file__, "--bare-server", bare_endpoint, str(artifact)], env=env)
            try:
                for chunk_mib in CHUNKS_MIB:
                    for window in WINDOWS:
                        chunk = chunk_mib * MIB
                        cases = {
                            "service fetch": lambda: client.fetch_chunks(
                                job, ARTIFACT, sink, chunk_bytes=chunk, window=window, verify=False
                            ),
                            "service fetch+sha256": lambda: client.fetch_chunks(
                                job, ARTIFACT, sink, chunk_bytes=chunk, window=window
                            ),
                            "bare pyzmq": lambda: bare_fetch(bare_endpoint, total, dst, chunk, window),
                        }
                        for path, fn in cases.items():
                            dst[:] = 0
                            fetch_s, copy_s = paired(fn, lambda: np.copyto(dst, src), args.runs)
                            if not np.array_equal(dst, src):
                                raise RuntimeError(f"{path}: the bytes received differ from the artifact")
                            gbps = total / statistics.median(fetch_s) / GB
                            ratio = statistics.median(f / c for f, c in zip(fetch_s, copy_s))
                            row = {
                                "path": path,
                                "chunk_mib": chunk_mib,
                                "window": window,
                                "gbps": gbps,
                                "copy_gbps": total / statistics.median(copy_s) / GB,
                                "copy_ratio": ratio,
                            }
                            results["rows"].append(row)
                            print(
                                f"{path:<22} {chunk_mib:>9} {window:>6} {gbps:>6.2f} {row['copy_gbps']:>9.2f} {ratio:>7.2f}"
                            )
            finally:
                import zmq

                stopper = zmq.Context.instance().socket(zmq.DEALER)
                stopper.connect(bare_endpoint)
                stopper.send(STOP)
                bare.wait(10)
                stopper.close(linger=0)
            results["load_average_after"] = os.getloadavg()[0]
            client.shutdown()
    finally:
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        shutil.rmtree(data_dir, ignore_errors=True)  # the service's job store: the artifact alone is 131 MiB
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
