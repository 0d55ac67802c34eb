"""Codec and validator: round trips (hypothesis), every rejection with its code, schema coverage."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol import errors, limits
from protocol.codec import DTYPES, decode, encode, pack, unpack
from protocol.errors import ProtocolError
from protocol.schemas import OPS, Field, validate
from tests.protocol.helpers import camera, png_bytes, scene_msg

JOB = "ab" * 16

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(
        np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=limits.MAX_ARRAY_NDIM, min_side=0, max_side=5)
    )
)
values = st.recursive(
    st.one_of(scalars, arrays),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "__array__"), inner, max_size=4),
    ),
    max_leaves=12,
)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b, equal_nan=True)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "__array__"), values, max_size=5))
def test_pack_unpack_round_trip(msg):
    frames = pack(msg)
    n_arrays = len(frames) - 1
    assert same(msg, unpack([bytes(f) for f in frames]))
    assert n_arrays == sum(1 for _ in _arrays(msg))


def _arrays(value):
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v)
    elif isinstance(value, list):
        for v in value:
            yield from _arrays(v)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=4096), st.integers(0, limits.MAX_ID_INT), st.integers(0, 10**9))
def test_fetch_reply_round_trip(data, rid, offset):
    reply = {
        "v": 1,
        "op": "fetch",
        "id": rid,
        "ok": True,
        "job": JOB,
        "name": "frames/0001.png",
        "offset": offset,
        "data": np.frombuffer(data, np.uint8),
        "total": offset + len(data),
        "sha256": "0" * 64,
    }
    got = decode(encode(reply, "reply"), "reply")
    assert bytes(got["data"]) == data and got["id"] == rid and got["offset"] == offset


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["float32", "float64"]), st.floats(-1e6, 1e6), st.integers(1, 4096), st.booleans())
def test_submit_round_trip(dtype, t, width, raw):
    scene = scene_msg()
    cam = camera(width=width)
    cam["w2c"] = cam["w2c"].astype(dtype)
    cam["w2c"][0, 3] = t
    scene["trajectory"][0]["camera"] = cam
    if raw:
        scene["captures"][0]["image"] = np.full((3, 5, 4), 7, np.uint8)
    msg = {"v": 1, "op": "submit", "id": "req-1", "scene": scene, "key": "k"}
    got = decode(encode(msg, "request"), "request")
    assert same(msg, got)
    assert got["scene"]["trajectory"][0]["camera"]["w2c"].dtype == np.dtype(dtype)


def test_arrays_are_zero_copy_views_and_little_endian():
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    frames = pack({"a": a})
    assert bytes(frames[1]) == a.astype("<i4").tobytes()
    buf = bytearray(frames[1])
    got = unpack([frames[0], buf])["a"]
    assert np.array_equal(got, a)
    buf[0] = 99
    assert got[0, 0] == 99  # a view of the received frame, not a copy


def code_of(frames, kind="request") -> str:
    with pytest.raises(ProtocolError) as err:
        decode(frames, kind)
    return err.value.code


def header(**fields) -> bytes:
    return msgpack.packb({"v": 1, "op": "jobs", "id": 1, **fields}, use_bin_type=True)


def ref(i=0, dtype="uint8", shape=(4,)):
    return {"__array__": i, "dtype": dtype, "shape": list(shape)}


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], errors.BAD_FRAME),
        ([b"\xc1garbage"], errors.BAD_MSGPACK),
        ([msgpack.packb({"v": 1, "op": "jobs", "id": 1})[:-3]], errors.BAD_MSGPACK),  # truncated
        ([msgpack.packb([1, 2, 3])], errors.BAD_MSGPACK),  # not a map
        ([msgpack.packb({1: 2})], errors.BAD_MSGPACK),  # non-string keys
        ([b"\x92\x01"], errors.BAD_MSGPACK),  # array header with a missing item
        ([msgpack.packb({"v": 1, "op": "jobs", "id": 1}) + b"\x00"], errors.BAD_MSGPACK),  # extra data
        ([msgpack.packb({"v": 1, "op": "jobs", "id": 1, "x": msgpack.ExtType(1, b"ab")})], errors.BAD_MSGPACK),
        (
            [
                msgpack.packb({"v": 1, "op": "jobs", "id": 1, "s": b"\xff\xfe".decode("latin1")}, use_bin_type=False)[
                    :-2
                ]
                + b"\xff\xfe"
            ],
            errors.BAD_MSGPACK,
        ),
        ([msgpack.packb({"op": "jobs", "id": 1})], errors.UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": 99, "op": "nope", "id": 1})], errors.UNSUPPORTED_VERSION),  # version before op
        ([msgpack.packb({"v": True, "op": "jobs", "id": 1})], errors.UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": 1, "op": "nope", "id": 1})], errors.UNKNOWN_OP),
        ([msgpack.packb({"v": 1, "id": 1})], errors.UNKNOWN_OP),
        ([msgpack.packb({"v": 1, "op": "jobs"})], errors.BAD_FIELD),  # no id
        ([msgpack.packb({"v": 1, "op": "jobs", "id": -1})], errors.BAD_FIELD),
        ([msgpack.packb({"v": 1, "op": "jobs", "id": 1, "extra": 1})], errors.BAD_FIELD),
        ([header(), b"1234"], errors.BAD_FRAME),  # an array frame nobody references
        ([header(a=ref(0, shape=(5,))), b"1234"], errors.BAD_FRAME),  # size mismatch
        ([header(a=ref(1)), b"1234"], errors.BAD_FRAME),  # no such frame
        ([header(a=ref(0), b=ref(0)), b"1234"], errors.BAD_FRAME),  # referenced twice
        ([header(a=ref(0, dtype="object")), b"1234"], errors.BAD_FRAME),
        ([header(a=ref(0, dtype="complex64")), b"1234"], errors.BAD_FRAME),
        ([header(a=ref(0, shape=(1, 1, 1, 1, 4))), b"1234"], errors.BAD_FRAME),
        ([header(a=ref(0, shape=(-4,))), b"1234"], errors.BAD_FRAME),
        ([header(a={"__array__": 0, "dtype": "uint8"}), b"1234"], errors.BAD_FRAME),
        ([header(a=ref(0, dtype="float64", shape=(2**20, 2**20))), b"1234"], errors.TOO_LARGE),
        ([header()] + [b""] * limits.MAX_FRAMES, errors.TOO_LARGE),
        ([b"\x80" + b"\x00" * limits.MAX_HEADER_BYTES], errors.TOO_LARGE),
    ],
)
def test_bad_frames_get_codes(frames, code):
    assert code_of(frames) == code


def test_a_header_msgpack_cannot_read_says_why():
    """msgpack's FormatError has no message of its own (a reserved byte such as 0xc1): the error still says
    what went wrong, as the others do."""
    for frame, why in (
        (b"\xc1garbage", "FormatError: invalid msgpack format"),
        (b"\x92\x01", "ValueError: Unpack failed: incomplete input"),
        (msgpack.packb({"v": 1}) + b"\x00", "ExtraData: unpack(b) received extra data."),
    ):
        with pytest.raises(ProtocolError, match=r"header frame is not valid msgpack within the limits: ") as err:
            unpack([frame])
        assert str(err.value).endswith(why), str(err.value)


def test_a_missing_v_says_what_to_send_and_does_not_tell_a_hello_to_send_hello():
    from protocol.schemas import check_version

    with pytest.raises(ProtocolError, match=r"got None \(send hello to negotiate\)"):
        check_version({"op": "jobs", "id": 1})
    with pytest.raises(ProtocolError, match=r"got None \(hello carries v too, any version number, beside the versions"):
        check_version({"op": "hello", "id": 1, "versions": [1]})


def test_unpack_limits_and_depth():
    deep: object = 1
    for _ in range(limits.MAX_DEPTH + 2):
        deep = [deep]
    assert code_of([msgpack.packb({"v": 1, "op": "jobs", "id": 1, "x": deep})]) == errors.TOO_LARGE
    long_list = msgpack.packb({"v": 1, "op": "jobs", "id": 1, "x": [0] * (limits.MAX_LIST_LEN + 1)})
    assert code_of([long_list]) == errors.BAD_MSGPACK
    long_str = msgpack.packb({"v": 1, "op": "jobs", "id": 1, "x": "a" * (limits.MAX_STR_BYTES + 1)})
    assert code_of([long_str]) == errors.BAD_MSGPACK
    with pytest.raises(ValueError, match="deeper"):
        pack({"x": deep})
    with pytest.raises(ValueError, match="dtype"):
        pack({"x": np.zeros(2, np.complex64)})


def test_error_carries_id_and_op_when_readable():
    with pytest.raises(ProtocolError) as err:
        decode([msgpack.packb({"v": 1, "op": "status", "id": "r7", "job": 5})], "request")
    assert (err.value.code, err.value.request_id, err.value.op, err.value.field) == (
        errors.BAD_FIELD,
        "r7",
        "status",
        "job",
    )
    assert err.value.message == "status: job must be a string; got 5"


def test_hello_is_read_in_any_version():
    msg = decode([msgpack.packb({"v": 7, "op": "hello", "id": 1, "versions": [7, 1]})], "request")
    assert msg["versions"] == [7, 1]
    # a service of version 7 saying so: its hello and error replies are read whatever their v
    refusal = {
        "code": errors.UNSUPPORTED_VERSION,
        "message": "hello: no common version; client speaks [1], server speaks [7]",
    }
    reply = decode([msgpack.packb({"v": 7, "op": "hello", "id": 1, "ok": False, "error": refusal})], "reply")
    assert reply["error"]["message"].endswith("server speaks [7]")
    assert (
        decode([msgpack.packb({"v": 7, "op": "jobs", "id": 2, "ok": False, "error": refusal})], "reply")["ok"] is False
    )
    # any other reply of a version this code does not speak is refused
    assert code_of([msgpack.packb({"v": 7, "op": "jobs", "id": 2, "ok": True, "jobs": []})], "reply") == (
        errors.UNSUPPORTED_VERSION
    )
    assert code_of([msgpack.packb({"v": 7, "op": "event", "ok": True})], "reply") == errors.UNSUPPORTED_VERSION


def test_images_checked_by_header():
    base = {"v": 1, "op": "submit", "id": 1, "scene": scene_msg()}

    def with_image(image):
        msg = {**base, "scene": {**base["scene"], "captures": [{"name": "a", "image": image}]}}
        with pytest.raises(ProtocolError) as err:
            validate(msg, "request")
        return err.value

    assert with_image(b"GIF89a....").code == errors.BAD_FIELD
    assert with_image(png_bytes()[:20]).code == errors.BAD_FIELD  # cut before the size
    assert with_image(png_bytes(width=limits.MAX_IMAGE_SIDE + 1, height=1)).code == errors.TOO_LARGE
    assert with_image(np.zeros((4, 4, 2), np.uint8)).code == errors.BAD_FIELD
    assert with_image(np.zeros((4, 4, 3), np.float32)).code == errors.BAD_FIELD
    assert with_image(np.zeros((1, limits.MAX_IMAGE_SIDE + 1, 3), np.uint8)).code == errors.TOO_LARGE
    err = with_image(5)
    assert err.field == "scene.captures[0].image"
    ok = {
        **base,
        "scene": {**base["scene"], "captures": [{"name": "a", "image": np.frombuffer(png_bytes(), np.uint8)}]},
    }
    validate(ok, "request")


def test_masks_travel_and_are_checked_like_images():
    """A capture's (and a held-out photo's) ``mask`` is an image field: it round-trips, and a bad one is
    refused naming ``scene.<list>[i].mask`` and the rule, not as an unknown field."""
    scene = scene_msg()
    scene["captures"][0]["mask"] = np.frombuffer(png_bytes(seed=5), np.uint8)
    scene["captures"][1]["mask"] = np.full((48, 64, 4), 255, np.uint8)
    scene["heldout"] = [{"name": "h", "image": png_bytes(), "mask": png_bytes(seed=6), "camera": camera()}]
    msg = {"v": 1, "op": "submit", "id": 1, "scene": scene}
    got = decode(encode(msg, "request"), "request")
    assert same(msg, got)
    assert bytes(got["scene"]["captures"][0]["mask"]) == png_bytes(seed=5)
    assert bytes(got["scene"]["heldout"][0]["mask"]) == png_bytes(seed=6)

    def with_mask(key, mask):
        bad = {**msg, "scene": {**scene, key: [{**scene[key][0], "mask": mask}]}}
        with pytest.raises(ProtocolError) as err:
            validate(bad, "request")
        return err.value

    for key in ("captures", "heldout"):
        field = f"scene.{key}[0].mask"
        for mask, code, rule in (
            ("m.png", errors.BAD_FIELD, "must be a PNG/JPEG file"),
            (b"GIF89a....", errors.BAD_FIELD, "must be a PNG or JPEG file; not a PNG or JPEG file"),
            (png_bytes()[:20], errors.BAD_FIELD, "must be a PNG or JPEG file; PNG without an IHDR"),
            (np.zeros((4, 4), np.uint8), errors.BAD_FIELD, "must be a PNG/JPEG file"),
            (png_bytes(width=limits.MAX_IMAGE_SIDE + 1, height=1), errors.TOO_LARGE, "must be at most 4096 px a side"),
        ):
            err = with_mask(key, mask)
            assert (err.code, err.field) == (code, field), (key, mask)
            assert err.message.startswith(f"submit: {field} {rule}"), err.message


# ----------------------------------------------------------------------------------------------
# A wrong type in every field of every op (the same cases run against the live service)

WRONG = {
    "int": "x",
    "float": "x",
    "bool": 1,
    "str": 5,
    "id": 1.5,
    "array": "x",
    "image": 5,
    "list": 5,
    "struct": 5,
    "map": 5,
}


def valid_requests() -> dict[str, dict]:
    """One valid request per op, with every optional field present."""
    scene = scene_msg()
    scene["heldout"] = [{"name": "h", "image": png_bytes(), "mask": png_bytes(seed=9), "camera": camera()}]
    scene["captures"][0]["mask"] = np.frombuffer(png_bytes(seed=8), np.uint8)
    scene["captures"][0]["camera"]["distortion"] = {"model": "SIMPLE_RADIAL", "params": [0.01]}
    fields = {
        "hello": {"versions": [1], "client": "test"},
        "submit": {"scene": scene, "key": "k"},
        "status": {"job": JOB, "watch": True, "since": 0},
        "cancel": {"job": JOB},
        "delete": {"job": JOB},
        "jobs": {},
        "fetch": {"job": JOB, "name": "a.ply", "offset": 0, "length": 10},
        "shutdown": {},
    }
    return {op: {"v": 1, "op": op, "id": 1, **f} for op, f in fields.items()}


def field_paths(value, fields: tuple[Field, ...], prefix=()):
    """(path, field) for every field present in ``value``, recursing into structs and list items."""
    for f in fields:
        if f.name not in value:
            continue
        path = prefix + (f.name,)
        yield path, f
        inner = value[f.name]
        if f.type == "struct":
            yield from field_paths(inner, f.fields, path)
        elif f.type == "list" and f.items is not None and inner:
            yield path + (0,), f.items
            if f.items.type == "struct":
                yield from field_paths(inner[0], f.items.fields, path + (0,))


def path_text(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def wrong_type_cases():
    cases = []
    for op, msg in valid_requests().items():
        for path, f in field_paths(msg, OPS[op].request):
            cases.append((op, path, f))
    return cases


def set_path(msg, path, value):
    import copy

    out = copy.deepcopy(msg)
    target = out
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return out


def test_every_op_field_is_covered():
    covered = {(op, path_text(p)) for op, p, _ in wrong_type_cases()}
    assert len(covered) >= 40
    for op, s in OPS.items():
        for f in s.request:
            assert (op, f.name) in covered, (op, f.name)


@pytest.mark.parametrize(
    "op, path, field", wrong_type_cases(), ids=lambda x: path_text(x) if isinstance(x, tuple) else str(x)[:20]
)
def test_wrong_type_in_each_field(op, path, field):
    msg = set_path(valid_requests()[op], path, WRONG[field.type])
    with pytest.raises(ProtocolError) as err:
        decode(encode_unchecked(msg), "request")
    assert err.value.code == errors.BAD_FIELD
    assert err.value.field == path_text(path)


def encode_unchecked(msg):
    return [bytes(f) for f in pack(msg)]


def test_valid_requests_pass():
    for msg in valid_requests().values():
        decode(encode(msg, "request"), "request")


def test_string_limits_count_utf8_bytes_as_msgpack_does():
    """A field's max_len is in UTF-8 bytes: a string within it is within the decoder's max_str_len."""
    msg = {"v": 1, "op": "fetch", "id": 1, "job": JOB, "name": "é" * limits.MAX_NAME_BYTES}  # 255 characters
    with pytest.raises(ProtocolError) as err:
        encode(msg, "request")
    assert err.value.code == errors.TOO_LARGE and err.value.field == "name"
    assert f"at most {limits.MAX_NAME_BYTES} UTF-8 bytes" in err.value.message
    msg["name"] = "é" * (limits.MAX_NAME_BYTES // 2)  # 254 bytes
    assert decode(encode(msg, "request"), "request")["name"] == msg["name"]
    reply = {"v": 1, "op": None, "id": None, "ok": False, "error": {"code": errors.BAD_FIELD, "message": "€" * 21846}}
    with pytest.raises(ProtocolError, match="UTF-8 bytes"):  # 21846 characters, 65538 bytes
        encode(reply, "reply")


@pytest.mark.parametrize(
    "text", ["a" * 70, "é" * 7, "€" * 30, "😀" * 20, "a€" * 20], ids=["ascii", "2-byte", "3-byte", "4-byte", "mixed"]
)
@pytest.mark.parametrize("max_bytes", [10, 11, 12, 13, 20])
def test_clip_utf8_fits_and_never_splits_a_character(text, max_bytes):
    out = limits.clip_utf8(text, max_bytes)
    assert limits.utf8_len(out) <= max_bytes
    if limits.utf8_len(text) <= max_bytes:
        assert out == text
    else:
        assert out.endswith("...") and text.startswith(out[:-3])
        assert limits.utf8_len(out) > max_bytes - 4 - 3  # at most one character (<= 4 bytes) given up


def test_status_reply_with_the_most_artifacts_a_job_may_list_fits():
    """2 files per frame of the longest trajectory and the rest, with the longest names: one status reply."""
    assert limits.MAX_ARTIFACTS >= limits.MAX_FILES_PER_FRAME * limits.MAX_TRAJECTORY
    name = "é" * (limits.MAX_NAME_BYTES // 2 - 3)  # + "/NNNN": at most 255 UTF-8 bytes
    artifacts = [{"name": f"{name}/{i:04d}", "size": 2**40, "sha256": "f" * 64} for i in range(limits.MAX_ARTIFACTS)]
    standing = {"job": JOB, "state": "done", "stage": "done", "fraction": 1.0, "message": "finished"}
    reply = {"v": 1, "op": "status", "id": 1, "ok": True, **standing, "created": 1.0, "updated": 2.0, "seq": 9}
    frames = encode({**reply, "artifacts": artifacts}, "reply")
    assert len(frames[0]) <= limits.MAX_HEADER_BYTES
    assert len(decode(frames, "reply")["artifacts"]) == limits.MAX_ARTIFACTS
    event = {"v": 1, "op": "event", "ok": True, "seq": 9, "time": 2.0, **standing, "artifacts": artifacts}
    assert len(decode(encode(event, "reply"), "reply")["artifacts"]) == limits.MAX_ARTIFACTS
    with pytest.raises(ProtocolError) as err:
        encode({**reply, "artifacts": artifacts + artifacts[:1]}, "reply")
    assert err.value.code == errors.TOO_LARGE and err.value.field == "artifacts"


def test_a_protocol_error_survives_pickling_whole():
    """Code, message, field and what the request was read as come back (a process pool's error is pickled)."""
    err = ProtocolError("bad_field", "must be positive; got -1", field="settings.gaussian_iterations")
    err.request_id, err.op = 7, "submit"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ProtocolError and str(again) == str(err)
    assert again.to_wire() == err.to_wire()
    assert (again.request_id, again.op) == (7, "submit")
