"""Capture masks: scene.json ``mask``, alpha channels, DTU ``mask/`` folders and Middlebury silhouettes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from backend.formats import import_scene
from backend.masks import (
    MaskError,
    capture_mask,
    image_alpha,
    read_mask,
    resize_mask,
    stack_masks,
    threshold_silhouette,
)
from backend.scene import Camera, Capture, SceneError, load_scene, look_at, save_scene

DINO_BOX = (np.array([-0.061897, -0.018874, -0.057845]), np.array([0.010897, 0.068227, 0.015495]))


def test_scene_json_mask_round_trip_and_errors(temple_dir, tmp_path):
    scene = import_scene("middlebury", temple_dir, tmp_path / "s")
    mask = np.zeros((scene.captures[0].camera.height, scene.captures[0].camera.width), bool)
    mask[100:200, 150:300] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "s" / "m0.png")
    data = json.loads((tmp_path / "s" / "scene.json").read_text())
    data["captures"][0]["mask"] = "m0.png"
    (tmp_path / "s" / "scene.json").write_text(json.dumps(data))
    loaded = load_scene(tmp_path / "s")
    assert loaded.captures[0].mask == (tmp_path / "s" / "m0.png").resolve()
    assert loaded.captures[1].mask is None
    np.testing.assert_array_equal(capture_mask(loaded.captures[0], loaded.captures[0].camera), mask)
    assert capture_mask(loaded.captures[1]) is None  # an RGB photo without a mask file
    save_scene(loaded, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "scene.json").read_text())["captures"][0]["mask"] == "m0.png"
    # a mask of another size, and a missing one, are refused naming the field
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "s" / "small.png")
    for bad, match in (("small.png", r"captures\[0\]\.mask: small.png is 10x10"), ("nope.png", "file not found")):
        data["captures"][0]["mask"] = bad
        (tmp_path / "s" / "scene.json").write_text(json.dumps(data))
        with pytest.raises(SceneError, match=match):
            load_scene(tmp_path / "s")


def test_alpha_channel_is_the_mask(temple_dir, tmp_path):
    scene = import_scene("middlebury", temple_dir, tmp_path / "s")
    cap = scene.captures[0]
    rgb = np.asarray(Image.open(cap.image).convert("RGB"))
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[50:120, 60:200] = 255
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    from dataclasses import replace

    masked = replace(cap, image=tmp_path / "rgba.png")
    np.testing.assert_array_equal(capture_mask(masked), alpha > 0)
    small = resize_mask(alpha > 0, 64, 48)
    assert small.shape == (48, 64) and small.dtype == bool
    assert read_mask(tmp_path / "rgba.png").sum() == (alpha > 0).sum()


def test_middlebury_silhouettes_cover_the_dino(dino_dir, tmp_path):
    """The README's recipe (0.19, dilate 10, erode 7): every corner of the dino's bounding box that
    projects into a photo lands near or on the silhouette's bounding box, and the backdrop is out."""
    scene = import_scene("middlebury", dino_dir, tmp_path / "dino", silhouettes=True)
    assert all(c.mask is not None and c.mask.parent.name == "masks" for c in scene.captures)
    centre = (DINO_BOX[0] + DINO_BOX[1]) / 2
    for cap in scene.captures[:4]:
        m = capture_mask(cap, cap.camera)
        assert m.shape == (cap.camera.height, cap.camera.width)
        assert 0.02 < m.mean() < 0.5  # the object, not the black backdrop
        uv, _ = cap.camera.project(centre[None])
        u, v = np.floor(uv[0]).astype(int)
        assert m[v, u]  # the box centre is on the object
        assert not m[0, 0] and not m[-1, -1]
    loaded = load_scene(tmp_path / "dino")
    assert loaded.captures[3].mask == scene.captures[3].mask
    plain = threshold_silhouette(np.zeros((20, 20, 3), np.uint8), threshold=0.19, dilate_px=10, erode_px=7)
    assert not plain.any()


def _dtu_folder(temple_dir, root, count: int, *, with_masks: bool):
    """A folder in the real IDR/NeuS layout made from the first temple photos: image/000000.png...,
    mask/000.png..., cameras_sphere.npz with world_mat_i, world_mat_inv_i, scale_mat_i,
    scale_mat_inv_i, camera_mat_i, camera_mat_inv_i."""
    temple = import_scene("middlebury", temple_dir, root / "temple", silhouettes=with_masks)
    (root / "dtu" / "image").mkdir(parents=True)
    if with_masks:
        (root / "dtu" / "mask").mkdir()
    mats = {}
    scale_mat = np.diag([0.1, 0.1, 0.1, 1.0])
    scale_mat[:3, 3] = [-0.02, 0.1, 0.025]
    for i, cap in enumerate(temple.captures[:count]):
        (root / "dtu" / "image" / f"{i:06d}.png").symlink_to(cap.image)
        if with_masks:
            (root / "dtu" / "mask" / f"{i:03d}.png").symlink_to(cap.mask)
        K4 = np.eye(4)
        K4[:3, :3] = cap.camera.K
        K4[:2, 2] -= 0.5  # IDR's K: pixel centres at integers (ours at i + 0.5)
        world_mat = K4 @ cap.camera.w2c
        mats[f"world_mat_{i}"] = world_mat
        mats[f"world_mat_inv_{i}"] = np.linalg.inv(world_mat)
        mats[f"scale_mat_{i}"] = scale_mat
        mats[f"scale_mat_inv_{i}"] = np.linalg.inv(scale_mat)
        mats[f"camera_mat_{i}"] = K4
        mats[f"camera_mat_inv_{i}"] = np.linalg.inv(K4)
    np.savez(root / "dtu" / "cameras_sphere.npz", **mats)
    return temple


def test_dtu_real_layout_with_masks(temple_dir, tmp_path):
    temple = _dtu_folder(temple_dir, tmp_path, 5, with_masks=True)
    scene = import_scene("dtu", tmp_path / "dtu", tmp_path / "out", use_scale_mat=False)
    assert len(scene.captures) == 5
    for a, b in zip(scene.captures, temple.captures):
        np.testing.assert_allclose(a.camera.w2c, b.camera.w2c, atol=1e-7)
        np.testing.assert_allclose(a.camera.K, b.camera.K, atol=1e-7)
        assert a.mask is not None and a.mask.name.endswith(".png")
        np.testing.assert_array_equal(capture_mask(a), capture_mask(b))
    unit = import_scene("dtu", tmp_path / "dtu", tmp_path / "unit")  # scale_mat_i applied
    for a, b in zip(unit.captures, scene.captures):  # x_unit = (x_world - t) / s
        np.testing.assert_allclose(a.camera.center, (b.camera.center - [-0.02, 0.1, 0.025]) / 0.1, atol=1e-6)


def test_dtu_drops_a_negligible_skew_and_names_resized_photos(temple_dir, tmp_path):
    """A calibrated projection decomposes with a trace of skew, which the exporters' formats cannot hold: below
    SKEW_MAX_PX it is none (the scene exports). Photos smaller than their cameras are refused by name."""
    from backend.formats import export_scene

    _dtu_folder(temple_dir, tmp_path, 3, with_masks=False)
    npz = tmp_path / "dtu" / "cameras_sphere.npz"
    mats = dict(np.load(npz))
    for i in range(3):  # skew of 1e-5 fx: at most 0.004 px on a 480-pixel-high photo
        mats[f"world_mat_{i}"][0, :] += 1e-5 * mats[f"world_mat_{i}"][1, :]
    np.savez(npz, **mats)
    scene = import_scene("dtu", tmp_path / "dtu", tmp_path / "out", use_scale_mat=False)
    assert all(c.camera.K[0, 1] == 0.0 for c in scene.captures)
    export_scene("nerf", scene, tmp_path / "nerf")  # refused any skew
    small = tmp_path / "dtu" / "image"
    for path in small.iterdir():  # the photos at half size, the cameras as measured
        Image.open(path.resolve()).resize((320, 240)).save(path.with_suffix(".tmp.png"))
        path.unlink()
        path.with_suffix(".tmp.png").rename(path)
    with pytest.raises(
        SceneError, match=r"the principal point \(.*\) is far from the centre of 000000.png \(320x240\)"
    ):
        import_scene("dtu", tmp_path / "dtu", tmp_path / "out2", use_scale_mat=False)


def test_dtu_counts_cameras_by_world_mat_keys_only(temple_dir, tmp_path):
    _dtu_folder(temple_dir, tmp_path, 3, with_masks=False)
    (tmp_path / "dtu" / "image" / "000002.png").unlink()
    with pytest.raises(SceneError, match="holds 2 images; cameras_sphere.npz has 3 cameras"):
        import_scene("dtu", tmp_path / "dtu", tmp_path / "out")


def test_dtu_reads_its_camera_entries_alone(temple_dir, tmp_path):
    """An entry of another name that numpy reads only with pickle (a tool's notes) is not read; one of a camera's
    names that cannot be read is named (the whole file was refused as "not a numpy .npz file")."""
    _dtu_folder(temple_dir, tmp_path, 3, with_masks=False)
    npz = tmp_path / "dtu" / "cameras_sphere.npz"
    mats = dict(np.load(npz))
    np.savez(npz, **mats, meta=np.array([{"tool": "x"}], dtype=object))
    assert len(import_scene("dtu", tmp_path / "dtu", tmp_path / "out", use_scale_mat=False).captures) == 3
    mats["scale_mat_1"] = np.array([{"not": "a matrix"}], dtype=object)
    np.savez(npz, **mats)
    with pytest.raises(SceneError, match=r"cameras_sphere.npz\[scale_mat_1\]: cannot be read: Object arrays"):
        import_scene("dtu", tmp_path / "dtu", tmp_path / "out2")


def test_a_16_bit_photo_or_mask_reads_at_its_level(temple_dir, tmp_path):
    """A 16-bit greyscale PNG (Pillow's I;16) read almost white (Pillow clips the level at 255: the temple's mean
    191 for 33), and a 16-bit mask's soft edge as kept."""
    from backend.stages.cameras import load_image

    grey = np.asarray(Image.open(next(temple_dir.glob("*.png"))).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "photo16.png")
    assert Image.open(tmp_path / "photo16.png").mode == "I;16"
    np.testing.assert_array_equal(load_image(tmp_path / "photo16.png"), np.dstack([grey] * 3))
    edge = np.array([[0, 100, 200, 255]], np.uint16) * 257  # a soft edge: two pixels below half
    Image.fromarray(edge).save(tmp_path / "mask16.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask16.png"), [[False, False, True, True]])


def test_an_alpha_opaque_everywhere_masks_nothing(temple_dir, tmp_path):
    """An RGBA mask whose alpha is opaque everywhere (an editor's black-and-white export) is its grey level, where
    it kept every pixel; a photo with such an alpha has no mask (no hull, no masked scores)."""
    rgb = np.asarray(Image.open(next(temple_dir.glob("*.png"))).convert("RGB"))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "opaque.png")
    assert image_alpha(tmp_path / "opaque.png") is None
    white = np.zeros(rgb.shape, np.uint8)
    white[10:20, 30:50] = 255
    Image.fromarray(np.dstack([white, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "mask_rgba.png")
    assert read_mask(tmp_path / "mask_rgba.png").sum() == 200


def test_a_mask_that_keeps_no_pixel_is_refused_naming_the_file(tmp_path):
    """A 0/1 label image keeps nothing above half: refused, not read as an empty object; an all-black
    mask is a view without the object."""
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 1
    Image.fromarray(labels).save(tmp_path / "labels.png")
    with pytest.raises(SceneError, match=r"labels.png keeps no pixel \(its highest value 1 is not above 127"):
        read_mask(tmp_path / "labels.png")
    Image.fromarray(labels * 255).save(tmp_path / "white.png")
    assert read_mask(tmp_path / "white.png").sum() == 16
    Image.fromarray(labels * 0).save(tmp_path / "black.png")  # a view without the object: empty, not an error
    assert not read_mask(tmp_path / "black.png").any()


def test_a_mask_that_cannot_be_decoded_is_a_mask_error_naming_the_file(tmp_path):
    """A body cut short behind a valid header: MaskError (a SceneError), not PIL's own exception."""
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(MaskError, match=r"cut.png cannot be decoded \((OSError|SyntaxError|ValueError)"):
        read_mask(tmp_path / "cut.png")


def test_a_mask_error_survives_pickling_whole(tmp_path):
    """A process pool's worker hands its error back pickled: the same text and the reason kept for a client."""
    Image.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "labels.png")
    with pytest.raises(MaskError) as err:
        read_mask(tmp_path / "labels.png")
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is MaskError and str(again) == str(err.value)
    assert (again.path, again.reason) == (err.value.path, err.value.reason)
    err.value.add_note("a note")  # what else it carries, too
    assert pickle.loads(pickle.dumps(err.value)).__notes__ == ["a note"]


def test_masks_that_all_keep_no_pixel_are_refused_naming_them(tmp_path):
    """One all-black mask is a view without the object; every capture's black leaves nothing to reconstruct,
    refused when the captures are read (every geometry fallback came out empty, the fit said 'memory empty')."""
    cam = Camera(w2c=look_at(np.array([0.0, 0.0, -3.0]), np.zeros(3)), K=np.diag([8.0, 8.0, 1.0]), width=8, height=8)
    caps = []
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"p{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"m{i}.png")
        caps.append(Capture(f"p{i}", tmp_path / f"p{i}.png", cam, mask=tmp_path / f"m{i}.png"))
    with pytest.raises(
        SceneError, match=r"^captures: every mask keeps no pixel at the working size 8x8: p0 \(m0.png\)"
    ):
        stack_masks(caps, [cam, cam], 8, 8, "cpu")
    assert not stack_masks(caps, [cam, cam], 8, 8, "cpu", need_pixels=False).any()  # held-out views may
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "m1.png")
    assert stack_masks(caps, [cam, cam], 8, 8, "cpu").sum() == 64  # one view with the object: it goes on


def test_mask_and_alpha_keep_values_above_127_only(tmp_path):
    values = np.array([[127, 128, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png"), [[False, True, True]])
    rgba = np.dstack([np.full((1, 3, 3), 90, np.uint8), values])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png"), [[False, True, True]])
    np.testing.assert_array_equal(image_alpha(tmp_path / "rgba.png"), [[False, True, True]])


@pytest.mark.parametrize(
    "key, value, match",
    [
        (
            "world_mat_1",
            np.eye(3),
            r"cameras_sphere.npz\[world_mat_1\]: must be a finite 4x4 or 3x4 matrix; got shape \(3, 3\)",
        ),
        (
            "scale_mat_1",
            np.eye(3),
            r"cameras_sphere.npz\[scale_mat_1\]: must be a finite 4x4 matrix; got shape \(3, 3\)",
        ),
        ("world_mat_1", np.diag([1.0, 1.0, 0.0, 1.0]), r"world_mat_1\]: the projection's left 3x3 block is singular"),
    ],
)
def test_dtu_bad_matrix_names_the_key(temple_dir, tmp_path, key, value, match):
    _dtu_folder(temple_dir, tmp_path, 2, with_masks=False)
    npz = tmp_path / "dtu" / "cameras_sphere.npz"
    mats = dict(np.load(npz))
    mats[key] = value
    np.savez(npz, **mats)
    with pytest.raises(SceneError, match=match):
        import_scene("dtu", tmp_path / "dtu", tmp_path / "out")


def test_one_capture_whose_mask_keeps_nothing_is_named_in_a_note(tmp_path):
    """One blank (or inverted) mask among good ones: the job goes on without that capture's pixels, and a note names
    it (it added nothing to the memory or the fit, silently)."""
    from backend.scene import Scene
    from backend.stages.cameras import prepare_captures

    caps = []
    for i, x in enumerate((-0.5, 0.0, 0.5)):
        cam = Camera(
            w2c=look_at(np.array([x, 0.0, -3.0]), np.zeros(3)), K=np.diag([8.0, 8.0, 1.0]), width=16, height=16
        )
        Image.fromarray(np.full((16, 16, 3), 90 * i, np.uint8)).save(tmp_path / f"p{i}.png")
        Image.fromarray(np.full((16, 16), 0 if i == 1 else 255, np.uint8)).save(tmp_path / f"m{i}.png")
        caps.append(Capture(f"p{i}", tmp_path / f"p{i}.png", cam, mask=tmp_path / f"m{i}.png"))
    step = prepare_captures(Scene(tmp_path, caps), width=16, height=16, default_frames=4, device="cpu")
    (note,) = [n for n in step.notes if "keeps no pixel" in n]
    assert note.startswith("the mask of 1 capture (p1) keeps no pixel at the working size 16x16: it adds nothing")


def test_a_refused_import_leaves_the_folder_as_it_was(temple_dir, tmp_path):
    """An import refused after it wrote its masks (a training id past the captures) left 16 mask files and no
    scene.json; now what it wrote goes, and what the folder held stays."""
    with pytest.raises(ValueError, match="99"):
        import_scene("middlebury", temple_dir, tmp_path / "new", silhouettes=True, train_ids=[0, 99])
    assert not (tmp_path / "new").exists()
    (tmp_path / "used" / "masks").mkdir(parents=True)
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="99"):
        import_scene("middlebury", temple_dir, tmp_path / "used", silhouettes=True, train_ids=[0, 99])
    assert sorted(p.relative_to(tmp_path / "used").as_posix() for p in (tmp_path / "used").rglob("*")) == [
        "masks",
        "notes.txt",
    ]
