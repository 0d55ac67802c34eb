"""scripts/reconstruct_headless.py's arguments: every generator the sidebar offers can be chosen, and a bad
value is one line naming the flag, never a traceback (the service is not needed for any of this)."""

from __future__ import annotations

import sys
from pathlib import Path

import bpy
import pytest

from protocol.settings import BY_NAME

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import reconstruct_headless  # noqa: E402


def configure(tmp_path: Path, *flags: str) -> None:
    reconstruct_headless.configure(reconstruct_headless.parse_args(["--out", str(tmp_path), *flags]))


def test_every_offered_generator_can_be_chosen(registered, tmp_path):
    for name in ("refine", "anyrecon", "reproject"):
        configure(tmp_path, "--generator", name)
        assert bpy.context.scene.reconloop.generator == name


def test_a_generator_the_sidebar_does_not_offer_goes_to_the_service(registered, tmp_path):
    """A service may list generators the table does not (a plugin's): the script adds the name to the offer and
    the service checks it at submit, as the sidebar does after a hello."""
    st = bpy.context.scene.reconloop
    props = sys.modules[type(st).__module__]
    try:
        configure(tmp_path, "--generator", "passthrough")
        assert st.generator == "passthrough"
        assert [item[0] for item in props._generators(st, bpy.context)] == [
            *BY_NAME["generator"].choices,
            "passthrough",
        ]
    finally:
        props.set_generators(list(BY_NAME["generator"].choices))
        st.generator = BY_NAME["generator"].default


def test_settings_reach_the_sidebar(registered, tmp_path):
    configure(tmp_path, "--size", "64x48", "--frames", "2:30:4", "--retrieval-k", "3")
    st = bpy.context.scene.reconloop
    assert (st.width, st.height, st.retrieval_k) == (64, 48, 3)
    assert not st.use_scene_range and (st.frame_start, st.frame_end, st.frame_step) == (2, 30, 4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--size", "8x8"), "--size: width: must be in [16, 4096]; got 8"),  # Blender would clamp it silently
        (("--segment-length", "1"), "--segment-length: segment_length: must be in [2, 512]; got 1"),
    ],
)
def test_a_value_the_add_on_would_not_take_is_one_line(registered, tmp_path, flags, message):
    with pytest.raises(SystemExit) as err:
        configure(tmp_path, *flags)
    assert str(err.value.code) == message


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--size", "64"), "argument --size: must be WIDTHxHEIGHT in pixels, e.g. 320x240; got '64'"),
        (("--frames", "1-40"), "argument --frames: must be START:END[:STEP] in frames, STEP at least 1; got '1-40'"),
        (("--frames", "1:40:0"), "argument --frames: must be START:END[:STEP]"),
        (("--frames", "5:1"), "argument --frames: END must not be before START; got '5:1'"),
        (("--blend", "missing.blend"), "argument --blend: missing.blend: no such file"),
        (("--extension", "reconloop.zip"), "argument --extension: reconloop.zip: no such file"),
        (("--server-key", "server.key"), "argument --server-key: server.key: no such file"),
        (("--timeout-s", "0"), "argument --timeout-s: must be a number of seconds, at least 1; got '0'"),
        (("--photos", "photos", "--trajectory", "Camera"), "--photos and --trajectory: a folder's photos are placed"),
    ],
)
def test_a_malformed_argument_is_a_usage_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as err:
        reconstruct_headless.parse_args(["--out", str(tmp_path), *flags])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_a_file_blender_cannot_read_is_one_line(tmp_path):
    junk = tmp_path / "junk.blend"
    junk.write_text("not a .blend")
    with pytest.raises(SystemExit) as err:
        reconstruct_headless.main(["--blend", str(junk), "--out", str(tmp_path / "out")])
    assert str(err.value.code) == f'--blend {junk}: File format is not supported in file "{junk}"'
