"""A small, quick job runner for checking a service: real file work, steered faults.

Not the reconstruction loop: ``reconloop serve --runner backend.service.probe:run`` makes the service run
this instead, so that load tests, fault injection and the reliability report exercise the real service
path (sockets, codec, job store, worker, manifests) in milliseconds per job on any machine.

What a probe job does: it decodes every capture image, and for each of ``steps`` steps writes one
artifact (``step{i}.json``: per-capture mean colours and a digest of the step) and reports progress
naming it; at the end it writes ``summary.json``. The scene's ``settings.prompt`` steers it, as
space-separated ``key=value`` words after the word ``probe``::

    probe steps=5 delay_ms=20            5 steps, 20 ms each
    probe steps=3 fault=error at=1       RuntimeError in step 1
    probe fault=memory at=0              a real MemoryError: numpy asked for 2^60 bytes
    probe fault=cuda_oom                 torch.cuda.OutOfMemoryError (simulated: no GPU needed)
    probe fault=write bytes=1000000      step 0 writes a file of that many bytes (disk-full checks)
    probe fault=symlink                  announces an artifact that is a symlink out of the job folder
    probe fault=escape                   announces the artifact name ``../meta.json``
    probe fault=hang                     sleeps ``delay_ms`` per step without reporting progress

Anything else (or an empty prompt) runs 3 steps with no delay.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import ProgressEvent, ProgressFn
from ..scene import Scene

DEFAULT_STEPS = 3
MAX_STEPS = 100_000
MS = 1e-3
HUGE_ALLOCATION_BYTES = 1 << 60  # no machine has this: numpy raises MemoryError at once
FAULTS = ("none", "error", "memory", "cuda_oom", "write", "symlink", "escape", "hang")
OUTSIDE_TARGET = "/etc/hostname"


@dataclass(frozen=True)
class ProbePlan:
    """What a probe job does (parsed from ``settings.prompt``)."""

    steps: int = DEFAULT_STEPS
    delay_ms: int = 0
    fault: str = "none"
    at: int = 0  # the step where the fault strikes
    bytes: int = 0  # size of the file fault=write writes

    @classmethod
    def parse(cls, prompt: str) -> ProbePlan:
        words = prompt.split()
        if not words or words[0] != "probe":
            return cls()
        values: dict[str, Any] = {}
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(
                    f"probe prompt: words must be key=value with key in {', '.join(cls.__dataclass_fields__)}; got {word!r}"
                )
            values[key] = value if key == "fault" else int(value)
        plan = cls(**values)
        if plan.fault not in FAULTS:
            raise ValueError(f"probe prompt: fault must be one of {', '.join(FAULTS)}; got {plan.fault!r}")
        if not 1 <= plan.steps <= MAX_STEPS or plan.delay_ms < 0 or plan.bytes < 0:
            raise ValueError(f"probe prompt: steps must be in [1, {MAX_STEPS}], delay_ms and bytes >= 0; got {plan}")
        return plan


def _mean_colours(scene: Scene) -> list[list[float]]:
    from PIL import Image

    out = []
    for c in scene.captures:
        with Image.open(c.image) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
        out.append([round(float(v), 4) for v in rgb.reshape(-1, 3).mean(axis=0)])
    return out


def _inject(plan: ProbePlan, step: int, out_dir: Path) -> str | None:
    """Strike the planned fault at this step; returns an extra artifact name to announce, if any."""
    if plan.fault == "none" or step != plan.at:
        return None
    if plan.fault == "error":
        raise RuntimeError(f"injected fault in probe step {step}")
    if plan.fault == "memory":
        np.empty(HUGE_ALLOCATION_BYTES, dtype=np.uint8)  # raises MemoryError
    if plan.fault == "cuda_oom":
        import torch

        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB (injected by the probe runner)"
        )
    if plan.fault == "write":
        with open(out_dir / "big.bin", "wb") as f:
            chunk = bytes(1 << 16)
            left = plan.bytes
            while left > 0:
                left -= f.write(chunk[: min(left, len(chunk))])
        return "big.bin"
    if plan.fault == "symlink":
        os.symlink(OUTSIDE_TARGET, out_dir / "leak.txt")
        return "leak.txt"
    if plan.fault == "escape":
        return "../meta.json"
    return None


def run(scene: Scene, out_dir: Path, *, device: str, progress: ProgressFn) -> dict[str, Any]:
    """Run a probe job on ``scene`` into ``out_dir`` (see the module docstring). Returns the summary."""
    plan = ProbePlan.parse(scene.settings.prompt)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    colours = _mean_colours(scene)
    digest = hashlib.sha256(json.dumps(colours).encode())
    for step in range(plan.steps):
        if plan.delay_ms:
            time.sleep(plan.delay_ms * MS)
        extra = _inject(plan, step, out_dir)
        if plan.fault == "hang":
            continue
        digest.update(step.to_bytes(4, "little"))
        name = f"step{step}.json"
        body = {"step": step, "device": device, "mean_rgb": colours, "digest": digest.hexdigest()}
        (out_dir / name).write_text(json.dumps(body))
        names = (name,) if extra is None else (name, extra)
        progress(ProgressEvent("probe", (step + 1) / plan.steps, f"step {step + 1} of {plan.steps}", names))
    summary = {
        "captures": len(scene.captures),
        "trajectory": len(scene.trajectory),
        "steps": plan.steps,
        "start": start,
        "end": time.time(),
        "digest": digest.hexdigest(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary))
    return summary
