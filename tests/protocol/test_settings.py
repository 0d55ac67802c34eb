"""The settings table: its rows check themselves, and check_settings names the field and the rule."""

from __future__ import annotations

import pytest

from protocol.settings import BY_NAME, SETTINGS, Setting, SettingError, check_settings, defaults


def test_rows_are_consistent():
    assert len(BY_NAME) == len(SETTINGS)
    for row in SETTINGS:
        assert row.check(row.default) == row.default
        assert row.label and row.help


@pytest.mark.parametrize(
    "given, message",
    [
        ({"width": 8}, r"^settings\.width: must be in \[16, 4096\]; got 8$"),
        ({"width": 32.0}, r"^settings\.width: must be an integer; got 32\.0$"),
        ({"guide": 1}, r"^settings\.guide: must be true or false; got 1$"),
        ({"prompt": 3}, r"^settings\.prompt: must be a string; got 3$"),
        ({"generator": ""}, r"^settings\.generator: must be a non-empty name"),
        ({"colour": 1}, r"^settings\.colour: unknown setting; known: "),
        ([], r"^settings: must be an object; got list$"),
    ],
)
def test_check_settings_errors(given, message):
    with pytest.raises(SettingError, match=message):
        check_settings(given)


def test_float_and_closed_enum_rows():
    f = Setting("budget", "float", 1.5, "Budget", "seconds", range=(0, 10))
    assert f.check(3) == 3.0 and isinstance(f.check(3), float)
    with pytest.raises(SettingError, match="finite"):
        f.check(float("nan"))
    e = Setting("mode", "enum", "a", "Mode", "which", choices=("a", "b"))
    with pytest.raises(SettingError, match=r"must be one of a, b; got 'c'"):
        e.check("c")
    with pytest.raises(ValueError, match="range"):
        Setting("bad", "int", 1, "Bad", "no range")
    with pytest.raises(SettingError, match=r"Setting bad\.default: must be in"):
        Setting("bad", "int", 99, "Bad", "out of range", range=(0, 1))
    assert check_settings(None) == {} and defaults()["width"] == 320


def test_open_choices_are_checked_against_the_names_given():
    """An open row takes any non-empty name until the backend gives its registry's names; then a typo is
    refused like a closed row's, naming the field."""
    assert check_settings({"generator": "anyrecn"}) == {"generator": "anyrecn"}
    names = {"generator": ["anyrecon", "refine", "reproject"]}
    assert check_settings({"generator": "refine"}, names=names) == {"generator": "refine"}
    with pytest.raises(
        SettingError, match=r"^settings\.generator: must be one of anyrecon, refine, reproject; got 'anyrecn'$"
    ):
        check_settings({"generator": "anyrecn"}, names=names)
    with pytest.raises(SettingError, match=r"^settings\.generator: must be a non-empty name"):
        check_settings({"generator": ""}, names=names)
    # names for a closed row change nothing: its own choices rule
    with pytest.raises(SettingError, match=r"^settings\.geometry: must be one of mvs, patchmatch, hull"):
        check_settings({"geometry": "stereo"}, names={"geometry": ["stereo"]})
