"""The submit payload from plain camera values and image bytes, and the job's results (pure Python).

No bpy here: ``operators.py`` reads the Blender scene into :class:`CaptureInput` and camera values
(``scene_read.py``), this module packs them into the protocol's ``scene`` struct, and sorts the
artifacts a job returns into what ``importers.py`` turns into Blender objects.

Example::

    >>> import numpy as np
    >>> from blender_addon.cameras import OpenCVCamera
    >>> cam = OpenCVCamera(w2c=np.eye(4), K=np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]]), width=64, height=48)
    >>> payload = build_scene_payload([], [(1, cam)], {"width": 64})
    Traceback (most recent call last):
    ...
    blender_addon.errors.ReconLoopError: no captures: pick a collection of cameras with photos, or a folder of photos
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.settings import NAMES

from .cameras import BlenderCameraParams, OpenCVCamera, blender_from_opencv
from .errors import ReconLoopError

try:  # the protocol package: bundled as a wheel in the extension, importable from the repo in tests
    from protocol.images import encoded_image_size
except ImportError:  # pragma: no cover - only when the extension was built without its wheels
    encoded_image_size = None

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")
# Job settings a submit may carry: the names of protocol.settings.SETTINGS (the server checks values).
SETTING_NAMES = NAMES

# What each finished file of a job is, by name (the backend's job outputs).
KIND_POINTS = "points"
KIND_GAUSSIANS = "gaussians"
KIND_FRAME = "frame"
KIND_CAMERAS = "cameras"
KIND_OTHER = "other"
_ARTIFACT_PATTERNS = (
    (KIND_GAUSSIANS, re.compile(r"(^|/)gaussians[^/]*\.ply$")),
    (KIND_POINTS, re.compile(r"(^|/)(points|memory|point_cloud)[^/]*\.ply$")),
    (KIND_FRAME, re.compile(r"^frames/frame_(-?\d+)\.(png|jpe?g)$")),
    (KIND_CAMERAS, re.compile(r"^cameras\.json$")),
)
# The sRGB transfer function (IEC 61966-2-1).
SRGB_LINEAR_KNEE = 0.04045
SRGB_LINEAR_SLOPE = 12.92
SRGB_OFFSET = 0.055
SRGB_GAMMA = 2.4
_FRAME_NUMBER = re.compile(r"(-?\d+)\.(png|jpe?g)$")


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "png" or "jpeg"
    width: int
    height: int


@dataclass(frozen=True)
class CaptureInput:
    """One photo to send: its encoded bytes (sent untouched) and its camera, if known.

    Attributes:
        name: unique capture name (the Blender camera object's name, or the file's stem).
        image: the PNG/JPEG file's bytes.
        image_format: "png" or "jpeg".
        camera: OpenCV camera at the photo's pixel size, or None to have it estimated.
        path: the file the photo was read from, where it was read from one ("" for a camera's background).
        mask: the PNG/JPEG file of the capture's mask (its photo's size; which pixels are the object), sent
            untouched beside the photo (protocol/README.md, Masks); None: no mask.
    """

    name: str
    image: bytes
    image_format: str
    camera: OpenCVCamera | None = None
    path: str = ""
    mask: str | None = None


def image_info(data: bytes, name: str, what: str = "photo") -> ImageInfo:
    """Format and size of a PNG/JPEG file from its header. Raises ReconLoopError for anything else, naming
    ``what`` (the photo, a capture's mask) and ``name``."""
    if encoded_image_size is None:
        raise ReconLoopError("the protocol package is missing: reinstall the ReconLoop extension")
    try:
        fmt, w, h = encoded_image_size(data)
    except ValueError as err:
        raise ReconLoopError(f"{what} {name!r} is not a PNG or JPEG file we can read ({err})") from None
    return ImageInfo(format=fmt, width=int(w), height=int(h))


def captures_from_folder(folder: str) -> list[CaptureInput]:
    """Captures without cameras from the PNG/JPEG files of ``folder`` (sorted by file name)."""
    if not os.path.isdir(folder):
        raise ReconLoopError(f"photo folder not found: {folder}")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(PHOTO_SUFFIXES))
    if not names:
        raise ReconLoopError(f"no PNG or JPEG photos in {folder}")
    out = []
    for fname in names:
        path = os.path.join(folder, fname)
        with open(path, "rb") as f:
            data = f.read()
        info = image_info(data, fname)
        out.append(CaptureInput(name=os.path.splitext(fname)[0], image=data, image_format=info.format, path=path))
    return out


def mask_bytes(capture: CaptureInput) -> bytes:
    """The encoded file bytes of a capture's mask, checked to be a PNG/JPEG of its photo's size.

    Raises ReconLoopError naming the capture and the file when the file is missing, unreadable, not a
    PNG/JPEG or of another size than the photo (the service would refuse it after the upload).
    """
    path = capture.mask
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ReconLoopError(f"capture {capture.name!r}: mask file not found: {path}") from None
    except OSError as err:
        raise ReconLoopError(f"capture {capture.name!r}: cannot read mask file {path}: {err}") from None
    mask = image_info(data, path, what=f"capture {capture.name!r}: mask")
    photo = image_info(capture.image, capture.name)
    if (mask.width, mask.height) != (photo.width, photo.height):
        raise ReconLoopError(
            f"capture {capture.name!r}: mask {path} is {mask.width}x{mask.height}; its photo is "
            f"{photo.width}x{photo.height} (a mask has its photo's size)"
        )
    return data


def build_scene_payload(
    captures: list[CaptureInput],
    trajectory: Iterable[tuple[int, OpenCVCamera]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The protocol's ``scene`` struct of a submit.

    Args:
        captures: photos with their cameras (camera None: to be estimated).
        trajectory: (Blender frame number, camera at the render size), frame numbers increasing.
        settings: job settings by name (SETTING_NAMES).
    Returns:
        {"captures": [{name, image, mask?, camera?}], "trajectory": [{frame, camera}], "settings": {...}}
        with cameras as float32 numpy arrays and each image (and mask) file as a uint8 array [N].
    """
    if not captures:
        raise ReconLoopError("no captures: pick a collection of cameras with photos, or a folder of photos")
    names = [c.name for c in captures]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ReconLoopError(f"two captures are named {dup!r}: capture names must be unique")
    has_camera = [c.camera is not None for c in captures]
    if any(has_camera) and not all(has_camera):
        missing = [c.name for c in captures if c.camera is None]
        raise ReconLoopError(f"captures {missing} have no camera: give every capture a camera, or none")
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise ReconLoopError(f"unknown setting {unknown[0]!r}; known: {', '.join(SETTING_NAMES)}")
    cap_msgs = []
    for c in captures:
        # uint8 arrays travel as their own frames (bytes would sit in the msgpack header)
        msg: dict[str, Any] = {"name": c.name, "image": np.frombuffer(bytes(c.image), dtype=np.uint8)}
        if c.mask is not None:
            msg["mask"] = np.frombuffer(mask_bytes(c), dtype=np.uint8)
        if c.camera is not None:
            msg["camera"] = c.camera.to_wire()
        cap_msgs.append(msg)
    traj = [{"frame": int(f), "camera": cam.to_wire()} for f, cam in trajectory]
    frames = [t["frame"] for t in traj]
    if frames != sorted(set(frames)):
        raise ReconLoopError("trajectory frame numbers must increase")
    scene: dict[str, Any] = {"captures": cap_msgs, "settings": dict(settings)}
    if traj:
        scene["trajectory"] = traj
    return scene


def artifact_kind(name: str) -> str:
    """What a job's file is: KIND_POINTS, KIND_GAUSSIANS, KIND_FRAME, KIND_CAMERAS or KIND_OTHER."""
    for kind, pattern in _ARTIFACT_PATTERNS:
        if pattern.search(name):
            return kind
    return KIND_OTHER


def check_trajectory_moves(samples: list[tuple[int, OpenCVCamera]], camera_name: str) -> None:
    """Refuse a trajectory whose every sampled view is the same (a camera that is not animated).

    One sample is a one-frame trajectory and is fine; two or more with equal pose, K and size would
    make the service generate the same frame again and again.
    """
    if len(samples) < 2:
        return
    first = samples[0][1]
    for _, cam in samples[1:]:
        if (
            (cam.width, cam.height) != (first.width, first.height)
            or not np.array_equal(cam.w2c, first.w2c)
            or not np.array_equal(cam.K, first.K)
        ):
            return
    start, end = samples[0][0], samples[-1][0]
    raise ReconLoopError(
        f"Trajectory: the camera {camera_name!r} does not move over frames {start}-{end} (all {len(samples)} "
        "views would be the same): animate it (keyframes on its location, rotation or lens), or clear "
        "Trajectory to let the service choose a path"
    )


PATH_MOVE = 1e-4  # same_path: a camera centre moved by this share of the path's size, or turned by this (radians)
PATH_SHARES = 1e-4  # same_path: intrinsics, as shares of the image size


def same_path(now: dict[int, OpenCVCamera], path: list[tuple[int, OpenCVCamera]]) -> bool:
    """Whether a camera sampled now (``now``: frame -> camera) still has the views of a job's ``path`` (as
    cameras.json holds it: float32, at the render size of the day): at each of the path's frames the camera
    centre within PATH_MOVE of the path's size (its centres' extent, or their distance from the origin),
    its rotation within PATH_MOVE radians, and the intrinsics as shares of the image size (a render size
    changed since in proportion still matches)."""

    def centre(cam: OpenCVCamera) -> np.ndarray:
        return -cam.w2c[:3, :3].T @ cam.w2c[:3, 3]

    def shares(cam: OpenCVCamera) -> np.ndarray:
        K = cam.K
        return np.array([K[0, 0] / cam.width, K[1, 1] / cam.height, K[0, 2] / cam.width, K[1, 2] / cam.height])

    centres = np.array([centre(cam) for _, cam in path])
    size = max(float(np.ptp(centres, axis=0).max()), float(np.abs(centres).max()), 1e-6)
    for frame, cam in path:
        other = now.get(frame)
        if other is None or np.linalg.norm(centre(other) - centre(cam)) > PATH_MOVE * size:
            return False
        # the angle between the rotations, well conditioned near 0: |R1 - R2|_F = 2 sqrt(2) sin(angle / 2)
        chord = np.linalg.norm(other.w2c[:3, :3] - cam.w2c[:3, :3]) / (2.0 * np.sqrt(2.0))
        if 2.0 * np.arcsin(min(chord, 1.0)) > PATH_MOVE:
            return False
        if not np.allclose(shares(other), shares(cam), rtol=0.0, atol=PATH_SHARES):
            return False
    return True


def frame_number(name: str) -> int:
    """The frame number at the end of a generated frame's file name (``frames/000012.png`` -> 12)."""
    m = _FRAME_NUMBER.search(name)
    if m is None:
        raise ReconLoopError(f"generated frame {name!r} has no frame number in its name")
    return int(m.group(1))


def frame_fill(frames: list[int], frame_start: int, frame_end: int) -> dict[int, int]:
    """For every frame in start..end, the generated frame shown there: the latest one at or before it.

    Args:
        frames: frame numbers that have a generated image, any order.
    Returns:
        {frame: source frame} for each frame from the first generated one to ``frame_end``.
    """
    have = sorted(set(int(f) for f in frames))
    out: dict[int, int] = {}
    if not have:
        return out
    j = 0
    for f in range(max(frame_start, have[0]), frame_end + 1):
        while j + 1 < len(have) and have[j + 1] <= f:
            j += 1
        out[f] = have[j]
    return out


@dataclass(frozen=True)
class EstimatedCamera:
    """A camera the service estimated for a photo, ready to become a Blender camera."""

    name: str
    image: str  # relative path of the photo inside the job's outputs, or the capture name
    camera: OpenCVCamera

    def blender_params(self) -> BlenderCameraParams:
        c = self.camera
        return blender_from_opencv(c.w2c, c.K, c.width, c.height)


def parse_cameras_json(data: bytes | str, name: str = "cameras.json") -> list[EstimatedCamera]:
    """Cameras of a job's ``cameras.json`` (scene.json layout: {"captures": [{name, image, camera}]}).

    Entries with ``"estimated": false`` (cameras the user gave) are left out.
    """
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReconLoopError(f"{name} is not valid JSON: {err}") from None
    items = doc.get("captures") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ReconLoopError(f"{name}: expected a list of captures with cameras")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("estimated") is False:
            continue
        try:
            cam = item["camera"]
            w2c = np.asarray(cam["w2c"], dtype=np.float64).reshape(4, 4)
            K = np.asarray(cam["K"], dtype=np.float64).reshape(3, 3)
            width, height = int(cam["width"]), int(cam["height"])
            cap_name = str(item.get("name") or f"camera_{i}")
            image = str(item.get("image") or cap_name)
        except (KeyError, TypeError, ValueError) as err:
            raise ReconLoopError(f"{name}: captures[{i}] has no usable camera ({err})") from None
        out.append(
            EstimatedCamera(name=cap_name, image=image, camera=OpenCVCamera(w2c=w2c, K=K, width=width, height=height))
        )
    return out


def parse_trajectory_json(data: bytes | str, name: str = "cameras.json") -> list[tuple[int, OpenCVCamera]]:
    """The trajectory of a job's ``cameras.json`` ({"trajectory": [{frame, camera}]}): (frame, camera) pairs,
    frames increasing; empty when the file has none."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReconLoopError(f"{name} is not valid JSON: {err}") from None
    items = doc.get("trajectory") if isinstance(doc, dict) else None
    out = []
    for i, item in enumerate(items or []):
        try:
            cam = item["camera"]
            camera = OpenCVCamera(
                w2c=np.asarray(cam["w2c"], dtype=np.float64).reshape(4, 4),
                K=np.asarray(cam["K"], dtype=np.float64).reshape(3, 3),
                width=int(cam["width"]),
                height=int(cam["height"]),
            )
            out.append((int(item["frame"]), camera))
        except (KeyError, TypeError, ValueError) as err:
            raise ReconLoopError(f"{name}: trajectory[{i}] has no usable camera ({err})") from None
    return sorted(out, key=lambda fc: fc[0])


def unregistered_photos(sent: Iterable[str], cams: list[EstimatedCamera]) -> list[str]:
    """Names of photos sent without cameras that came back without one (SfM could not place them)."""
    placed = {c.name for c in cams}
    return sorted(n for n in sent if n not in placed)


def unregistered_note(names: list[str], total: int) -> str:
    """One line for the sidebar and the report: which photos got no camera."""
    if not names:
        return ""
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"{len(names)} of {total} photos could not be placed (no camera found): {shown}"


def job_collection_name(job_id: str, label: str = "") -> str:
    """Name of the collection holding one job's results."""
    short = job_id[:8]
    return f"ReconLoop {label} {short}".replace("  ", " ") if label else f"ReconLoop {short}"


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] to linear (Blender's colour attributes are linear). Same shape."""
    c = np.asarray(c, dtype=np.float32)
    linear = c / SRGB_LINEAR_SLOPE
    curve = ((c + SRGB_OFFSET) / (1.0 + SRGB_OFFSET)) ** SRGB_GAMMA
    return np.where(c <= SRGB_LINEAR_KNEE, linear, curve).astype(np.float32)
