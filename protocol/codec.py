"""Messages to frames and back: a msgpack header, then one raw frame per array.

Frames of one message (a ZeroMQ multipart message)::

    frame 0     msgpack map: the header ({"v": 1, "op": "fetch", "id": 7, ...})
    frame 1..n  raw little-endian array bytes, C order, one frame per array

An array inside the header is replaced by a reference map ``{"__array__": i, "dtype": "uint8",
"shape": [512, 896, 3]}`` where ``i`` counts array frames from 0 (frame ``i + 1``). Every array frame is
referenced exactly once. dtypes are limited to ``DTYPES``. ``bytes`` stay inside the header as msgpack
bin; send large files as uint8 arrays so they travel as frames without copies.

``encode(msg) -> frames`` and ``decode(frames, kind) -> msg`` validate against ``schemas.py``;
``pack``/``unpack`` are the same without the schema (any nested maps and lists of scalars, bytes and
arrays). Decoded arrays are read-only views of the received frames (no copy).

Example::

    frames = encode({"v": 1, "op": "fetch", "id": 1, "job": "ab" * 16, "name": "points.ply"}, "request")
    msg = decode(frames, "request")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from . import errors, limits
from .errors import ProtocolError
from .schemas import check_version, reads_in_every_version, validate

ARRAY_KEY = "__array__"
REF_KEYS = frozenset({ARRAY_KEY, "dtype", "shape"})
DTYPES = (
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
)
Buffer = Any  # bytes, memoryview, zmq.Frame: anything with the buffer protocol


def _scalar_default(obj: Any) -> Any:
    """msgpack's fallback for numpy scalars."""
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} (msgpack scalars, bytes, lists, maps and numpy arrays only)")


def _out_refs(value: Any, arrays: list[memoryview], depth: int) -> Any:
    if depth > limits.MAX_DEPTH:
        raise ValueError(f"message nests deeper than {limits.MAX_DEPTH} levels")
    if isinstance(value, np.ndarray):
        if value.dtype.name not in DTYPES:
            raise ValueError(f"array dtype must be one of {', '.join(DTYPES)}; got {value.dtype}")
        arr = value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d arrays 0-d
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arrays.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b""))
        return {ARRAY_KEY: len(arrays) - 1, "dtype": arr.dtype.name, "shape": list(arr.shape)}
    if isinstance(value, dict):
        return {k: _out_refs(v, arrays, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_out_refs(v, arrays, depth + 1) for v in value]
    return value


def pack(msg: dict[str, Any]) -> list[Buffer]:
    """Frames of a message: the msgpack header (bytes), then one memoryview per array (no copy).

    Raises ValueError for a value msgpack cannot carry or an array of a dtype not in DTYPES.
    """
    arrays: list[memoryview] = []
    header = _out_refs(msg, arrays, 0)
    return [msgpack.packb(header, use_bin_type=True, default=_scalar_default), *arrays]


def _array(ref: dict[str, Any], frames: Sequence[Buffer], used: list[bool]) -> np.ndarray:
    index, dtype, shape = ref[ARRAY_KEY], ref["dtype"], ref["shape"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(used):
        raise ProtocolError(errors.BAD_FRAME, f"array reference {index!r}: no array frame {index!r} ({len(used)} sent)")
    if used[index]:
        raise ProtocolError(errors.BAD_FRAME, f"array frame {index} is referenced twice")
    used[index] = True
    if dtype not in DTYPES:
        raise ProtocolError(errors.BAD_FRAME, f"array {index}: dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > limits.MAX_ARRAY_NDIM
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= limits.MAX_ARRAY_BYTES for s in shape)
    ):
        raise ProtocolError(
            errors.BAD_FRAME,
            f"array {index}: shape must be a list of at most {limits.MAX_ARRAY_NDIM} sizes >= 0; got {shape!r}",
        )
    dt = np.dtype(dtype).newbyteorder("<")
    count = 1
    for s in shape:
        count *= s
    nbytes = count * dt.itemsize
    if nbytes > limits.MAX_ARRAY_BYTES:
        raise ProtocolError(errors.TOO_LARGE, f"array {index}: {nbytes} bytes; at most {limits.MAX_ARRAY_BYTES}")
    buf = memoryview(frames[index + 1]).cast("B")
    if buf.nbytes != nbytes:
        raise ProtocolError(
            errors.BAD_FRAME, f"array {index}: {dtype} {shape} needs {nbytes} bytes; frame has {buf.nbytes}"
        )
    return np.frombuffer(buf, dtype=dt, count=count).reshape(shape)


def _in_refs(value: Any, frames: Sequence[Buffer], used: list[bool], depth: int) -> Any:
    if depth > limits.MAX_DEPTH:
        raise ProtocolError(errors.TOO_LARGE, f"header nests deeper than {limits.MAX_DEPTH} levels")
    if isinstance(value, dict):
        if ARRAY_KEY in value:
            if set(value) != REF_KEYS:
                raise ProtocolError(
                    errors.BAD_FRAME,
                    f"an array reference has exactly the keys {sorted(REF_KEYS)}; got {sorted(map(str, value))}",
                )
            return _array(value, frames, used)
        return {k: _in_refs(v, frames, used, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_refs(v, frames, used, depth + 1) for v in value]
    return value


def check_frame_count(count: int) -> None:
    """Raise ``too_large`` for a message of more than ``MAX_FRAMES`` frames.

    A receiver that counts frames as they arrive (the service drops those past the limit unkept) calls it
    with the count; ``read_header`` calls it with the frames it got.
    """
    if count > limits.MAX_FRAMES:
        raise ProtocolError(errors.TOO_LARGE, f"{count} frames; at most {limits.MAX_FRAMES}")


def read_header(frames: Sequence[Buffer]) -> dict[str, Any]:
    """Check the frame layout and unpack frame 0 (no array resolution, no schema)."""
    if not frames:
        raise ProtocolError(errors.BAD_FRAME, "a message needs at least one frame (the msgpack header)")
    check_frame_count(len(frames))
    sizes = [memoryview(f).nbytes for f in frames]
    if sum(sizes) > limits.MAX_MESSAGE_BYTES:
        raise ProtocolError(errors.TOO_LARGE, f"message of {sum(sizes)} bytes; at most {limits.MAX_MESSAGE_BYTES}")
    if sizes[0] > limits.MAX_HEADER_BYTES:
        raise ProtocolError(errors.TOO_LARGE, f"header frame of {sizes[0]} bytes; at most {limits.MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(memoryview(frames[0]), raw=False, strict_map_key=True, **limits.unpack_limits())
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as err:
        # ExtraData, FormatError, StackError and UnicodeDecodeError all derive from ValueError. FormatError
        # (a byte that starts no msgpack type, such as 0xc1) carries no message: its class's says what it is.
        detail = str(err) or ((type(err).__doc__ or "").strip() or "no detail").splitlines()[0].lower()
        raise ProtocolError(
            errors.BAD_MSGPACK, f"header frame is not valid msgpack within the limits: {type(err).__name__}: {detail}"
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError(errors.BAD_MSGPACK, f"header frame must hold a msgpack map; got {type(header).__name__}")
    return header


def unpack(frames: Sequence[Buffer]) -> dict[str, Any]:
    """The message of ``frames``: header with array references replaced by read-only arrays."""
    header = read_header(frames)
    used = [False] * (len(frames) - 1)
    msg = _in_refs(header, frames, used, 0)
    if not all(used):
        raise ProtocolError(errors.BAD_FRAME, f"array frame {used.index(False)} is not referenced by the header")
    return msg


def encode(msg: dict[str, Any], kind: str) -> list[Buffer]:
    """Validate ``msg`` as a ``kind`` (``"request"`` or ``"reply"``) and pack it. See ``pack``."""
    validate(msg, kind)
    return pack(msg)


def decode(frames: Sequence[Buffer], kind: str) -> dict[str, Any]:
    """Unpack and validate a received message: layout, msgpack, version, op, arrays, fields.

    Raises ProtocolError with a stable code; ``err.request_id`` and ``err.op`` hold the request's id
    and op when the header could be read, so the error reply can carry them.
    """
    header: dict[str, Any] | None = None
    try:
        header = read_header(frames)
        if not reads_in_every_version(header, kind):
            check_version(header)
        used = [False] * (len(frames) - 1)
        msg = _in_refs(header, frames, used, 0)
        if not all(used):
            raise ProtocolError(errors.BAD_FRAME, f"array frame {used.index(False)} is not referenced by the header")
        return validate(msg, kind)
    except ProtocolError as err:
        if header is not None:
            rid = header.get("id")
            op = header.get("op")
            err.request_id = rid if _is_id(rid) else None
            err.op = op if isinstance(op, str) and limits.utf8_len(op) <= limits.MAX_NAME_BYTES else None
        raise


def _is_id(value: Any) -> bool:
    if isinstance(value, str):
        return 1 <= len(value) <= limits.MAX_ID_CHARS
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limits.MAX_ID_INT
