"""How long other clients wait while the service writes a large submit's job folder.

A submit of raw pixels (uint8 [H, W, 3] images, what a script may send instead of encoded photos) is written as
PNGs, the scene loaded and its masks read before the job is listed: seconds for a large scene. A second client
sends ``hello`` every 50 ms meanwhile; the script reports the submit's answer time and the hellos' median and longest
round trip. The service runs in this process on loopback, with the probe runner (no reconstruction).

Usage (the 2-core dev machine is enough; ``--repo`` points at another checkout to time its code side by side)::

    python scripts/bench_submit_write.py --captures 8 --size 4096x2048
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captures", type=int, default=8)
    ap.add_argument("--size", default="4096x2048", help="WxH of each raw image")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to time")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.repo))
    from backend.service import Service, ServiceConfig
    from backend.service.probe import run as probe_runner
    from protocol.client import Client
    from tests.protocol.helpers import scene_msg

    w, h = (int(v) for v in args.size.split("x"))
    scene = scene_msg("probe", captures=args.captures)
    rng = np.random.default_rng(0)
    for capture in scene["captures"]:
        capture["image"] = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        capture["camera"]["width"], capture["camera"]["height"] = w, h
    with tempfile.TemporaryDirectory() as data:
        svc = Service(ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=Path(data), device="cpu"), runner=probe_runner)
        thread = svc.start_thread()
        rounds: list[float] = []
        stop = threading.Event()

        def ping() -> None:
            with Client(svc.endpoint, timeout_ms=120_000) as other:
                while not stop.is_set():
                    t = time.perf_counter()
                    other.hello()
                    rounds.append(time.perf_counter() - t)
                    time.sleep(0.05)

        pinger = threading.Thread(target=ping)
        pinger.start()
        time.sleep(0.5)
        with Client(svc.endpoint, timeout_ms=300_000, retries=0) as client:
            t = time.perf_counter()
            client.submit(scene)
            took = time.perf_counter() - t
        stop.set()
        pinger.join()
        svc.stop()
        thread.join()
    mb = args.captures * w * h * 3 / 1e6
    print(
        f"{args.repo}: submit of {args.captures} raw {w}x{h} images ({mb:.0f} MB) answered in {took:.1f} s; "
        f"another client's hello meanwhile: {len(rounds)} round trips, median {1000 * np.median(rounds):.1f} ms, "
        f"longest {1000 * max(rounds):.1f} ms"
    )


if __name__ == "__main__":
    main()
