"""The add-on's pure helpers (camera maths, payload, results), without bpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blender_addon import cameras as cam_math
from blender_addon import scene_io
from blender_addon.errors import ReconLoopError

REPO = Path(__file__).resolve().parents[1]


def test_pure_modules_do_not_import_bpy():
    code = (
        "import sys\n"
        "import blender_addon, blender_addon.cameras, blender_addon.scene_io, blender_addon.errors, blender_addon.connection\n"
        "bad = sorted(m for m in sys.modules if m == 'bpy' or m.startswith(('bpy.', 'mathutils', 'torch')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, f"pure modules imported {out.stdout.strip()} {out.stderr[-2000:]}"


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def test_default_camera_intrinsics():
    cam = cam_math.opencv_from_blender(cam_math.BlenderCameraParams())
    # 50 mm on a 36 mm sensor, 1920 wide: fx = 50 * 1920 / 36
    assert cam.K[0, 0] == pytest.approx(50 * 1920 / 36)
    assert cam.K[1, 1] == pytest.approx(cam.K[0, 0])
    assert (cam.K[0, 2], cam.K[1, 2]) == (960.0, 540.0)
    # Blender's camera at the identity looks down -Z: a point at z=-1 is in front (OpenCV z=+1).
    uv, depth = cam.project(np.array([[0.0, 0.0, -1.0]]))
    np.testing.assert_allclose(uv[0], [960, 540])
    assert depth[0] == pytest.approx(1.0)


def test_portrait_vertical_fit_shift():
    p = cam_math.BlenderCameraParams(resolution_x=480, resolution_y=640, sensor_fit="AUTO", shift_x=0.1, shift_y=-0.05)
    K, W, H = cam_math.intrinsics_from_blender(p)
    assert (W, H) == (480, 640)
    # AUTO on a portrait frame fits the sensor width to the height; shifts are in units of that side.
    assert K[0, 0] == pytest.approx(50 * 640 / 36)
    assert K[0, 2] == pytest.approx(240 - 0.1 * 640)
    assert K[1, 2] == pytest.approx(320 - 0.05 * 640)


@pytest.mark.parametrize("seed", range(8))
def test_opencv_blender_round_trip(seed):
    rng = np.random.default_rng(seed)
    w2c = np.eye(4)
    w2c[:3, :3] = _random_rotation(rng)
    w2c[:3, 3] = rng.normal(size=3)
    W, H = int(rng.integers(32, 2000)), int(rng.integers(32, 2000))
    fx = float(rng.uniform(100, 3000))
    fy = fx * float(rng.uniform(0.8, 1.25))
    K = np.array([[fx, 0, rng.uniform(0, W)], [0, fy, rng.uniform(0, H)], [0, 0, 1]])
    p = cam_math.blender_from_opencv(w2c, K, W, H)
    back = cam_math.opencv_from_blender(p)
    assert (back.width, back.height) == (W, H)
    np.testing.assert_allclose(back.K, K, atol=1e-6 * fx)
    np.testing.assert_allclose(back.w2c, w2c, atol=1e-9)


def test_scale_is_ignored():
    rng = np.random.default_rng(3)
    m = np.eye(4)
    m[:3, :3] = _random_rotation(rng)
    m[:3, 3] = [1, 2, 3]
    scaled = m.copy()
    scaled[:3, :3] = m[:3, :3] @ np.diag([2.0, 0.5, 3.0])
    np.testing.assert_allclose(cam_math.w2c_from_matrix_world(scaled), cam_math.w2c_from_matrix_world(m), atol=1e-12)


def test_a_sheared_or_mirrored_camera_is_refused():
    """A parent's non-uniform scale with a rotation between them shears the camera's axes, and a negative scale
    mirrors them: Blender renders through that frame (its view is the normalised matrix's inverse, 893 px from
    the transpose this module takes for a rotation), which no photo's camera has."""
    rng = np.random.default_rng(4)
    rot = np.eye(4)
    rot[:3, :3] = _random_rotation(rng)
    parent = np.diag([1.0, 3.0, 0.5, 1.0])
    with pytest.raises(cam_math.CameraConversionError, match="sheared.*Apply > Scale"):
        cam_math.w2c_from_matrix_world(parent @ rot)
    for flip in ([-1.0, 1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0]):
        with pytest.raises(cam_math.CameraConversionError, match="mirrored.*negative scale"):
            cam_math.w2c_from_matrix_world(rot @ np.diag(flip))
    cam_math.w2c_from_matrix_world(np.diag([2.0, 2.0, 2.0, 1.0]) @ rot)  # a uniform parent scale is a rotation


def test_image_intrinsics_fit_crop_stretch():
    K = np.array([[100.0, 0, 32], [0, 100.0, 24], [0, 0, 1]])
    # Same aspect: all three methods are a plain scale.
    for method in cam_math.FRAME_METHODS:
        np.testing.assert_allclose(cam_math.image_intrinsics(K, 64, 48, 640, 480, frame_method=method)[:2], K[:2] * 10)
    # A square photo in a 4:3 frame, FIT: the photo spans the frame's height, centred.
    Kf = cam_math.image_intrinsics(K, 64, 48, 480, 480, frame_method="FIT")
    np.testing.assert_allclose(Kf, [[1000, 0, 240], [0, 1000, 240], [0, 0, 1]])
    Kc = cam_math.image_intrinsics(K, 64, 48, 480, 480, frame_method="CROP")
    np.testing.assert_allclose(Kc, [[750, 0, 240], [0, 750, 240], [0, 0, 1]])

    # By hand, from how Blender draws the photo into the frame (render pixel u -> photo pixel x).
    # A 2:1 photo (960x480) in the 64x48 frame, principal point off centre (30, 20).
    K = np.array([[100.0, 0, 30], [0, 100.0, 20], [0, 0, 1]])
    # STRETCH: x = 15 u, y = 10 v.
    Ks = cam_math.image_intrinsics(K, 64, 48, 960, 480, frame_method="STRETCH")
    np.testing.assert_allclose(Ks, [[1500, 0, 450], [0, 1000, 200], [0, 0, 1]])
    # FIT: the photo spans the frame's width (15 px a render pixel), 32 render px high from v = 8:
    # x = 15 u, y = 15 (v - 8).
    Kf = cam_math.image_intrinsics(K, 64, 48, 960, 480, frame_method="FIT")
    np.testing.assert_allclose(Kf, [[1500, 0, 450], [0, 1500, 180], [0, 0, 1]])
    # CROP: the photo spans the frame's height (10 px a render pixel), 96 render px wide from u = -16:
    # x = 10 (u + 16), y = 10 v.
    Kc = cam_math.image_intrinsics(K, 64, 48, 960, 480, frame_method="CROP")
    np.testing.assert_allclose(Kc, [[1000, 0, 460], [0, 1000, 200], [0, 0, 1]])

    # Pixels twice as wide as high (pixel_aspect_x 2): the frame shows as 128x48, and K at the render
    # size has fx = fy / 2 (DESIGN.md: fy = fx / ycor, ycor = 1/2). The photo has square pixels.
    K = np.array([[50.0, 0, 30], [0, 100.0, 20], [0, 0, 1]])
    aspect = {"pixel_aspect_x": 2.0, "pixel_aspect_y": 1.0}
    # An 8:3 photo (1280x480) fills the shown frame exactly, whatever the method: 10 px a shown unit,
    # x = 10 * 2 u, y = 10 v; its own fx = fy, as square pixels must have.
    for method in cam_math.FRAME_METHODS:
        Km = cam_math.image_intrinsics(K, 64, 48, 1280, 480, frame_method=method, **aspect)
        np.testing.assert_allclose(Km, [[1000, 0, 600], [0, 1000, 200], [0, 0, 1]], err_msg=method)
    # A square photo (480x480), FIT: 10 px a shown unit, 48 units wide from 40 of the frame's 128:
    # x = 10 (2 u - 40), y = 10 v.
    Kf = cam_math.image_intrinsics(K, 64, 48, 480, 480, frame_method="FIT", **aspect)
    np.testing.assert_allclose(Kf, [[1000, 0, 200], [0, 1000, 200], [0, 0, 1]])
    # CROP: 480 px over the 128 shown units (3.75 px a unit), 128 units high from -40:
    # x = 3.75 * 2 u, y = 3.75 (v + 40).
    Kc = cam_math.image_intrinsics(K, 64, 48, 480, 480, frame_method="CROP", **aspect)
    np.testing.assert_allclose(Kc, [[375, 0, 225], [0, 375, 225], [0, 0, 1]])
    # Only the ratio of the two aspects matters.
    Kc2 = cam_math.image_intrinsics(K, 64, 48, 480, 480, frame_method="CROP", pixel_aspect_x=4.0, pixel_aspect_y=2.0)
    np.testing.assert_allclose(Kc2, Kc)


@pytest.mark.parametrize("method", ["FIT", "CROP"])
def test_a_photos_own_pixel_aspect_is_how_blender_draws_it(method):
    """An anamorphic photo (1440x1080 with ``Image.display_aspect`` 4/3 : 1) shows as a 1920x1080 one: its K is
    that photo's squeezed to 3/4 across (Blender's background image takes the photo's aspect as w * aspx / h *
    aspy; the 150 px the photo's own aspect moved it went unseen before)."""
    K = np.array([[1500.0, 0, 1000], [0, 1500.0, 500], [0, 0, 1]])
    square = cam_math.image_intrinsics(K, 2000, 1000, 1920, 1080, frame_method=method)
    anamorphic = cam_math.image_intrinsics(K, 2000, 1000, 1440, 1080, frame_method=method, image_aspect=(4 / 3, 1.0))
    np.testing.assert_allclose(anamorphic, np.diag([0.75, 1.0, 1.0]) @ square)
    with pytest.raises(cam_math.CameraConversionError, match="image_aspect"):
        cam_math.image_intrinsics(K, 2000, 1000, 1440, 1080, frame_method=method, image_aspect=(0.0, 1.0))


def test_bad_values_name_the_field():
    with pytest.raises(cam_math.CameraConversionError, match="sensor_fit must be one of"):
        cam_math.opencv_from_blender(cam_math.BlenderCameraParams(sensor_fit="DIAGONAL"))
    with pytest.raises(cam_math.CameraConversionError, match="lens_mm must be a positive number"):
        cam_math.opencv_from_blender(cam_math.BlenderCameraParams(lens_mm=0.0))
    with pytest.raises(cam_math.CameraConversionError, match="w2c: top-left 3x3 must be a rotation"):
        cam_math.matrix_world_from_w2c(np.diag([2.0, 1, 1, 1]))


PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6300010000050001"
    "0d0a2db40000000049454e44ae426082"
)


def _cam(w=64, h=48):
    return cam_math.OpenCVCamera(
        w2c=np.eye(4), K=np.array([[50.0, 0, w / 2], [0, 50, h / 2], [0, 0, 1]]), width=w, height=h
    )


def test_build_scene_payload():
    caps = [
        scene_io.CaptureInput("a", PNG_1x1, "png", _cam(1, 1)),
        scene_io.CaptureInput("b", PNG_1x1, "png", _cam(1, 1)),
    ]
    scene = scene_io.build_scene_payload(caps, [(1, _cam()), (3, _cam())], {"width": 64, "height": 48})
    assert [c["name"] for c in scene["captures"]] == ["a", "b"]
    assert scene["captures"][0]["image"].tobytes() == PNG_1x1
    assert scene["captures"][0]["camera"]["w2c"].dtype == np.float32
    assert scene["captures"][0]["camera"]["K"].shape == (3, 3)
    assert [t["frame"] for t in scene["trajectory"]] == [1, 3]
    assert scene["settings"] == {"width": 64, "height": 48}
    # The payload passes the protocol's own validator.
    from protocol.schemas import validate
    from protocol.version import SUPPORTED_VERSIONS

    validate({"v": max(SUPPORTED_VERSIONS), "op": "submit", "id": 1, "scene": scene}, "request")


def _png(pixels: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    return buf.tobytes()


def test_build_scene_payload_sends_each_capture_mask_file(tmp_path):
    """A capture's mask file goes as its bytes (uint8 [N], like the photo) under ``mask``; one without a mask
    has no ``mask`` key; the payload passes the protocol's validator."""
    mask = tmp_path / "masks" / "a.png"
    mask.parent.mkdir()
    mask.write_bytes(_png(np.full((1, 1), 255, np.uint8)))
    caps = [
        scene_io.CaptureInput("a", PNG_1x1, "png", _cam(1, 1), mask=str(mask)),
        scene_io.CaptureInput("b", PNG_1x1, "png", _cam(1, 1)),
    ]
    scene = scene_io.build_scene_payload(caps, [], {"geometry": "hull"})
    a, b = scene["captures"]
    assert a["mask"].dtype == np.uint8 and a["mask"].ndim == 1
    assert a["mask"].tobytes() == mask.read_bytes() and a["image"].tobytes() == PNG_1x1
    assert "mask" not in b
    from protocol.schemas import validate
    from protocol.version import SUPPORTED_VERSIONS

    validate({"v": max(SUPPORTED_VERSIONS), "op": "submit", "id": 1, "scene": scene}, "request")


def test_a_bad_mask_file_names_the_capture_and_the_file(tmp_path):
    def payload(mask):
        return scene_io.build_scene_payload([scene_io.CaptureInput("a", PNG_1x1, "png", _cam(1, 1), mask=mask)], [], {})

    gone = tmp_path / "gone.png"
    with pytest.raises(ReconLoopError, match=f"capture 'a': mask file not found: {gone}"):
        payload(str(gone))
    (tmp_path / "mask.txt").write_text("not an image")
    with pytest.raises(ReconLoopError, match=r"capture 'a': mask '.*mask.txt' is not a PNG or JPEG"):
        payload(str(tmp_path / "mask.txt"))
    (tmp_path / "big.png").write_bytes(_png(np.zeros((2, 3), np.uint8)))
    with pytest.raises(ReconLoopError, match=r"capture 'a': mask .*big.png is 3x2; its photo is 1x1"):
        payload(str(tmp_path / "big.png"))


def test_build_scene_payload_errors():
    cap = scene_io.CaptureInput("a", PNG_1x1, "png", _cam(1, 1))
    with pytest.raises(ReconLoopError, match="no captures"):
        scene_io.build_scene_payload([], [], {})
    with pytest.raises(ReconLoopError, match="named 'a'"):
        scene_io.build_scene_payload([cap, cap], [], {})
    with pytest.raises(ReconLoopError, match="have no camera"):
        scene_io.build_scene_payload([cap, scene_io.CaptureInput("b", PNG_1x1, "png")], [], {})
    with pytest.raises(ReconLoopError, match="unknown setting 'colour'"):
        scene_io.build_scene_payload([cap], [], {"colour": 1})
    with pytest.raises(ReconLoopError, match="not a PNG or JPEG"):
        scene_io.image_info(b"GIF89a....", "x.gif")


def test_image_info_and_folder(temple_dir, tmp_path):
    info = scene_io.image_info((temple_dir / "templeSR0001.png").read_bytes(), "templeSR0001.png")
    assert (info.format, info.width, info.height) == ("png", 640, 480)
    for name in ("b.png", "a.png"):
        (tmp_path / name).write_bytes(PNG_1x1)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a.xmp").write_text("<x:xmpmeta/>")  # a sidecar of the same stem, listed after a.png or not
    caps = scene_io.captures_from_folder(str(tmp_path))
    assert [c.name for c in caps] == ["a", "b"] and all(c.camera is None for c in caps)
    assert [c.path for c in caps] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]  # the files read
    with pytest.raises(ReconLoopError, match="no PNG or JPEG photos"):
        (tmp_path / "empty").mkdir()
        scene_io.captures_from_folder(str(tmp_path / "empty"))


def test_artifact_kinds_and_frames():
    assert scene_io.artifact_kind("points.ply") == scene_io.KIND_POINTS
    assert scene_io.artifact_kind("gaussians.ply") == scene_io.KIND_GAUSSIANS
    assert scene_io.artifact_kind("points_final.ply") == scene_io.KIND_POINTS
    assert scene_io.artifact_kind("frames/frame_0012.png") == scene_io.KIND_FRAME
    assert scene_io.artifact_kind("frames/confidence_0012.png") == scene_io.KIND_OTHER
    assert scene_io.artifact_kind("frames/cameras.json") == scene_io.KIND_OTHER
    assert scene_io.artifact_kind("cameras.json") == scene_io.KIND_CAMERAS
    assert scene_io.artifact_kind("log.txt") == scene_io.KIND_OTHER
    assert scene_io.frame_number("frames/frame_000012.png") == 12
    assert scene_io.frame_fill([5, 1, 3], 1, 6) == {1: 1, 2: 1, 3: 3, 4: 3, 5: 5, 6: 5}


def test_parse_cameras_json_to_blender():
    cam = _cam()
    doc = {
        "captures": [
            {
                "name": "p0",
                "image": "images/p0.png",
                "camera": {"w2c": cam.w2c.tolist(), "K": cam.K.tolist(), "width": 64, "height": 48},
            }
        ]
    }
    import json

    (est,) = scene_io.parse_cameras_json(json.dumps(doc))
    assert est.name == "p0"
    p = est.blender_params()
    back = cam_math.opencv_from_blender(p)
    np.testing.assert_allclose(back.K, cam.K, atol=1e-9)
    with pytest.raises(ReconLoopError, match="not valid JSON"):
        scene_io.parse_cameras_json(b"{")


def test_srgb_to_linear():
    np.testing.assert_allclose(scene_io.srgb_to_linear(np.array([0.0, 0.5, 1.0])), [0.0, 0.21404114, 1.0], atol=1e-6)


def test_service_command_and_hello_text():
    from backend.service.spawn import serve_command
    from blender_addon import connection

    cfg = connection.ConnectionConfig(local_python="/opt/py/bin/python", local_device="cpu", data_dir="/tmp/jobs")
    # the add-on cannot import backend: its command is the one the backend's own helper makes, in another Python
    expected = ["/opt/py/bin/python", *serve_command("tcp://127.0.0.1:5000", "/tmp/jobs", device="cpu")[1:]]
    assert connection.service_command(cfg, "tcp://127.0.0.1:5000") == expected
    cfg = connection.ConnectionConfig(local_command="conda run -n recon reconloop")
    assert connection.service_command(cfg, "tcp://127.0.0.1:5000")[:6] == [
        "conda",
        "run",
        "-n",
        "recon",
        "reconloop",
        "serve",
    ]
    text = connection.describe_hello(
        {
            "server": "0.1.0",
            "version": 1,
            "device": "cuda:0",
            "generators": ["reproject", "anyrecon"],
            "gpu": {"name": "H100", "total_bytes": 80 << 30, "free_bytes": 60 << 30},
        }
    )
    assert text == (
        "ReconLoop 0.1.0 (protocol 1); device cuda:0; H100: 60.0 of 80.0 GiB free; generators: reproject, anyrecon"
    )


def test_half_set_keys_are_refused(tmp_path):
    from blender_addon import connection

    key = tmp_path / "server.key"
    key.write_text("x")
    cfg = connection.ConnectionConfig(mode="remote", remote_address="tcp://127.0.0.1:1", server_key_file=str(key))
    with pytest.raises(ReconLoopError, match="needs both files"):
        connection.make_client(cfg.remote_address, cfg)
    cfg = connection.ConnectionConfig(
        mode="remote", server_key_file=str(key), client_key_file=str(tmp_path / "missing")
    )
    with pytest.raises(ReconLoopError, match="key file not found"):
        connection.make_client(cfg.remote_address, cfg)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("tcp://127.0.0.1:5555", None),
        ("tcp://gpu-box.lan:6000", None),
        ("tcp://[::1]:5555", None),
        ("ipc:///tmp/reconloop", None),
        ("127.0.0.1:5555", "write tcp://127.0.0.1:5555"),
        ("gpu-box", "write tcp://gpu-box:5555"),
        ("http://gpu-box:5555/", "not HTTP: write tcp://gpu-box:5555"),
        ("tcp://gpu-box", "tcp://host:port"),
        ("tcp://gpu-box:70000", "port must be in 1-65535"),
        ("udp://x:1", "unknown transport 'udp'"),
        ("", "enter the service's address"),
    ],
)
def test_check_address(text, problem):
    from blender_addon.connection import check_address

    got = check_address(text)
    assert got is None if problem is None else problem in got


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:5555", "tcp://localhost:6000", "tcp://[::1]:7000", "tcp://gpu-box.lan:6000"]
)
def test_the_start_hint_is_a_command_the_service_accepts(endpoint, tmp_path):
    """The hint after "no service at ...": a loopback bind for a loopback address, keys with any other. It used to
    say `--bind tcp://0.0.0.0:PORT` for 127.0.0.1 too, which the service refuses without keys."""
    import shlex

    from backend.cli import build_parser
    from backend.service.auth import check_bind
    from blender_addon.connection import start_hint

    argv = shlex.split(start_hint(endpoint))
    assert argv[:2] == ["reconloop", "serve"]
    args = build_parser().parse_args(argv[1:])
    assert args.bind.rsplit(":", 1)[1] == endpoint.rsplit(":", 1)[1]
    assert args.bind == endpoint or "localhost" in endpoint or "gpu-box" in endpoint  # a loopback address as given
    check_bind(args.bind, None if args.curve_secret is None else object())  # refuses a network bind without keys
    assert (args.curve_secret is None) == ("gpu-box" not in endpoint)


def test_preflight_unknown_host_and_no_service_fail_fast():
    import socket
    import time

    from blender_addon.connection import free_loopback_port, preflight
    from blender_addon.errors import ReconLoopError

    t0 = time.monotonic()
    with pytest.raises(ReconLoopError, match="unknown host 'no-such-host.invalid'"):
        preflight("tcp://no-such-host.invalid:5555")
    port = free_loopback_port()
    with pytest.raises(
        ReconLoopError, match=rf"Start it on 127\.0\.0\.1 with `reconloop serve --bind tcp://127\.0\.0\.1:{port}`"
    ):
        preflight(f"tcp://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(ReconLoopError, match="not HTTP"):
        preflight("http://127.0.0.1:5555")
    with socket.socket() as listening:  # something listens: the address passes
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        preflight(f"tcp://127.0.0.1:{listening.getsockname()[1]}")


def test_ipc_is_refused_where_zeromq_has_none(monkeypatch):
    """Windows' pyzmq has no ipc://: the add-on offered it and then said to start `serve --bind ipc://...`."""
    import zmq

    from blender_addon.connection import check_address

    monkeypatch.setattr(zmq, "has", lambda capability: capability != "ipc")
    assert check_address("ipc:///tmp/reconloop") == (
        "ipc:// is not available on this system (Windows' ZeroMQ has none): use tcp://127.0.0.1:5555"
    )
    assert check_address("tcp://127.0.0.1:5555") is None


def test_preflight_tries_every_address_of_a_name(monkeypatch):
    """macOS and Windows resolve localhost to ::1 first; the service listens on 127.0.0.1: the check tried the
    first address alone and said "refused"."""
    import socket

    from blender_addon import connection

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        port = listening.getsockname()[1]
        v6_first = [
            (12345, socket.SOCK_STREAM, 6, "", ("nowhere", port)),  # a family this machine cannot open a socket of
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]
        monkeypatch.setattr(connection.socket, "getaddrinfo", lambda *a, **k: v6_first)
        connection.preflight(f"tcp://localhost:{port}")


@pytest.mark.parametrize(
    "text, windows, words",
    [
        (r"C:\Users\me\.venv\Scripts\reconloop.exe", True, [r"C:\Users\me\.venv\Scripts\reconloop.exe"]),
        (r'"C:\Program Files\rl\reconloop.exe" --x', True, [r"C:\Program Files\rl\reconloop.exe", "--x"]),
        ('reconloop --data-dir "/a b"', False, ["reconloop", "--data-dir", "/a b"]),
        (r'reconloop --data-dir="C:\a b"', True, ["reconloop", r"--data-dir=C:\a b"]),
        ("  ", True, []),
    ],
)
def test_the_service_command_keeps_a_windows_path(text, windows, words):
    from blender_addon.connection import command_words

    assert command_words(text, windows=windows) == words


def test_render_conflicts_name_the_cameras_that_cannot_share_a_scene():
    K = np.array([[500.0, 0, 330], [0, 500.0, 233], [0, 0, 1]])
    K_tall = np.array([[500.0, 0, 330], [0, 520.0, 233], [0, 0, 1]])
    assert cam_math.render_conflicts([("a", K, 640, 480), ("b", K.copy(), 640, 480)]) is None
    assert cam_math.render_conflicts([]) is None
    # fx/fy off by far less than a pixel at the border: one pixel aspect fits both
    K_near = K.copy()
    K_near[1, 1] *= 1 + 1e-7
    assert cam_math.render_conflicts([("a", K, 640, 480), ("b", K_near, 640, 480)]) is None
    msg = cam_math.render_conflicts(
        [("a", K, 640, 480), ("b", K, 480, 640), ("c", K_tall, 640, 480), ("d", K, 640, 480)]
    )
    assert "2 camera(s)" in msg and "'a' (640x480, fx/fy 1)" in msg
    assert "'b' (480x640, fx/fy 1)" in msg and "'c' (640x480, fx/fy 0.961538)" in msg and "'d'" not in msg
    assert "one render size and one pixel aspect" in msg


def test_stretch_mismatch_is_in_render_pixels():
    assert cam_math.stretch_mismatch_px(640, 480, 1280, 960) == 0
    assert cam_math.stretch_mismatch_px(960, 540, 1921, 1081) < cam_math.STRETCH_TOL_PX  # 50 % of an odd size
    assert cam_math.stretch_mismatch_px(640, 480, 480, 640) > 100
    assert cam_math.stretch_mismatch_px(1920, 1080, 640, 480) > 100


# -- requests from Blender's UI timers never wait for the service --------------------------------

STEP_BOUND_S = 0.1  # what one timer tick may take


def _timed(fn, *args):
    import time

    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def test_steps_never_wait_for_a_silent_service(silent_endpoint, tmp_path, monkeypatch):
    import time

    from blender_addon import connection
    from protocol.client import Client

    monkeypatch.setattr(connection, "WAITING_NOTE_S", 0.2)
    with Client(silent_endpoint) as client:  # 10 s a try, 3 tries: 30 s in one blocking request
        driver = connection.JobDriver(client, str(tmp_path), scene={"captures": []})
        messages = []
        driver.on_progress = lambda p: messages.append(p.message)
        longest = 0.0
        for _ in range(30):
            done, took = _timed(driver.step, 0)
            longest = max(longest, took)
            assert not done
            time.sleep(0.01)
        assert longest < STEP_BOUND_S, f"a step took {longest:.3f} s"
        assert driver.hello is None and any("waiting for the service at" in m and "(hello," in m for m in messages)
        probe = connection.HelloProbe(client)
        reply, took = _timed(probe.poll, 0)
        assert reply is None and took < STEP_BOUND_S
    # Without an answer for all its tries, a step raises (the tick shows it), still without waiting.
    with Client(silent_endpoint, timeout_ms=100, retries=1) as client:
        driver = connection.JobDriver(client, str(tmp_path), job="deadbeef")
        deadline = time.monotonic() + 5
        with pytest.raises(TimeoutError, match="hello: no reply .* after 2 tries of 100 ms"):
            while time.monotonic() < deadline:
                _, took = _timed(driver.step, 0)
                assert took < STEP_BOUND_S
                time.sleep(0.01)


POINTS_BYTES = 2500  # three chunks of FETCH_CHUNK_BYTES below


def _points_runner(scene, out_dir, *, device, progress):
    """Writes and announces points.ply; with prompt "slow", reports for 10 s (a job to cancel)."""
    import time

    from backend.progress import ProgressEvent

    (out_dir / "points.ply").write_bytes(np.random.default_rng(0).bytes(POINTS_BYTES))
    progress(ProgressEvent("memory", 0.5, "points", ("points.ply",)))
    for _ in range(500 if scene.settings.prompt == "slow" else 0):
        time.sleep(0.02)
        progress(ProgressEvent("memory", 0.5, "working"))


def _drive(driver, timeout_s: float = 60.0, *, cancel_after: int = -1) -> tuple[int, float]:
    """Step ``driver`` as Blender's timer does until it is done; (steps, longest step in s)."""
    import time

    steps, longest, deadline = 0, 0.0, time.monotonic() + timeout_s
    while True:
        if steps == cancel_after:
            driver.cancel()
        done, took = _timed(driver.step, 0)
        longest, steps = max(longest, took), steps + 1
        if done:
            return steps, longest
        assert time.monotonic() < deadline, f"the job did not end: {driver.progress}"
        time.sleep(0.005)


SILENCE_S = 0.25  # how long the scripted service keeps each reply


def _bounded_step(driver) -> bool:
    """One timer step of ``driver``, which must return within STEP_BOUND_S (and not wait out a try)."""
    import time

    t0 = time.perf_counter()
    try:
        done = driver.step(0)
    except TimeoutError as err:
        raise AssertionError(f"a step waited {time.perf_counter() - t0:.1f} s for the service: {err}") from err
    took = time.perf_counter() - t0
    assert took < STEP_BOUND_S, f"a step took {took:.3f} s while the service was silent"
    return done


def _steps_while_silent(driver, svc, seconds: float = SILENCE_S) -> int:
    """Step ``driver`` as the timer does while the service keeps its reply: each step returns within
    STEP_BOUND_S, none ends the job, and no other request goes out meanwhile. Returns the steps."""
    import time

    steps, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not _bounded_step(driver)
        steps += 1
        time.sleep(0.01)
    assert not svc.pending(), "a request went out while the previous one was unanswered"
    return steps


def _step_until_request(driver, svc) -> dict:
    """Step ``driver`` (each within STEP_BOUND_S) until its next request reaches the scripted service."""
    import time

    deadline = time.monotonic() + 5
    while not svc.pending():
        assert not _bounded_step(driver)
        assert time.monotonic() < deadline, f"no request came: {driver.progress}"
        time.sleep(0.005)
    return svc.request()


def test_driver_runs_a_job_in_steps_that_never_wait(tmp_path, monkeypatch, loopback_router):
    """Submit, watch, events, a download in three chunks and a status, each request sent in one step
    and its reply taken in a later one: against a service that keeps every reply a while (no step
    waits for it), then against the real service."""
    import zmq

    from backend.service import Service, ServiceConfig
    from blender_addon import connection
    from protocol.client import Client

    from .protocol.helpers import HELLO_REPLY, ScriptedService, artifact, fetch_reply, scene_msg, status_reply

    monkeypatch.setattr(connection, "FETCH_CHUNK_BYTES", 1000)
    monkeypatch.setattr(connection, "IDLE_STATUS_S", 0.2)
    data = np.random.default_rng(0).bytes(POINTS_BYTES)
    job = "0123456789abcdef0123456789abcdef"
    svc = ScriptedService(loopback_router)
    files = []
    # One try of 3 s: longer than each silence (no resend), and a step that waited for a reply would
    # wait the whole try, then raise TimeoutError.
    with Client(loopback_router.getsockopt_string(zmq.LAST_ENDPOINT), timeout_ms=3000, retries=0) as client:
        driver = connection.JobDriver(
            client, str(tmp_path / "scripted"), scene=scene_msg(), on_file=lambda *a: files.append(a)
        )
        hello = _step_until_request(driver, svc)
        assert hello["op"] == "hello"
        _steps_while_silent(driver, svc)
        svc.answer(hello, **HELLO_REPLY)
        submit = _step_until_request(driver, svc)
        assert submit["op"] == "submit" and driver.progress.state == "uploading"
        _steps_while_silent(driver, svc)
        svc.answer(submit, job=job, state="queued")
        watch = _step_until_request(driver, svc)
        assert (watch["op"], watch["job"], watch["watch"]) == ("status", job, True)
        _steps_while_silent(driver, svc)
        svc.answer(watch, **status_reply(job, "running", 1, [artifact("points.ply", data)]))
        for offset in range(0, POINTS_BYTES, 1000):
            fetch = _step_until_request(driver, svc)
            assert (fetch["op"], fetch["name"], fetch["offset"]) == ("fetch", "points.ply", offset)
            _steps_while_silent(driver, svc)
            svc.event(job, offset // 1000 + 2, "running", fraction=0.5 + offset / 10000)  # comes meanwhile
            _steps_while_silent(driver, svc, 0.05)
            assert driver.progress.fraction == 0.5 + offset / 10000  # taken while the fetch waits
            svc.answer(fetch, **fetch_reply(job, "points.ply", data, offset, fetch["length"]))
        # No event for IDLE_STATUS_S: the driver asks for the status, and no step waits for it either.
        status = _step_until_request(driver, svc)
        assert (status["op"], status["job"]) == ("status", job)
        assert files and Path(files[0][2]).read_bytes() == data  # the download ended before
        _steps_while_silent(driver, svc)
        svc.answer(status, **status_reply(job, "done", 5))
        _drive(driver, 5)
    assert driver.progress.state == "done" and len(files) == 1
    # A download that the add-on stops (an error in a later step): its .part goes, the queue empties.
    with Client(loopback_router.getsockopt_string(zmq.LAST_ENDPOINT), timeout_ms=3000, retries=0) as client:
        driver = connection.JobDriver(client, str(tmp_path / "dropped"), job=job)
        svc.answer(_step_until_request(driver, svc), **HELLO_REPLY)
        watch = _step_until_request(driver, svc)
        svc.answer(watch, **status_reply(job, "running", 1, [artifact("points.ply", data)]))
        fetch = _step_until_request(driver, svc)
        svc.answer(fetch, **fetch_reply(job, "points.ply", data, 0, fetch["length"]))
        while driver._current.offset == 0:
            assert not _bounded_step(driver)
        assert list((tmp_path / "dropped").rglob("*.part"))
        driver.drop_downloads()
        assert not list((tmp_path / "dropped").rglob("*.part")) and not driver.is_downloading

    svc = Service(
        ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=tmp_path / "jobs", device="cpu"), runner=_points_runner
    )
    thread = svc.start_thread()
    files = []
    try:
        with Client(svc.endpoint) as client:
            driver = connection.JobDriver(
                client, str(tmp_path / "out"), scene=scene_msg(), on_file=lambda *a: files.append(a)
            )
            steps, longest = _drive(driver)
            # Cancel (the operator only asks; the next step sends it): the job ends cancelled.
            slow = connection.JobDriver(client, str(tmp_path / "out"), scene=scene_msg("slow"))
            _drive(slow, cancel_after=20)
    finally:
        svc.stop()
        thread.join(20)
    assert driver.progress.state == "done" and driver.hello["version"] == 1
    ((kind, name, path),) = files
    assert (kind, name) == ("points", "points.ply")
    assert Path(path).read_bytes() == data
    assert steps > 6 and longest < 0.5, (steps, longest)  # hello, submit, watch, 3 chunks: 6 replies at least
    assert slow.progress.state == "cancelled"


def test_a_service_job_id_outside_the_results_folder_ends_the_job(tmp_path, loopback_router):
    """The service's job id becomes the folder below the add-on's: one that would leave it ends the job with an
    error naming it, and nothing is written outside."""
    import zmq

    from blender_addon import connection
    from blender_addon.errors import ReconLoopError
    from protocol.client import Client

    from .protocol.helpers import HELLO_REPLY, ScriptedService, artifact, scene_msg, status_reply

    svc = ScriptedService(loopback_router)
    root = tmp_path / "a" / "b" / "results"
    job = "../../escaped"
    with Client(loopback_router.getsockopt_string(zmq.LAST_ENDPOINT), timeout_ms=3000, retries=0) as client:
        driver = connection.JobDriver(client, str(root), scene=scene_msg())
        svc.answer(_step_until_request(driver, svc), **HELLO_REPLY)
        svc.answer(_step_until_request(driver, svc), job=job, state="queued")
        with pytest.raises(ReconLoopError, match="is not a ReconLoop job id \\(32 hex characters\\)"):
            watch = _step_until_request(driver, svc)
            svc.answer(watch, **status_reply(job, "running", 1, [artifact("points.ply", b"ply")]))
            _drive(driver, 5)
    assert all(root in p.parents for p in tmp_path.rglob("*") if p.is_file() or p.name == "escaped")


@pytest.mark.parametrize("name", ["../../escaped/points.ply", "ABSOLUTE/points.ply"])
def test_a_service_output_name_outside_the_results_folder_is_not_written(tmp_path, loopback_router, name):
    """An output name that would leave the job's folder is not written and is named when the job ends (the
    sidebar's error, as ``reconloop fetch`` does); the job's other files still come."""
    import zmq

    from blender_addon import connection
    from protocol.client import Client

    from .protocol.helpers import HELLO_REPLY, ScriptedService, artifact, fetch_reply, scene_msg, status_reply

    svc = ScriptedService(loopback_router)
    root = tmp_path / "a" / "b" / "results"
    name = name.replace("ABSOLUTE", str(tmp_path / "absolute"))  # an absolute path that the check below can see
    job, data, files = "0123456789abcdef0123456789abcdef", b"ply", []
    with Client(loopback_router.getsockopt_string(zmq.LAST_ENDPOINT), timeout_ms=3000, retries=0) as client:
        driver = connection.JobDriver(client, str(root), scene=scene_msg(), on_file=lambda *a: files.append(a))
        svc.answer(_step_until_request(driver, svc), **HELLO_REPLY)
        svc.answer(_step_until_request(driver, svc), job=job, state="queued")
        watch = _step_until_request(driver, svc)
        svc.answer(watch, **status_reply(job, "done", 1, [artifact(name, data), artifact("points.ply", data)]))
        fetch = _step_until_request(driver, svc)
        assert fetch["name"] == "points.ply"
        svc.answer(fetch, **fetch_reply(job, "points.ply", data, 0, fetch["length"]))
        _drive(driver, 5)
    assert driver.progress.state == "done" and [(kind, n) for kind, n, _ in files] == [("points", "points.ply")]
    (why,) = driver.refused
    assert "artifact name must" in why and name in why
    assert all(root in p.parents for p in tmp_path.rglob("*") if p.is_file() or p.name == "escaped")


def test_a_service_of_another_version_is_named_with_both_versions(loopback_router):
    """A service that speaks protocol 2 refuses the add-on's hello in its own version: the add-on reads that
    refusal (it used to refuse the reply's v itself and blame the service) and says what to update."""
    import msgpack
    import zmq

    from blender_addon import connection
    from protocol.client import Client
    from protocol.errors import ProtocolError

    from .protocol.helpers import ScriptedService

    svc = ScriptedService(loopback_router)
    endpoint = loopback_router.getsockopt_string(zmq.LAST_ENDPOINT)
    with Client(endpoint, timeout_ms=3000, retries=0) as client:
        pending = client.begin_hello()
        hello = svc.request()
        assert hello["versions"] == [1]
        message = f"hello: no common version; client speaks {hello['versions']}, server speaks [2]"
        error = {"code": "unsupported_version", "message": message}
        reply = {"v": 2, "op": "hello", "id": hello["id"], "ok": False, "error": error}
        svc.router.send_multipart([svc.ident, msgpack.packb(reply)])
        with pytest.raises(ProtocolError) as err:
            pending.wait()
    assert err.value.message == message
    text = connection.plain_error(err.value, endpoint)
    assert "server speaks [2]" in text and "another protocol version" in text and endpoint in text


def test_stopping_a_service_does_not_wait_for_it(silent_endpoint, tmp_path):
    import shlex

    from blender_addon import connection
    from protocol.client import Client

    cfg = connection.ConnectionConfig(
        local_command=f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'", data_dir=str(tmp_path)
    )
    # Still starting (never answered hello): terminated at once, its exit awaited off the caller's thread.
    svc = connection.LocalService(cfg)
    _, took = _timed(svc.stop)
    assert took < STEP_BOUND_S and svc.wait_stopped(10) and svc.proc.returncode is not None
    # It answered once but does not answer the shutdown now: asked for SHUTDOWN_REPLY_MS, then terminated.
    svc = connection.LocalService(cfg)
    svc.answered = True
    with Client(silent_endpoint) as client:
        _, took = _timed(svc.stop, client)
    assert took < connection.SHUTDOWN_REPLY_MS / 1000 + STEP_BOUND_S
    assert svc.wait_stopped(10) and svc.proc.returncode is not None


def test_same_path_matches_an_unmoved_camera_only():
    """Import job refreshes a job's frames on the camera it ran on while that camera still follows the job's
    path: cameras.json's float32 cameras (a render size changed since in proportion still matches); a move
    of a ten-thousandth of the path's size, a turn, a zoom or a missing frame does not."""

    def cam(centre, f: float, width: int, height: int, yaw: float = 0.3) -> cam_math.OpenCVCamera:
        c, s_ = np.cos(yaw), np.sin(yaw)
        R = np.array([[c, 0, -s_], [0, 1, 0], [s_, 0, c]])
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = R, -R @ np.asarray(centre, float)
        K = np.array([[f * width / 1920, 0, width / 2], [0, f * width / 1920, height / 2], [0, 0, 1]])
        return cam_math.OpenCVCamera(w2c=w2c, K=K, width=width, height=height)

    for origin in (np.zeros(3), np.array([60.0, 60.0, 60.0])):  # near the world's origin, and far from it
        centres = {f: origin + [0.1 * f, 0.0, 0.6] for f in range(1, 11)}
        now = {f: cam(centres[f], 1500.0, 1920, 1080) for f in range(1, 11)}
        path = [(f, cam(centres[f], 1500.0, 960, 540)) for f in (1, 4, 7, 10)]
        wire = [(f, cam_math.OpenCVCamera(c.w2c.astype(np.float32), c.K.astype(np.float32), c.width, c.height))
                for f, c in path]  # fmt: skip
        assert scene_io.same_path(now, path) and scene_io.same_path(now, wire)
        size = max(0.9, np.abs(origin).max() + 1.0)  # the path's centres: 0.9 apart, this far from the origin
        for changed in (
            {7: cam(centres[7] + [0, 0, 2e-4 * size], 1500.0, 1920, 1080)},
            {7: cam(centres[7], 1500.0, 1920, 1080, yaw=0.3 + 2e-4)},
            {4: cam(centres[4], 1600.0, 1920, 1080)},
        ):
            assert not scene_io.same_path({**now, **changed}, path), changed
        assert not scene_io.same_path({f: c for f, c in now.items() if f < 10}, path)
