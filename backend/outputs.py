"""A job's output folder, every file written atomically.

Layout (names relative to the job's output folder, as announced in ProgressEvent.artifacts)::

    points.ply              initial memory M (DESIGN.md section 3 point layout)
    frames/frame_0001.png   generated frame per trajectory frame number (8-bit sRGB)
    frames/confidence_0001.png  its per-pixel confidence, 0..255 for 0..1 (8-bit grey)
    frames/cameras.json     {"frames": [{"frame", "image", "confidence", "camera"}]}
    points_final.ply        memory after the loop's updates
    gaussians.ply           fitted Gaussians, INRIA layout
    cameras.json            {"captures": [{"name", "image", "camera", "estimated"}], "trajectory": [...]}
    metrics.json            time and peak memory per stage, evaluation scores when held-out views exist
    overview.png            rows of [capture | render with holes | generated | Gaussian render]

Cameras use scene.json's JSON layout (``Camera.to_json``): OpenCV w2c 4x4, K, width, height.

A run into a folder that holds an earlier run's outputs replaces them: :func:`clear_outputs` removes
exactly the files above (the frames by their name pattern) before the run writes its own, so that
none of the earlier run's frames, index or Gaussians pass for this run's; anything else in the
folder stays.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from protocol.ply import GaussianArrays, PointArrays, write_gaussians_ply, write_points_ply

from .fileio import write_atomic
from .progress import mark_stage
from .scene import Camera

try:
    import resource  # Unix only
except ImportError:  # Windows: no peak RSS to read; every job runs all the same
    resource = None

POINTS_FILE = "points.ply"
POINTS_FINAL_FILE = "points_final.ply"
GAUSSIANS_FILE = "gaussians.ply"
CAMERAS_FILE = "cameras.json"
METRICS_FILE = "metrics.json"
OVERVIEW_FILE = "overview.png"
FRAMES_DIR = "frames"
FRAME_IMAGE = "frame_{:04d}.png"
FRAME_CONFIDENCE = "confidence_{:04d}.png"
# the files of FRAME_IMAGE and FRAME_CONFIDENCE, any frame number (more than 4 digits too, and below 0: "-002")
FRAME_FILE_PATTERN = re.compile(
    "|".join(
        re.escape(name).replace(re.escape("{:04d}"), r"(?:\d{4,}|-\d{3,})") for name in (FRAME_IMAGE, FRAME_CONFIDENCE)
    )
)
# every file the loop writes at the folder's top (the frames folder aside): what clear_outputs removes
JOB_FILES = (POINTS_FILE, POINTS_FINAL_FILE, GAUSSIANS_FILE, CAMERAS_FILE, METRICS_FILE, OVERVIEW_FILE)
U8_MAX = 255
# ru_maxrss is in KiB on Linux and in bytes on macOS
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024
MIB = 1 << 20
OVERVIEW_GAP_PX = 2  # white gap between tiles of overview.png
# zlib level of the PNGs written: a 896x512 frame and its confidence take 32 ms at level 1 against
# 128 ms at Pillow's default 6, for 19 % more bytes (394 against 331 kB; docs/benchmarks.md "Loop on the GPU")
PNG_LEVEL = 1
# frames are encoded and written by this many threads (Pillow's encoder and fsync release the GIL)
WRITE_THREADS = min(8, os.cpu_count() or 1)


def to_u8(images: Tensor) -> np.ndarray:
    """Float images in [0, 1] to 8-bit (rounded, clipped). [..., H, W, C] -> uint8 same shape"""
    return (images.detach().float().clamp(0.0, 1.0) * U8_MAX).round().to(torch.uint8).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file bytes of an 8-bit image, grey [H, W] or RGB [H, W, 3], at zlib level :data:`PNG_LEVEL`."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()


def write_points(path: Path, points: PointArrays) -> Path:
    """Write a point cloud .ply atomically."""
    buf = io.BytesIO()
    write_points_ply(buf, points)
    return write_atomic(path, buf.getvalue())


def write_gaussians(path: Path, gaussians: GaussianArrays) -> Path:
    """Write Gaussians as an INRIA .ply atomically."""
    buf = io.BytesIO()
    write_gaussians_ply(buf, gaussians)
    return write_atomic(path, buf.getvalue())


def clear_outputs(out_dir: Path) -> list[str]:
    """Remove what an earlier run of the loop left in ``out_dir``: the files of :data:`JOB_FILES`, and in
    ``frames/`` the frames, confidences and cameras.json (the folder too when that leaves it empty).
    Everything else in the folder stays (a user's own files, say).

    The loop writes its files one by one as it goes; without this, a second run into the same folder
    that generates fewer frames, or fits no Gaussians, would leave the first run's there as its own.
    Returns the names removed, relative to ``out_dir``.
    """
    removed = earlier_outputs(out_dir)
    for name in removed:
        (out_dir / name).unlink()
    folder = out_dir / FRAMES_DIR
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return removed


def earlier_outputs(out_dir: Path) -> list[str]:
    """What :func:`clear_outputs` removes from ``out_dir``: an earlier run's files, relative to it."""
    found = [name for name in JOB_FILES if (out_dir / name).is_file()]
    folder = out_dir / FRAMES_DIR
    if folder.is_dir():
        found += [
            f"{FRAMES_DIR}/{path.name}"
            for path in sorted(folder.iterdir())
            if path.is_file() and (path.name == CAMERAS_FILE or FRAME_FILE_PATTERN.fullmatch(path.name))
        ]
    return found


def write_frames(
    out_dir: Path,
    frame_numbers: Sequence[int],
    images: Tensor,
    confidence: Tensor,
    cams: Sequence[Camera],
    index: dict[int, dict[str, Any]] | None = None,
) -> list[str]:
    """Write generated frames, their confidences and frames/cameras.json.

    cameras.json lists the frames of ``index``, the run's own frame index kept in memory (never what
    the folder's cameras.json held before: an earlier run's frames are not this run's).

    Args:
        out_dir: the job's output folder.
        frame_numbers: trajectory frame numbers, F of them.
        images: frames, sRGB values in [0, 1]. float32 [F, H, W, 3]
        confidence: per-pixel confidence in [0, 1]. float32 [F, H, W]
        cams: the frames' cameras (at the frames' size), F of them.
        index: the entries this run wrote before, by frame number; these frames are added to it in
            place (the loop passes one for all its segments). None: cameras.json lists these frames only.
    Returns:
        names written, relative to ``out_dir``, cameras.json last.
    """
    if not (len(frame_numbers) == images.shape[0] == confidence.shape[0] == len(cams)):
        raise ValueError(
            f"write_frames: frame_numbers, images, confidence and cams must have one entry per frame; got "
            f"{len(frame_numbers)}, {images.shape[0]}, {confidence.shape[0]}, {len(cams)}"
        )
    folder = out_dir / FRAMES_DIR
    rgb_u8, conf_u8 = to_u8(images), to_u8(confidence)
    entries = {} if index is None else index
    jobs = []
    for i, frame in enumerate(frame_numbers):
        jobs += [(folder / FRAME_IMAGE.format(frame), rgb_u8[i]), (folder / FRAME_CONFIDENCE.format(frame), conf_u8[i])]
    with ThreadPoolExecutor(WRITE_THREADS) as pool:  # map re-raises the first write's error here
        list(pool.map(lambda job: write_atomic(job[0], png_bytes(job[1])), jobs))
    names = []
    for i, frame in enumerate(frame_numbers):
        image_name, conf_name = FRAME_IMAGE.format(frame), FRAME_CONFIDENCE.format(frame)
        entries[int(frame)] = {
            "frame": int(frame),
            "image": image_name,
            "confidence": conf_name,
            "camera": cams[i].to_json(),
        }
        names += [f"{FRAMES_DIR}/{image_name}", f"{FRAMES_DIR}/{conf_name}"]
    write_atomic(folder / CAMERAS_FILE, json_bytes({"frames": [entries[k] for k in sorted(entries)]}))
    return names + [f"{FRAMES_DIR}/{CAMERAS_FILE}"]


@dataclass(frozen=True)
class CaptureCamera:
    """A capture's camera as the loop used it: given in the scene or estimated by SfM."""

    name: str
    image: str
    camera: Camera
    is_estimated: bool


def write_cameras(out_dir: Path, captures: Sequence[CaptureCamera], trajectory: Sequence[tuple[int, Camera]]) -> str:
    """Write cameras.json (captures, given or estimated, and the trajectory). Returns its name."""
    data = {
        "captures": [
            {"name": c.name, "image": c.image, "camera": c.camera.to_json(), "estimated": c.is_estimated}
            for c in captures
        ],
        "trajectory": [{"frame": int(f), "camera": cam.to_json()} for f, cam in trajectory],
    }
    write_atomic(out_dir / CAMERAS_FILE, json_bytes(data))
    return CAMERAS_FILE


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write a JSON object atomically (numpy scalars converted, non-finite floats as null)."""
    return write_atomic(path, json_bytes(_jsonable(data)))


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> str:
    write_json(out_dir / METRICS_FILE, metrics)
    return METRICS_FILE


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def spread(n: int, count: int) -> list[int]:
    """``min(count, n)`` indices spread evenly over range(n), first and last included."""
    k = min(count, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def overview_rows(columns: Sequence[Tensor], rows: Sequence[int]) -> list[list[np.ndarray]]:
    """Picture rows from image columns: row r holds ``column[rows[r]]`` of every column, as uint8.

    Args:
        columns: images in [0, 1], each indexable by row. [F, H, W, 3] each
        rows: which index of the columns each row shows.
    """
    return [[to_u8(c[r]) for c in columns] for r in rows]


def write_overview(out_dir: Path, rows: Sequence[Sequence[np.ndarray]]) -> str:
    """Write overview.png: a grid of 8-bit RGB tiles, one row per entry, tiles left to right.

    Args:
        rows: each a list of uint8 images [h, w, 3] (any sizes; each is scaled to the first tile's height).
    """
    return write_overview_as(out_dir, OVERVIEW_FILE, rows)


def write_overview_as(out_dir: Path, name: str, rows: Sequence[Sequence[np.ndarray]]) -> str:
    """Write a grid of tiles (see write_overview) as ``out_dir/name``. Returns ``name``."""
    if not rows or not rows[0]:
        raise ValueError("write_overview: needs at least one row with one tile")
    tile_h = rows[0][0].shape[0]
    scaled_rows = []
    for row in rows:
        tiles = []
        for t in row:
            h, w = t.shape[:2]
            tiles.append(Image.fromarray(t).resize((max(1, round(w * tile_h / h)), tile_h), Image.BILINEAR))
        scaled_rows.append(tiles)
    width = max(sum(t.width for t in r) + OVERVIEW_GAP_PX * (len(r) - 1) for r in scaled_rows)
    height = len(scaled_rows) * tile_h + OVERVIEW_GAP_PX * (len(scaled_rows) - 1)
    canvas = Image.new("RGB", (width, height), (U8_MAX, U8_MAX, U8_MAX))
    y = 0
    for tiles in scaled_rows:
        x = 0
        for t in tiles:
            canvas.paste(t, (x, y))
            x += t.width + OVERVIEW_GAP_PX
        y += tile_h + OVERVIEW_GAP_PX
    write_atomic(out_dir / name, png_bytes(np.asarray(canvas)))
    return name


# ----------------------------------------------------------------------------------------------
# Time and peak memory per stage


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA's max allocated on a CUDA device, else the process's peak RSS (0 where the OS has
    no ``resource`` module: Windows)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if resource is None:
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * RSS_UNIT_BYTES


@dataclass
class StageMeter:
    """Wall time and peak memory per stage (seconds add up when a stage runs more than once).

    On CUDA the peak counter is reset at each stage's start, so ``peak_mib`` is that stage's own
    peak; on CPU it is the process's peak RSS up to the stage's end (RSS peaks cannot be reset).
    """

    device: torch.device
    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException as err:
            mark_stage(err, stage)  # a failure message names this stage (progress.failed_stage)
            raise
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            peak = peak_memory_bytes(self.device) / MIB
            entry = self.stages.setdefault(stage, {"seconds": 0.0, "peak_mib": 0.0, "calls": 0})
            entry["seconds"] += seconds
            entry["peak_mib"] = max(entry["peak_mib"], peak)
            entry["calls"] += 1

    def summary(self) -> dict[str, Any]:
        memory_kind = "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"
        if self.device.type != "cuda" and resource is None:
            memory_kind = "unmeasured (no resource module: Windows)"  # the peaks read 0
        return {
            "device": str(self.device),
            "memory": memory_kind,
            "stages": {
                k: {"seconds": round(v["seconds"], 4), "peak_mib": round(v["peak_mib"], 1), "calls": int(v["calls"])}
                for k, v in self.stages.items()
            },
            "total_seconds": round(sum(v["seconds"] for v in self.stages.values()), 4),
        }
