"""Every message of the protocol, declared once as data, and the one validator that reads the tables.

A message is a msgpack map (the header) plus one raw frame per array (see ``codec.py``). The header of
every message holds ``v`` (protocol version), ``op`` and, in requests and replies, ``id``. ``TYPES``
says what each field type is on the wire.

An optional field may be absent or nil. ``validate(msg, kind)`` checks a decoded header against these
tables and raises ``ProtocolError`` naming the field path (``scene.captures[3].camera.K``), the rule
and what arrived. ``schema_markdown()`` renders the tables for ``protocol/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import errors, limits
from .errors import ProtocolError
from .images import encoded_image_size, is_raw_pixels
from .limits import limits_markdown
from .settings import PIPE, settings_markdown
from .version import SUPPORTED_VERSIONS

TYPES = {
    "int": "msgpack integer (not bool), within the limits",
    "float": "msgpack float or integer, finite, within the limits",
    "bool": "true or false",
    "str": "UTF-8 string (msgpack str); length in UTF-8 bytes (msgpack's unit)",
    "id": "an integer 0..2^63-1 or a string of 1..64 characters",
    "array": "an array reference (see Arrays) with the dtype and shape given; N: any length",
    "image": "a PNG/JPEG file (bin, or uint8 array [N]) or raw pixels uint8 [H, W, 3|4]",
    "list": "msgpack array; the `[]` rows below describe its items",
    "struct": "msgpack map with exactly the fields listed below it",
    "map": "msgpack map from strings to nil, bool, int, float or str",
}
JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
TERMINAL_STATES = ("done", "failed", "cancelled", "interrupted")
SHA256_HEX_CHARS = 64
MAX_CLIENT_VERSIONS = 16
MAX_DISTORTION_PARAMS = 16
# COLMAP's names and distortion coefficients (in its order) for the models a capture may carry; COLMAP's own
# parameter lists start with the focal length and principal point, which are in K here (backend.scene reads them)
DISTORTION_COEFFS = {
    "NONE": (),
    "SIMPLE_RADIAL": ("k",),
    "RADIAL": ("k1", "k2"),
    "OPENCV": ("k1", "k2", "p1", "p2"),
    "FULL_OPENCV": ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"),
}
MAX_MODEL_CHARS = 32
FRAME_NUMBER_MAX = 2**31 - 1
SCALAR_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Field:
    """One field of a message. See the module docstring for the meaning of ``type``."""

    name: str
    type: str
    doc: str = ""
    required: bool = True
    dtypes: tuple[str, ...] = ()
    shape: tuple[int | None, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_len: int = 0
    max_len: int | None = None
    choices: tuple[str, ...] = ()
    items: Field | None = None
    fields: tuple[Field, ...] = ()


@dataclass(frozen=True)
class OpSchema:
    """A request op: its request fields and its reply fields (beside the envelope)."""

    op: str
    doc: str
    request: tuple[Field, ...]
    reply: tuple[Field, ...]


# ----------------------------------------------------------------------------------------------
# The tables

FLOAT_DTYPES = ("float32", "float64")
ENVELOPE_REQUEST = (
    Field("v", "int", "protocol version of this message (checked first)", min=0, max=limits.MAX_ID_INT),
    Field("op", "str", "operation name", max_len=limits.MAX_NAME_BYTES),
    Field("id", "id", "request id chosen by the client; echoed in the reply"),
)
ERROR = Field(
    "error",
    "struct",
    "present when ok is false",
    required=False,
    fields=(
        Field("code", "str", "stable error code (table below)", choices=tuple(errors.CODES)),
        Field("message", "str", "plain text naming the field, the rule and what arrived", max_len=limits.MAX_STR_BYTES),
        Field(
            "field",
            "str",
            "path of the offending field, when there is one",
            required=False,
            max_len=limits.MAX_STR_BYTES,
        ),
    ),
)
ENVELOPE_REPLY = (
    Field("v", "int", "protocol version of this message", min=0, max=limits.MAX_ID_INT),
    Field(
        "op",
        "str",
        "the request's op; nil when it could not be read or is not a known op",
        required=False,
        max_len=limits.MAX_NAME_BYTES,
    ),
    Field(
        "id",
        "id",
        "the request's id; nil when it could not be read or is not a valid id (see Transport: the reply then "
        "answers the oldest request still waiting)",
        required=False,
    ),
    Field("ok", "bool", "true on success; the op's reply fields follow only then"),
    ERROR,
)

JOB = Field("job", "str", "job id (32 hex characters)", min_len=1, max_len=limits.MAX_ID_CHARS)
STATE = Field("state", "str", "job state", choices=JOB_STATES)
STAGE = Field(
    "stage", "str", "current stage (queued, memory, render, generate, fit, done, ...)", max_len=limits.MAX_NAME_BYTES
)
FRACTION = Field("fraction", "float", "overall progress", min=0.0, max=1.0)
MESSAGE = Field(
    "message", "str", "plain-language detail; the reason when failed or interrupted", max_len=limits.MAX_STR_BYTES
)
QUEUE_POSITION = Field(
    "queue_position",
    "int",
    "a waiting job's place in the queue, 1 = next (queued jobs only)",
    required=False,
    min=1,
    max=limits.MAX_ID_INT,
)
QUEUE_LENGTH = Field(
    "queue_length", "int", "jobs waiting in the queue (queued jobs only)", required=False, min=1, max=limits.MAX_ID_INT
)
WORKER = Field(
    "worker",
    "str",
    "the worker running the job, e.g. 'worker ray-1 (pid 4242 on 10.0.0.7, GPU 3)' (running jobs only)",
    required=False,
    max_len=limits.MAX_STR_BYTES,
)
ARTIFACT = Field(
    "artifacts[]",
    "struct",
    "a finished file of the job",
    fields=(
        Field(
            "name",
            "str",
            "relative path inside the job's outputs, '/'-separated",
            min_len=1,
            max_len=limits.MAX_NAME_BYTES,
        ),
        Field("size", "int", "bytes", min=0, max=limits.MAX_ID_INT),
        Field("sha256", "str", "hex sha256 of the whole file", min_len=SHA256_HEX_CHARS, max_len=SHA256_HEX_CHARS),
    ),
)
ARTIFACTS = Field("artifacts", "list", "finished files", items=ARTIFACT, max_len=limits.MAX_ARTIFACTS)
CREATED = Field("created", "float", "unix time of submission", min=0.0)
UPDATED = Field("updated", "float", "unix time of the latest event", min=0.0)
# where a job stands, as `status` replies and `jobs` lists it
JOB_STANDING = (JOB, STATE, STAGE, FRACTION, MESSAGE, QUEUE_POSITION, QUEUE_LENGTH, WORKER)

CAMERA_FIELDS = (
    Field("w2c", "array", "world-to-camera, OpenCV (x right, y down, z forward)", dtypes=FLOAT_DTYPES, shape=(4, 4)),
    Field("K", "array", "intrinsics in pixels; pixel i spans [i, i+1]", dtypes=FLOAT_DTYPES, shape=(3, 3)),
    Field("width", "int", "image width in pixels", min=1, max=limits.MAX_IMAGE_SIDE),
    Field("height", "int", "image height in pixels", min=1, max=limits.MAX_IMAGE_SIDE),
    Field(
        "distortion",
        "struct",
        "lens distortion, captures only (COLMAP models)",
        required=False,
        fields=(
            Field("model", "str", ", ".join(DISTORTION_COEFFS), max_len=MAX_MODEL_CHARS),
            Field(
                "params",
                "list",
                "the distortion coefficients alone, in COLMAP's order (focal length and principal point are in K): "
                + ", ".join(f"{model} {' '.join(coeffs) or 'none'}" for model, coeffs in DISTORTION_COEFFS.items()),
                items=Field("params[]", "float"),
                max_len=MAX_DISTORTION_PARAMS,
            ),
        ),
    ),
)


def _camera(required: bool) -> Field:
    return Field("camera", "struct", "OpenCV camera (see Cameras)", required=required, fields=CAMERA_FIELDS)


def _captures(name: str, doc: str, *, required: bool, min_len: int, max_len: int) -> Field:
    capture = Field(
        f"{name}[]",
        "struct",
        "one photo",
        fields=(
            Field("name", "str", "unique capture name", min_len=1, max_len=limits.MAX_NAME_BYTES),
            Field("image", "image", "PNG/JPEG file, or raw pixels uint8 [H, W, 3|4]"),
            Field(
                "mask",
                "image",
                "which pixels are the object (or what to keep), at the image's size: PNG/JPEG file (greyscale, "
                "or RGBA whose alpha is the mask) or raw pixels uint8 [H, W, 3|4]; above 127 of 255 is kept "
                "(see Masks)",
                required=False,
            ),
            _camera(required=False),
        ),
    )
    return Field(name, "list", doc, required=required, items=capture, min_len=min_len, max_len=max_len)


SCENE = Field(
    "scene",
    "struct",
    "the scene (backend/scene.py's scene.json, with images inline)",
    fields=(
        _captures("captures", "photos with cameras", required=True, min_len=1, max_len=limits.MAX_CAPTURES),
        Field(
            "trajectory",
            "list",
            "cameras to generate, by frame number (increasing); absent or empty: the service's own path (see Jobs). "
            "Refused where captures lack cameras and fewer than 3 have one (SfM's frame, not the scene's)",
            required=False,
            max_len=limits.MAX_TRAJECTORY,
            items=Field(
                "trajectory[]",
                "struct",
                "one trajectory camera",
                fields=(
                    Field("frame", "int", "Blender frame number", min=-FRAME_NUMBER_MAX, max=FRAME_NUMBER_MAX),
                    _camera(required=True),
                ),
            ),
        ),
        _captures(
            "heldout",
            "photos kept out of the fit, for evaluation (camera required)",
            required=False,
            min_len=0,
            max_len=limits.MAX_HELDOUT,
        ),
        Field(
            "settings",
            "map",
            "job settings by name (table Job settings below); a name left out takes its default",
            required=False,
            max_len=limits.MAX_SETTINGS,
        ),
    ),
)

OPS: dict[str, OpSchema] = {
    s.op: s
    for s in (
        OpSchema(
            "hello",
            "Negotiate the version; learn what the server offers. Valid in any `v`.",
            request=(
                Field(
                    "versions",
                    "list",
                    "protocol versions the client speaks",
                    items=Field("versions[]", "int", min=0, max=limits.MAX_ID_INT),
                    min_len=1,
                    max_len=MAX_CLIENT_VERSIONS,
                ),
                Field(
                    "client", "str", "client name and version, for logs", required=False, max_len=limits.MAX_NAME_BYTES
                ),
            ),
            reply=(
                Field("version", "int", "the version chosen: the highest both speak", min=0, max=limits.MAX_ID_INT),
                Field(
                    "versions",
                    "list",
                    "versions the server speaks",
                    items=Field("versions[]", "int", min=0, max=limits.MAX_ID_INT),
                    max_len=MAX_CLIENT_VERSIONS,
                ),
                Field("server", "str", "server software version", max_len=limits.MAX_NAME_BYTES),
                Field(
                    "generators",
                    "list",
                    "generator names a job may ask for",
                    items=Field("generators[]", "str", max_len=limits.MAX_NAME_BYTES),
                    max_len=limits.MAX_MAP_LEN,
                ),
                Field(
                    "device",
                    "str",
                    "compute device, for people to read: 'cpu', 'cuda:0' or 'mps'; on a Ray pool"
                    " 'ray: N workers, 1 GPU each' or 'ray: N workers, cpu' (docs/cluster.md)",
                    max_len=limits.MAX_NAME_BYTES,
                ),
                Field(
                    "gpu",
                    "struct",
                    "present when the device is one CUDA GPU (never on a Ray pool)",
                    required=False,
                    fields=(
                        Field("name", "str", "GPU name", max_len=limits.MAX_NAME_BYTES),
                        Field("total_bytes", "int", "GPU memory", min=0, max=limits.MAX_ID_INT),
                        Field("free_bytes", "int", "GPU memory free now", min=0, max=limits.MAX_ID_INT),
                    ),
                ),
                Field("limits", "map", "the server's limits (protocol/limits.py as_dict)", max_len=limits.MAX_MAP_LEN),
            ),
        ),
        OpSchema(
            "submit",
            "Queue a job. A submit with a `key` the service knows returns that job (see Jobs, Submit keys).",
            request=(
                SCENE,
                Field(
                    "key",
                    "str",
                    "idempotency key, matched alone (not the scene) among this client's stored jobs: a submit "
                    "with a known key returns that job and queues nothing",
                    required=False,
                    min_len=1,
                    max_len=limits.MAX_ID_CHARS,
                ),
            ),
            reply=(JOB, STATE),
        ),
        OpSchema(
            "status",
            "A job's state. `watch: true` subscribes this connection to its `event`s; `since: N` also replays events with seq > N.",
            request=(
                JOB,
                Field("watch", "bool", "push this job's events to this connection until it ends", required=False),
                Field(
                    "since",
                    "int",
                    "replay events with seq greater than this (after the reply)",
                    required=False,
                    min=0,
                    max=limits.MAX_ID_INT,
                ),
            ),
            reply=(
                *JOB_STANDING,
                Field("seq", "int", "seq of the job's latest event", min=0, max=limits.MAX_ID_INT),
                CREATED,
                UPDATED,
                ARTIFACTS,
            ),
        ),
        OpSchema(
            "cancel",
            "Cancel a job (whatever its state: not an error). The reply's `state` is its state when the request was\n"
            "handled; unless that is final, an `event` reports how the job ends (see Jobs, Cancel).",
            request=(JOB,),
            reply=(JOB, STATE),
        ),
        OpSchema(
            "delete",
            "Delete an ended job (done, failed, cancelled, interrupted) and its files from the store. A queued or\n"
            "running job is refused (`bad_field`): cancel it and wait for it to end. The reply's `state` is the state\n"
            "it ended in (see Jobs, Delete).",
            request=(JOB,),
            reply=(JOB, STATE),
        ),
        OpSchema(
            "jobs",
            f"List your jobs in the store, oldest first: the newest {limits.MAX_JOBS_LISTED} at most. Older ones stay\n"
            "in the store, answer `status` and `fetch` by id, and leave with `delete` or the service's `--keep-days`.\n"
            "With keys the count is of your own jobs.",
            request=(),
            reply=(
                Field(
                    "jobs",
                    "list",
                    "the jobs",
                    max_len=limits.MAX_JOBS_LISTED,
                    items=Field(
                        "jobs[]",
                        "struct",
                        "one job",
                        fields=(*JOB_STANDING, CREATED, UPDATED),
                    ),
                ),
            ),
        ),
        OpSchema(
            "fetch",
            "Read a chunk of an artifact. Repeat with offset += length of data until offset = total.",
            request=(
                JOB,
                Field(
                    "name", "str", "artifact name as listed by status/event", min_len=1, max_len=limits.MAX_NAME_BYTES
                ),
                Field("offset", "int", "first byte (default 0)", required=False, min=0, max=limits.MAX_ID_INT),
                Field(
                    "length",
                    "int",
                    f"bytes wanted (default {limits.FETCH_CHUNK_BYTES})",
                    required=False,
                    min=1,
                    max=limits.MAX_FETCH_CHUNK_BYTES,
                ),
            ),
            reply=(
                JOB,
                Field("name", "str", "artifact name", min_len=1, max_len=limits.MAX_NAME_BYTES),
                Field("offset", "int", "first byte of data", min=0, max=limits.MAX_ID_INT),
                Field(
                    "data",
                    "array",
                    "the bytes; shorter than length at the end of the file",
                    dtypes=("uint8",),
                    shape=(None,),
                ),
                Field("total", "int", "size of the whole artifact", min=0, max=limits.MAX_ID_INT),
                Field(
                    "sha256",
                    "str",
                    "hex sha256 of the whole artifact",
                    min_len=SHA256_HEX_CHARS,
                    max_len=SHA256_HEX_CHARS,
                ),
            ),
        ),
        OpSchema(
            "shutdown",
            "Stop the service (loopback peers only); a running job becomes interrupted (see Events).",
            request=(),
            reply=(),
        ),
    )
}

EVENT = OpSchema(
    "event",
    "Pushed by the server (no id, ok true) to every connection watching the job.",
    request=(),
    reply=(
        Field("v", "int", "protocol version", min=0, max=limits.MAX_ID_INT),
        Field("op", "str", "always 'event'", choices=("event",)),
        Field("ok", "bool", "always true"),
        JOB,
        Field("seq", "int", "1, 2, 3, ... per job; resume with status since=seq", min=1, max=limits.MAX_ID_INT),
        Field("time", "float", "unix time", min=0.0),
        STATE,
        STAGE,
        FRACTION,
        MESSAGE,
        Field(
            "artifacts", "list", "files finished since the previous event", items=ARTIFACT, max_len=limits.MAX_ARTIFACTS
        ),
    ),
)


# ----------------------------------------------------------------------------------------------
# The validator


def _got(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{tuple(value.shape)} {value.dtype}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, op: str) -> None:
        self.op = op

    def fail(self, code: str, path: str, rule: str, value: Any) -> ProtocolError:
        return ProtocolError(code, f"{self.op}: {path} must be {rule}; got {_got(value)}", field=path)

    def struct(self, msg: dict, fields: tuple[Field, ...], path: str) -> None:
        known = {f.name for f in fields}
        for key in msg:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                raise ProtocolError(
                    errors.BAD_FIELD,
                    f"{self.op}: {where}: unknown field; known: {', '.join(sorted(known))}",
                    field=where,
                )
        for f in fields:
            where = f"{path}.{f.name}" if path else f.name
            value = msg.get(f.name)
            if value is None:
                if f.required:
                    raise ProtocolError(
                        errors.BAD_FIELD, f"{self.op}: {where}: missing ({f.type} required)", field=where
                    )
                continue
            self.value(value, f, where)

    def value(self, value: Any, f: Field, path: str) -> None:  # noqa: C901 (one branch per type)
        t = f.type
        if t == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(errors.BAD_FIELD, path, "an integer", value)
            self.range(value, f, path)
        elif t == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.fail(errors.BAD_FIELD, path, "a finite number", value)
            self.range(value, f, path)
        elif t == "bool":
            if not isinstance(value, bool):
                raise self.fail(errors.BAD_FIELD, path, "true or false", value)
        elif t == "str":
            if not isinstance(value, str):
                raise self.fail(errors.BAD_FIELD, path, "a string", value)
            self.length(value, f, path, "UTF-8 bytes", limits.utf8_len(value))  # msgpack limits bytes
            if f.choices and value not in f.choices:
                raise self.fail(errors.BAD_FIELD, path, f"one of {', '.join(f.choices)}", value)
        elif t == "id":
            if isinstance(value, str):
                if not 1 <= len(value) <= limits.MAX_ID_CHARS:
                    raise self.fail(errors.BAD_FIELD, path, f"a string of 1..{limits.MAX_ID_CHARS} characters", value)
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limits.MAX_ID_INT:
                raise self.fail(errors.BAD_FIELD, path, "an integer in [0, 2^63) or a string", value)
        elif t == "array":
            self.array(value, f, path)
        elif t == "image":
            self.image(value, path)
        elif t == "list":
            if not isinstance(value, list):
                raise self.fail(errors.BAD_FIELD, path, "a list", value)
            self.length(value, f, path, "items")
            items = f.items if f.items is not None else Field(f"{f.name}[]", "map")
            for i, item in enumerate(value):
                where = f"{path}[{i}]"
                if item is None:
                    raise self.fail(errors.BAD_FIELD, where, f"a {items.type}", item)
                self.value(item, items, where)
        elif t == "struct":
            if not isinstance(value, dict):
                raise self.fail(errors.BAD_FIELD, path, "a map", value)
            self.struct(value, f.fields, path)
        elif t == "map":
            if not isinstance(value, dict):
                raise self.fail(errors.BAD_FIELD, path, "a map", value)
            self.length(value, f, path, "keys")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise self.fail(errors.BAD_FIELD, f"{path} keys", "strings", key)
                if not isinstance(item, SCALAR_TYPES):
                    raise self.fail(errors.BAD_FIELD, f"{path}.{key}", "nil, bool, int, float or str", item)
                if isinstance(item, float) and not math.isfinite(item):
                    raise self.fail(errors.BAD_FIELD, f"{path}.{key}", "finite", item)
        else:  # pragma: no cover - schema tables, not input
            raise ValueError(f"schema field {f.name!r} has unknown type {t!r}; known: {', '.join(TYPES)}")

    def range(self, value: float, f: Field, path: str) -> None:
        if f.min is not None and value < f.min or f.max is not None and value > f.max:
            raise self.fail(errors.BAD_FIELD, path, f"in [{f.min}, {f.max}]", value)

    def length(self, value: Any, f: Field, path: str, unit: str, size: int | None = None) -> None:
        size = len(value) if size is None else size
        if f.max_len is not None and size > f.max_len:
            raise self.fail(errors.TOO_LARGE, path, f"at most {f.max_len} {unit}", value)
        if size < f.min_len:
            raise self.fail(errors.BAD_FIELD, path, f"at least {f.min_len} {unit}", value)

    def array(self, value: Any, f: Field, path: str) -> None:
        rule = f"an array {'|'.join(f.dtypes)} {list(f.shape or ())}".replace("None", "N")
        if not isinstance(value, np.ndarray):
            raise self.fail(errors.BAD_FIELD, path, rule, value)
        if value.dtype.name not in f.dtypes or f.shape is None or value.ndim != len(f.shape):
            raise self.fail(errors.BAD_FIELD, path, rule, value)
        if any(want is not None and want != got for want, got in zip(f.shape, value.shape)):
            raise self.fail(errors.BAD_FIELD, path, rule, value)
        if value.nbytes > limits.MAX_ARRAY_BYTES:
            raise self.fail(errors.TOO_LARGE, path, f"at most {limits.MAX_ARRAY_BYTES} bytes", value)

    def image(self, value: Any, path: str) -> None:
        side = limits.MAX_IMAGE_SIDE
        if is_raw_pixels(value):
            h, w, c = value.shape
            if value.dtype != np.uint8 or c not in (3, limits.MAX_IMAGE_CHANNELS) or h < 1 or w < 1:
                raise self.fail(errors.BAD_FIELD, path, "raw pixels uint8 [H, W, 3|4]", value)
            if h > side or w > side:
                raise self.fail(errors.TOO_LARGE, path, f"at most {side} px a side", value)
            return
        if isinstance(value, np.ndarray):
            if value.dtype != np.uint8 or value.ndim != 1:
                raise self.fail(
                    errors.BAD_FIELD, path, "a PNG/JPEG file (bin or uint8 [N]) or uint8 [H, W, 3|4]", value
                )
        elif not isinstance(value, bytes):
            raise self.fail(errors.BAD_FIELD, path, "a PNG/JPEG file (bin or uint8 [N]) or uint8 [H, W, 3|4]", value)
        if len(value) > limits.MAX_ENCODED_IMAGE_BYTES:
            raise self.fail(errors.TOO_LARGE, path, f"at most {limits.MAX_ENCODED_IMAGE_BYTES} bytes", value)
        data = memoryview(value).cast("B") if isinstance(value, np.ndarray) else value
        try:
            _fmt, w, h = encoded_image_size(data)
        except ValueError as err:
            raise ProtocolError(
                errors.BAD_FIELD, f"{self.op}: {path} must be a PNG or JPEG file; {err}", field=path
            ) from None
        if not (1 <= w <= side and 1 <= h <= side):
            raise ProtocolError(
                errors.TOO_LARGE, f"{self.op}: {path} must be at most {side} px a side; got {w}x{h}", field=path
            )


def check_version(msg: dict) -> int:
    """The header's ``v``; raises ``unsupported_version`` unless this code speaks it."""
    v = msg.get("v")
    if isinstance(v, bool) or not isinstance(v, int) or v not in SUPPORTED_VERSIONS:
        op = msg.get("op")
        advice = (
            "hello carries v too, any version number, beside the versions you speak"
            if isinstance(op, str) and op == "hello"  # op may be anything that arrived: an array compares elementwise
            else "send hello to negotiate"
        )
        raise ProtocolError(
            errors.UNSUPPORTED_VERSION,
            f"v must be one of {list(SUPPORTED_VERSIONS)}; got {_got(v)} ({advice})",
            field="v",
        )
    return v


def reads_in_every_version(msg: dict, kind: str) -> bool:
    """Whether ``msg`` is read whatever its (integer) ``v``: a ``hello`` request or reply (how versions are agreed,
    protocol.version) and an error reply (how a client learns that the service speaks another version:
    ``hello: no common version; client speaks [1], server speaks [2]``)."""
    v = msg.get("v")
    if isinstance(v, bool) or not isinstance(v, int):  # a missing or non-integer v is never a version
        return False
    op = msg.get("op")
    if isinstance(op, str) and op == "hello":  # op may be anything that arrived: an array compares elementwise
        return True
    return kind == "reply" and msg.get("ok") is False


def validate(msg: dict, kind: str) -> dict:
    """Check a decoded header against the tables; return it (optional fields may stay absent).

    Args:
        msg: the header with arrays resolved (``codec.unpack``).
        kind: ``"request"`` (client to server) or ``"reply"`` (server to client: replies and events).
    Raises:
        ProtocolError: ``unsupported_version`` first, then ``unknown_op``, ``bad_field``, ``too_large``.
    """
    op = msg.get("op")
    if kind not in ("request", "reply"):
        raise ValueError(f"kind must be 'request' or 'reply'; got {kind!r}")
    if not reads_in_every_version(msg, kind):
        check_version(msg)
    if kind == "request":
        if not isinstance(op, str) or op not in OPS:  # a map or list as op is unhashable: check the type first
            raise ProtocolError(errors.UNKNOWN_OP, f"op must be one of {', '.join(OPS)}; got {_got(op)}", field="op")
        _Checker(op).struct(msg, ENVELOPE_REQUEST + OPS[op].request, "")
        return msg
    if op is not None and not isinstance(op, str):  # an array or map as op: compare nothing with it
        raise ProtocolError(errors.UNKNOWN_OP, f"op must be a string; got {_got(op)}", field="op")
    if op == "event":
        _Checker(op).struct(msg, EVENT.reply, "")
        return msg
    if op is not None and (not isinstance(op, str) or op not in OPS):
        raise ProtocolError(errors.UNKNOWN_OP, f"op must be one of event, {', '.join(OPS)}; got {_got(op)}", field="op")
    checker = _Checker(str(op))
    if msg.get("ok") is True and op is not None:
        checker.struct(msg, ENVELOPE_REPLY + OPS[op].reply, "")
    else:
        checker.struct(msg, ENVELOPE_REPLY, "")
        if msg.get("ok") is not False or "error" not in msg:
            raise ProtocolError(
                errors.BAD_FIELD, f"{op}: an error reply must have ok false and an error map", field="error"
            )
    return msg


# ----------------------------------------------------------------------------------------------
# Documentation from the tables


def _rule(f: Field) -> str:
    parts = []
    if f.type == "array":
        shape = ", ".join("N" if s is None else str(s) for s in f.shape or ())
        dtypes = PIPE.join(f.dtypes)
        parts.append(f"{dtypes} [{shape}]")
    if f.min is not None or f.max is not None:
        lo = "" if f.min is None else f"{f.min:g}" if isinstance(f.min, float) else str(f.min)
        hi = "" if f.max is None else f"{f.max:g}" if isinstance(f.max, float) else str(f.max)
        parts.append(f"{lo}..{hi}")
    if f.max_len is not None or f.min_len:
        parts.append(f"len {f.min_len}..{'' if f.max_len is None else f.max_len}")
    if f.choices and len(f.choices) <= len(JOB_STATES):
        parts.append(f" {PIPE} ".join(f.choices))
    return "; ".join(parts)


def _rows(fields: tuple[Field, ...], prefix: str) -> list[str]:
    rows = []
    for f in fields:
        path = f"{prefix}{f.name}"
        req = "yes" if f.required else "no"
        doc = f.doc.replace("|", PIPE)
        rows.append(f"| `{path}` | {f.type} | {req} | {_rule(f)} | {doc} |")
        if f.type == "struct":
            rows += _rows(f.fields, f"{path}.")
        elif f.type == "list" and f.items is not None and f.items.type == "struct":
            rows += _rows(f.items.fields, f"{path}[].")
    return rows


def _table(fields: tuple[Field, ...]) -> str:
    if not fields:
        return "(no fields)\n"
    head = ["| field | type | required | limits | meaning |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(head + _rows(fields, "")) + "\n"


def schema_markdown() -> str:
    """The generated tables of protocol/README.md: OPS, EVENT, the error codes, the job settings
    (``settings.settings_markdown``) and the ``hello`` reply's limits (``limits.limits_markdown``)."""
    out = ["### Field types\n\n| type | on the wire |\n| --- | --- |\n"]
    out += [f"| {t} | {doc.replace('|', PIPE)} |\n" for t, doc in TYPES.items()]
    out += [
        "\n### Envelope of every request\n\n",
        _table(ENVELOPE_REQUEST),
        "\n### Envelope of every reply\n\n",
        _table(ENVELOPE_REPLY),
    ]
    for s in list(OPS.values()):
        out += [
            f"\n### `{s.op}`\n\n{s.doc}\n\nRequest fields:\n\n",
            _table(s.request),
            "\nReply fields (when ok):\n\n",
            _table(s.reply),
        ]
    out += [f"\n### `event` (server push)\n\n{EVENT.doc}\n\n", _table(EVENT.reply)]
    out += ["\n### Error codes\n\n| code | meaning |\n| --- | --- |\n"]
    out += [f"| `{code}` | {meaning} |\n" for code, meaning in errors.CODES.items()]
    out += [
        "\n### Job settings\n\nThe names a submit's `scene.settings` map may hold (protocol/settings.py); "
        "a name left out takes\nits default. The label is the Blender sidebar's; help texts use it.\n\n",
        settings_markdown(),
        "\n### Limits\n\nThe keys of the `hello` reply's `limits` (protocol/limits.py), with the protocol's "
        "values; a server\nstarted with the option named may report lower ones.\n\n",
        limits_markdown(),
    ]
    return "".join(out)


BEGIN_MARK = "<!-- BEGIN GENERATED: python -m protocol -->"
END_MARK = "<!-- END GENERATED -->"


def update_readme(path: str) -> bool:
    """Rewrite the generated block of ``path`` from the tables; True when it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, sep, rest = text.partition(BEGIN_MARK)
    _old, sep2, tail = rest.partition(END_MARK)
    if not sep or not sep2:
        raise ValueError(f"{path}: needs the markers {BEGIN_MARK} and {END_MARK}")
    new = f"{head}{BEGIN_MARK}\n\n{schema_markdown()}\n{END_MARK}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text
