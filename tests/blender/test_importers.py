"""Importers and scene reading, run from the repository package (no service needed)."""

from __future__ import annotations

import os
from pathlib import Path

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Vector

from blender_addon import cameras as cam_math
from blender_addon import importers, scene_io
from blender_addon.errors import ReconLoopError
from blender_addon.scene_read import read_captures, sample_camera, sample_trajectory

from ._temple import build_temple_scene_plain, temple_captures

MAX_ERROR_PX = 0.01


def test_animated_trajectory_is_sampled_per_frame_and_frame_restored():
    scene = bpy.context.scene
    obj = bpy.data.objects.new("traj", bpy.data.cameras.new("traj"))
    scene.collection.objects.link(obj)
    for frame, (x, lens, shift) in {1: (0.0, 30.0, 0.0), 5: (4.0, 70.0, 0.2)}.items():
        obj.location = (x, 0.0, 0.0)
        obj.data.lens, obj.data.shift_x = lens, shift
        obj.keyframe_insert("location", frame=frame)
        obj.data.keyframe_insert("lens", frame=frame)
        obj.data.keyframe_insert("shift_x", frame=frame)
    scene.frame_set(3)
    lens_now = obj.data.lens
    samples = sample_trajectory(obj, scene, 1, 5, 2)
    assert [f for f, _ in samples] == [1, 3, 5]
    assert scene.frame_current == 3 and obj.data.lens == lens_now
    W = scene.render.resolution_x
    first, last = samples[0][1], samples[-1][1]
    assert first.K[0, 0] == pytest.approx(30.0 * W / 36.0) and last.K[0, 0] == pytest.approx(70.0 * W / 36.0)
    assert last.K[0, 2] == pytest.approx(W / 2 - 0.2 * W)
    # camera centres follow the animation: c = -R^T t
    centres = [-(c.w2c[:3, :3].T @ c.w2c[:3, 3]) for _, c in samples]
    assert centres[0][0] == pytest.approx(0.0, abs=1e-6) and centres[-1][0] == pytest.approx(4.0, abs=1e-6)
    with pytest.raises(ReconLoopError, match="frame step must be at least 1"):
        sample_trajectory(obj, scene, 1, 5, 0)


def test_captures_read_back_as_the_dataset_cameras(temple_dir):
    """Temple cameras (non-square pixels, off-centre principal point) in Blender, read back for submit."""
    made = build_temple_scene_plain(temple_dir)
    captures = read_captures(made["collection"], bpy.context.scene)
    assert [c.name for c in captures] == [c.name for c in made["captures"]]
    for got, cap in zip(captures, made["captures"]):
        assert got.image == cap.image.read_bytes() and got.image_format == "png"
        assert (got.camera.width, got.camera.height) == (cap.camera.width, cap.camera.height)
        np.testing.assert_allclose(got.camera.K, cap.camera.K, atol=1e-6)
        np.testing.assert_allclose(got.camera.w2c, cap.camera.w2c, atol=1e-6)  # Blender keeps float32


def test_capture_without_photo_is_a_clear_error():
    coll = bpy.data.collections.new("caps")
    bpy.context.scene.collection.children.link(coll)
    obj = bpy.data.objects.new("cam_a", bpy.data.cameras.new("cam_a"))
    coll.objects.link(obj)
    with pytest.raises(ReconLoopError, match="camera 'cam_a' has no photo"):
        read_captures(coll, bpy.context.scene)


def _capture_with_photos(tmp_path: Path, sizes: list[tuple[int, int]]) -> tuple[bpy.types.Collection, bpy.types.Object]:
    """A collection with one camera whose backgrounds are PNG photos of ``sizes``, in that order."""
    from PIL import Image

    coll = bpy.data.collections.new("caps")
    bpy.context.scene.collection.children.link(coll)
    obj = bpy.data.objects.new("cam_a", bpy.data.cameras.new("cam_a"))
    coll.objects.link(obj)
    for w, h in sizes:
        path = tmp_path / f"photo_{w}x{h}.png"
        Image.new("RGB", (w, h)).save(path)
        obj.data.background_images.new().image = bpy.data.images.load(str(path))
    return coll, obj


def test_the_photo_is_the_shown_background_with_its_own_pixel_aspect(tmp_path):
    """The photo read is the background Blender shows (a hidden one before it was sent instead), mapped to the frame
    with its own pixel aspect (``Image.display_aspect``: an anamorphic photo was 150 px off in Fit)."""
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 1920, 1080, 100
    coll, obj = _capture_with_photos(tmp_path, [(1920, 1080), (1440, 1080)])
    hidden, shown = obj.data.background_images
    hidden.show_background_image = False
    shown.frame_method = "FIT"
    shown.image.display_aspect = (4 / 3, 1.0)
    (capture,) = read_captures(coll, scene)
    assert (capture.camera.width, capture.camera.height) == (1440, 1080)
    K = sample_camera(obj, scene).K  # the render's: 1920x1080, as the photo shows
    np.testing.assert_allclose(capture.camera.K, np.diag([0.75, 1.0, 1.0]) @ K, atol=1e-6)
    shown.show_background_image = False  # none shown: the first photo, hidden to look at the scene, is the photo
    assert read_captures(coll, scene)[0].camera.width == 1920


def test_a_sheared_or_mirrored_camera_is_named_with_its_frame(tmp_path):
    """A camera under a parent of non-uniform scale with a rotation between them, or under a negative scale, has no
    pinhole camera (it was sent 893 px off, or mirrored): the error names the camera, and the frame in a path."""
    scene = bpy.context.scene
    coll, obj = _capture_with_photos(tmp_path, [(1920, 1080)])
    parent = bpy.data.objects.new("rig", None)
    scene.collection.objects.link(parent)
    obj.parent = parent
    obj.rotation_euler = (1.2, 0.3, 0.7)
    parent.scale = (1.0, 3.0, 0.5)
    bpy.context.view_layer.update()
    with pytest.raises(ReconLoopError, match="camera 'cam_a': its axes are sheared"):
        read_captures(coll, scene)
    parent.scale = (1.0, 1.0, 1.0)
    parent.keyframe_insert("scale", frame=1)
    parent.scale = (-1.0, 1.0, 1.0)
    parent.keyframe_insert("scale", frame=3)
    assert len(sample_trajectory(obj, scene, 1, 1, 1)) == 1
    with pytest.raises(ReconLoopError, match=r"camera 'cam_a': its axes are mirrored.* \(at frame 3\)"):
        sample_trajectory(obj, scene, 1, 3, 2)


def test_estimated_cameras_match_their_opencv_values(temple_dir, tmp_path):
    caps, _ = temple_captures(temple_dir, ids=(0, 5))
    est = [
        scene_io.EstimatedCamera(
            name=c.name,
            image=str(c.image),
            camera=cam_math.OpenCVCamera(w2c=c.camera.w2c, K=c.camera.K, width=c.camera.width, height=c.camera.height),
        )
        for c in caps
    ]
    scene = bpy.context.scene
    # Results leave the render settings alone: the scene's are the photos' (as after importing them).
    first = cam_math.blender_from_opencv(caps[0].camera.w2c, caps[0].camera.K, 640, 480)
    r = scene.render
    r.resolution_x, r.resolution_y, r.pixel_aspect_x, r.pixel_aspect_y = (
        640,
        480,
        first.pixel_aspect_x,
        first.pixel_aspect_y,
    )
    coll = importers.job_collection(scene, "estimated", "job0")
    objs = importers.import_estimated_cameras(est, {c.name: str(c.image) for c in caps}, coll, scene)
    bpy.context.view_layer.update()
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.05, 0.1, (20, 3))  # inside the temple's bounding box
    for obj, cap in zip(objs, caps):
        assert obj.data.background_images[0].image.filepath == str(cap.image)
        uv, _ = cap.camera.project(pts)
        for p, (u, v) in zip(pts, uv):
            ndc = world_to_camera_view(scene, obj, Vector(p.tolist()))
            assert abs(ndc.x * cap.camera.width - u) < MAX_ERROR_PX
            assert abs((1 - ndc.y) * cap.camera.height - v) < MAX_ERROR_PX
        np.testing.assert_allclose(sample_camera(obj, scene).K, cap.camera.K, atol=1e-6)


def test_rerun_replaces_its_collection():
    scene = bpy.context.scene
    from protocol.ply import PointArrays

    p = PointArrays(
        xyz=np.zeros((3, 3), np.float32),
        rgb=np.zeros((3, 3), np.uint8),
        confidence=np.ones(3, np.float32),
        source=np.zeros(3, np.int32),
    )
    first = importers.job_collection(scene, "caps", "job1")
    importers.import_points(p, "caps points", first)
    other = importers.job_collection(scene, "other", "job2")
    importers.import_points(p, "other points", other)
    again = importers.job_collection(scene, "caps", "job3")
    assert again == first and again["reconloop_job"] == "job3" and len(again.objects) == 0
    assert "caps points" not in bpy.data.objects and "caps points" not in bpy.data.meshes
    assert len(other.objects) == 1


def test_frame_sequence_fills_gaps(tmp_path):
    from PIL import Image

    frames = {}
    for f in (1, 3):
        path = tmp_path / "frames" / f"frame_{f:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 6), (f * 40, 0, 0)).save(path)
        frames[f] = str(path)
    first = importers.write_frame_sequence(frames, str(tmp_path / "seq"), 1, 4)
    names = sorted(p.name for p in (tmp_path / "seq").iterdir())
    assert names == [f"frame_{f:06d}.png" for f in (1, 2, 3, 4)]
    assert (tmp_path / "seq" / "frame_000002.png").read_bytes() == (tmp_path / "frames" / "frame_0001.png").read_bytes()
    cam = bpy.data.objects.new("traj", bpy.data.cameras.new("traj"))
    bg = importers.set_background_sequence(cam, first, 1, 4)
    assert bg.image.source == "SEQUENCE" and bg.image_user.frame_duration == 4
    # Blender's file number for scene frame f: f - frame_start + 1 + frame_offset == f
    assert 3 - bg.image_user.frame_start + 1 + bg.image_user.frame_offset == 3
    # the same job's sequence again (its next segment's frames): the same image, reloaded, no stale copy
    images = len(bpy.data.images)
    cam.data.background_images.new()
    again = importers.set_background_sequence(cam, first, 1, 5)
    assert again.image == bg.image and again.image_user.frame_duration == 5 and len(bpy.data.images) == images
    kinds = [b.image is not None for b in cam.data.background_images]
    assert sorted(kinds) == [False, True]  # other backgrounds left alone
    # another job's sequence replaces it, and the replaced image goes where nothing else uses it
    other = importers.set_background_sequence(cam, first, 1, 4, job="job2")
    assert other.image.get(importers.FRAME_JOB) == "job2" and len(bpy.data.images) == images
    assert sorted(b.image is not None for b in cam.data.background_images) == [False, True]
    # ... but stays where a material's node shows it too
    mat = bpy.data.materials.new("uses the frames")
    mat.node_tree.nodes.new("ShaderNodeTexImage").image = other.image
    kept = other.image
    importers.set_background_sequence(cam, first, 1, 4, job="job3")
    assert kept.name in bpy.data.images and len(bpy.data.images) == images + 1


def test_cycles_shows_points_and_gaussians_in_their_colours():
    """A tiny Cycles render: red points and green Gaussians come out red and green."""
    from protocol.ply import GaussianArrays, PointArrays

    scene = bpy.context.scene
    for obj in list(scene.objects):
        if obj.type != "CAMERA":
            bpy.data.objects.remove(obj)
    coll = importers.job_collection(scene, "render", "job")
    n = 60
    rng = np.random.default_rng(0)
    left = np.c_[rng.uniform(-1.6, -0.2, n), rng.uniform(-1, 1, n), np.zeros(n)].astype(np.float32)
    right = left + np.float32([1.8, 0, 0])
    pts = importers.import_points(
        PointArrays(
            xyz=left,
            rgb=np.tile(np.uint8([[255, 0, 0]]), (n, 1)),
            confidence=np.ones(n, np.float32),
            source=np.zeros(n, np.int32),
        ),
        "P",
        coll,
    )
    importers._set_modifier_input(pts.modifiers[0], "Point Radius", 0.08)
    sh = np.zeros((n, 1, 3), np.float32)
    sh[:, 0] = (np.float32([0, 1, 0]) - 0.5) / 0.28209479  # base colour pure green
    importers.import_gaussians(
        GaussianArrays(
            means=right,
            log_scales=np.full((n, 3), np.log(0.06), np.float32),
            quats=np.tile(np.float32([1, 0, 0, 0]), (n, 1)),
            opacity_logits=np.full(n, 6.0, np.float32),
            sh=sh,
        ),
        "G",
        coll,
    )
    cam = scene.camera
    cam.location, cam.rotation_euler = (0, 0, 5), (0, 0, 0)
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 4
    scene.cycles.device = "CPU"
    scene.view_settings.view_transform = "Standard"
    scene.render.resolution_x, scene.render.resolution_y = 96, 72
    scene.render.filepath = str(Path(bpy.app.tempdir or "/tmp") / "reconloop_colours.png")
    bpy.ops.render.render(write_still=True)
    from PIL import Image

    img = np.asarray(Image.open(scene.render.filepath).convert("RGB")).astype(int)
    half = img.shape[1] // 2
    red = (img[:, :half, 0] > 150) & (img[:, :half, 1] < 80)
    green = (img[:, half:, 1] > 150) & (img[:, half:, 0] < 80)
    assert red.sum() > 20, "points did not render red"
    assert green.sum() > 20, "Gaussians did not render green"


def test_gaussians_drawn_by_an_older_add_on_take_this_ones_node_group_and_material():
    """A .blend saved with an earlier add-on holds its node groups and material under the names this one reuses
    (every SH degree's, and a ".001" copy that an appended object brought): all are rebuilt on the next import
    of any degree, and the Gaussians already in the file take the new ones, their modifiers' inputs with them."""
    from protocol.ply import GaussianArrays

    n = 4

    def gaussians(degree: int) -> GaussianArrays:
        return GaussianArrays(
            means=np.zeros((n, 3), np.float32),
            log_scales=np.full((n, 3), -3.0, np.float32),
            quats=np.tile(np.float32([1, 0, 0, 0]), (n, 1)),
            opacity_logits=np.zeros(n, np.float32),
            sh=np.zeros((n, (degree + 1) ** 2, 3), np.float32),
        )

    coll = importers.job_collection(bpy.context.scene, "older", "job")
    first = importers.import_gaussians(gaussians(0), "first", coll)
    third = importers.import_gaussians(gaussians(3), "third", coll)
    appended = first.copy()  # an object appended from another file with its own copy of the group
    coll.objects.link(appended)
    appended.modifiers[0].node_group = first.modifiers[0].node_group.copy()
    assert appended.modifiers[0].node_group.name == importers.GAUSSIANS_NODES + ".001"
    older = [first, third, appended]
    for made in [o.modifiers[0].node_group for o in older] + [importers.gaussian_material()]:
        del made[importers.VERSION_PROP]  # as an earlier version left them: no version, no low-pass input
        if isinstance(made, bpy.types.NodeTree):
            made.interface.remove(made.interface.items_tree[importers.LOW_PASS_INPUT])
    users = bpy.data.node_groups.new(importers.GAUSSIANS_NODES + " SH 7", "GeometryNodeTree")  # not a degree of ours
    newer = importers.gaussians_node_group(1)
    newer[importers.VERSION_PROP] = importers.GAUSSIANS_VERSION + 1  # a newer add-on's: not downgraded
    importers.import_gaussians(gaussians(0), "second", coll)
    groups = [g for g in bpy.data.node_groups if g.name.startswith(importers.GAUSSIANS_NODES)]
    assert sorted(g.name for g in groups) == [
        importers.GAUSSIANS_NODES,
        *(f"{importers.GAUSSIANS_NODES} SH {d}" for d in (1, 3, 7)),
    ]
    assert (
        users.get(importers.VERSION_PROP) is None and newer[importers.VERSION_PROP] == importers.GAUSSIANS_VERSION + 1
    )
    groups = [g for g in groups if g not in (users, newer)]
    assert all(g[importers.VERSION_PROP] == importers.GAUSSIANS_VERSION for g in groups)
    assert importers.gaussian_material()[importers.VERSION_PROP] == importers.GAUSSIANS_VERSION
    assert not [ID.name for ID in (*bpy.data.node_groups, *bpy.data.materials) if "older add-on" in ID.name]
    for obj, degree in zip(older, (0, 3, 0), strict=True):  # the older Gaussians render as this version draws them
        mod = obj.modifiers[0]
        assert mod.node_group == importers.gaussians_node_group(degree), obj.name
        low_pass = mod.node_group.interface.items_tree[importers.LOW_PASS_INPUT].identifier
        assert low_pass in mod.keys(), f"{obj.name}: the modifier lacks the Low-pass input's value"


def _photo_camera(coll, name: str, photo: Path, frame_method: str = "STRETCH"):
    obj = bpy.data.objects.new(name, bpy.data.cameras.new(name))
    coll.objects.link(obj)
    bg = obj.data.background_images.new()
    bg.image = bpy.data.images.load(str(photo))
    bg.frame_method = frame_method
    return obj


def test_a_stretched_photo_of_another_shape_is_refused(tmp_path):
    from PIL import Image

    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 640, 480, 100
    Image.new("RGB", (480, 640)).save(tmp_path / "tall.png")
    Image.new("RGB", (1280, 960)).save(tmp_path / "big.png")
    coll = bpy.data.collections.new("caps")
    scene.collection.children.link(coll)
    _photo_camera(coll, "a", tmp_path / "big.png")  # the render's shape at another size: fine
    _photo_camera(coll, "b", tmp_path / "tall.png")
    with pytest.raises(ReconLoopError, match=r"camera 'b': its photo is 480x640 pixels and the render 640x480") as err:
        read_captures(coll, scene)
    assert "set the render resolution (Output properties) to 480x640" in str(err.value)
    bpy.data.objects["b"].data.background_images[0].frame_method = "FIT"  # drawn as it is: accepted
    assert [c.name for c in read_captures(coll, scene)] == ["a", "b"]


def _estimated(name: str, w: int, h: int, fx: float, fy: float) -> scene_io.EstimatedCamera:
    w2c = np.eye(4)
    w2c[2, 3] = 5.0
    K = np.array([[fx, 0, w / 2], [0, fy, h / 2], [0, 0, 1]])
    return scene_io.EstimatedCamera(name=name, image=name, camera=cam_math.OpenCVCamera(w2c, K, w, h))


def _render_settings(scene) -> tuple:
    r = scene.render
    return r.resolution_x, r.resolution_y, r.resolution_percentage, r.pixel_aspect_x, r.pixel_aspect_y


def test_a_jobs_path_leaves_the_render_settings_and_estimated_cameras_set_them(tmp_path):
    """The path a job invented (at its working size) never changes the render settings: the next run
    reads the same cameras at the same render size. Estimated cameras are the photos' cameras: the
    render takes their size and pixel aspect, so they read back as estimated."""
    from PIL import Image

    scene = bpy.context.scene
    Image.new("RGB", (1920, 1080)).save(tmp_path / "a.png")
    coll = bpy.data.collections.new("caps")
    scene.collection.children.link(coll)
    _photo_camera(coll, "a", tmp_path / "a.png").location = (0, -5, 0)
    before, K_before = _render_settings(scene), read_captures(coll, scene)[0].camera.K
    results = importers.job_collection(scene, "caps", "job1")
    path = [(f, _estimated("p", 320, 240, 300.0, 280.0).camera) for f in (1, 2)]
    importers.import_trajectory_camera(path, "caps path", results, scene)
    assert _render_settings(scene) == before
    np.testing.assert_array_equal(read_captures(coll, scene)[0].camera.K, K_before)
    importers.import_estimated_cameras([_estimated("e", 320, 240, 300.0, 280.0)], {}, results, scene)
    want = _estimated("e", 320, 240, 300.0, 280.0).blender_params()
    assert _render_settings(scene) == pytest.approx((320, 240, 100, want.pixel_aspect_x, want.pixel_aspect_y))
    # Estimated cameras of different sizes or fx/fy cannot share the scene: refused, naming them.
    mixed = [_estimated("e1", 320, 240, 300.0, 300.0), _estimated("e2", 240, 320, 300.0, 300.0)]
    n_objects = len(bpy.data.objects)
    with pytest.raises(ReconLoopError, match=r"estimated cameras: 1 camera.*'e2' \(240x320, fx/fy 1\)"):
        importers.import_estimated_cameras(mixed, {}, results, scene)
    assert len(bpy.data.objects) == n_objects


def test_a_replaced_path_camera_leaves_no_data_behind(registered):
    """Import job refreshes a job's collection: each re-import replaces the path camera (remove_kind), and
    its camera data and action go with it instead of piling up as ``path.001``, ``path.002``."""
    scene = bpy.context.scene
    results = importers.job_collection(scene, "re", "job-re")
    path = [(f, _estimated("p", 320, 240, 300.0, 280.0).camera) for f in (1, 2)]
    cameras, actions = len(bpy.data.cameras), len(bpy.data.actions)
    for _ in range(3):
        importers.remove_kind(results, importers.KIND_TRAJECTORY)
        importers.import_trajectory_camera(path, "re path", results, scene)
    assert len(bpy.data.cameras) == cameras + 1 and len(bpy.data.actions) == actions + 1


def test_another_photo_folder_of_the_same_name_gets_its_own_collection():
    """Two folders named ``images`` (two datasets) in one scene: the second's job does not empty the first's
    results; a re-run of either replaces its own."""
    scene = bpy.context.scene
    first = importers.job_collection(scene, "images", "job1", "/data/door/images")
    importers._link(bpy.data.objects.new("door points", bpy.data.meshes.new("m")), first, "points")
    second = importers.job_collection(scene, "images", "job2", "/data/fern/images")
    assert second is not first and [o.name for o in first.objects] == ["door points"]
    assert second["reconloop_key"] == "images 2" and second.name == "ReconLoop images 2"
    importers._link(bpy.data.objects.new("fern points", bpy.data.meshes.new("m")), second, "points")
    again = importers.job_collection(scene, "images", "job3", "/data/fern/images")
    assert again is second and len(again.objects) == 0 and [o.name for o in first.objects] == ["door points"]
    assert importers.job_collection(scene, "images", "job4", "/data/door/images") is first
    third = importers.job_collection(scene, "images", "job5", "/data/dino/images")
    assert third["reconloop_key"] == "images 3"


def test_a_rerun_finds_its_own_collection_whatever_its_number_and_an_old_one_is_claimed():
    """A re-run reuses its source's collection even where a lower number came free (the first folder's deleted), and
    a collection made before sources were recorded is claimed by the first run of its key, not emptied by every
    folder of that name."""
    scene = bpy.context.scene
    legacy = importers.job_collection(scene, "images", "job0")  # no source: as an older add-on made it
    assert "reconloop_source" not in legacy
    door = importers.job_collection(scene, "images", "job1", "/data/door/images")
    assert door is legacy and door["reconloop_source"] == "/data/door/images"
    importers._link(bpy.data.objects.new("door points", bpy.data.meshes.new("m")), door, "points")
    fern = importers.job_collection(scene, "images", "job2", "/data/fern/images")
    assert fern is not door and [o.name for o in door.objects] == ["door points"]
    bpy.data.collections.remove(door)  # "images" is free again
    again = importers.job_collection(scene, "images", "job3", "/data/fern/images")
    assert again is fern and again["reconloop_key"] == "images 2"
    assert [c for c in scene.collection.children_recursive if c.get("reconloop_key", "").startswith("images")] == [fern]


def _gaussians(n: int, degree: int = 0, **values: np.ndarray):
    from protocol.ply import GaussianArrays, num_sh_bases

    g = {
        "means": np.zeros((n, 3), np.float32),
        "log_scales": np.full((n, 3), -3.0, np.float32),
        "quats": np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
        "opacity_logits": np.zeros(n, np.float32),
        "sh": np.zeros((n, num_sh_bases(degree), 3), np.float32),
    }
    return GaussianArrays(**{**g, **values})


@pytest.mark.parametrize("degree", [0, 3])
def test_an_empty_result_imports_as_an_empty_object(tmp_path, degree):
    """0 Gaussians or 0 points (a job whose masks cropped everything): a mesh without vertices has no position
    attribute, and the import raised KeyError where an empty object is the result."""
    from protocol.ply import write_gaussians_ply

    from ._plys import write_blank_points

    coll = bpy.data.collections.new("results")
    write_gaussians_ply(tmp_path / "g.ply", _gaussians(0, degree))
    obj = importers.import_gaussians_ply(str(tmp_path / "g.ply"), f"empty {degree}", coll)
    assert len(obj.data.vertices) == 0 and obj.modifiers["Gaussians"].node_group is not None
    points = importers.import_points_ply(str(write_blank_points(tmp_path / "p.ply", 0)), "no points", coll)
    assert len(points.data.vertices) == 0


def test_rotations_far_from_unit_length_are_normalised_and_huge_scales_refused(tmp_path):
    """A rotation of length 1e-30 was stored as [inf, nan, nan, nan] and one of 3e38 as zeros (normalised in
    float32); a log-scale of 200 as an inf scale. Rotations are normalised in float64; such scales are refused."""
    from protocol.ply import write_gaussians_ply

    coll = bpy.data.collections.new("results")
    quats = np.array([[1e-30, 0, 0, 0], [3e38, 3e38, 0, 0]], np.float32)
    obj = importers.import_gaussians(_gaussians(2, quats=quats), "odd rotations", coll)
    got = np.zeros(8, np.float32)
    obj.data.attributes[importers.ATTR_ROTATION].data.foreach_get("value", got)
    np.testing.assert_allclose(got.reshape(2, 4), [[1, 0, 0, 0], [0.5**0.5, 0.5**0.5, 0, 0]], atol=1e-6)
    write_gaussians_ply(tmp_path / "huge.ply", _gaussians(2, log_scales=np.array([[200, 0, 0], [0, 0, 0]], np.float32)))
    with pytest.raises(ReconLoopError, match="1 of 2 Gaussians have a scale_\\* above 80"):
        importers.import_gaussians_ply(str(tmp_path / "huge.ply"), "huge", coll)


def test_a_result_that_fails_to_read_keeps_the_earlier_one(tmp_path):
    """A job's gaussians.ply that cannot be read (cut short) is named in ``failed``; the earlier Gaussians stay (they
    were removed before the new file was read)."""
    from blender_addon import operators
    from protocol.ply import write_gaussians_ply

    importer = operators.ResultImporter(bpy.context.scene.name, "k", "", (1, 2))
    write_gaussians_ply(tmp_path / "gaussians.ply", _gaussians(3))
    importer.on_file(scene_io.KIND_GAUSSIANS, "gaussians.ply", str(tmp_path / "gaussians.ply"))
    first = importer.objects[scene_io.KIND_GAUSSIANS]
    data = (tmp_path / "gaussians.ply").read_bytes()
    (tmp_path / "gaussians.ply").write_bytes(data[: len(data) - 20])
    importer.on_file(scene_io.KIND_GAUSSIANS, "gaussians.ply", str(tmp_path / "gaussians.ply"))
    assert "gaussians.ply" in importer.failed
    assert first in bpy.data.objects and len(bpy.data.objects[first].data.vertices) == 3


def test_a_rerun_keeps_the_earlier_results_until_its_own_replace_them(tmp_path):
    """A re-run emptied its collection when its first file came, so one cancelled before its Gaussians left none:
    now each kind stays until the new run's replaces it, and a run that finishes drops the kinds it did not deliver."""
    from blender_addon import operators
    from protocol.ply import write_gaussians_ply

    from ._plys import write_blank_points

    points = str(write_blank_points(tmp_path / "points.ply", 4))
    write_gaussians_ply(tmp_path / "gaussians.ply", _gaussians(3))

    def run(job: str, files: list[tuple[str, str]]) -> operators.ResultImporter:
        importer = operators.ResultImporter(bpy.context.scene.name, "caps", "", (1, 2))
        importer.job = job
        for kind, path in files:
            importer.on_file(kind, os.path.basename(path), path)
        return importer

    both = [(scene_io.KIND_POINTS, points), (scene_io.KIND_GAUSSIANS, str(tmp_path / "gaussians.ply"))]
    run("job1", both).drop_earlier()
    cancelled = run("job2", both[:1])  # cancelled after its points: no drop_earlier
    kinds = sorted(o.get(importers.OBJECT_KIND) for o in cancelled.collection().objects)
    assert kinds == [scene_io.KIND_GAUSSIANS, scene_io.KIND_POINTS]
    assert cancelled.objects[scene_io.KIND_POINTS] in bpy.data.objects  # the new points, beside the old Gaussians
    done = run("job3", both[:1])
    done.drop_earlier()  # finished without Gaussians (no fit): the earlier run's go
    assert [o.get(importers.OBJECT_KIND) for o in done.collection().objects] == [scene_io.KIND_POINTS]
