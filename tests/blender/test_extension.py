"""The extension as a user gets it: built into a zip, installed with Blender's own installer, run
against a real ``reconloop serve`` on loopback with a scene made from the real Middlebury temple."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import bpy
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import build_extension  # noqa: E402

from protocol.ply import (  # noqa: E402
    GaussianArrays,
    PlyFormatError,
    PointArrays,
    read_gaussians_ply,
    read_points_ply,
    write_gaussians_ply,
    write_points_ply,
)

from ._plys import write_blank_points  # noqa: E402
from ._temple import build_temple_scene, silhouette  # noqa: E402

# One worker should run this module (its fixtures, the installed extension and a service, are per
# process); each fixture also works when pytest-xdist splits the module across workers.
pytestmark = pytest.mark.xdist_group("blender_extension")

REPO_NAME = "user_default"
ADDON = f"bl_ext.{REPO_NAME}.reconloop"
# Small sizes so the whole loop runs in about half a minute on 2 CPU cores.
JOB_SETTINGS = {"width": 160, "height": 120, "gaussian_iterations": 5, "segment_length": 8, "retrieval_k": 2}
E2E_CAPTURES = (0, 1, 2, 3)  # neighbouring ring views (22.5 degrees apart): enough overlap for stereo
JOB_TIMEOUT_S = 300.0
MIN_INSIDE = 0.9  # share of reprojected points that must land inside each photo / on the temple
# The memory is built at the working resolution: allow two working pixels of reprojection error.
SILHOUETTE_GROW_PX = 2 * 640 // 160
MISPLACEMENT_M = (0.02, 0.02, 0.0)
MISPLACED_MARGIN = 0.1


@pytest.fixture(scope="module")
def extension_zips(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("dist")
    try:
        return build_extension.build(out, split=True)
    except build_extension.BuildError as err:
        pytest.fail(f"cannot build the extension: {err}")


@pytest.fixture(scope="module")
def extension_zip(extension_zips) -> Path:
    return extension_zips[0]  # the all-platform zip


def test_per_platform_zips(extension_zips):
    names = {p.name for p in extension_zips}
    assert names == {
        "reconloop-0.1.0.zip",
        "reconloop-0.1.0-linux_x64.zip",
        "reconloop-0.1.0-windows_x64.zip",
        "reconloop-0.1.0-windows_arm64.zip",
        "reconloop-0.1.0-macos_arm64.zip",
    }
    for path in extension_zips[1:]:
        platform = path.stem.split("-")[-1].replace("_", "-")
        with zipfile.ZipFile(path) as zf:
            manifest = zf.read("blender_manifest.toml").decode()
            wheels = [n for n in zf.namelist() if n.startswith("wheels/")]
        assert f'platforms = ["{platform}"]' in manifest
        tags = {"linux-x64": "linux", "windows-x64": "win_amd64", "windows-arm64": "win_arm64", "macos-arm64": "macosx"}
        binary = [w for w in wheels if not w.endswith("-none-any.whl")]
        assert len(binary) == 4 and all(tags[platform] in w for w in binary), binary
    # the all-platform zip names the three it bundles wheels for (no list: Blender would take it on any platform)
    with zipfile.ZipFile(extension_zips[0]) as zf:
        manifest = zf.read("blender_manifest.toml").decode()
    assert 'platforms = ["linux-x64", "windows-x64", "windows-arm64", "macos-arm64"]' in manifest


def test_builds_at_once_each_bundle_a_whole_protocol_wheel(tmp_path):
    """Builds running at the same time (pytest-xdist workers, tests beside `make demo`) each zip a whole
    protocol wheel: they once shared the folder it is made in, and Blender's installer then met a zip
    holding another build's half-written wheel (BadZipFile)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    def build(i: int) -> Path:
        return build_extension.build(tmp_path / f"dist{i}", split=False)[0]

    with ThreadPoolExecutor(4) as pool:
        zips = list(pool.map(build, range(12)))
    for path in zips:
        with zipfile.ZipFile(path) as zf:
            (name,) = [n for n in zf.namelist() if n.startswith("wheels/reconloop_protocol-")]
            with zipfile.ZipFile(io.BytesIO(zf.read(name))) as wheel:
                assert wheel.testzip() is None and "protocol/__init__.py" in wheel.namelist(), path


@pytest.fixture(scope="module")
def installed(extension_zip) -> str:
    user = bpy.utils.user_resource("EXTENSIONS")
    if not user.startswith(os.environ.get("BLENDER_USER_RESOURCES", "/nonexistent")):
        pytest.fail(f"Blender's user folder {user} is not the test's temporary one: bpy was imported too early")
    result = bpy.ops.extensions.package_install_files(
        filepath=str(extension_zip), repo=REPO_NAME, enable_on_install=True
    )
    assert result == {"FINISHED"}
    yield ADDON
    bpy.ops.preferences.addon_disable(module=ADDON)


def _prefs():
    return bpy.context.preferences.addons[ADDON].preferences


def test_zip_layout(extension_zip):
    with zipfile.ZipFile(extension_zip) as zf:
        names = set(zf.namelist())
        manifest = zf.read("blender_manifest.toml").decode()
    assert {"__init__.py", "cameras.py", "operators.py", "importers.py", "blender_manifest.toml"} <= names
    wheels = sorted(n for n in names if n.startswith("wheels/"))
    for part in ("pyzmq", "msgpack", "plyfile", "reconloop_protocol"):
        assert any(part in w for w in wheels), f"no {part} wheel in {wheels}"
    for tag in ("cp311", "cp312-abi3", "win_amd64", "macosx", "manylinux"):
        assert any(tag in w for w in wheels), f"no {tag} wheel in {wheels}"
    assert 'id = "reconloop"' in manifest and "[permissions]" in manifest
    assert all(f'"./{w}"' in manifest for w in wheels)
    assert not any("__pycache__" in n for n in names)


def test_install_register_unregister(installed):
    assert installed in bpy.context.preferences.addons
    assert hasattr(bpy.types.Scene, "reconloop")
    site = Path(bpy.utils.user_resource("EXTENSIONS")) / ".local" / "lib"
    found = {p.name for p in site.glob("python*/site-packages/*")}
    assert {"zmq", "msgpack", "protocol", "plyfile.py", "backend"} <= found, found
    # the dataset readers travel with the protocol wheel, and only the torch-free part of backend
    backend = next(site.glob("python*/site-packages/backend"))
    assert (backend / "formats" / "colmap.py").is_file() and (backend / "scene.py").is_file()
    assert not (backend / "stages").exists() and not (backend / "loop.py").exists()
    bpy.ops.preferences.addon_disable(module=installed)
    assert not hasattr(bpy.types.Scene, "reconloop")
    bpy.ops.preferences.addon_enable(module=installed)
    assert hasattr(bpy.types.Scene, "reconloop")
    assert bpy.ops.reconloop.reconstruct.poll()


def test_gaussians_operator_matches_reader(installed, tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    g = GaussianArrays(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        log_scales=rng.uniform(-5, -2, (n, 3)).astype(np.float32),
        quats=rng.normal(size=(n, 4)).astype(np.float32),
        opacity_logits=rng.normal(size=n).astype(np.float32),
        sh=rng.normal(scale=0.5, size=(n, 16, 3)).astype(np.float32),
    )
    path = tmp_path / "splats.ply"
    write_gaussians_ply(path, g)
    assert bpy.ops.reconloop.import_gaussians(filepath=str(path)) == {"FINISHED"}
    obj = bpy.data.objects["splats"]
    from blender_addon.importers import attribute_values, mesh_positions
    from blender_addon.scene_io import srgb_to_linear

    ref = read_gaussians_ply(path)
    np.testing.assert_allclose(mesh_positions(obj), ref.means, atol=1e-6)
    np.testing.assert_allclose(attribute_values(obj, "scale"), ref.scales, rtol=1e-6)
    np.testing.assert_allclose(attribute_values(obj, "opacity"), ref.opacities, rtol=1e-6)
    q = ref.quats / np.linalg.norm(ref.quats, axis=1, keepdims=True)
    np.testing.assert_allclose(attribute_values(obj, "rotation"), q, atol=1e-6)
    np.testing.assert_allclose(attribute_values(obj, "color")[:, :3], srgb_to_linear(ref.rgb), atol=1e-6)
    # The geometry nodes instance one ellipsoid per Gaussian, carrying the attributes for the material.
    depsgraph = bpy.context.evaluated_depsgraph_get()
    geometry = obj.evaluated_get(depsgraph).evaluated_geometry()
    instances = geometry.instances_pointcloud()
    assert len(instances.points) == n
    assert {"color", "opacity"} <= set(instances.attributes.keys())


def test_points_operator_matches_reader(installed, tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    p = PointArrays(
        xyz=rng.normal(size=(n, 3)).astype(np.float32),
        rgb=rng.integers(0, 256, (n, 3), dtype=np.uint8),
        confidence=rng.uniform(size=n).astype(np.float32),
        source=rng.integers(-1, 4, n).astype(np.int32),
    )
    path = tmp_path / "cloud.ply"
    write_points_ply(path, p)
    assert bpy.ops.reconloop.import_points(filepath=str(path)) == {"FINISHED"}
    obj = bpy.data.objects["cloud"]
    from blender_addon.importers import attribute_values, mesh_positions

    np.testing.assert_allclose(mesh_positions(obj), p.xyz, atol=1e-6)
    np.testing.assert_allclose(attribute_values(obj, "confidence"), p.confidence)
    np.testing.assert_array_equal(attribute_values(obj, "source"), p.source)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    geometry = obj.evaluated_get(depsgraph).evaluated_geometry()
    assert len(geometry.pointcloud.points) == n


def test_non_gaussian_ply_is_a_clear_error(installed, tmp_path):
    path = write_blank_points(tmp_path / "points.ply", 4)
    with pytest.raises(PlyFormatError, match="points.ply has no f_dc_0: not a Gaussian file"):
        read_gaussians_ply(path)
    n_objects = len(bpy.data.objects)
    imports = "ReconLoop imports"  # the collection an import makes: not made for a file that cannot be read
    if imports in bpy.data.collections:
        bpy.data.collections.remove(bpy.data.collections[imports])
    with pytest.raises(RuntimeError, match="points.ply has no f_dc_0: not a Gaussian file"):
        bpy.ops.reconloop.import_gaussians(filepath=str(path))
    assert len(bpy.data.objects) == n_objects and imports not in bpy.data.collections


def test_reconstruct_temple_against_local_service(installed, temple_dir, tmp_path, monkeypatch):
    """Reconstruct runs the real loop through a `reconloop serve` the add-on starts on loopback."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    prefs = _prefs()
    prefs.backend_mode = "local"
    prefs.local_python = sys.executable
    prefs.local_device = "cpu"
    made = build_temple_scene(temple_dir, ids=E2E_CAPTURES)
    scene = bpy.context.scene
    st = scene.reconloop
    for key, value in JOB_SETTINGS.items():
        setattr(st, key, value)
    st.generator = "reproject"
    scene.frame_set(2)
    lens_before = made["trajectory"].data.lens
    out = tmp_path / "results"
    connection = sys.modules[f"{ADDON}.connection"]

    try:
        assert bpy.ops.reconloop.reconstruct(output_dir=str(out), timeout_s=JOB_TIMEOUT_S) == {"FINISHED"}
        service = connection.SESSION.service
        assert service is not None and service.is_running()
        job = bpy.context.window_manager.reconloop.job
        # Past jobs: listed by the service, and re-imported into a collection of their own.
        assert bpy.ops.reconloop.refresh_jobs() == {"FINISHED"}
        listed = {j.job: j.state for j in bpy.context.window_manager.reconloop.jobs}
        assert listed.get(job) == "done", listed
        # The job is in the scene already: its collection is refreshed, not copied; the trajectory camera it
        # ran on still follows the job's own path (cameras.json, as the real loop writes it), so its frames
        # are refreshed there and no second, path camera is made.
        assert bpy.ops.reconloop.import_job(job=job) == {"FINISHED"}
        (again,) = [c for c in bpy.data.collections if c.get("reconloop_job") == job]
        assert again.name == f"ReconLoop {made['collection'].name}"
        assert {o.get("reconloop_kind") for o in again.objects} == {"points", "gaussians"}
        shown = [bg.image for bg in made["trajectory"].data.background_images if bg.image is not None]
        assert [img.get("reconloop_job") for img in shown if img.source == "SEQUENCE"] == [job]
    finally:
        bpy.ops.reconloop.stop_service()  # returns at once; the service's exit is awaited off the main thread
    assert service.wait_stopped(30) and service.proc.returncode is not None, "the local service was not stopped"
    assert scene.frame_current == 2 and made["trajectory"].data.lens == lens_before

    rt = bpy.context.window_manager.reconloop
    assert rt.state == "done" and not rt.is_running and rt.last_error == ""
    coll = bpy.data.collections[f"ReconLoop {made['collection'].name}"]
    kinds = {o.get("reconloop_kind"): o for o in coll.objects}
    assert {"points", "gaussians"} <= set(kinds)
    job_dir = out / "Temple_captures" / rt.job

    # Point cloud: the final memory, attributes on every point, the same positions as the file.
    points = kinds["points"]
    from blender_addon.importers import attribute_values, mesh_positions

    ref = read_points_ply(job_dir / "points_final.ply")
    n = len(points.data.vertices)
    assert n == len(ref) > 100
    assert len(attribute_values(points, "color")) == n and len(attribute_values(points, "confidence")) == n
    xyz = mesh_positions(points)
    np.testing.assert_allclose(xyz, ref.xyz, atol=1e-6)

    # It lands where the photos' cameras say: reproject into every capture (original calibration).
    def on_temple(points: np.ndarray, cap) -> tuple[float, float]:
        uv, depth = cap.camera.project(points.astype(np.float64))
        w, h = cap.camera.width, cap.camera.height
        inside = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        mask = silhouette(cap.image, grow_px=SILHOUETTE_GROW_PX)
        px = np.floor(uv[inside]).astype(int)
        return float(inside.mean()), float(mask[px[:, 1], px[:, 0]].mean())

    for cap in made["captures"]:
        inside, hit = on_temple(xyz, cap)
        assert inside > MIN_INSIDE, f"{cap.name}: {inside:.2f} of the points project inside the photo"
        assert hit > MIN_INSIDE, f"{cap.name}: only {hit:.2f} of the points land on the temple"
    # The check tells a misplaced cloud apart: moved by 2 cm (a fifth of the temple), it misses.
    moved = xyz + np.array(MISPLACEMENT_M, dtype=np.float32)
    hits = [on_temple(moved, cap)[1] for cap in made["captures"]]
    assert np.mean(hits) < MIN_INSIDE - MISPLACED_MARGIN, hits

    # Gaussians: one vertex per Gaussian with every attribute, positions as in the file.
    gauss = kinds["gaussians"]
    g = read_gaussians_ply(job_dir / "gaussians.ply")
    assert len(gauss.data.vertices) == len(g) > 0
    for name, width in (("scale", 3), ("rotation", 4), ("opacity", 1), ("color", 4)):
        values = attribute_values(gauss, name)
        assert values.shape == ((len(g), width) if width > 1 else (len(g),))
    np.testing.assert_allclose(mesh_positions(gauss), g.means, atol=1e-6)

    # Generated frames: an image sequence behind the trajectory camera, one file per frame.
    traj = made["trajectory"].data
    seq = [bg for bg in traj.background_images if bg.image is not None and bg.image.source == "SEQUENCE"]
    assert len(seq) == 1
    assert seq[0].image_user.frame_start == scene.frame_start
    files = sorted((job_dir / "sequence").glob("frame_*.png"))
    assert [f.name for f in files] == [f"frame_{i:06d}.png" for i in range(scene.frame_start, scene.frame_end + 1)]


@pytest.fixture(scope="module")
def probe_service(tmp_path_factory):
    """A real `reconloop serve` on loopback with CurveZMQ keys and the quick probe runner."""
    import subprocess

    from backend.service.spawn import free_port, serve_command, serve_env
    from protocol.client import Client

    root = tmp_path_factory.mktemp("probe_service")
    env = serve_env()
    keys, allowed = root / "keys", root / "allowed"
    for name in ("server", "alice", "mallory"):
        subprocess.run(
            [sys.executable, "-m", "backend.cli", "keys", str(keys), "--name", name],
            check=True,
            env=env,
            cwd=REPO,
            capture_output=True,
        )
    allowed.mkdir()
    (allowed / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = open(root / "service.log", "wb")
    proc = subprocess.Popen(
        serve_command(
            endpoint,
            root / "jobs",
            runner="backend.service.probe:run",
            extra=["--curve-secret", str(keys / "server.key_secret"), "--allow-keys", str(allowed)],
        ),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with Client(
            endpoint, timeout_ms=1000, retries=30, server_key=keys / "server.key", client_key=keys / "alice.key_secret"
        ) as c:
            c.hello()
        yield {"endpoint": endpoint, "keys": keys}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _use_remote(endpoint: str, keys: Path, client: str = "alice", timeout_ms: int = 5000) -> None:
    prefs = _prefs()
    prefs.backend_mode = "remote"
    prefs.remote_address = endpoint
    prefs.server_key_file = str(keys / "server.key")
    prefs.client_key_file = str(keys / f"{client}.key_secret")
    prefs.timeout_ms = timeout_ms


def test_remote_with_keys_test_connection(installed, probe_service):
    from blender_addon import connection

    _use_remote(probe_service["endpoint"], probe_service["keys"])
    try:
        assert bpy.ops.reconloop.test_connection() == {"FINISHED"}
        summary = bpy.context.window_manager.reconloop.hello_summary
        assert "ReconLoop" in summary and "device cpu" in summary and "generators:" in summary
        # A key the server does not allow: no answer, said plainly.
        _use_remote(probe_service["endpoint"], probe_service["keys"], client="mallory", timeout_ms=300)
        with pytest.raises(RuntimeError, match="does not answer"):
            bpy.ops.reconloop.test_connection()
        # Only one of the two key files: refused before connecting.
        _prefs().client_key_file = ""
        with pytest.raises(RuntimeError, match="needs both files"):
            bpy.ops.reconloop.test_connection()
    finally:
        connection.close()


def test_service_fault_is_a_plain_error(installed, probe_service, temple_dir):
    """A job that runs out of GPU memory on the server ends in a sentence, reported by the operator."""
    from blender_addon import connection

    _use_remote(probe_service["endpoint"], probe_service["keys"])
    build_temple_scene(temple_dir, ids=(0, 8))
    st = bpy.context.scene.reconloop
    st.prompt = "probe fault=cuda_oom"
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            bpy.ops.reconloop.reconstruct(timeout_s=60)
    finally:
        connection.close()
    rt = bpy.context.window_manager.reconloop
    assert rt.state == "failed" and "out of memory" in rt.last_error and not rt.is_running


def _timer_modules(probe_service, temple_dir, prompt: str):
    """The installed add-on's operators and connection modules, the probe service and a temple scene set up."""
    _use_remote(probe_service["endpoint"], probe_service["keys"])
    build_temple_scene(temple_dir, ids=(0, 8))
    bpy.context.scene.reconloop.prompt = prompt
    return sys.modules[f"{ADDON}.operators"], sys.modules[f"{ADDON}.connection"]


def _begin_timer_job(ops):
    """Start Reconstruct's job as the button does, for the test to drive ``ops._tick`` as Blender's timer would."""
    driver, importer = ops.prepare_job(bpy.context)
    ops.begin_job(bpy.context, driver, importer)
    return driver


def test_an_error_while_following_a_job_says_where_it_goes_on(installed, probe_service, temple_dir, monkeypatch):
    """An error in a timer step ends the add-on's following of a job the service still runs: the job's importer
    is let go, anything half downloaded deleted, and the error says where the job's results are to be had."""
    import time

    ops, conn = _timer_modules(probe_service, temple_dir, "probe steps=50 delay_ms=100")
    driver = None
    try:
        driver = _begin_timer_job(ops)
        deadline = time.monotonic() + 60
        while driver.job is None:
            assert ops._tick() is not None, "the job ended before the service took it"
            assert time.monotonic() < deadline, "the service did not take the job"
        dropped = []
        monkeypatch.setattr(driver, "drop_downloads", lambda: dropped.append(True))

        def broken(wait_ms=0):
            raise conn.ReconLoopError("the disk is full")

        monkeypatch.setattr(driver, "step", broken)
        assert ops._tick() is None
    finally:
        if conn.SESSION.client is not None and driver is not None and driver.job:  # not to hold the next test's job
            conn.SESSION.client.cancel(driver.job)
        conn.close()
    rt = bpy.context.window_manager.reconloop
    assert dropped and "importer" not in conn.SESSION.handlers and not rt.is_running
    assert rt.last_error.startswith("the disk is full.") and "keeps running on the service" in rt.last_error


def test_an_output_the_add_on_did_not_write_is_named_when_the_job_ends(installed, probe_service, temple_dir):
    """A file the service named unsafely was skipped while the job's others came (JobDriver.refused, tested with
    a scripted service in test_addon_pure): the job ends done, with the sidebar's error naming it."""
    import time

    ops, conn = _timer_modules(probe_service, temple_dir, "probe steps=2")
    try:
        driver = _begin_timer_job(ops)
        for i in range(10):  # a hostile service may name thousands: the first few are said, the rest counted
            driver.refused[f"artifact name must not hold empty, '.' or '..' parts; got '../x{i}.ply'"] = None
        deadline = time.monotonic() + 60
        while (interval := ops._tick()) is not None:
            assert time.monotonic() < deadline, "the job did not end"
            time.sleep(interval)
    finally:
        conn.close()
    rt = bpy.context.window_manager.reconloop
    assert rt.state == "done" and not rt.is_running
    assert rt.last_error.startswith(
        "the service announced output files this add-on did not write: artifact name must not hold empty, '.' or "
        "'..' parts; got '../x0.ply'; "
    )
    assert rt.last_error.count("artifact name must") == 8 and rt.last_error.endswith("got '../x7.ply'; and 2 more")


def test_timer_path_takes_short_steps(installed, probe_service, temple_dir):
    """The UI path: the timer callback drives a job in short, bounded steps until it ends."""
    import time

    ops, conn = _timer_modules(probe_service, temple_dir, "probe steps=6 delay_ms=150")
    try:
        _begin_timer_job(ops)
        ticks, longest, fractions = 0, 0.0, []
        deadline = time.monotonic() + 60
        while True:
            t0 = time.perf_counter()
            interval = ops._tick()
            longest = max(longest, time.perf_counter() - t0)
            ticks += 1
            fractions.append(bpy.context.window_manager.reconloop.fraction)
            if interval is None:
                break
            assert time.monotonic() < deadline, "the job did not end"
            time.sleep(interval)
    finally:
        conn.close()
    rt = bpy.context.window_manager.reconloop
    assert rt.state == "done" and not rt.is_running and rt.last_error == ""
    assert ticks > 6 and conn.SESSION.driver is None
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    # No tick waits for the job: each is one poll or one request (upload, watch) on loopback.
    assert longest < 0.5, f"a timer tick took {longest:.3f} s"


def test_headless_script(installed, probe_service, extension_zip, temple_dir, tmp_path):
    """scripts/reconstruct_headless.py with the bpy wheel: open a .blend, install the zip, reconstruct, save."""
    import subprocess

    build_temple_scene(temple_dir, ids=(0, 8))
    st = bpy.context.scene.reconloop
    st.prompt = "probe steps=2"
    blend = tmp_path / "temple.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    keys = probe_service["keys"]
    # No BLENDER_USER_RESOURCES: the script itself must keep the install out of the user's Blender folders.
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "BLENDER_USER_RESOURCES"}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "reconstruct_headless.py"),
        "--blend",
        str(blend),
        "--server",
        probe_service["endpoint"],
        "--out",
        str(out),
        "--extension",
        str(extension_zip),
        "--server-key",
        str(keys / "server.key"),
        "--client-key",
        str(keys / "alice.key_secret"),
    ]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "done" in run.stdout and (out / "temple_reconstructed.blend").is_file()
    assert not [p for p in home.rglob("*reconloop*") if "extensions" in str(p)], "installed into the user's Blender"
    # A job that fails: exit code 1 and the plain reason on stderr.
    st.prompt = "probe fault=cuda_oom"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "out of memory" in run.stderr, run.stdout[-3000:] + run.stderr[-3000:]


def test_photo_folder_without_cameras(installed, probe_service, temple_dir, tmp_path):
    """A folder of photos goes out without cameras; estimated cameras come back as cameras with photos."""
    import json

    ops = sys.modules[f"{ADDON}.operators"]
    conn = sys.modules[f"{ADDON}.connection"]
    _use_remote(probe_service["endpoint"], probe_service["keys"])
    st = bpy.context.scene.reconloop
    st.capture_source = "FOLDER"
    photos = tmp_path / "photos"  # the temple's photos, and a sidecar beside the first (a camera app's .xmp)
    photos.mkdir()
    for png in sorted(temple_dir.glob("*.png")):
        (photos / png.name).symlink_to(png)
    (photos / "templeSR0001.xmp").write_text("<x:xmpmeta/>")
    st.photo_folder = str(photos)
    # a trajectory camera means nothing in SfM's frame: refused before anything is sent
    path_cam = bpy.data.objects.new("path", bpy.data.cameras.new("path"))
    bpy.context.scene.collection.objects.link(path_cam)
    st.trajectory_camera = path_cam
    with pytest.raises(sys.modules[f"{ADDON}.errors"].ReconLoopError, match="clear the trajectory camera"):
        ops.prepare_job(bpy.context, output_dir=str(tmp_path))
    st.trajectory_camera = None
    st.prompt = "probe steps=1"
    try:
        driver, importer = ops.prepare_job(bpy.context, output_dir=str(tmp_path))
        assert [c["name"] for c in driver.scene["captures"]][:2] == ["templeSR0001", "templeSR0002"]
        assert all("camera" not in c for c in driver.scene["captures"])
        assert importer.photos["templeSR0001"] == str(photos / "templeSR0001.png")  # the photo, not the sidecar
        conn.run_blocking(driver, 60)
        assert driver.progress.state == "done"
    finally:
        conn.close()
    # What the loop writes for estimated cameras (backend/outputs.py cameras.json), imported as the
    # operator does when the file arrives.
    from backend.formats.middlebury import read_middlebury

    caps = read_middlebury(temple_dir).captures[:3]
    doc = {
        "captures": [
            {"name": c.name, "image": f"images/{c.name}.png", "camera": c.camera.to_json(), "estimated": True}
            for c in caps
        ]
    }
    path = tmp_path / "cameras.json"
    path.write_text(json.dumps(doc))
    importer.job = "job-estimated"
    importer.on_file("cameras", "cameras.json", str(path))
    coll = importer.collection()
    cams = sorted((o for o in coll.objects if o.type == "CAMERA"), key=lambda o: o.name)
    assert [o.name for o in cams] == [c.name for c in caps]
    for obj, cap in zip(cams, caps):
        assert Path(obj.data.background_images[0].image.filepath).resolve() == Path(cap.image).resolve()
        from blender_addon.scene_read import sample_camera

        np.testing.assert_allclose(sample_camera(obj, bpy.context.scene).w2c, cap.camera.w2c, atol=1e-5)
