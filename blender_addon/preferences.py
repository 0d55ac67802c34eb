"""Add-on preferences: where the service runs (local subprocess or remote server) and where results go."""

from __future__ import annotations

import os

import bpy

from . import connection
from .connection import ConnectionConfig

ADDON_ID = __package__  # "bl_ext.<repo>.reconloop" when installed as an extension
DEFAULT_REMOTE = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT_MS = 10_000
MIN_TIMEOUT_MS = 500


def user_dir(*parts: str) -> str:
    """A folder under the extension's user directory (created), or a temp folder when not an extension."""
    try:
        base = bpy.utils.extension_path_user(ADDON_ID, create=True)
    except ValueError:  # loaded as a plain module (tests, scripts), not as an installed extension
        base = os.path.join(bpy.app.tempdir or os.path.expanduser("~"), "reconloop")
    path = os.path.join(base, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def _check_remote_address(self, context) -> None:
    """Checked when the field is edited: the panel shows the problem under it until it is fixed."""
    self.address_problem = connection.check_address(self.remote_address) or ""


class ReconLoopPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    backend_mode: bpy.props.EnumProperty(
        name="Backend",
        items=[
            ("local", "This computer", "Start `reconloop serve` on this computer (loopback only) and stop it on exit"),
            ("remote", "Remote server", "Connect to a ReconLoop service on another machine, e.g. a GPU server"),
        ],
        default="local",
    )
    local_python: bpy.props.StringProperty(
        name="Python",
        description="Python interpreter of the environment where ReconLoop is installed (runs `python -m backend.cli serve`). "
        "Leave empty to use the command below",
        subtype="FILE_PATH",
    )
    local_command: bpy.props.StringProperty(
        name="Command", description="Command that starts the service when no Python is set", default="reconloop"
    )
    local_device: bpy.props.EnumProperty(
        name="Device",
        items=[
            ("auto", "Auto", "The GPU when there is one, else the CPU"),
            ("cuda", "GPU", "CUDA GPU"),
            ("cpu", "CPU", "CPU (slow)"),
        ],
        default="auto",
    )
    remote_address: bpy.props.StringProperty(
        name="Address",
        description="ZeroMQ address of the service: tcp://host:port or ipc://path",
        default=DEFAULT_REMOTE,
        update=_check_remote_address,
    )
    address_problem: bpy.props.StringProperty(name="Address problem", options={"SKIP_SAVE"})
    server_key_file: bpy.props.StringProperty(
        name="Server public key",
        description="The server's CurveZMQ public key file (for an authenticated connection)",
        subtype="FILE_PATH",
    )
    client_key_file: bpy.props.StringProperty(
        name="Your key",
        description="Your CurveZMQ secret key file (for an authenticated connection)",
        subtype="FILE_PATH",
    )
    timeout_ms: bpy.props.IntProperty(
        name="Timeout (ms)",
        description="How long a request waits for an answer before it is retried",
        default=DEFAULT_TIMEOUT_MS,
        min=MIN_TIMEOUT_MS,
    )
    output_dir: bpy.props.StringProperty(
        name="Results folder",
        description="Where downloaded results are kept (empty: the extension's own folder)",
        subtype="DIR_PATH",
    )

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_mode", expand=True)
        box = layout.box()
        if self.backend_mode == "local":
            box.prop(self, "local_python")
            row = box.row()
            row.enabled = not self.local_python
            row.prop(self, "local_command")
            box.prop(self, "local_device")
        else:
            box.prop(self, "remote_address")
            problem = connection.check_address(self.remote_address)
            if problem:
                box.label(text=problem, icon="ERROR")
            box.prop(self, "server_key_file")
            box.prop(self, "client_key_file")
        layout.prop(self, "timeout_ms")
        layout.prop(self, "output_dir")
        row = layout.row()
        row.operator("reconloop.test_connection", icon="LINKED")
        row.operator("reconloop.stop_service", icon="CANCEL")
        rt = context.window_manager.reconloop
        if rt.hello_summary:
            layout.label(text=rt.hello_summary, icon="INFO")


def get_prefs(context=None) -> ReconLoopPreferences | None:
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon is not None else None


def connection_config(context=None, *, server: str = "") -> ConnectionConfig:
    """Plain connection values from the preferences; ``server`` (an address) forces remote mode."""
    prefs = get_prefs(context)
    data_dir = user_dir("service")
    if prefs is None:  # not registered as an add-on (scripts): defaults
        return ConnectionConfig(
            mode="remote" if server else "local",
            remote_address=server or DEFAULT_REMOTE,
            data_dir=os.path.join(data_dir, "jobs"),
            log_path=os.path.join(data_dir, "service.log"),
        )
    return ConnectionConfig(
        mode="remote" if server else prefs.backend_mode,
        remote_address=server or prefs.remote_address,
        server_key_file=bpy.path.abspath(prefs.server_key_file) if prefs.server_key_file else "",
        client_key_file=bpy.path.abspath(prefs.client_key_file) if prefs.client_key_file else "",
        local_python=bpy.path.abspath(prefs.local_python) if prefs.local_python else "",
        local_command=prefs.local_command,
        local_device=prefs.local_device,
        data_dir=os.path.join(data_dir, "jobs"),
        log_path=os.path.join(data_dir, "service.log"),
        timeout_ms=prefs.timeout_ms,
    )


def results_dir(context=None, override: str = "") -> str:
    """The folder downloaded results go to (operator override, preference, or the extension's folder)."""
    prefs = get_prefs(context)
    chosen = override or (prefs.output_dir if prefs is not None else "")
    if chosen:
        path = bpy.path.abspath(chosen)
        os.makedirs(path, exist_ok=True)
        return path
    return user_dir("results")


CLASSES = (ReconLoopPreferences,)
