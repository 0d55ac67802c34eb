"""Every row of protocol.settings.SETTINGS reaches backend.scene.Settings, the Blender properties,
the sidebar's Settings panels and the submit payload, with the row's default, range and label."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import bpy
import pytest

from backend.scene import SceneError, Settings
from blender_addon import panels, scene_io
from protocol.settings import SECTIONS, SETTINGS

from ._layout import RecordingLayout


def test_every_row_reaches_settings():
    names = [f.name for f in fields(Settings)]
    assert names == [row.name for row in SETTINGS]
    s = Settings()
    for row in SETTINGS:
        assert getattr(s, row.name) == row.default
        if row.range is not None:
            lo, hi = row.range
            Settings.from_json({row.name: type(row.default)(hi)})
            with pytest.raises(SceneError, match=rf"^settings\.{row.name}: must be in"):
                Settings.from_json({row.name: type(row.default)(hi + 1)})
        with pytest.raises(SceneError, match=rf"^settings\.{row.name}: "):
            Settings.from_json({row.name: None})
    assert Settings.from_json(s.to_json()) == s


def test_every_row_reaches_the_property_group_and_the_panel(registered):
    st = bpy.context.scene.reconloop
    props = st.bl_rna.properties
    for row in SETTINGS:
        assert row.name in props, f"{row.name}: no Blender property"
        p = props[row.name]
        assert p.name == row.label and p.description == row.help
        if row.kind in ("int", "float"):
            assert (p.hard_min, p.hard_max) == pytest.approx(row.range)
            assert getattr(st, row.name) == row.default
        elif row.kind in ("bool", "str"):
            assert getattr(st, row.name) == row.default
        else:
            assert getattr(st, row.name) == row.default  # first offered item is the table's default

    drawn: dict[str, list[str]] = {}
    for panel in (panels.RECONLOOP_PT_settings, panels.RECONLOOP_PT_settings_advanced):
        layout = RecordingLayout()
        panel.draw(SimpleNamespace(layout=layout, section=panel.section), bpy.context)
        drawn[panel.section] = layout.props()
    assert set(drawn) == set(SECTIONS)
    for section in SECTIONS:
        assert drawn[section] == [row.name for row in SETTINGS if row.section == section]
    assert all(len(row.label) <= 16 for row in SETTINGS), "labels must fit the sidebar"

    # what the sidebar sends is what Settings accepts, and the default job is the default Settings
    sent = st.job_settings()
    assert set(sent) <= set(scene_io.SETTING_NAMES)
    assert Settings.from_json(sent) == Settings()


def test_generator_choice_survives_the_services_list(registered, tmp_path):
    """Blender stores an enum's number: numbered by name, the choice stays the same generator when a
    service lists them in another order (backend lists them sorted), also in a saved .blend."""
    from blender_addon import props

    default = props.BY_NAME["generator"].default
    st = bpy.context.scene.reconloop
    try:
        assert st.generator == default
        props.set_generators(["anyrecon", "refine", "reproject"])
        assert st.generator == default and st.job_settings()["generator"] == default
        props.set_generators(["reproject", "anyrecon"])
        st.generator = "anyrecon"
        props.set_generators(["anyrecon", "refine", "reproject"])
        assert st.generator == "anyrecon"
        path = tmp_path / "gen.blend"
        bpy.ops.wm.save_as_mainfile(filepath=str(path))
        props.set_generators(["refine", "reproject", "anyrecon", "zzz"])
        bpy.ops.wm.open_mainfile(filepath=str(path))
        assert bpy.context.scene.reconloop.generator == "anyrecon"
    finally:
        props.set_generators(list(props.BY_NAME["generator"].choices))
