"""SfM's intrinsics: photos of one physical camera share one (issue: the temple's 3 photos got 3 focal lengths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.estimators.sfm import EXIF_FOCAL, EXIF_IFD, EXIF_MAKE, EXIF_MODEL, SfMConfig, camera_groups
from tests.conftest import require_module


def _photo(path: Path, size: tuple[int, int], make: str | None = None, focal: float | None = None) -> Path:
    exif = Image.Exif()
    if make is not None:
        exif[EXIF_MAKE], exif[EXIF_MODEL] = make, "M1"
    if focal is not None:
        exif.get_ifd(EXIF_IFD)[EXIF_FOCAL] = focal
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path, exif=exif)
    return path


def test_photos_of_one_camera_share_intrinsics(tmp_path: Path) -> None:
    photos = [
        _photo(tmp_path / "a.jpg", (64, 48), "Canon", 35.0),
        _photo(tmp_path / "b.jpg", (64, 48), "Canon", 35.0),
        _photo(tmp_path / "c.jpg", (64, 48), "Canon", 50.0),  # zoomed: another intrinsic
        _photo(tmp_path / "d.jpg", (48, 64), "Canon", 35.0),  # portrait: another size
        _photo(tmp_path / "e.jpg", (64, 48)),  # no EXIF
        _photo(tmp_path / "f.jpg", (64, 48)),
    ]
    assert camera_groups(photos, "auto") == [0, 0, 1, 2, 3, 3]
    assert camera_groups(photos, "one") == [0, 0, 0, 1, 0, 0]  # one lens, but a size is a size
    assert camera_groups(photos, "each") == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="SfMConfig.camera_grouping must be one of auto, one, each"):
        SfMConfig(camera_grouping="two").check()


def test_the_job_setting_reaches_sfm() -> None:
    from backend.scene import SceneError, Settings

    assert Settings().photo_cameras == "auto"
    assert Settings.from_json({"photo_cameras": "one"}).photo_cameras == "one"
    with pytest.raises(SceneError, match="settings.photo_cameras: must be one of auto, one, each"):
        Settings.from_json({"photo_cameras": "many"})


def test_sfm_gives_one_focal_length_for_one_camera(temple_dir: Path, tmp_path: Path) -> None:
    """The temple's photos come from one camera: every photo SfM places gets the same intrinsics."""
    from backend.estimators.sfm import estimate_cameras

    photos = sorted(temple_dir.glob("templeSR000[1-6].png"))
    cams = estimate_cameras(photos, work_dir=tmp_path / "sfm", cfg=SfMConfig(num_threads=1, max_image_size=640))
    placed = [c for c in cams if c is not None]
    assert len(placed) >= 2
    for c in placed[1:]:
        np.testing.assert_array_equal(c.K, placed[0].K)


def _flat_photos(folder: Path, names: list[str]) -> list[Path]:
    """Grey photos without texture: SfM places none of them (a real failure, in a fraction of a second)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png" for name in names]
    for p in paths:
        Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(p)
    return paths


def test_sfm_failure_names_the_photos_as_the_user_does(tmp_path: Path) -> None:
    """The message names ``photo_names`` (the captures' names) when given, not the files it read: a job
    store keeps the photos as c0000.png ... (issue: the service named those to the user)."""
    require_module("pycolmap")
    from backend.estimators.sfm import SfMError, estimate_cameras

    cfg = SfMConfig(num_threads=1)
    photos = _flat_photos(tmp_path / "images", ["c0000", "c0001"])
    with pytest.raises(
        SfMError, match=r"only 0 of 2 photos could be placed .*; not placed: templeSR0001, templeSR0002\."
    ):
        estimate_cameras(photos, work_dir=tmp_path / "sfm", cfg=cfg, photo_names=["templeSR0001", "templeSR0002"])
    with pytest.raises(SfMError, match=r"not placed: c0000.png, c0001.png\."):  # no names: the files'
        estimate_cameras(photos, work_dir=tmp_path / "sfm", cfg=cfg)
    with pytest.raises(ValueError, match="estimate_cameras: 1 photo_names for 2 photos"):
        estimate_cameras(photos, work_dir=tmp_path / "sfm", cfg=cfg, photo_names=["a"])


def test_a_service_job_names_the_photos_sfm_could_not_place(tmp_path: Path) -> None:
    """Through the service (the job store renames the photos c0000.png ...), the loop's SfM failure
    names the user's photos, as ``reconloop run`` does."""
    require_module("pycolmap")
    import json

    from backend.loop import run_loop
    from backend.scene import load_scene
    from backend.service.store import scene_message
    from protocol.client import Client
    from tests.protocol.helpers import running_service

    names = ["templeSR0001", "templeSR0002"]
    _flat_photos(tmp_path / "scene" / "images", names)
    scene = {"version": 1, "captures": [{"name": n, "image": f"images/{n}.png"} for n in names]}  # no cameras
    (tmp_path / "scene" / "scene.json").write_text(json.dumps(scene))
    with running_service(tmp_path / "jobs", runner=run_loop) as svc:
        with Client(svc.endpoint, timeout_ms=5000, retries=1) as client:
            job = client.submit(scene_message(load_scene(tmp_path / "scene")))
            client.watch(job, since=0)
            final = list(client.events(job))[-1]
    assert final["state"] == "failed"
    assert "not placed: templeSR0001, templeSR0002." in final["message"], final["message"]
    assert "c0000" not in final["message"]


def test_a_trajectory_needs_the_sfm_frame_aligned(temple_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 given cameras align SfM's frame to the scene's; where SfM places only 2 of them, the trajectory (in the
    scene's frame) would not be where the photos are: refused by name, not run in two frames at once."""
    from dataclasses import replace

    from backend.estimators import sfm
    from backend.formats.middlebury import read_middlebury
    from backend.scene import Scene, SceneError, Settings, TrajectoryFrame
    from backend.stages.cameras import capture_cameras

    given = read_middlebury(temple_dir).captures[:4]
    caps = [*given[:3], replace(given[3], camera=None)]
    scene = Scene(temple_dir, caps, [TrajectoryFrame(1, given[0].camera)], [], Settings())
    placed = [None, given[1].camera, given[2].camera, given[3].camera]  # the first given camera not placed
    monkeypatch.setattr(sfm, "estimate_cameras", lambda *args, **kwargs: placed)
    with pytest.raises(SceneError, match=r"^trajectory: SfM placed 2 of the 3 captures that have cameras"):
        capture_cameras(scene, [])
    notes: list[str] = []
    cams, estimated = capture_cameras(replace(scene, trajectory=[]), notes)  # no trajectory: SfM's frame for all
    assert cams == placed and estimated == [True] * 4 and "SfM cameras used for all" in notes[0]


def test_sfm_says_each_step_and_a_cancel_stops_it_inside_colmap(
    temple_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COLMAP's three steps each announced, then every PROGRESS_INTERVAL_S while one runs (extraction took 30 s for
    12 photos with no word); a cancel during extraction stops it there (pycolmap's CancellationToken, where it has
    one), raised as Cancelled, and matching never starts."""
    require_module("pycolmap")
    from backend import progress as progress_module
    from backend.estimators.sfm import estimate_cameras
    from backend.progress import Cancelled

    photos = sorted(temple_dir.glob("templeSR000[1-6].png"))
    cfg = SfMConfig(num_threads=1, max_image_size=640)
    heard: list[tuple[float, str]] = []
    cams = estimate_cameras(photos, work_dir=tmp_path / "a", cfg=cfg, progress=lambda f, m: heard.append((f, m)))
    steps = [(f, m) for f, m in heard if not m.endswith(" s)")]
    assert steps == [
        (0.0, "SfM: finding features in 6 photos"),
        (0.4, "SfM: matching 15 photo pairs"),
        (0.7, "SfM: placing the photos, 0 of 6 placed"),
    ]
    assert sum(c is not None for c in cams) >= 2

    monkeypatch.setattr(progress_module, "PROGRESS_INTERVAL_S", 0.01)
    heard.clear()

    def cancel_while_extracting(fraction: float, message: str) -> None:
        heard.append((fraction, message))
        if message.startswith("SfM: finding features in 6 photos ("):
            raise Cancelled("cancelled by a client")

    with pytest.raises(Cancelled, match="cancelled by a client"):
        estimate_cameras(photos, work_dir=tmp_path / "b", cfg=cfg, progress=cancel_while_extracting)
    assert [m for _, m in heard] == ["SfM: finding features in 6 photos", "SfM: finding features in 6 photos (0 s)"]
