"""scripts/build_extension.py's wheel cache: a build bundles the pinned versions only, and fetching
removes what no pin matches (no Blender, no network: empty files named as pip names wheels)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import build_extension  # noqa: E402

TAGS = {
    "linux-x64": "manylinux_2_17_x86_64",
    "windows-x64": "win_amd64",
    "windows-arm64": "win_arm64",
    "macos-arm64": "macosx_11_0_arm64",
}


def wheel_names(req: str) -> list[str]:
    """File names of a pinned binary requirement's wheels for every platform and Python version."""
    dist, version = req.split("==")
    return [
        f"{dist}-{version}-cp{py.replace('.', '')}-cp{py.replace('.', '')}-{tag}.whl"
        for py in build_extension.PYTHON_VERSIONS
        for tag in TAGS.values()
    ]


def pinned_cache(folder: Path) -> Path:
    folder.mkdir()
    for req in build_extension.BINARY_REQUIREMENTS:
        for name in wheel_names(req):
            (folder / name).write_bytes(b"")
    for req in build_extension.PURE_REQUIREMENTS:
        dist, version = req.split("==")
        (folder / f"{dist}-{version}-py3-none-any.whl").write_bytes(b"")
    return folder


def other_version(req: str) -> str:
    """The requirement pinned to a later version (what a cache fetched for another pin holds)."""
    dist, version = req.split("==")
    return f"{dist}==99.{version}"


def test_a_build_takes_the_pinned_version_not_the_last_cached_one(tmp_path):
    cache = pinned_cache(tmp_path / "cache")
    req = build_extension.BINARY_REQUIREMENTS[0]
    for name in wheel_names(other_version(req)):  # sorts after the pinned ones: once taken
        (cache / name).write_bytes(b"")
    wheels = build_extension.wheels_for(None, cache)
    dist, version = req.split("==")
    assert sorted(w.name for w in wheels if w.name.startswith(f"{dist}-")) == sorted(wheel_names(req))
    assert not any("-99." in w.name for w in wheels)


def test_a_missing_pinned_wheel_is_named_even_beside_another_version(tmp_path):
    cache = pinned_cache(tmp_path / "cache")
    req = build_extension.BINARY_REQUIREMENTS[0]
    for name in wheel_names(req):
        (cache / name).unlink()
        (cache / name.replace(req.split("==")[1], "99." + req.split("==")[1])).write_bytes(b"")
    with pytest.raises(build_extension.BuildError, match=rf"{req} for Python 3\.11 on linux-x64"):
        build_extension.wheels_for(None, cache)
    pure = build_extension.PURE_REQUIREMENTS[0]
    dist, version = pure.split("==")
    (cache / f"{dist}-{version}-py3-none-any.whl").rename(cache / f"{dist}-0.1-py3-none-any.whl")
    with pytest.raises(build_extension.BuildError, match=rf"{pure} \(pure Python\)"):
        build_extension.wheels_for(build_extension.PLATFORMS[0], cache)


def test_fetching_removes_cached_wheels_that_match_no_pin(tmp_path):
    cache = pinned_cache(tmp_path / "cache")
    pinned = sorted(p.name for p in cache.iterdir())
    stale = wheel_names(other_version(build_extension.BINARY_REQUIREMENTS[1]))[:2] + ["unrelated-1.0-py3-none-any.whl"]
    for name in stale:
        (cache / name).write_bytes(b"")
    (cache / ".fetched").write_text("")  # the Makefile's stamp is not a wheel: it stays
    assert sorted(p.name for p in build_extension.prune_wheels(cache)) == sorted(stale)
    assert sorted(p.name for p in cache.iterdir()) == sorted(pinned + [".fetched"])


def test_the_manifests_texts_fit_blenders_limits():
    """`blender --command extension validate` (and extensions.blender.org) refuse a tagline or a permission's
    reason over 64 characters; installing takes them, so nothing else here would notice."""
    import tomllib

    manifest = tomllib.loads((build_extension.ADDON_DIR / build_extension.MANIFEST).read_text())
    assert len(manifest["tagline"]) <= 64, manifest["tagline"]
    for name, reason in manifest.get("permissions", {}).items():
        assert len(reason) <= 64, (name, reason)


def test_the_bundled_backend_imports_on_its_own(tmp_path):
    """The protocol wheel's backend (FORMAT_FILES and backend/formats) imports without the rest of backend, as in
    Blender: ``backend.formats`` came to import ``backend.camera_paths``, which the wheel lacked."""
    import subprocess
    import zipfile

    import numpy

    wheel = build_extension.build_protocol_wheel(tmp_path / "wheel", "0.0.0")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # -S: no site-packages processing, so no editable install's backend: the wheel's is the one found (the numpy
    # folder added after it holds the other packages too; a missing backend module is what this catches)
    code = (
        f"import sys; sys.path[:0] = [{str(tmp_path / 'site')!r}, {str(Path(numpy.__file__).parents[1])!r}]; "
        "import backend.formats, protocol; assert backend.formats.__file__.startswith(sys.path[0]), backend.__file__"
    )
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
