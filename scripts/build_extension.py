"""Build the ReconLoop Blender extension: zips that Blender's own installer takes (no pip, no console).

Two steps:

1. ``--fetch-wheels`` (a set-up step, run by ``make setup``) downloads the binary wheels the extension
   bundles, pyzmq and msgpack for CPython 3.11 (Blender 4.2 to 5.0) and 3.13 (5.1 and later) on
   Linux x86_64, Windows amd64 and macOS arm64, plus plyfile (pure Python), into the ignored folder
   ``.cache/extension_wheels``; cached wheels of other versions (an older pin's) are removed first.
2. The build (default) makes a pure-Python wheel of the ``protocol`` package and writes, from
   ``blender_addon/`` and the cached wheels:

   * ``dist/reconloop-<version>.zip``: every platform's wheels in one zip (Blender installs the ones
     that fit the machine);
   * ``dist/reconloop-<version>-<platform>.zip``: one zip per platform (``platforms`` set in its
     manifest), as ``blender --command extension build --split-platforms`` would.

The build never downloads, and bundles only the pinned versions: a missing wheel stops it with the pin
and the command to run.

    .venv/bin/python scripts/build_extension.py --fetch-wheels
    .venv/bin/python scripts/build_extension.py            # -> dist/reconloop-0.1.0*.zip
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADDON_DIR = REPO / "blender_addon"
PROTOCOL_DIR = REPO / "protocol"
# backend modules the dataset importers need (numpy + protocol only; tests/test_addon_pure.py checks that)
FORMAT_FILES = (
    "backend/__init__.py",
    "backend/scene.py",
    "backend/registry.py",
    "backend/fileio.py",
    "backend/masks.py",
    "backend/camera_paths.py",
)
WHEEL_CACHE = REPO / ".cache" / "extension_wheels"
DIST = REPO / "dist"
MANIFEST = "blender_manifest.toml"

# Pinned so every build bundles the same code: the versions the project's environment ran when they were last
# raised (pyproject.toml asks only for pyzmq>=25, msgpack>=1.0, plyfile>=1.0, so a later `make setup` may test newer).
BINARY_REQUIREMENTS = ("pyzmq==27.3.0", "msgpack==1.2.4")
PURE_REQUIREMENTS = ("plyfile==1.1.3",)
PYTHON_VERSIONS = ("3.11", "3.13")  # Blender 4.2-5.0 and 5.1+


@dataclass(frozen=True)
class Platform:
    blender: str  # the manifest's platform name
    pip_tags: tuple[str, ...]  # --platform values for pip download
    wheel_tag: re.Pattern  # matches the platform tag of a wheel file name


PLATFORMS = (
    Platform(
        "linux-x64",
        ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
        re.compile(r"(manylinux|musllinux)[^-]*x86_64"),
    ),
    Platform("windows-x64", ("win_amd64",), re.compile(r"win_amd64")),
    Platform("windows-arm64", ("win_arm64",), re.compile(r"win_arm64")),  # the pinned pyzmq and msgpack have them
    Platform(
        "macos-arm64",
        (
            "macosx_11_0_arm64",
            "macosx_12_0_arm64",
            "macosx_14_0_arm64",
            "macosx_10_15_universal2",
            "macosx_10_9_universal2",
        ),
        re.compile(r"macosx_[0-9_]+_(arm64|universal2)"),
    ),
)
EXCLUDE = re.compile(r"(__pycache__|\.pyc$|\.pyo$|~$)")
ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same zip


class BuildError(RuntimeError):
    pass


def _project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    if m is None:
        raise BuildError("pyproject.toml has no version")
    return m.group(1)


def manifest_version(manifest_text: str) -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', manifest_text, re.M)
    if m is None:
        raise BuildError(f"{MANIFEST} has no version")
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# Wheels


def _pin(req: str) -> tuple[str, str]:
    """(distribution as in wheel file names, version) of a pinned requirement ``name==version``."""
    name, sep, version = req.partition("==")
    if not sep or not version:
        raise BuildError(f"requirement {req!r} must pin a version (name==version)")
    return re.sub(r"[-_.]+", "_", name).lower(), version


def _is_pinned(path: Path, req: str) -> bool:
    """Whether a wheel file is the pinned release of ``req``: its name starts ``{dist}-{version}-``
    (a cached wheel of another version, one an older pin fetched, must never be bundled)."""
    dist, version = _pin(req)
    return path.name.lower().startswith(f"{dist}-{version.lower()}-")


def prune_wheels(cache: Path = WHEEL_CACHE) -> list[Path]:
    """Remove the cached wheels that match no pin of BINARY_REQUIREMENTS and PURE_REQUIREMENTS (left by
    an older pin), so the cache holds only what a build may bundle. Returns the files removed."""
    pins = BINARY_REQUIREMENTS + PURE_REQUIREMENTS
    stale = [w for w in sorted(cache.glob("*.whl")) if not any(_is_pinned(w, req) for req in pins)]
    for w in stale:
        w.unlink()
    return stale


def fetch_wheels(cache: Path = WHEEL_CACHE) -> list[Path]:
    """Download the bundled wheels (all platforms, both Python versions) into ``cache``, after removing
    the cached ones that match no pin (:func:`prune_wheels`)."""
    cache.mkdir(parents=True, exist_ok=True)
    for w in prune_wheels(cache):
        print(f"fetch: removed {w.name} (no pin matches it)", flush=True)
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(cache)]
    for py in PYTHON_VERSIONS:
        for plat in PLATFORMS:
            cmd = base + ["--python-version", py, "--implementation", "cp"]
            for tag in plat.pip_tags:
                cmd += ["--platform", tag]
            print(f"fetch: {' '.join(BINARY_REQUIREMENTS)} for Python {py} on {plat.blender}", flush=True)
            subprocess.run(cmd + list(BINARY_REQUIREMENTS), check=True)
    subprocess.run(base + list(PURE_REQUIREMENTS), check=True)
    return sorted(cache.glob("*.whl"))


def _wheel_tags(path: Path) -> tuple[str, str, str]:
    """(python tag, abi tag, platform tag) of a wheel file name."""
    parts = path.stem.split("-")
    if len(parts) < 5:
        raise BuildError(f"not a wheel file name: {path.name}")
    return parts[-3], parts[-2], parts[-1]


def _serves_python(path: Path, py: str) -> bool:
    pytag, abi, _ = _wheel_tags(path)
    major, minor = (int(x) for x in py.split("."))
    for tag in pytag.split("."):
        if tag in ("py3", f"cp{major}{minor}", "py2.py3"):
            return True
        if abi == "abi3" and tag.startswith("cp3") and int(tag[3:]) <= minor:
            return True
    return False


def wheels_for(platform: Platform | None, cache: Path = WHEEL_CACHE) -> list[Path]:
    """The cached wheels a zip for ``platform`` (None: all) needs: for each pin, the wheel of exactly its
    version (``{dist}-{version}-`` in the file name). Raises BuildError naming each pin with no wheel."""
    found = sorted(cache.glob("*.whl")) if cache.is_dir() else []
    out: list[Path] = []
    missing: list[str] = []
    platforms = PLATFORMS if platform is None else (platform,)
    for req in BINARY_REQUIREMENTS:
        for plat in platforms:
            for py in PYTHON_VERSIONS:
                match = [
                    w
                    for w in found
                    if _is_pinned(w, req) and plat.wheel_tag.search(_wheel_tags(w)[2]) and _serves_python(w, py)
                ]
                if not match:
                    missing.append(f"{req} for Python {py} on {plat.blender}")
                out.extend(m for m in match[-1:] if m not in out)
    for req in PURE_REQUIREMENTS:
        match = [w for w in found if _is_pinned(w, req) and _wheel_tags(w)[2] == "any"]
        if not match:
            missing.append(f"{req} (pure Python)")
        out.extend(match[-1:])
    if missing:
        raise BuildError(
            "missing extension wheels in "
            + str(cache)
            + ": "
            + "; ".join(missing)
            + ". Run: .venv/bin/python scripts/build_extension.py --fetch-wheels"
        )
    return out


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_protocol_wheel(out_dir: Path, version: str) -> Path:
    """A pure-Python wheel of the ``protocol`` package (imports numpy, msgpack, zmq, plyfile), with the
    torch-free part of ``backend`` that reads and writes scene folders and datasets (FORMAT_FILES and
    ``backend/formats``), so the add-on imports datasets through the same code as ``reconloop import``."""
    dist = "reconloop_protocol"
    info = f"{dist}-{version}.dist-info"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dist}-{version}-py3-none-any.whl"
    files: list[tuple[str, bytes]] = []
    sources = sorted(PROTOCOL_DIR.rglob("*")) + [REPO / f for f in FORMAT_FILES]
    sources += sorted((REPO / "backend" / "formats").glob("*.py"))
    for src in sources:
        rel = src.relative_to(REPO).as_posix()
        if src.is_file() and not EXCLUDE.search(rel) and src.suffix in (".py", ".md"):
            files.append((rel, src.read_bytes()))
    if not any(name == "protocol/__init__.py" for name, _ in files):
        raise BuildError("protocol/__init__.py not found")
    metadata = (
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        "Summary: ReconLoop wire protocol (bundled with the Blender extension)\n"
        "Requires-Dist: numpy\nRequires-Dist: msgpack\nRequires-Dist: pyzmq\nRequires-Dist: plyfile\n"
    ).encode()
    wheel = b"Wheel-Version: 1.0\nGenerator: reconloop build_extension\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files += [
        (f"{info}/METADATA", metadata),
        (f"{info}/WHEEL", wheel),
        (f"{info}/top_level.txt", b"protocol\nbackend\n"),
    ]
    record = "\n".join(_record_line(n, d) for n, d in files) + f"\n{info}/RECORD,,\n"
    files.append((f"{info}/RECORD", record.encode()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(zipfile.ZipInfo(name, ZIP_DATE), data, zipfile.ZIP_DEFLATED)
    return path


# ---------------------------------------------------------------------------------------------
# Zips


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def render_manifest(text: str, wheels: list[str], platforms: list[str]) -> str:
    """The source manifest with its ``wheels`` (and ``platforms``, or none for all) filled in."""
    text, n_w = re.subn(r"^wheels\s*=\s*\[.*?\]", f"wheels = {_toml_list(wheels)}", text, flags=re.M | re.S)
    if n_w != 1:
        raise BuildError(f"{MANIFEST} must hold one `wheels = [...]` line")
    repl = f"platforms = {_toml_list(platforms)}" if platforms else ""
    text, n_p = re.subn(r"^platforms\s*=\s*\[.*?\]\n?", repl + ("\n" if repl else ""), text, flags=re.M | re.S)
    if n_p != 1:
        raise BuildError(f"{MANIFEST} must hold one `platforms = [...]` line")
    return text


def _zip_name(version: str, platform: Platform | None) -> str:
    return (
        f"reconloop-{version}.zip"
        if platform is None
        else f"reconloop-{version}-{platform.blender.replace('-', '_')}.zip"
    )


def write_zip(path: Path, manifest: str, wheels: list[Path]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo(MANIFEST, ZIP_DATE), manifest, zipfile.ZIP_DEFLATED)
        for src in sorted(ADDON_DIR.rglob("*")):
            rel = src.relative_to(ADDON_DIR).as_posix()
            if src.is_file() and rel != MANIFEST and not EXCLUDE.search(rel):
                zf.writestr(zipfile.ZipInfo(rel, ZIP_DATE), src.read_bytes(), zipfile.ZIP_DEFLATED)
        for w in wheels:
            # wheels are zips already: store them
            zf.writestr(zipfile.ZipInfo(f"wheels/{w.name}", ZIP_DATE), w.read_bytes(), zipfile.ZIP_STORED)
    tmp.replace(path)
    return path


def build(out_dir: Path = DIST, cache: Path = WHEEL_CACHE, *, split: bool = True) -> list[Path]:
    """Build the all-platform zip (and, if ``split``, one zip per platform). Returns their paths."""
    source = (ADDON_DIR / MANIFEST).read_text()
    version = manifest_version(source)
    project = _project_version()
    if version != project:
        raise BuildError(f"{MANIFEST} version {version} differs from pyproject.toml version {project}")
    outputs = []
    # The protocol wheel is made afresh in a folder of this build's own: two builds at once (pytest-xdist
    # workers, a test run beside `make demo`) once shared one, and a zip took the other's half-written wheel.
    with tempfile.TemporaryDirectory(prefix="reconloop-protocol-wheel-") as tmp:
        proto = build_protocol_wheel(Path(tmp), version)
        for platform in (None, *PLATFORMS) if split else (None,):
            wheels = wheels_for(platform, cache) + [proto]
            # the all-platform zip names the platforms it has wheels for: no list means every platform to Blender,
            # and an Intel Mac or an ARM PC would install it and lack pyzmq and msgpack
            names = [p.blender for p in PLATFORMS] if platform is None else [platform.blender]
            manifest = render_manifest(source, [f"./wheels/{w.name}" for w in wheels], names)
            outputs.append(write_zip(out_dir / _zip_name(version, platform), manifest, wheels))
    return outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the ReconLoop Blender extension zips.")
    ap.add_argument("--fetch-wheels", action="store_true", help=f"download the bundled wheels into {WHEEL_CACHE}")
    ap.add_argument("--no-build", action="store_true", help="only fetch the wheels")
    ap.add_argument("--no-split", action="store_true", help="only the all-platform zip")
    ap.add_argument("--out", type=Path, default=DIST, help="output folder (default dist/)")
    args = ap.parse_args(argv)
    try:
        if args.fetch_wheels:
            fetch_wheels()
        if not args.no_build:
            for path in build(args.out, split=not args.no_split):
                print(f"{path}  ({path.stat().st_size / 1e6:.1f} MB)")
    except (BuildError, subprocess.CalledProcessError) as err:
        print(f"build_extension: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
