"""ReconLoop: a Blender extension that turns a few photos into a 3D scene.

Sidebar (3D viewport, tab ReconLoop): pick the captures (cameras with their photos as backgrounds,
or a folder of photos) and an animated trajectory camera, click Reconstruct. The ReconLoop service
(local or remote) returns a point cloud, generated frames and 3D Gaussians, imported as objects.

This file imports no bpy at module level: ``cameras``, ``scene_io`` and ``errors`` are plain Python
and import without Blender. Inside the package, imports are relative (the extension's package name
depends on the repository it is installed in).
"""

from __future__ import annotations

_MODULES = ("preferences", "props", "operators", "panels")


def _modules():
    import importlib

    return [importlib.import_module(f".{name}", __package__) for name in _MODULES]


def register() -> None:
    import atexit

    import bpy

    from . import connection, operators, props

    for mod in _modules():
        for cls in mod.CLASSES:
            bpy.utils.register_class(cls)

    props.register_properties()
    operators.register_menus()
    operators.register_handlers()
    atexit.register(connection.close_at_exit)  # Blender's exit does not unregister add-ons: stop our service


def unregister() -> None:
    import atexit

    import bpy

    from . import connection, operators, props

    operators.stop_timers()
    operators.unregister_handlers()
    connection.close()  # stops the local service we started
    atexit.unregister(connection.close_at_exit)
    operators.unregister_menus()
    props.unregister_properties()
    for mod in reversed(_modules()):
        for cls in reversed(mod.CLASSES):
            bpy.utils.unregister_class(cls)
