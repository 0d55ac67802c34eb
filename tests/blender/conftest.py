"""Fixtures for tests that need the bpy wheel.

Blender's user folders (extensions, config) are pointed at a temporary folder before bpy is imported,
so installing the extension never touches the user's own Blender set-up.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Per process (each pytest-xdist worker its own): two Blender sessions must not share an extension repo.
_USER_RESOURCES = Path(tempfile.mkdtemp(prefix="reconloop_blender_user_"))
atexit.register(shutil.rmtree, _USER_RESOURCES, ignore_errors=True)  # up to 15 MB a process, left in /tmp before
os.environ["BLENDER_USER_RESOURCES"] = str(_USER_RESOURCES)

try:
    import bpy
except ImportError as err:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").lower() == "true":
        # the wheel may be there without the system libraries it loads (libX11, libxkbcommon, libGL: README)
        raise RuntimeError(
            f"tests/blender need the bpy wheel (`pip install bpy==5.0.1` on Python 3.11) and the system libraries "
            f"it loads; importing it failed: {err}"
        ) from None
    pytest.skip("tests/blender need the bpy wheel (pip install bpy on Python 3.11)", allow_module_level=True)


@pytest.fixture(autouse=True)
def fresh_scene():
    """A factory-fresh scene before and after each test (as MolecularNodes does)."""
    bpy.ops.wm.read_homefile(app_template="")
    yield
    bpy.ops.wm.read_homefile(app_template="")


@pytest.fixture
def registered():
    """The add-on registered for the test (``unregister`` stops its timers and closes its connection)."""
    import blender_addon

    blender_addon.register()
    yield
    blender_addon.unregister()
