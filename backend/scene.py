"""The scene folder: ``scene.json`` plus images.

A scene holds the captures (a photo and, when known, its camera), an optional trajectory (cameras
with frame numbers) and the job settings. Cameras follow DESIGN.md section 3: an OpenCV/COLMAP
world-to-camera 4x4 (x right, y down, z forward) and K in pixels (pixel i spans [i, i+1]).

``scene.json`` layout (version 1)::

    {
      "version": 1,
      "captures": [
        {"name": "img0", "image": "images/img0.png", "mask": "masks/img0.png",   # mask optional
         "camera": {"w2c": [[...4x4...]], "K": [[...3x3...]], "width": 640, "height": 480,
                    "distortion": {"model": "SIMPLE_RADIAL", "params": [0.01]}}},   # camera optional
        ...
      ],
      "trajectory": [{"frame": 1, "camera": {...}}, ...],                        # optional
      "heldout": [{"name": ..., "image": ..., "camera": {...}}],                   # optional, evaluation
      "settings": {"width": 448, "height": 256, ...}                               # optional
    }

``load_scene`` checks everything before it returns and raises :class:`SceneError` naming the field
path and the reason (``captures[3].camera.K: focal lengths must be positive; got fx=-500``); it
never returns a half-loaded scene.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import listed
from protocol.images import encoded_image_size
from protocol.schemas import DISTORTION_COEFFS
from protocol.settings import SETTINGS, SettingError, check_settings

SCENE_FORMAT_VERSION = 1
SIM_MIN_CAMERAS = 3  # given camera centres that fix a similarity: SfM's frame aligned to the scene's
SCENE_FILE = "scene.json"

DISTORTION_PARAMS = {model: len(coeffs) for model, coeffs in DISTORTION_COEFFS.items()}

ROTATION_TOL = 1e-4  # |R^T R - I| and |det R - 1| allowed in a camera's rotation
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SceneError(ValueError):
    """A scene that cannot be used; the message starts with the path of the offending field.

    Attributes:
        problems: every problem found, each "field path: reason" (one unless :meth:`of` gathered several:
            the captures', the trajectory's and the held-out views' items are each checked, so that a
            scene with several bad items is told all of them at once).
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)

    @classmethod
    def of(cls, problems: Sequence[str], prefix: str = "") -> SceneError:
        """One error for several problems, each with ``prefix`` before its field path: "p1; p2; ... (N
        problems)", at most ``protocol.errors.MAX_LISTED`` named (:func:`protocol.errors.listed`); one problem is
        its own message."""
        problems = [prefix + p for p in problems]
        text = listed(problems)
        if len(problems) > 1:
            text += f" ({len(problems)} problems)"
        return cls(text, problems)


@dataclass(frozen=True)
class Distortion:
    """Lens distortion in COLMAP's parameterisation (``model`` one of DISTORTION_PARAMS)."""

    model: str
    params: tuple[float, ...] = ()

    def to_opencv(self) -> np.ndarray:
        """OpenCV ``distCoeffs`` (k1 k2 p1 p2 [k3 k4 k5 k6]). float64 [4] or [8]."""
        p = list(self.params)
        if self.model == "NONE":
            return np.zeros(4)
        if self.model == "SIMPLE_RADIAL":
            return np.array([p[0], 0.0, 0.0, 0.0])
        if self.model == "RADIAL":
            return np.array([p[0], p[1], 0.0, 0.0])
        if self.model == "OPENCV":
            return np.array(p[:4], dtype=np.float64)
        # FULL_OPENCV: k1 k2 p1 p2 k3 k4 k5 k6, the same order OpenCV's rational model takes.
        return np.array(p, dtype=np.float64)

    @property
    def is_identity(self) -> bool:
        return self.model == "NONE" or all(v == 0.0 for v in self.params)


@dataclass(frozen=True)
class Camera:
    """One pinhole camera, OpenCV convention (DESIGN.md section 3).

    Attributes:
        w2c: world-to-camera, OpenCV (x right, y down, z forward). float64 [4, 4]
        K: intrinsics in pixels, pixel i spans [i, i+1]. float64 [3, 3]
        width, height: image size in pixels.
        distortion: lens distortion (captures only), or None for an ideal pinhole.
    """

    w2c: np.ndarray
    K: np.ndarray
    width: int
    height: int
    distortion: Distortion | None = None

    @property
    def c2w(self) -> np.ndarray:
        """Camera-to-world, OpenCV. float64 [4, 4]"""
        return np.linalg.inv(self.w2c)

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates. float64 [3]"""
        R, t = self.w2c[:3, :3], self.w2c[:3, 3]
        return -R.T @ t

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project world points (ignoring distortion).

        Args:
            xyz: world points. [N, 3]
        Returns:
            (uv, depth): pixel coordinates (pixel i spans [i, i+1]) [N, 2] and camera z [N].
        """
        cam = xyz @ self.w2c[:3, :3].T + self.w2c[:3, 3]
        z = cam[:, 2]
        uvw = cam @ self.K.T
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = uvw[:, :2] / uvw[:, 2:3]
        return uv, z

    def scaled(self, width: int, height: int) -> Camera:
        """The same camera at another image size (K scaled per axis)."""
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0] *= sx
        K[1] *= sy
        return replace(self, K=K, width=int(width), height=int(height))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "w2c": self.w2c.tolist(),
            "K": self.K.tolist(),
            "width": int(self.width),
            "height": int(self.height),
        }
        if self.distortion is not None:
            out["distortion"] = {"model": self.distortion.model, "params": list(self.distortion.params)}
        return out


@dataclass(frozen=True)
class Capture:
    """A photo with its camera (None: to be estimated). ``image`` is an absolute path once loaded.

    ``mask`` (optional) is a greyscale or RGBA image of the photo's size whose pixels above half (alpha
    for RGBA, unless it is opaque everywhere) are the object, or what to keep; without one, a photo with an
    alpha channel that is not opaque everywhere is masked by its alpha (``backend.masks.capture_mask``).
    """

    name: str
    image: Path
    camera: Camera | None = None
    mask: Path | None = None


@dataclass(frozen=True)
class TrajectoryFrame:
    """One camera of the animated trajectory at a Blender frame number."""

    frame: int
    camera: Camera


def _registered_names() -> dict[str, list[str]]:
    """The values the open-choices settings may take in this backend: ``generator``, the generator registry's
    names. Empty where the generators are not installed: the Blender extension bundles only the scene
    readers (scripts/build_extension.py), and the service that takes the job checks the name."""
    try:
        from backend.generators import GENERATORS
    except ModuleNotFoundError as err:
        if err.name != "backend.generators":
            raise
        return {}
    return {"generator": GENERATORS.names()}


def _settings_from_json(cls, d: Any, path: str = "settings", *, registered: bool = True) -> Settings:
    """Settings from a scene.json/wire map (missing names take defaults). Raises SceneError naming the field.
    ``registered``: check the generator against this backend's registry (False: a client's, whose service
    checks it against its own)."""
    try:
        return cls(**check_settings(d, path, _registered_names() if registered else {}))
    except SettingError as err:
        raise SceneError(str(err)) from None


def _settings_to_json(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in fields(self)}


_PY_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "enum": str}

# Per-job settings a user picks (Blender sidebar, CLI or scene.json): one field per row of
# protocol.settings.SETTINGS (name, default and rule live there). A CPU's default time budget plans within them.
Settings = make_dataclass(
    "Settings",
    [(s.name, _PY_TYPES[s.kind], field(default=s.default)) for s in SETTINGS],
    frozen=True,
    namespace={"from_json": classmethod(_settings_from_json), "to_json": _settings_to_json},
)
Settings.__module__ = __name__  # make_dataclass takes module= only from Python 3.12
Settings.__doc__ = "Per-job settings, one field per row of ``protocol.settings.SETTINGS``."


@dataclass(frozen=True)
class Scene:
    """A loaded, checked scene. Image paths are absolute."""

    root: Path
    captures: list[Capture]
    trajectory: list[TrajectoryFrame] = field(default_factory=list)
    heldout: list[Capture] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)

    @property
    def has_all_cameras(self) -> bool:
        return all(c.camera is not None for c in self.captures)


def look_at(eye, target=(0.0, 0.0, 0.0), down=(0.0, -1.0, 0.0)) -> np.ndarray:
    """OpenCV world-to-camera of a camera at ``eye`` looking at ``target``.

    Args:
        eye, target: world points. [3]
        down: the world direction that points down in the image (OpenCV y); default world -y,
            so world +y is up in the image; one along the view gives any roll. [3]
    Returns:
        w2c: world-to-camera, OpenCV (x right, y down, z forward). float64 [4, 4]

    Example::

        w2c = look_at((0.0, 0.0, -3.0))   # on -z, looking at the origin
    """
    eye, target, down = (np.asarray(v, dtype=np.float64) for v in (eye, target, down))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(down, z)
    if np.linalg.norm(x) < 1e-6:  # ``down`` along the view: a right axis square to it, any
        x = np.cross(np.eye(3)[int(np.argmin(np.abs(z)))], z)
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = -R @ eye
    return w2c


# ----------------------------------------------------------------------------------------------
# Checking

# The keys each object of scene.json may hold (what the readers below read, and scene_to_json writes).
SCENE_KEYS = ("version", "captures", "trajectory", "heldout", "settings")
CAPTURE_KEYS = ("name", "image", "mask", "camera")  # captures and heldout entries
TRAJECTORY_KEYS = ("frame", "camera")
CAMERA_KEYS = ("w2c", "K", "width", "height", "distortion")
DISTORTION_KEYS = ("model", "params")


def _refuse_unknown(d: dict[str, Any], known: tuple[str, ...], path: str) -> None:
    """Raise SceneError for a key of ``d`` not in ``known`` (a typo would otherwise be silently ignored):
    ``captures[0].camrea: unknown field; known: name, image, mask, camera``."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise SceneError(f"{where}: unknown field; known: {', '.join(known)}")


def _matrix(value: Any, shape: tuple[int, int], path: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SceneError(f"{path}: must be a {shape[0]}x{shape[1]} matrix of numbers; {err}") from None
    if arr.shape != shape:
        raise SceneError(f"{path}: must be a {shape[0]}x{shape[1]} matrix; got shape {arr.shape}")
    for i, row in enumerate(value):  # JSON numbers only: numpy reads "1.5" and true as numbers too
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SceneError(f"{path}[{i}][{j}]: must be a number; got {v!r}")
    if not np.all(np.isfinite(arr)):
        raise SceneError(f"{path}: holds NaN or infinity")
    return arr


def check_camera_arrays(w2c: np.ndarray, K: np.ndarray, width: int, height: int, path: str) -> None:
    """Check a camera's numbers; raise SceneError naming ``path`` and the rule broken."""
    if not np.all(np.isfinite(w2c)):
        raise SceneError(f"{path}.w2c: holds NaN or infinity")
    if not np.all(np.isfinite(K)):
        raise SceneError(f"{path}.K: holds NaN or infinity")
    if not np.allclose(w2c[3], [0, 0, 0, 1], atol=1e-9):
        raise SceneError(f"{path}.w2c: last row must be [0, 0, 0, 1]; got {w2c[3].tolist()}")
    R = w2c[:3, :3]
    ortho = float(np.abs(R.T @ R - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if ortho > ROTATION_TOL or abs(det - 1.0) > ROTATION_TOL:
        raise SceneError(
            f"{path}.w2c: top-left 3x3 must be a rotation (R^T R = I, det R = 1); "
            f"got |R^T R - I| = {ortho:.2g}, det = {det:.4g}"
        )
    fx, fy = K[0, 0], K[1, 1]
    if fx <= 0 or fy <= 0:
        raise SceneError(f"{path}.K: focal lengths must be positive; got fx={fx:g}, fy={fy:g}")
    if K[1, 0] != 0 or K[2, 0] != 0 or K[2, 1] != 0 or K[2, 2] != 1:
        raise SceneError(f"{path}.K: must be upper triangular with K[2,2] = 1; got {K.tolist()}")
    for key, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 65536:
            raise SceneError(f"{path}.{key}: must be an integer in [1, 65536]; got {v!r}")


def camera_from_json(d: Any, path: str, *, allow_distortion: bool) -> Camera:
    if not isinstance(d, dict):
        raise SceneError(f"{path}: must be an object with w2c, K, width, height; got {type(d).__name__}")
    for key in ("w2c", "K", "width", "height"):
        if key not in d:
            raise SceneError(f"{path}.{key}: missing")
    _refuse_unknown(d, CAMERA_KEYS, path)
    w2c = _matrix(d["w2c"], (4, 4), f"{path}.w2c")
    K = _matrix(d["K"], (3, 3), f"{path}.K")
    width, height = d["width"], d["height"]
    check_camera_arrays(w2c, K, width, height, path)
    distortion = None
    if d.get("distortion") is not None:
        if not allow_distortion:
            raise SceneError(f"{path}.distortion: only captures may have lens distortion")
        distortion = distortion_from_json(d["distortion"], f"{path}.distortion")
    return Camera(w2c=w2c, K=K, width=int(width), height=int(height), distortion=distortion)


def distortion_from_json(d: Any, path: str) -> Distortion:
    if not isinstance(d, dict) or "model" not in d:
        raise SceneError(f"{path}: must be an object with model and params")
    _refuse_unknown(d, DISTORTION_KEYS, path)
    model = d["model"]
    if model not in DISTORTION_PARAMS:
        raise SceneError(f"{path}.model: unknown model {model!r}; known: {', '.join(DISTORTION_PARAMS)}")
    params = d.get("params", [])
    if not isinstance(params, list) or len(params) != DISTORTION_PARAMS[model]:
        coeffs = " ".join(DISTORTION_COEFFS[model]) or "none"
        raise SceneError(
            f"{path}.params: {model} takes {DISTORTION_PARAMS[model]} numbers ({coeffs}: the distortion coefficients "
            f"alone, the focal length and principal point go in K); got {params!r}"
        )
    values = []
    for i, v in enumerate(params):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SceneError(f"{path}.params[{i}]: must be a finite number; got {v!r}")
        values.append(float(v))
    return Distortion(model=model, params=tuple(values))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG or JPEG, read from its header (protocol.images: no PIL, so it runs in Blender)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        _, width, height = encoded_image_size(data)
    except ValueError as err:
        raise SceneError(f"{Path(path).name}: {err}") from None
    return width, height


def _capture_from_json(d: Any, root: Path, path: str, *, need_camera: bool) -> Capture:
    if not isinstance(d, dict):
        raise SceneError(f"{path}: must be an object with name and image; got {type(d).__name__}")
    _refuse_unknown(d, CAPTURE_KEYS, path)
    image = d.get("image")
    if not isinstance(image, str) or not image:
        raise SceneError(f"{path}.image: missing or not a string")
    image_path = (root / image).resolve()
    if image_path.suffix.lower() not in IMAGE_SUFFIXES:
        raise SceneError(f"{path}.image: must be a PNG or JPEG file; got {image!r}")
    if not image_path.is_file():
        raise SceneError(f"{path}.image: file not found: {image_path}")
    name = d.get("name", Path(image).stem)
    if not isinstance(name, str) or not name:
        raise SceneError(f"{path}.name: must be a non-empty string")
    camera = None
    if d.get("camera") is not None:
        camera = camera_from_json(d["camera"], f"{path}.camera", allow_distortion=True)
        try:
            size = image_size(image_path)
        except Exception as err:  # PIL raises several types for unreadable files
            raise SceneError(f"{path}.image: cannot read {image_path.name}: {err}") from None
        if size != (camera.width, camera.height):
            raise SceneError(
                f"{path}.camera: size {camera.width}x{camera.height} does not match the image "
                f"{image_path.name}, which is {size[0]}x{size[1]}"
            )
    elif need_camera:
        raise SceneError(f"{path}.camera: missing")
    mask_path = None
    if d.get("mask") is not None:
        mask = d["mask"]
        if not isinstance(mask, str) or not mask:
            raise SceneError(f"{path}.mask: must be a path string; got {mask!r}")
        mask_path = (root / mask).resolve()
        if mask_path.suffix.lower() not in IMAGE_SUFFIXES:
            raise SceneError(f"{path}.mask: must be a PNG or JPEG file; got {mask!r}")
        if not mask_path.is_file():
            raise SceneError(f"{path}.mask: file not found: {mask_path}")
        try:
            mask_size, image_wh = image_size(mask_path), image_size(image_path)
        except Exception as err:  # PIL raises several types for unreadable files
            raise SceneError(f"{path}.mask: cannot read {mask_path.name}: {err}") from None
        if mask_size != image_wh:
            raise SceneError(
                f"{path}.mask: {mask_path.name} is {mask_size[0]}x{mask_size[1]}; "
                f"the image is {image_wh[0]}x{image_wh[1]}"
            )
    return Capture(name=name, image=image_path, camera=camera, mask=mask_path)


def scene_from_json(data: Any, root: Path, *, registered: bool = True) -> Scene:
    """Check and build a Scene from parsed scene.json; image paths resolve against ``root``; ``registered``:
    as in ``Settings.from_json``."""
    if not isinstance(data, dict):
        raise SceneError(f"scene.json: must hold an object; got {type(data).__name__}")
    version = data.get("version")
    if isinstance(version, bool) or version != SCENE_FORMAT_VERSION:  # true == 1 in Python
        raise SceneError(f"version: scene format version must be {SCENE_FORMAT_VERSION}; got {version!r}")
    _refuse_unknown(data, SCENE_KEYS, "")
    captures_json = data.get("captures")
    if not isinstance(captures_json, list) or not captures_json:
        raise SceneError("captures: must be a non-empty list")
    traj_json = data.get("trajectory") or []
    if not isinstance(traj_json, list):
        raise SceneError("trajectory: must be a list")
    heldout_json = data.get("heldout") or []
    if not isinstance(heldout_json, list):
        raise SceneError("heldout: must be a list")
    problems: list[str] = []  # every item's, so that a scene with several bad items hears of all of them

    def each(items: list[Any], key: str, build: Callable[[Any, str], Any]) -> list[Any]:
        built = []
        for i, item in enumerate(items):
            try:
                built.append(build(item, f"{key}[{i}]"))
            except SceneError as err:
                problems.extend(err.problems)
        return built

    captures = each(captures_json, "captures", lambda c, p: _capture_from_json(c, root, p, need_camera=False))
    trajectory = each(traj_json, "trajectory", _trajectory_frame_from_json)
    heldout = each(heldout_json, "heldout", lambda c, p: _capture_from_json(c, root, p, need_camera=True))
    if problems:
        raise SceneError.of(problems)
    names = [c.name for c in captures]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SceneError(f"captures: names must be unique; {dup!r} appears twice")
    frames = [t.frame for t in trajectory]
    if frames != sorted(set(frames)):
        raise SceneError("trajectory: frame numbers must increase strictly")
    _check_trajectory_shape(trajectory)
    _check_frame(captures, trajectory)
    settings = Settings.from_json(data.get("settings"), registered=registered)
    return Scene(root=root.resolve(), captures=captures, trajectory=trajectory, heldout=heldout, settings=settings)


def same_shape(width: int, height: int, other_width: float, other_height: float) -> bool:
    """Whether two image sizes have one aspect ratio, each side rounded to whole pixels (a size scaled down and
    rounded, either way round): |w h0 - h w0| within half the four sides' sum."""
    return abs(width * other_height - height * other_width) <= (width + height + other_width + other_height) / 2


def _check_trajectory_shape(trajectory: list[TrajectoryFrame]) -> None:
    """Every trajectory camera of the first's shape: the loop renders every frame at one working size, so a frame of
    another shape was squeezed into it (a 30x90 frame behind a 100x20 one: fx/fy 2.8), with no word."""
    if not trajectory:
        return
    first = trajectory[0].camera
    for i, t in enumerate(trajectory):
        w, h = t.camera.width, t.camera.height
        if not same_shape(w, h, first.width, first.height):
            raise SceneError(
                f"trajectory[{i}].camera: {w}x{h} is another shape than trajectory[0]'s {first.width}x{first.height}; "
                "the loop renders every frame at one size: give the trajectory's cameras one aspect ratio"
            )


def _trajectory_frame_from_json(t: Any, p: str) -> TrajectoryFrame:
    if not isinstance(t, dict):
        raise SceneError(f"{p}: must be an object with frame and camera")
    _refuse_unknown(t, TRAJECTORY_KEYS, p)
    frame = t.get("frame")
    if isinstance(frame, bool) or not isinstance(frame, int):
        raise SceneError(f"{p}.frame: must be an integer; got {frame!r}")
    return TrajectoryFrame(frame=frame, camera=camera_from_json(t.get("camera"), f"{p}.camera", allow_distortion=False))


def _check_frame(captures: list[Capture], trajectory: list[TrajectoryFrame]) -> None:
    """Refuse a trajectory that would not share the captures' frame: where captures lack cameras, SfM places them
    in a frame of its own and aligns it to the scene's only through SIM_MIN_CAMERAS given ones or more; with
    fewer, the trajectory's cameras would not be where the photos are. (Held-out views are scored only by the
    evaluation, which needs every capture's camera and says so.)"""
    given = sum(c.camera is not None for c in captures)
    if trajectory and given < len(captures) and given < SIM_MIN_CAMERAS:
        raise SceneError(
            f"trajectory: {given} of the {len(captures)} captures have cameras; SfM places the others in a frame of "
            f"its own, aligned to the scene's only through {SIM_MIN_CAMERAS} given cameras or more, so the "
            f"trajectory's cameras would not be where the photos are: give {SIM_MIN_CAMERAS} or more captures their "
            "cameras, or send no trajectory (the service then makes a path through the captures)"
        )


def load_scene(folder: str | os.PathLike, *, registered: bool = True) -> Scene:
    """Load and check ``folder/scene.json`` (or the scene.json file given). Raises SceneError (field path
    + reason); a folder without scene.json gets told how to make one (:func:`_no_scene_json`).
    ``registered``: as in ``Settings.from_json`` (``reconloop submit`` leaves the generator to the service)."""
    given = Path(folder)
    if not given.exists():
        raise SceneError(f"{given}: no such {'file' if given.name == SCENE_FILE else 'folder'}")
    if given.is_file() and given.suffix.lower() != ".json":  # a photo or a dataset's file: not read as JSON
        raise SceneError(f"{given}: is a file; a scene is a folder with {SCENE_FILE} (or the path of its {SCENE_FILE})")
    path = given / SCENE_FILE if given.is_dir() else given
    root = path.parent
    if not path.is_file():
        raise SceneError(_no_scene_json(root))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SceneError(f"scene.json: not valid JSON: {err}") from None
    return scene_from_json(data, root, registered=registered)


def _no_scene_json(folder: Path) -> str:
    """What to say of a folder without scene.json: how to import the dataset it holds, or how to list its
    photos so that the loop estimates their cameras."""
    from backend.formats import detect_format  # backend.formats imports this module
    from backend.formats.base import list_images

    problem = f"scene.json: not found in {folder}"
    try:
        fmt = detect_format(folder)
    except SceneError:
        pass
    else:
        return (
            f"{problem}; it holds a dataset in the {fmt} format: make a scene of it with "
            f"reconloop import {fmt} {folder} DST"
        )

    # the photos in the folder, else in the first folder below, two levels at most, that holds any (images/,
    # a camera card's DCIM/100CANON/); hidden folders (.thumbnails/, a NAS's @eaDir/) are not looked in
    def below(where: Path) -> list[Path]:
        return sorted(p for p in where.iterdir() if p.is_dir() and not p.name.startswith((".", "@")))

    children = below(folder)
    for where in [folder, *children, *(g for c in children for g in below(c))]:
        photos = [p.relative_to(folder).as_posix() for p in list_images(where)]
        if photos:
            break
    else:
        return problem
    inside = "" if where == folder else f" (in {where.relative_to(folder).as_posix()}/)"
    listed = ", ".join(json.dumps({"image": name}) for name in photos[:2]) + (", ..." if len(photos) > 2 else "")
    return (
        f"{problem}; for its {len(photos)} photos{inside}, write one that lists them without a camera "
        f'({{"version": 1, "captures": [{listed}]}}) and the loop estimates their cameras (SfM)'
    )


def relative_posix(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to ``root`` with forward slashes, as scene.json holds it on every OS (Windows' backslashes
    are one file name on Linux); absolute where no relative path exists (Windows: another drive)."""
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # "path is on mount 'D:', start on mount 'C:'"
        return Path(path).resolve().as_posix()


def scene_to_json(scene: Scene, root: Path | None = None) -> dict[str, Any]:
    """The scene.json object; image paths are written relative to ``root`` (default scene.root)."""
    root = Path(root or scene.root).resolve()

    def cap(c: Capture) -> dict[str, Any]:
        out: dict[str, Any] = {"name": c.name, "image": relative_posix(c.image, root)}
        if c.mask is not None:
            out["mask"] = relative_posix(c.mask, root)
        if c.camera is not None:
            out["camera"] = c.camera.to_json()
        return out

    data: dict[str, Any] = {"version": SCENE_FORMAT_VERSION, "captures": [cap(c) for c in scene.captures]}
    if scene.trajectory:
        data["trajectory"] = [{"frame": t.frame, "camera": t.camera.to_json()} for t in scene.trajectory]
    if scene.heldout:
        data["heldout"] = [cap(c) for c in scene.heldout]
    data["settings"] = scene.settings.to_json()
    return data


def save_scene(scene: Scene, folder: str | os.PathLike) -> Path:
    """Write ``folder/scene.json`` (atomically) pointing at the scene's images. Returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SCENE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(scene_to_json(scene, folder), indent=1))
    os.replace(tmp, path)
    return path
