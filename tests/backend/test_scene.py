"""The scene folder format: round trip and every rejection naming its field."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.generators import GENERATORS
from backend.scene import (
    SCENE_FILE,
    Camera,
    Capture,
    Distortion,
    Scene,
    SceneError,
    Settings,
    TrajectoryFrame,
    load_scene,
    save_scene,
    scene_from_json,
    scene_to_json,
)
from protocol.errors import MAX_LISTED

WIDTH, HEIGHT = 32, 24


def make_camera(angle: float, distortion: Distortion | None = None) -> Camera:
    c, s = math.cos(angle), math.sin(angle)
    w2c = np.eye(4)
    w2c[:3, :3] = [[c, 0, -s], [0, 1, 0], [s, 0, c]]
    w2c[:3, 3] = [0.1, -0.2, 3.0]
    K = np.array([[30.0, 0.0, 16.0], [0.0, 31.0, 12.0], [0.0, 0.0, 1.0]])
    return Camera(w2c=w2c, K=K, width=WIDTH, height=HEIGHT, distortion=distortion)


@pytest.fixture
def scene_dir(tmp_path) -> Path:
    """A valid scene folder: 4 captures (one without camera, one with distortion; 3 with cameras, which
    SfM's frame aligns to), 1 held out, a trajectory, settings; images in a sibling folder, referenced by
    relative paths."""
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (WIDTH, HEIGHT), (i * 50, 0, 0)).save(images / f"img{i}.png")
    scene = Scene(
        root=tmp_path / "scene",
        captures=[
            Capture("img0", images / "img0.png", make_camera(0.0)),
            Capture("img1", images / "img1.png", make_camera(0.3, Distortion("SIMPLE_RADIAL", (-0.03,)))),
            Capture("img2", images / "img2.png", None),
            Capture("img4", images / "img4.png", make_camera(0.4)),
        ],
        trajectory=[TrajectoryFrame(1, make_camera(0.1)), TrajectoryFrame(5, make_camera(0.2))],
        heldout=[Capture("img3", images / "img3.png", make_camera(0.5))],
        settings=Settings(width=64, height=48, generator="anyrecon", seed=7),
    )
    save_scene(scene, tmp_path / "scene")
    return tmp_path / "scene"


def read_json(folder: Path) -> dict:
    return json.loads((folder / SCENE_FILE).read_text())


def write_json(folder: Path, data: dict) -> None:
    (folder / SCENE_FILE).write_text(json.dumps(data))


def test_round_trip(scene_dir, tmp_path):
    scene = load_scene(scene_dir)
    assert [c.name for c in scene.captures] == ["img0", "img1", "img2", "img4"]
    assert scene.captures[0].image == (tmp_path / "photos" / "img0.png").resolve()
    assert read_json(scene_dir)["captures"][0]["image"] == "../photos/img0.png"
    assert scene.captures[2].camera is None and not scene.has_all_cameras
    assert scene.captures[1].camera.distortion == Distortion("SIMPLE_RADIAL", (-0.03,))
    np.testing.assert_array_equal(scene.captures[1].camera.w2c, make_camera(0.3).w2c)
    assert [t.frame for t in scene.trajectory] == [1, 5]
    assert scene.heldout[0].name == "img3"
    assert scene.settings == Settings(width=64, height=48, generator="anyrecon", seed=7)
    # Saved elsewhere and loaded again: the same JSON apart from the relative image paths.
    save_scene(scene, tmp_path / "elsewhere" / "deeper")
    again = load_scene(tmp_path / "elsewhere" / "deeper")
    assert scene_to_json(again, scene_dir) == scene_to_json(scene, scene_dir)
    assert again.captures[0].image == scene.captures[0].image
    # A scene.json path works as well as its folder.
    assert load_scene(scene_dir / SCENE_FILE).root == scene.root


def edit(data: dict, dotted: str, value) -> dict:
    """Copy of ``data`` with ``dotted`` (keys and list indices, e.g. captures.0.camera.K) set."""
    data = copy.deepcopy(data)
    *parents, last = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("captures.1.image", "../photos/missing.png", r"^captures\[1\]\.image: file not found"),
        ("captures.0.image", "../photos/img0.tiff", r"^captures\[0\]\.image: must be a PNG or JPEG"),
        (
            "captures.0.camera.w2c",
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]],
            r"^captures\[0\]\.camera\.w2c: top-left 3x3 must be a rotation",
        ),
        (
            "captures.0.camera.w2c",
            [[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
            r"^captures\[0\]\.camera\.w2c: top-left 3x3 must be a rotation .* det = -1",
        ),
        (
            "captures.1.camera.K",
            [[-30, 0, 16], [0, 31, 12], [0, 0, 1]],
            r"^captures\[1\]\.camera\.K: focal lengths must be positive; got fx=-30",
        ),
        (
            "captures.0.camera.width",
            WIDTH + 1,
            r"^captures\[0\]\.camera: size 33x24 does not match the image img0\.png",
        ),
        ("heldout.0.camera.height", HEIGHT * 2, r"^heldout\[0\]\.camera: size 32x48 does not match"),
        (
            "captures.0.camera.K",
            [[30, 0, float("nan")], [0, 31, 12], [0, 0, 1]],
            r"^captures\[0\]\.camera\.K: holds NaN",
        ),
        ("trajectory.1.camera.w2c.0.3", float("inf"), r"^trajectory\[1\]\.camera\.w2c: holds NaN or infinity"),
        ("settings.resolution", 512, r"^settings\.resolution: unknown setting; known: "),
        ("settings.width", 8, r"^settings\.width: must be in \[16, 4096\]; got 8"),
        ("version", 2, r"^version: scene format version must be 1; got 2"),
        (
            "captures.1.camera.distortion",
            {"model": "FISHEYE", "params": [0.1]},
            r"^captures\[1\]\.camera\.distortion\.model: unknown model 'FISHEYE'",
        ),
        (
            "captures.1.camera.distortion",
            {"model": "RADIAL", "params": [0.1]},
            r"^captures\[1\]\.camera\.distortion\.params: RADIAL takes 2 numbers \(k1 k2: the distortion "
            r"coefficients alone, the focal length and principal point go in K\)",
        ),
        (
            "trajectory.0.camera.distortion",
            {"model": "RADIAL", "params": [0.1, 0.0]},
            r"^trajectory\[0\]\.camera\.distortion: only captures",
        ),
        ("trajectory.1.frame", 1, r"^trajectory: frame numbers must increase strictly"),
        # a trajectory frame of another shape was squeezed into the first's working size, with no word
        (
            "trajectory.1.camera.height",
            HEIGHT * 3,
            r"^trajectory\[1\]\.camera: 32x72 is another shape than trajectory\[0\]'s 32x24; the loop renders",
        ),
        ("captures.1.name", "img0", r"^captures: names must be unique; 'img0' appears twice"),
        ("heldout.0.camera", None, r"^heldout\[0\]\.camera: missing"),
        ("captures.0.camera.focal", 3, r"^captures\[0\]\.camera\.focal: unknown field"),
        # a typo'd key inside an entry is refused like one at the top, never silently dropped
        (
            "captures.0.camrea",
            {},
            r"^captures\[0\]\.camrea: unknown field; known: name, image, mask, camera$",
        ),
        ("captures.2.maks", "../photos/img0.png", r"^captures\[2\]\.maks: unknown field; known: "),
        ("captures.1.distortion", {"model": "NONE"}, r"^captures\[1\]\.distortion: unknown field"),
        ("heldout.0.imgae", "x.png", r"^heldout\[0\]\.imgae: unknown field; known: name, image, mask, camera$"),
        ("trajectory.1.camrea", {}, r"^trajectory\[1\]\.camrea: unknown field; known: frame, camera$"),
        (
            "captures.1.camera.distortion.parms",
            [0.1],
            r"^captures\[1\]\.camera\.distortion\.parms: unknown field; known: model, params$",
        ),
        ("setings", {}, r"^setings: unknown field; known: version, captures, trajectory, heldout, settings$"),
        # the generator is checked against the backend's registry when the scene loads, named like any setting
        (
            "settings.generator",
            "anyrecn",
            rf"^settings\.generator: must be one of {', '.join(GENERATORS.names())}; got 'anyrecn'$",
        ),
        ("captures", [], r"^captures: must be a non-empty list"),
        # 2 given cameras cannot align SfM's frame: a trajectory or held-out view would not be where the photos are
        ("captures.3.camera", None, r"^trajectory: 2 of the 4 captures have cameras; SfM places the others in a frame"),
    ],
)
def test_rejections_name_the_field(scene_dir, dotted, value, message):
    write_json(scene_dir, edit(read_json(scene_dir), dotted, value))
    with pytest.raises(SceneError, match=message):
        load_scene(scene_dir)


def test_every_bad_item_is_named_at_once(scene_dir):
    """A scene with several bad captures, trajectory frames or held-out views hears of all of them in one
    error (its first field first, as every SceneError starts), not one per try; past MAX_LISTED the
    rest are counted."""
    data = edit(read_json(scene_dir), "captures.0.image", "../photos/missing.png")
    data = edit(data, "captures.2.image", "../photos/img0.tiff")
    data = edit(data, "trajectory.1.frame", "5")
    data = edit(data, "heldout.0.camera", None)
    write_json(scene_dir, data)
    with pytest.raises(SceneError) as err:
        load_scene(scene_dir)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "captures[0].image",
        "captures[2].image",
        "trajectory[1].frame",
        "heldout[0].camera",
    ]
    text = str(err.value)
    assert text.startswith("captures[0].image: file not found: ") and text.endswith(
        "; captures[2].image: must be a PNG or JPEG file; got '../photos/img0.tiff'; trajectory[1].frame: must be an "
        "integer; got '5'; heldout[0].camera: missing (4 problems)"
    )
    many = {"version": 1, "captures": [{"image": f"../photos/gone{i}.png"} for i in range(MAX_LISTED + 3)]}
    with pytest.raises(SceneError) as err:
        scene_from_json(many, scene_dir)
    assert len(err.value.problems) == MAX_LISTED + 3 and str(err.value).count("file not found") == (MAX_LISTED)
    assert str(err.value).endswith(f"; and 3 more ({MAX_LISTED + 3} problems)")


def test_never_half_loads(scene_dir):
    """A defect in the last entry of the last section still fails the whole load; nothing returned."""
    good = read_json(scene_dir)
    bad = edit(good, "heldout.0.image", "../photos/nothing.png")
    with pytest.raises(SceneError, match=r"^heldout\[0\]\.image"):
        scene_from_json(bad, scene_dir)
    write_json(scene_dir, bad)
    with pytest.raises(SceneError):
        load_scene(scene_dir)
    # Fixing the one field makes the same file load in full.
    write_json(scene_dir, good)
    assert len(load_scene(scene_dir).heldout) == 1


def test_unreadable_files(tmp_path):
    with pytest.raises(SceneError, match="^scene.json: not found"):
        load_scene(tmp_path)
    (tmp_path / SCENE_FILE).write_text("{not json")
    with pytest.raises(SceneError, match="^scene.json: not valid JSON"):
        load_scene(tmp_path)
    (tmp_path / SCENE_FILE).write_text("[1, 2]")
    with pytest.raises(SceneError, match="^scene.json: must hold an object; got list"):
        load_scene(tmp_path)
    (tmp_path / SCENE_FILE).write_text('{"captures": []}')
    with pytest.raises(SceneError, match="^version: scene format version must be 1; got None"):
        load_scene(tmp_path)


def test_a_missing_scene_folder_is_named(tmp_path, monkeypatch):
    """The folder asked for, not its parent: a typo'd ``scnee/`` is said to be missing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SceneError, match=r"^scnee: no such folder$"):
        load_scene("scnee/")
    with pytest.raises(SceneError, match=rf"^{tmp_path / 'nope' / SCENE_FILE}: no such file$"):
        load_scene(tmp_path / "nope" / SCENE_FILE)
    (tmp_path / "templeSR_par.txt").write_text("16\n")  # a dataset's file given for its folder: was read as JSON
    with pytest.raises(SceneError, match=r"templeSR_par.txt: is a file; a scene is a folder with scene.json"):
        load_scene(tmp_path / "templeSR_par.txt")


def test_a_dataset_folder_without_scene_json_names_its_import(temple_dir):
    with pytest.raises(SceneError) as err:
        load_scene(temple_dir)
    assert str(err.value) == (
        f"scene.json: not found in {temple_dir}; it holds a dataset in the middlebury format: make a scene of it "
        f"with reconloop import middlebury {temple_dir} DST"
    )


@pytest.mark.parametrize("subfolder", ["", "images", "DCIM/100CANON"])
def test_a_photo_folder_without_scene_json_says_how_to_list_the_photos(tmp_path, subfolder):
    """The scene.json the message shows loads: its photos without cameras, which the loop estimates; photos
    one or two folders down (images/, a camera card's DCIM/100CANON/) are listed with those folders in their
    paths, and a hidden folder's thumbnails are not."""
    (tmp_path / "CACHE").mkdir()  # sorted before DCIM: a subfolder without photos is passed over
    (tmp_path / ".thumbnails").mkdir()  # sorted first, and its photos are not the user's
    Image.new("RGB", (8, 6)).save(tmp_path / ".thumbnails" / "t.jpg")
    (tmp_path / subfolder).mkdir(parents=True, exist_ok=True)
    for name in ("b.jpg", "a.png"):
        Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / subfolder / name)
    (tmp_path / "notes.txt").write_text("not a photo")
    inside = rf" \(in {subfolder}/\)" if subfolder else ""
    with pytest.raises(
        SceneError, match=rf"^scene\.json: not found in .*; for its 2 photos{inside}, .*estimates their cameras"
    ) as err:
        load_scene(tmp_path)
    shown = str(err.value)
    write_json(tmp_path, json.JSONDecoder().raw_decode(shown, shown.index("{"))[0])
    scene = load_scene(tmp_path)
    assert [c.name for c in scene.captures] == ["a", "b"] and not any(c.camera for c in scene.captures)


def test_every_generator_the_table_offers_is_registered():
    """The sidebar and the headless script choose from the generator row's choices before a service lists
    its own: each is a registered generator, and both weight-free ones (reproject, refine) are there."""
    from protocol.settings import BY_NAME

    offered = BY_NAME["generator"].choices
    assert set(offered) <= set(GENERATORS.names()) and {"reproject", "refine"} <= set(offered)
    assert offered[0] == BY_NAME["generator"].default  # the sidebar's first item
    assert Settings.from_json({"generator": "refine"}).generator == "refine"


def test_without_the_generators_any_generator_name_loads(monkeypatch):
    """The Blender extension bundles the scene readers but not backend.generators: a scene still loads there,
    and the service that takes the job checks the name."""
    monkeypatch.setitem(sys.modules, "backend.generators", None)
    assert Settings.from_json({"generator": "anyrecn"}).generator == "anyrecn"


def test_a_client_leaves_the_generator_to_its_service(scene_dir):
    """``reconloop submit`` loads the scene without this backend's registry: a generator only the service has
    (a plugin) reaches the service, which checks it against its own (below)."""
    data = read_json(scene_dir)
    data["settings"]["generator"] = "passthrough"
    write_json(scene_dir, data)
    with pytest.raises(SceneError, match=r"^settings\.generator: must be one of"):
        load_scene(scene_dir)
    assert load_scene(scene_dir, registered=False).settings.generator == "passthrough"


def test_the_service_refuses_a_submit_with_an_unknown_generator(tmp_path):
    """The generator typo is refused when the job is submitted (the service loads the scene then), with the
    field named; no job is made."""

    from protocol import errors
    from protocol.codec import pack
    from tests.protocol.helpers import ask, dealer, running_service, scene_msg

    msg = {"v": 1, "op": "submit", "id": 1, "scene": scene_msg()}
    msg["scene"]["settings"]["generator"] = "anyrecn"
    with running_service(tmp_path / "jobs") as svc:
        sock = dealer(svc.endpoint)
        try:
            reply = ask(sock, list(pack(msg)))
        finally:
            sock.close()
        assert svc.store.jobs == {}
    assert reply["ok"] is False and reply["error"]["code"] == errors.BAD_FIELD
    assert reply["error"]["field"] == "scene.settings.generator"
    assert reply["error"]["message"].endswith(
        f"scene.settings.generator: must be one of {', '.join(GENERATORS.names())}; got 'anyrecn'"
    )


def test_real_scene_loads(temple_dir, tmp_path):
    """A hand-written scene.json over the Middlebury temple: the shared images load where they lie."""
    par = (temple_dir / "templeSR_par.txt").read_text().split("\n")[1].split()
    K, R, t = (
        np.array(par[1:10], float).reshape(3, 3),
        np.array(par[10:19], float).reshape(3, 3),
        np.array(par[19:], float),
    )
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, t
    data = {
        "version": 1,
        "captures": [
            {
                "name": "t1",
                "image": str(temple_dir / par[0]),
                "camera": {"w2c": w2c.tolist(), "K": K.tolist(), "width": 640, "height": 480},
            },
            {"image": str(temple_dir / "templeSR0002.png")},
        ],
    }
    write_json(tmp_path, data)
    scene = load_scene(tmp_path)
    assert scene.captures[1].name == "templeSR0002"
    np.testing.assert_array_equal(scene.captures[0].camera.K, K)
    assert scene.settings == Settings()


def test_look_at_puts_the_target_on_the_optical_axis_with_world_y_up():
    import numpy as np

    from backend.scene import look_at

    w2c = look_at((1.0, -0.5, -3.0), target=(0.2, 0.1, 0.0))
    R = w2c[:3, :3]
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    cam = w2c[:3, :3] @ np.array([0.2, 0.1, 0.0]) + w2c[:3, 3]
    np.testing.assert_allclose(cam[:2], 0.0, atol=1e-12)
    assert cam[2] > 0
    above = w2c[:3, :3] @ np.array([0.2, 1.1, 0.0]) + w2c[:3, 3]  # world +y is image up (smaller y)
    assert above[1] < 0


def test_scene_json_paths_are_relative_with_slashes_or_absolute_across_drives(tmp_path, monkeypatch):
    """Windows: photos on D: and the scene on C: have no relative path (os.path.relpath raises): the export failed."""
    import backend.scene as scene_module
    from backend.scene import relative_posix

    (tmp_path / "photos").mkdir()
    photo = tmp_path / "photos" / "a.png"
    assert relative_posix(photo, tmp_path / "scene") == "../photos/a.png"

    def other_drive(path, start):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(scene_module.os.path, "relpath", other_drive)
    assert relative_posix(photo, tmp_path / "scene") == photo.resolve().as_posix()


def test_camera_numbers_must_be_json_numbers(temple_dir, tmp_path):
    """A string or a boolean in K (or w2c), and ``"version": true``, were read as numbers by numpy."""
    from backend.formats import import_scene

    import_scene("middlebury", temple_dir, tmp_path / "s")
    data = json.loads((tmp_path / "s" / "scene.json").read_text())
    for path, value, match in (
        (("K", 0, 0), "1520.4", r"captures\[0\]\.camera\.K\[0\]\[0\]: must be a number; got '1520.4'"),
        (("K", 2, 2), True, r"captures\[0\]\.camera\.K\[2\]\[2\]: must be a number; got True"),
        (("w2c", 0, 3), None, r"captures\[0\]\.camera\.w2c"),
    ):
        bad = json.loads(json.dumps(data))
        key, i, j = path
        bad["captures"][0]["camera"][key][i][j] = value
        (tmp_path / "s" / "scene.json").write_text(json.dumps(bad))
        with pytest.raises(SceneError, match=match):
            load_scene(tmp_path / "s")
    (tmp_path / "s" / "scene.json").write_text(json.dumps({**data, "version": True}))
    with pytest.raises(SceneError, match="version: scene format version must be 1; got True"):
        load_scene(tmp_path / "s")


def test_same_shape_allows_each_sides_rounding_either_way_round():
    """One rule for a trajectory camera against the first and an LLFF image against its hwf: a size scaled down and
    rounded keeps its shape (a small first camera's rounding is not multiplied up; a portrait images_8 of 3004x4003
    is 376x500); another aspect is not."""
    from backend.scene import same_shape

    assert same_shape(1920, 1080, 100, 56) and same_shape(100, 56, 1920, 1080)
    assert same_shape(376, 500, 3004, 4003) and same_shape(504, 378, 4032, 3024)
    assert not same_shape(30, 90, 100, 20) and not same_shape(1920, 1088, 1920, 1080)
    assert not same_shape(504, 378, 3024, 4032)  # height and width swapped
