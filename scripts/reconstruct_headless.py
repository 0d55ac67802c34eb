"""Reconstruct a .blend without the UI: send its captures and trajectory, import the results, save.

Inside Blender::

    blender -b scene.blend --python scripts/reconstruct_headless.py -- --server tcp://127.0.0.1:5555 --out DIR

With the bpy wheel (Python 3.11)::

    python scripts/reconstruct_headless.py --blend scene.blend --server tcp://127.0.0.1:5555 --out DIR

The scene's ReconLoop settings (sidebar) say which collection holds the captures and which camera is
the trajectory; ``--captures`` and ``--trajectory`` set or override them (by name). Without
``--server`` the add-on's preferences decide (a local ``reconloop serve`` by default). The add-on is
used as installed; ``--extension ZIP`` installs it first; otherwise it is registered from this
repository's ``blender_addon`` package. Results go to ``DIR`` and the .blend with the imported
objects is saved as ``DIR/<name>_reconstructed.blend`` (or ``--save PATH``). Exit code 0 on success,
1 when the job failed (the reason is printed).
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_OK = 0
EXIT_FAILED = 1
EXTENSION_REPO = "user_default"
TEMP_REPO = "reconloop_headless"  # a throw-away repository when run inside a Blender with real user folders
DEFAULT_TIMEOUT_S = 3600.0


def existing_file(text: str) -> Path:
    """argparse type: a file that exists (``--blend``, ``--extension``, the key files), so a wrong path is one
    line, not Blender's traceback."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def positive_seconds(text: str) -> float:
    """argparse type: seconds, at least 1 (the operator's ``timeout_s`` would clamp a smaller value to 1 s)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 1.0 <= seconds < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, at least 1; got {text!r}")
    return seconds


def image_size(text: str) -> tuple[int, int]:
    """argparse type: ``WxH`` (``320x240``) as (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT in pixels, e.g. 320x240; got {text!r}")
    return int(parts[0]), int(parts[1])


def frame_range(text: str) -> tuple[int, int, int]:
    """argparse type: ``START:END[:STEP]`` (step 1 when left out; at least 1)."""
    parts = text.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or (len(numbers) == 3 and numbers[2] < 1):
        raise argparse.ArgumentTypeError(f"must be START:END[:STEP] in frames, STEP at least 1; got {text!r}")
    if numbers[1] < numbers[0]:  # an empty range: it was taken, and the job ran the scene's path without a word
        raise argparse.ArgumentTypeError(f"END must not be before START; got {text!r}")
    return numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="reconstruct_headless.py", description="Reconstruct a .blend with ReconLoop and save the result."
    )
    ap.add_argument(
        "--blend", type=existing_file, default=None, help="the .blend to open (bpy wheel; Blender opens its own)"
    )
    ap.add_argument(
        "--server", default="", help="service address, e.g. tcp://127.0.0.1:5555 (default: the preferences)"
    )
    ap.add_argument(
        "--server-key", type=existing_file, default=None, help="the server's CurveZMQ public key file (NAME.key)"
    )
    ap.add_argument(
        "--client-key", type=existing_file, default=None, help="your CurveZMQ secret key file (NAME.key_secret)"
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for results and the saved .blend")
    ap.add_argument(
        "--save", type=Path, default=None, help="where to save the .blend (default OUT/<name>_reconstructed.blend)"
    )
    ap.add_argument("--extension", type=existing_file, default=None, help="extension zip to install first")
    ap.add_argument("--captures", default="", help="name of the collection of capture cameras")
    ap.add_argument(
        "--photos",
        type=Path,
        default=None,
        help="a folder of photos without cameras instead (SfM places them: the service makes the path, and a "
        "trajectory camera is refused with it)",
    )
    ap.add_argument("--trajectory", default="", help="name of the animated trajectory camera")
    ap.add_argument(
        "--frames", type=frame_range, default=None, help="START:END[:STEP] (default: the scene's frame range)"
    )
    ap.add_argument("--generator", default="", help="generator name (e.g. reproject, refine, anyrecon)")
    ap.add_argument("--size", type=image_size, default=None, help="working resolution WxH, e.g. 320x240")
    ap.add_argument("--gaussian-iterations", type=int, default=None)
    ap.add_argument("--segment-length", type=int, default=None)
    ap.add_argument("--retrieval-k", type=int, default=None)
    ap.add_argument(
        "--timeout-s", type=positive_seconds, default=DEFAULT_TIMEOUT_S, help="how long to wait for the job"
    )
    args = ap.parse_args(argv)
    if args.photos is not None and args.trajectory:
        ap.error(
            "--photos and --trajectory: a folder's photos are placed by SfM in a frame of its own, where no "
            "camera of the .blend is; leave --trajectory out (the service makes a path through the photos)"
        )
    return args


def script_argv() -> list[str]:
    """Arguments after ``--`` inside Blender, else the process's own."""
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1 :]
    return sys.argv[1:]


def ensure_addon(extension: Path | None) -> str:
    """Make the ReconLoop operators available; returns the add-on's module name."""
    import addon_utils
    import bpy

    enabled = [m for m in bpy.context.preferences.addons.keys() if m.split(".")[-1] in ("reconloop", "blender_addon")]
    if extension is not None:
        repo = EXTENSION_REPO
        if not os.environ.get("BLENDER_USER_RESOURCES", "").startswith(tempfile.gettempdir()):
            # Inside a Blender started with the user's own folders: install into a repository in a
            # temporary folder, and do not save preferences, so later Blender sessions never see it.
            bpy.context.preferences.use_preferences_save = False
            bpy.ops.preferences.extension_repo_add(
                name=TEMP_REPO, type="LOCAL", use_custom_directory=True, custom_directory=tempfile.mkdtemp()
            )
            repo = bpy.context.preferences.extensions.repos[-1].module
        result = bpy.ops.extensions.package_install_files(
            filepath=str(extension.resolve()), repo=repo, enable_on_install=True
        )
        if result != {"FINISHED"}:
            raise RuntimeError(f"could not install {extension}")
        return f"bl_ext.{repo}.reconloop"
    if enabled:
        return enabled[0]
    for mod in addon_utils.modules(refresh=False):
        if mod.__name__.endswith(".reconloop"):
            bpy.ops.preferences.addon_enable(module=mod.__name__)
            return mod.__name__
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    bpy.ops.preferences.addon_enable(module="blender_addon")  # this repository's package, as a plain add-on
    if not hasattr(bpy.types.Scene, "reconloop"):
        raise RuntimeError(f"could not enable the ReconLoop add-on from {REPO / 'blender_addon'}")
    return "blender_addon"


def set_keys(module: str, server_key: Path | None, client_key: Path | None) -> None:
    """Put the CurveZMQ key files into the add-on's preferences (an authenticated remote service)."""
    import bpy

    if server_key is None and client_key is None:
        return
    prefs = bpy.context.preferences.addons[module].preferences
    prefs.server_key_file = str(server_key.resolve()) if server_key else ""
    prefs.client_key_file = str(client_key.resolve()) if client_key else ""


def configure(args: argparse.Namespace) -> None:
    """Apply the command-line choices to the scene's ReconLoop settings."""
    import bpy

    scene = bpy.context.scene
    st = scene.reconloop
    if args.photos is not None:
        st.capture_source = "FOLDER"
        st.photo_folder = str(args.photos.resolve())
        st.trajectory_camera = None  # SfM places the photos in a frame of its own: the service makes the path
    elif args.captures:
        coll = bpy.data.collections.get(args.captures)
        if coll is None:
            raise SystemExit(f"no collection named {args.captures!r}; have: {[c.name for c in bpy.data.collections]}")
        st.capture_source, st.captures = "COLLECTION", coll
    if args.trajectory:
        obj = bpy.data.objects.get(args.trajectory)
        if obj is None or obj.type != "CAMERA":
            raise SystemExit(f"no camera named {args.trajectory!r}")
        st.trajectory_camera = obj
    if args.frames is not None:
        st.use_scene_range = False
        st.frame_start, st.frame_end, st.frame_step = args.frames
    if args.generator:
        set_setting(st, "generator", args.generator, "--generator")
    if args.size is not None:
        set_setting(st, "width", args.size[0], "--size")
        set_setting(st, "height", args.size[1], "--size")
    for name in ("gaussian_iterations", "segment_length", "retrieval_k"):
        value = getattr(args, name)
        if value is not None:
            set_setting(st, name, value, f"--{name.replace('_', '-')}")


def set_setting(st, name: str, value: object, flag: str) -> None:
    """Set one job setting of the sidebar from ``flag``; SystemExit with one line where the table refuses the
    value (Blender would clamp an int out of range silently). The generator is an open row: a name the sidebar
    does not offer yet (the service's hello lists its own) is added to the offer, and the service that takes
    the job checks it against its registry (a typo is refused at submit, naming ``settings.generator``)."""
    from protocol.settings import BY_NAME, SettingError

    try:
        BY_NAME[name].check(value, f"{flag}: {name}")  # the table the sidebar's properties are built from
    except SettingError as err:
        raise SystemExit(str(err)) from None
    if BY_NAME[name].open_choices:  # Blender refuses an enum value it does not list: offer the name first
        sys.modules[type(st).__module__].offer_generator(value)  # the add-on's props module
    setattr(st, name, value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(script_argv() if argv is None else argv)
    if args.extension is not None and "bpy" not in sys.modules:
        # bpy as a module reads this when imported: the extension goes to a temporary user folder,
        # never into the user's own Blender configuration.
        os.environ["BLENDER_USER_RESOURCES"] = user = tempfile.mkdtemp(prefix="reconloop_blender_user_")
        atexit.register(shutil.rmtree, user, ignore_errors=True)
    import bpy

    if args.blend is not None:
        try:
            bpy.ops.wm.open_mainfile(filepath=str(args.blend.resolve()))
        except RuntimeError as err:  # a file Blender cannot read ("Error: File format is not supported ...")
            raise SystemExit(f"--blend {args.blend}: {str(err).strip().removeprefix('Error: ')}") from None
    module = ensure_addon(args.extension)
    set_keys(module, args.server_key, args.client_key)
    configure(args)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        bpy.ops.reconloop.reconstruct(server=args.server, output_dir=str(out), timeout_s=args.timeout_s)
    except RuntimeError as err:  # the operator's ERROR report
        print(f"reconstruct_headless: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if not args.server:
            bpy.ops.reconloop.stop_service()
    rt = bpy.context.window_manager.reconloop
    stem = Path(bpy.data.filepath).stem if bpy.data.filepath else "scene"
    save = (args.save or out / f"{stem}_reconstructed.blend").resolve()
    save.parent.mkdir(parents=True, exist_ok=True)  # --save into a new folder: after the job, not a traceback
    bpy.ops.wm.save_as_mainfile(filepath=str(save))
    coll = next((c for c in bpy.data.collections if c.get("reconloop_job") == rt.job), None)
    objects = sorted(o.name for o in coll.objects) if coll is not None else []
    print(
        f"reconstruct_headless: job {rt.job} {rt.state} in {time.monotonic() - t0:.1f} s with add-on {module}; "
        f"imported {objects}; saved {save}"
    )
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    if code:
        sys.exit(code)
