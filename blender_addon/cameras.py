"""Blender camera <-> OpenCV camera, from plain values (DESIGN.md section 3).

Pure Python + numpy: nothing here imports bpy, so tests run it without Blender and the formulas can be
checked against Blender's own ``bpy_extras.object_utils.world_to_camera_view``.

Conventions:
    * OpenCV/COLMAP: world-to-camera 4x4 (x right, y down, z forward); K in pixels, pixel i spans
      [i, i+1] (its centre is i + 0.5); width and height in pixels.
    * Blender: camera objects look down -Z with +Y up; ``matrix_world`` may carry scale, which the
      projection ignores (a positive scale per axis; a shear or a mirror is refused: :func:`unscaled`).

Blender to OpenCV::

    W = resolution_x * pct // 100 ; H = resolution_y * pct // 100 ; ycor = pixel_aspect_y / pixel_aspect_x
    sensor  = sensor_height if sensor_fit == 'VERTICAL' else sensor_width
    horiz   = sensor_fit == 'HORIZONTAL' or (sensor_fit == 'AUTO' and pixel_aspect_x*W >= pixel_aspect_y*H)
    viewfac = W if horiz else ycor * H
    fx = lens * viewfac / sensor ; fy = fx / ycor
    cx = W/2 - shift_x * viewfac ; cy = H/2 + shift_y * viewfac / ycor
    w2c_cv = inverse(c2w_gl @ diag(1, -1, -1, 1)),  c2w_gl = matrix_world without scale

W and H are whole pixels, as Blender's renderer computes them (``RE_InitState``: size * pct / 100 in
integers); ``Camera.view_frame`` keeps the fraction, so for a render size with a fraction (1921 at 50 %)
the two differ by up to half a pixel, and the renderer is what the photos match.

Example::

    >>> import numpy as np
    >>> p = BlenderCameraParams(matrix_world=np.eye(4), lens_mm=50.0)
    >>> cam = opencv_from_blender(p)
    >>> round(float(cam.K[0, 0]), 3), cam.width, cam.height
    (2666.667, 1920, 1080)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocol.errors import listed

SENSOR_FITS = ("AUTO", "HORIZONTAL", "VERTICAL")
FRAME_METHODS = ("STRETCH", "FIT", "CROP")
PERCENT = 100  # resolution_percentage is in percent
# Blender's camera axes (-Z forward, +Y up) to OpenCV's (+Z forward, +Y down): flip y and z.
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
DEFAULT_SENSOR_WIDTH_MM = 36.0  # Blender's default sensor width
DEFAULT_SENSOR_HEIGHT_MM = 24.0
# Blender clamps pixel_aspect_x/y to [1, 200]; we pick the larger one as the one above 1.
PIXEL_ASPECT_MIN = 1.0
PIXEL_ASPECT_MAX = 200.0
ROTATION_TOL = 1e-4  # |R^T R - I| allowed in a world-to-camera rotation


class CameraConversionError(ValueError):
    """A camera that cannot be converted; the message names the field, the rule and the value."""


@dataclass(frozen=True)
class BlenderCameraParams:
    """The Blender values that fix a perspective camera's projection, read from bpy or written to it.

    Attributes:
        matrix_world: the camera object's world matrix (may hold scale). float64 [4, 4]
        lens_mm: focal length in millimetres (``Camera.lens``).
        sensor_width_mm, sensor_height_mm: ``Camera.sensor_width`` / ``sensor_height``.
        sensor_fit: 'AUTO', 'HORIZONTAL' or 'VERTICAL'.
        shift_x, shift_y: lens shift, in units of the larger/fitted frame side (``Camera.shift_x``).
        resolution_x, resolution_y, resolution_percentage: the scene's render size.
        pixel_aspect_x, pixel_aspect_y: the scene's pixel aspect.
    """

    matrix_world: np.ndarray = field(default_factory=lambda: np.eye(4))
    lens_mm: float = 50.0
    sensor_width_mm: float = DEFAULT_SENSOR_WIDTH_MM
    sensor_height_mm: float = DEFAULT_SENSOR_HEIGHT_MM
    sensor_fit: str = "AUTO"
    shift_x: float = 0.0
    shift_y: float = 0.0
    resolution_x: int = 1920
    resolution_y: int = 1080
    resolution_percentage: int = 100
    pixel_aspect_x: float = 1.0
    pixel_aspect_y: float = 1.0


@dataclass(frozen=True)
class OpenCVCamera:
    """A pinhole camera in the wire convention (DESIGN.md section 3).

    Attributes:
        w2c: world-to-camera, OpenCV (x right, y down, z forward). float64 [4, 4]
        K: intrinsics in pixels, pixel i spans [i, i+1]. float64 [3, 3]
        width, height: image size in pixels.
    """

    w2c: np.ndarray
    K: np.ndarray
    width: int
    height: int

    def to_wire(self) -> dict:
        """The ``camera`` map of the protocol: w2c float32 [4, 4], K float32 [3, 3], width, height."""
        return {
            "w2c": np.ascontiguousarray(self.w2c, dtype=np.float32),
            "K": np.ascontiguousarray(self.K, dtype=np.float32),
            "width": int(self.width),
            "height": int(self.height),
        }

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project world points.

        Args:
            xyz: world points. float [N, 3]
        Returns:
            (uv, depth): pixel coordinates (pixel i spans [i, i+1]) [N, 2] and camera z [N].
        """
        xyz = np.asarray(xyz, dtype=np.float64)
        cam = xyz @ self.w2c[:3, :3].T + self.w2c[:3, 3]
        uvw = cam @ self.K.T
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = uvw[:, :2] / uvw[:, 2:3]
        return uv, cam[:, 2]


def render_size(p: BlenderCameraParams) -> tuple[int, int]:
    """(W, H) of the render in pixels, as Blender computes it (integer percentage of the resolution)."""
    return (
        int(p.resolution_x) * int(p.resolution_percentage) // PERCENT,
        int(p.resolution_y) * int(p.resolution_percentage) // PERCENT,
    )


def _check_params(p: BlenderCameraParams) -> None:
    if p.sensor_fit not in SENSOR_FITS:
        raise CameraConversionError(f"sensor_fit must be one of {', '.join(SENSOR_FITS)}; got {p.sensor_fit!r}")
    for name in ("lens_mm", "sensor_width_mm", "sensor_height_mm", "pixel_aspect_x", "pixel_aspect_y"):
        v = float(getattr(p, name))
        if not np.isfinite(v) or v <= 0:
            raise CameraConversionError(f"{name} must be a positive number; got {v!r}")
    w, h = render_size(p)
    if w < 1 or h < 1:
        raise CameraConversionError(
            f"render size must be at least 1x1 pixels; got {w}x{h} "
            f"({p.resolution_x}x{p.resolution_y} at {p.resolution_percentage}%)"
        )
    m = np.asarray(p.matrix_world, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise CameraConversionError(f"matrix_world must be a finite 4x4 matrix; got shape {m.shape}")


def intrinsics_from_blender(p: BlenderCameraParams) -> tuple[np.ndarray, int, int]:
    """K and image size of a Blender camera at the scene's render size.

    Returns:
        (K, W, H): K in pixels, pixel i spans [i, i+1]. float64 [3, 3]
    """
    _check_params(p)
    W, H = render_size(p)
    ycor = p.pixel_aspect_y / p.pixel_aspect_x
    sensor = p.sensor_height_mm if p.sensor_fit == "VERTICAL" else p.sensor_width_mm
    is_horizontal = p.sensor_fit == "HORIZONTAL" or (
        p.sensor_fit == "AUTO" and p.pixel_aspect_x * W >= p.pixel_aspect_y * H
    )
    viewfac = W if is_horizontal else ycor * H
    fx = p.lens_mm * viewfac / sensor
    fy = fx / ycor
    cx = W / 2.0 - p.shift_x * viewfac
    cy = H / 2.0 + p.shift_y * viewfac / ycor
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    return K, W, H


def unscaled(matrix_world: np.ndarray) -> np.ndarray:
    """``matrix_world`` with the scale of each axis removed (columns of the 3x3 normalised, as Blender's camera
    does before it inverts the matrix into the view). [4, 4]

    Raises:
        CameraConversionError: where what is left is not a rotation, which no pinhole camera can follow: a
            parent's non-uniform scale with a rotation between them shears the camera's axes (Blender renders
            through the skewed frame), or a negative scale on the camera or a parent mirrors them.
    """
    m = np.array(matrix_world, dtype=np.float64)
    norms = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(norms <= 0):
        raise CameraConversionError(f"matrix_world has a zero scale on an axis; column norms {norms.tolist()}")
    m[:3, :3] /= norms
    R = m[:3, :3]
    shear = float(np.abs(R.T @ R - np.eye(3)).max())
    if shear > ROTATION_TOL:
        raise CameraConversionError(
            f"its axes are sheared (|R^T R - I| = {shear:.2g}): a parent's non-uniform scale with a rotation between "
            "them skews the view, which no photo's camera has; apply the parent's scale (Object > Apply > Scale) or "
            "make it uniform"
        )
    if np.linalg.det(R) < 0:
        raise CameraConversionError(
            "its axes are mirrored: a negative scale on the camera or a parent flips the view, which no photo's "
            "camera does; make the scale positive (rotate the camera instead)"
        )
    return m


def w2c_from_matrix_world(matrix_world: np.ndarray) -> np.ndarray:
    """OpenCV world-to-camera from a Blender camera object's world matrix (scale ignored).

    Args:
        matrix_world: Blender camera-to-world (looks down -Z, +Y up), may hold scale. [4, 4]
    Returns:
        w2c: world-to-camera, OpenCV. float64 [4, 4]
    """
    c2w_gl = unscaled(matrix_world)
    c2w_cv = c2w_gl @ GL_TO_CV
    R = c2w_cv[:3, :3]
    t = c2w_cv[:3, 3]
    w2c = np.eye(4)
    w2c[:3, :3] = R.T
    w2c[:3, 3] = -R.T @ t
    return w2c


def matrix_world_from_w2c(w2c: np.ndarray) -> np.ndarray:
    """Blender camera object's world matrix (no scale) from an OpenCV world-to-camera. [4, 4]"""
    w2c = np.asarray(w2c, dtype=np.float64)
    if w2c.shape != (4, 4):
        raise CameraConversionError(f"w2c must be [4, 4]; got {w2c.shape}")
    R = w2c[:3, :3]
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    if err > ROTATION_TOL or abs(float(np.linalg.det(R)) - 1.0) > ROTATION_TOL:
        raise CameraConversionError(f"w2c: top-left 3x3 must be a rotation; got |R^T R - I| = {err:.2g}")
    c2w_cv = np.eye(4)
    c2w_cv[:3, :3] = R.T
    c2w_cv[:3, 3] = -R.T @ w2c[:3, 3]
    return c2w_cv @ GL_TO_CV


def opencv_from_blender(p: BlenderCameraParams) -> OpenCVCamera:
    """The OpenCV camera (at the render size) of a Blender camera, by the formulas of DESIGN.md 3."""
    K, W, H = intrinsics_from_blender(p)
    return OpenCVCamera(w2c=w2c_from_matrix_world(p.matrix_world), K=K, width=W, height=H)


def blender_from_opencv(
    w2c: np.ndarray,
    K: np.ndarray,
    width: int,
    height: int,
    *,
    sensor_width_mm: float = DEFAULT_SENSOR_WIDTH_MM,
) -> BlenderCameraParams:
    """Blender values that reproduce an OpenCV camera exactly (the inverse of opencv_from_blender).

    Uses sensor fit 'HORIZONTAL' (so the frame width holds the sensor width), the pixel aspect for
    fx != fy and the lens shift for an off-centre principal point. Skew must be zero.

    Args:
        w2c: world-to-camera, OpenCV. [4, 4]
        K: intrinsics in pixels, pixel i spans [i, i+1]. [3, 3]
        width, height: image size in pixels.
    """
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise CameraConversionError(f"K must be [3, 3]; got {K.shape}")
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    if fx <= 0 or fy <= 0:
        raise CameraConversionError(f"K: focal lengths must be positive; got fx={fx:g}, fy={fy:g}")
    if K[0, 1] != 0:
        raise CameraConversionError(f"K: Blender cameras have no skew; got K[0,1]={K[0, 1]:g}")
    if int(width) < 1 or int(height) < 1:
        raise CameraConversionError(f"width and height must be positive; got {width}x{height}")
    W, H = int(width), int(height)
    ycor = fx / fy  # fy = fx / ycor
    if ycor >= PIXEL_ASPECT_MIN:
        aspect_x, aspect_y = PIXEL_ASPECT_MIN, ycor
    else:
        aspect_x, aspect_y = 1.0 / ycor, PIXEL_ASPECT_MIN
    if max(aspect_x, aspect_y) > PIXEL_ASPECT_MAX:
        raise CameraConversionError(f"K: fx/fy = {ycor:g} is beyond Blender's pixel aspect range")
    viewfac = float(W)  # sensor fit HORIZONTAL
    return BlenderCameraParams(
        matrix_world=matrix_world_from_w2c(w2c),
        lens_mm=fx * sensor_width_mm / viewfac,
        sensor_width_mm=sensor_width_mm,
        sensor_height_mm=sensor_width_mm * H / W,
        sensor_fit="HORIZONTAL",
        shift_x=(W / 2.0 - cx) / viewfac,
        shift_y=(cy - H / 2.0) * ycor / viewfac,
        resolution_x=W,
        resolution_y=H,
        resolution_percentage=PERCENT,
        pixel_aspect_x=aspect_x,
        pixel_aspect_y=aspect_y,
    )


def image_intrinsics(
    K: np.ndarray,
    render_w: int,
    render_h: int,
    image_w: int,
    image_h: int,
    *,
    frame_method: str = "STRETCH",
    pixel_aspect_x: float = 1.0,
    pixel_aspect_y: float = 1.0,
    image_aspect: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """K of a camera background photo, from the camera's K at the render size.

    Blender draws a camera's background image into the camera frame: 'STRETCH' fills it, 'FIT' scales
    the photo (its pixels ``image_aspect`` wide and high: ``Image.display_aspect``, square for most photos)
    to fit inside the displayed frame (render size times pixel aspect), 'CROP' to cover it, both centred.
    Image offset, rotation, scale and flips must be at their defaults (the caller checks them).

    Args:
        K: intrinsics at the render size. [3, 3]
        render_w, render_h: render size in pixels.
        image_w, image_h: the photo's size in pixels.
        pixel_aspect_x, pixel_aspect_y: the render's pixel aspect.
        image_aspect: the photo's pixel aspect (x, y), both > 0.
    Returns:
        K of the photo, pixel i spans [i, i+1]. float64 [3, 3]
    """
    if frame_method not in FRAME_METHODS:
        raise CameraConversionError(f"frame_method must be one of {', '.join(FRAME_METHODS)}; got {frame_method!r}")
    K = np.asarray(K, dtype=np.float64)
    if frame_method == "STRETCH":
        sx, sy = image_w / render_w, image_h / render_h
        out = K.copy()
        out[0] *= sx
        out[1] *= sy
        return out
    image_ax, image_ay = (float(a) for a in image_aspect)
    if not (np.isfinite(image_ax) and np.isfinite(image_ay) and image_ax > 0 and image_ay > 0):
        raise CameraConversionError(f"image_aspect must be two positive numbers; got {tuple(image_aspect)!r}")
    disp_w, disp_h = render_w * pixel_aspect_x, render_h * pixel_aspect_y
    ratio_w, ratio_h = disp_w / (image_w * image_ax), disp_h / (image_h * image_ay)
    s = min(ratio_w, ratio_h) if frame_method == "FIT" else max(ratio_w, ratio_h)
    # render pixel u -> displayed x = u * aspect_x -> the photo's displayed x = image_w * image_ax / 2 +
    # (x - disp_w/2) / s -> its pixel = that / image_ax = image_w/2 + (x - disp_w/2) / (s * image_ax)
    ax, ay = pixel_aspect_x / (s * image_ax), pixel_aspect_y / (s * image_ay)
    out = np.array(
        [
            [K[0, 0] * ax, K[0, 1] * ax, image_w / 2.0 + (K[0, 2] - render_w / 2.0) * ax],
            [0.0, K[1, 1] * ay, image_h / 2.0 + (K[1, 2] - render_h / 2.0) * ay],
            [0.0, 0.0, 1.0],
        ]
    )
    return out


# Blender has one render size and one pixel aspect per scene: what cameras sharing a scene must agree on.
PIXEL_ASPECT_TOL_PX = 0.01  # largest shift (pixels, at the image border) from sharing another camera's fx/fy
STRETCH_TOL_PX = 1.0  # a photo stretched into the camera frame may differ in shape by this much (render px)


def render_conflicts(cams) -> str | None:
    """Why cameras cannot share one scene's render size and pixel aspect, or None when they can.

    Args:
        cams: (name, K [3, 3], width, height) of each camera, the first one setting the render.
    Returns:
        A sentence naming the cameras whose (width, height, fx/fy) differ from the first one's.
    """
    first, bad = None, []
    for name, K, width, height in cams:
        ratio = float(K[0, 0]) / float(K[1, 1])
        if first is None:
            first = (name, int(width), int(height), ratio)
            continue
        drift_px = abs(ratio / first[3] - 1.0) * max(int(width), int(height)) / 2.0
        if (int(width), int(height)) != first[1:3] or drift_px > PIXEL_ASPECT_TOL_PX:
            bad.append(f"{name!r} ({int(width)}x{int(height)}, fx/fy {ratio:.6g})")
    if not bad:
        return None
    return (
        f"{len(bad)} camera(s) differ in image size or fx/fy from the first, {first[0]!r} "
        f"({first[1]}x{first[2]}, fx/fy {first[3]:.6g}): {listed(bad, 5, ', ')}. A Blender scene has "
        "one render size and one pixel aspect, so these cameras would get wrong intrinsics; import cameras "
        "of one image size and fx/fy at a time (e.g. into separate scenes), or resize the photos to one size"
    )


def stretch_mismatch_px(render_w: int, render_h: int, image_w: int, image_h: int) -> float:
    """How far (render pixels, along the side that fits best) a photo's shape is from the render's:
    0 when the photo has the render's width:height, so that 'STRETCH' scales it evenly."""
    return abs(render_w * image_h - render_h * image_w) / max(image_w, image_h)
