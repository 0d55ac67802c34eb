"""A stand-in for a panel's UILayout that records what a panel's draw() puts in it."""

from __future__ import annotations


class RecordingLayout:
    """Records ``prop`` (data, name, enabled), ``operator`` and ``label`` calls; nested layouts share the log."""

    def __init__(self, log: list | None = None, enabled: bool = True):
        object.__setattr__(self, "log", [] if log is None else log)
        object.__setattr__(self, "enabled", enabled)

    def _child(self):
        return RecordingLayout(self.log, self.enabled)

    def column(self, **_):
        return self._child()

    row = box = column

    def prop(self, data, name, **_):
        assert hasattr(data, name), name
        self.log.append(("prop", data, name, self.enabled))

    def operator(self, idname, **_):
        self.log.append(("operator", idname))
        return _OperatorProps()

    def label(self, text="", **_):
        self.log.append(("label", text))

    def template_list(self, *args, **_):
        self.log.append(("list",))

    def progress(self, **_):
        self.log.append(("progress",))

    def __setattr__(self, key, value):
        object.__setattr__(self, key, value)

    def props(self) -> list[str]:
        return [e[2] for e in self.log if e[0] == "prop"]


class _OperatorProps:
    """What ``layout.operator`` returns: the operator's properties, set by the panel."""


def draw(panel_cls, context) -> RecordingLayout:
    """What ``panel_cls.draw`` puts in a layout, for ``context`` (``bpy.context``)."""
    from types import SimpleNamespace

    layout = RecordingLayout()
    panel_cls.draw(SimpleNamespace(layout=layout), context)
    return layout
