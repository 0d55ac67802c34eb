"""Error codes. Codes are stable across versions; messages are for people and may change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BAD_FRAME = "bad_frame"  # wrong number or layout of frames, an array frame of the wrong size
BAD_MSGPACK = "bad_msgpack"  # the header frame is not a msgpack map within the unpack limits
UNSUPPORTED_VERSION = "unsupported_version"  # header v missing or not spoken by the receiver
UNKNOWN_OP = "unknown_op"
BAD_FIELD = "bad_field"  # a field is missing, unknown, of the wrong type or out of range
TOO_LARGE = "too_large"  # a message, frame, array, list or image over a limit in protocol/limits.py
NOT_FOUND = "not_found"  # no such job or artifact
CANCELLED = "cancelled"  # reserved: no op returns it (a cancelled job is a state, not an error)
INTERNAL = "internal"  # a bug or a fault on the server; the request may be retried
FORBIDDEN = "forbidden"  # not allowed from this peer (shutdown from a non-loopback address)

CODES: dict[str, str] = {
    BAD_FRAME: "wrong frame layout, or an array frame whose size does not match its dtype and shape",
    BAD_MSGPACK: "the header frame is not valid msgpack, not a map, or over the unpack limits",
    UNSUPPORTED_VERSION: "header `v` missing or not a version the server speaks (see `hello`)",
    UNKNOWN_OP: "`op` is not one of the ops in this table",
    BAD_FIELD: "a field is missing, unknown, of the wrong type or out of range, or names a job in a state the op "
    "refuses (`delete` of a job not ended); `field` names it",
    TOO_LARGE: "a message, frame, array, list, string or image is over a limit",
    NOT_FOUND: "no such job or artifact",
    CANCELLED: "reserved: no op of version 1 returns it (a cancelled job's `status`, `fetch` and `cancel` "
    "succeed; its `state` says `cancelled`)",
    INTERNAL: "a fault on the server; the request may be retried",
    FORBIDDEN: "not allowed from this peer",
}


class ProtocolError(Exception):
    """A message that cannot be accepted, or an error reply received.

    Attributes:
        code: one of CODES.
        message: plain text for people, naming the field, the rule and what arrived.
        field: path of the offending field (``scene.captures[3].camera.K``) or None.
        request_id: the request's ``id`` when it could be read, else None.
        op: the request's ``op`` when it could be read, else None.
    """

    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}; known: {', '.join(CODES)}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.request_id: Any = None
        self.op: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (a process pool's error), with what it was read from
        return type(self), (self.code, self.message), self.__dict__

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` map of a reply."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out

    @classmethod
    def from_wire(cls, error: dict[str, Any]) -> ProtocolError:
        code = error.get("code")
        message = str(error.get("message", ""))
        if code not in CODES:  # a newer server's code: keep the text, map to internal
            message = f"[{code}] {message}"
            code = INTERNAL
        return cls(code, message, field=error.get("field"))


MAX_LISTED = 8  # entries a message names before it counts the rest (listed)


def listed(items: Sequence[str], most: int = MAX_LISTED, sep: str = "; ") -> str:
    """``items`` joined by ``sep`` for a message: the first ``most`` said, the rest counted ("a; b; and 3 more"),
    so that a request or a job with thousands of bad entries is not answered with megabytes of text."""
    said = sep.join(items[:most])
    more = len(items) - min(len(items), most)
    return f"{said}{sep}and {more} more" if more else said
