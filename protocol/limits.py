"""Wire limits. One place for every size the codec, the validator and the service enforce.

A message larger than a limit gets a ``too_large`` error (or, above ``MAX_FRAME_BYTES``, is dropped by
the socket itself before it reaches Python), so a request can cost no memory beyond these numbers. One cost
is libzmq's own: it holds a whole multipart message before its first frame can be read, ~64 bytes a frame
beyond the frames' bytes, whatever their count; the service reads the frames one by one and keeps at most
``MAX_FRAMES`` (4M empty frames, 7 MiB on the wire, cost ~250 MiB in libzmq until read and dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1 << 20

# Images: a side of 4096 px and 4 channels bound a raw image at 64 MiB.
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_CHANNELS = 4
MAX_ENCODED_IMAGE_BYTES = 64 * MIB  # one PNG/JPEG file

# Arrays travel as raw frames; one frame holds one array.
MAX_ARRAY_BYTES = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * MAX_IMAGE_CHANNELS  # 64 MiB
MAX_ARRAY_NDIM = 4

# Frames of one message: a msgpack header, then one frame per array.
MAX_HEADER_BYTES = 8 * MIB
MAX_FRAME_BYTES = MAX_ARRAY_BYTES  # the socket's ZMQ_MAXMSGSIZE: bigger frames drop the connection
MAX_MESSAGE_BYTES = 1024 * MIB  # all frames of one message together
MAX_FRAMES = 16384
# Submits held in memory while their job folders are written (the service's two writer threads): two of the largest.
MAX_WRITING_BYTES = 2 * MAX_MESSAGE_BYTES

# A scene in a submit request.
MAX_CAPTURES = 1024
MAX_HELDOUT = 256
MAX_TRAJECTORY = 4096
MAX_SETTINGS = 64

# A job's outputs: every artifact stays listed in ``status``, so the list has a bound a legal job never
# reaches: two files per trajectory frame (a generated frame and its confidence, backend/outputs.py)
# plus the rest (point clouds, cameras, metrics, overview, a generator's extras). 9216 entries of at most
# ~350 bytes (a 255-byte name, a sha256, a size) are ~3 MiB: a status reply stays within MAX_HEADER_BYTES.
MAX_FILES_PER_FRAME = 2
MAX_OTHER_ARTIFACTS = 1024
MAX_ARTIFACTS = MAX_FILES_PER_FRAME * MAX_TRAJECTORY + MAX_OTHER_ARTIFACTS

# Strings and containers inside a header. String lengths are UTF-8 bytes, the unit of msgpack's limit.
MAX_NAME_BYTES = 255  # capture names, artifact names (UTF-8 bytes, as file systems count a name)
MAX_STR_BYTES = 64 * 1024  # any single string (messages, prompts)
MAX_LIST_LEN = MAX_ARTIFACTS  # any msgpack array: the longest list a field allows (a job's artifacts)
MAX_MAP_LEN = 256  # any msgpack map
MAX_DEPTH = 16  # nesting of maps and lists
MAX_ID_CHARS = 64  # request ids and submit keys given as strings
MAX_ID_INT = 2**63 - 1

# Fetch: artifacts come back in chunks.
FETCH_CHUNK_BYTES = 4 * MIB  # the default chunk (scripts/bench_protocol.py: 4 MiB, 2 in flight is best on loopback)
MAX_FETCH_CHUNK_BYTES = MAX_ARRAY_BYTES
MAX_JOBS_LISTED = 1000


def utf8_len(text: str) -> int:
    """``text``'s length in UTF-8 bytes: what msgpack's ``max_str_len`` counts (a lone surrogate counts 3)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def clip_utf8(text: str, max_bytes: int, tail: str = "...") -> str:
    """``text`` if it fits in ``max_bytes`` UTF-8 bytes, else cut to fit with ``tail`` (ASCII) at the end.

    Cut at a character boundary: a character cut in half would be invalid UTF-8 on the wire.
    """
    if utf8_len(text) <= max_bytes:
        return text
    data = text.encode("utf-8", "surrogatepass")
    cut = max(0, max_bytes - len(tail))
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # a continuation byte: back up to the character's start
        cut -= 1
    return data[:cut].decode("utf-8", "surrogatepass") + tail


JOB_ID_CHARS = 32  # a job id: 32 lowercase hex characters (128 random bits, the service's secrets.token_hex(16))


def is_job_id(value: object) -> bool:
    """Whether ``value`` is a job id as the service makes them (also a safe folder name on every system)."""
    return isinstance(value, str) and len(value) == JOB_ID_CHARS and all(c in "0123456789abcdef" for c in value)


WINDOWS_RESERVED = frozenset('<>:"|?*\\')  # characters no Windows file name may hold


def check_artifact_name(name: str) -> str:
    """Return ``name`` if it is a safe relative '/'-separated path, else raise ValueError.

    The rule of an output file's name on both sides: the service writes only such names, and a client joins
    only such names to its folder (a name from a wrong or hostile service cannot write outside it).
    Refused: empty, absolute, ``..`` or ``.`` parts, empty parts, parts ending in a dot or a space (Windows drops
    those), backslashes and other characters Windows forbids, control characters, more than MAX_NAME_BYTES UTF-8
    bytes (the protocol's unit).
    """
    if not isinstance(name, str) or not name or utf8_len(name) > MAX_NAME_BYTES:
        raise ValueError(f"artifact name must be 1..{MAX_NAME_BYTES} UTF-8 bytes; got {name!r}")
    if name.startswith("/") or any(ord(c) < 32 or c in WINDOWS_RESERVED for c in name):
        raise ValueError(
            f"artifact name must be a relative '/'-separated path without control or <>:\"|?*\\ characters; got {name!r}"
        )
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"artifact name must not hold empty, '.' or '..' parts; got {name!r}")
    if any(p.endswith((".", " ")) for p in parts):  # Windows drops them: '.. ' would be '..'
        raise ValueError(f"artifact name parts must not end in '.' or a space; got {name!r}")
    return name


def unpack_limits() -> dict[str, Any]:
    """Keyword arguments for ``msgpack.unpackb`` that bound what one header may allocate."""
    return {
        "max_str_len": MAX_STR_BYTES,
        "max_bin_len": MAX_HEADER_BYTES,
        "max_array_len": MAX_LIST_LEN,
        "max_map_len": MAX_MAP_LEN,
        "max_ext_len": 0,  # no extension types on the wire
    }


def as_dict() -> dict[str, int]:
    """The limits a client may need, as sent in the ``hello`` reply."""
    return {
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "max_frame_bytes": MAX_FRAME_BYTES,
        "max_header_bytes": MAX_HEADER_BYTES,
        "max_frames": MAX_FRAMES,
        "max_array_bytes": MAX_ARRAY_BYTES,
        "max_captures": MAX_CAPTURES,
        "max_trajectory": MAX_TRAJECTORY,
        "max_image_side": MAX_IMAGE_SIDE,
        "fetch_chunk_bytes": FETCH_CHUNK_BYTES,
        "max_fetch_chunk_bytes": MAX_FETCH_CHUNK_BYTES,
    }


# ----------------------------------------------------------------------------------------------
# Per-job limits a server may lower (``reconloop serve --max-captures ...``). The constants above bound
# what the codec accepts at all; these bound what one job may ask of this server, and travel in the
# ``hello`` reply's ``limits`` so a client can check a scene before sending it.

# ``reconloop serve``'s options that lower a JobLimits field (backend/service/options.py adds them; the
# README's limits table names them): (option, JobLimits field, scale of the option's unit, help)
LIMIT_OPTIONS = (
    ("--max-captures", "max_captures", 1, "photos per job"),
    ("--max-heldout", "max_heldout", 1, "held-out photos per job"),
    ("--max-trajectory", "max_trajectory", 1, "trajectory cameras per job"),
    ("--max-image-side", "max_image_side", 1, "pixels on a side (captures, masks, cameras, settings width/height)"),
    ("--max-frame-mib", "max_frame_bytes", MIB, "MiB in one frame at the socket; bigger frames drop the connection"),
    ("--max-request-mib", "max_request_bytes", MIB, "MiB in one submit request"),
    ("--max-queued", "max_queued_jobs", 1, "jobs waiting at once"),
    ("--max-queued-per-client", "max_queued_per_client", 1, "jobs one client may have waiting at once"),
    (
        "--max-writing-mib",
        "max_writing_bytes",
        MIB,
        "MiB of submits held in memory while their job folders are written",
    ),
)
HELLO_KEY = {"max_request_bytes": "max_message_bytes"}  # a JobLimits field sent under another key in hello

SETTING_SIDES = ("width", "height")  # the job's working resolution in ``scene.settings``


@dataclass(frozen=True)
class JobLimits:
    """What one job may ask of a server. Defaults are the wire limits above.

    Attributes:
        max_captures: photos per job (``scene.captures``).
        max_heldout: held-out photos per job.
        max_trajectory: trajectory cameras per job.
        max_image_side: pixels on a side: capture images and masks, camera width/height, settings width/height.
        max_frame_bytes: one frame at the socket (ZMQ_MAXMSGSIZE); a bigger frame drops the connection
            inside libzmq before it is allocated.
        max_request_bytes: all frames of one submit request together.
        max_queued_jobs: jobs waiting at once; a submit beyond it is refused until some finish.
        max_queued_per_client: jobs one client (one CurveZMQ key, or ``local``) may have waiting at once.
        max_writing_bytes: the submits (all their frames) the server holds in memory while its writer threads write
            their job folders; a submit that would pass it is refused while others are written (one alone always
            fits), so many large submits at once cost refusals, not the server's memory.
    """

    max_captures: int = MAX_CAPTURES
    max_heldout: int = MAX_HELDOUT
    max_trajectory: int = MAX_TRAJECTORY
    max_image_side: int = MAX_IMAGE_SIDE
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_request_bytes: int = MAX_MESSAGE_BYTES
    max_queued_jobs: int = MAX_JOBS_LISTED
    max_queued_per_client: int = MAX_JOBS_LISTED
    max_writing_bytes: int = MAX_WRITING_BYTES

    def __post_init__(self) -> None:
        ceilings = {
            "max_captures": MAX_CAPTURES,
            "max_heldout": MAX_HELDOUT,
            "max_trajectory": MAX_TRAJECTORY,
            "max_image_side": MAX_IMAGE_SIDE,
            "max_frame_bytes": MAX_FRAME_BYTES,
            "max_request_bytes": MAX_MESSAGE_BYTES,
            "max_queued_jobs": MAX_ID_INT,
            "max_queued_per_client": MAX_ID_INT,
            "max_writing_bytes": MAX_ID_INT,
        }
        for name, ceiling in ceilings.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
                raise ValueError(f"JobLimits.{name} must be an integer in [1, {ceiling}]; got {value!r}")

    def as_dict(self) -> dict[str, int]:
        """The ``hello`` reply's ``limits``: the wire limits with this server's per-job limits."""
        out = as_dict()
        out.update({HELLO_KEY.get(field, field): getattr(self, field) for _opt, field, _scale, _help in LIMIT_OPTIONS})
        return out


def check_job(scene: dict[str, Any], request_bytes: int, job_limits: JobLimits) -> None:
    """Check a validated submit ``scene`` against ``job_limits`` before anything is written.

    Args:
        scene: the submit request's ``scene`` map (codec-decoded: images as bytes or uint8 arrays).
        request_bytes: size of all frames of the request together.
    Raises:
        ProtocolError: ``too_large`` naming the field, the server's limit and what arrived.
    """
    from .errors import TOO_LARGE, ProtocolError
    from .images import image_field_size

    def refuse(field: str, rule: str, got: Any) -> ProtocolError:
        return ProtocolError(TOO_LARGE, f"submit: {field} must be {rule} on this server; got {got}", field=field)

    if request_bytes > job_limits.max_request_bytes:
        raise refuse("scene", f"at most {job_limits.max_request_bytes} bytes in all", request_bytes)
    counts = (
        ("captures", job_limits.max_captures),
        ("heldout", job_limits.max_heldout),
        ("trajectory", job_limits.max_trajectory),
    )
    for key, most in counts:
        n = len(scene.get(key) or ())
        if n > most:
            raise refuse(f"scene.{key}", f"at most {most} items", n)
    side = job_limits.max_image_side
    for key in ("captures", "heldout"):
        for i, cap in enumerate(scene.get(key) or ()):
            for field in ("image", "mask"):
                image = cap.get(field)
                if image is None:
                    continue
                w, h = image_field_size(image)
                if w > side or h > side:
                    raise refuse(f"scene.{key}[{i}].{field}", f"at most {side} px a side", f"{w}x{h}")
    for key in ("captures", "heldout", "trajectory"):
        for i, item in enumerate(scene.get(key) or ()):
            cam = item.get("camera")
            if cam is not None and (cam["width"] > side or cam["height"] > side):
                raise refuse(f"scene.{key}[{i}].camera", f"at most {side} px a side", f"{cam['width']}x{cam['height']}")
    settings = scene.get("settings") or {}
    for key in SETTING_SIDES:
        value = settings.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > side:
            raise refuse(f"scene.settings.{key}", f"at most {side}", value)


# ----------------------------------------------------------------------------------------------
# Documentation of the ``hello`` reply's ``limits`` (protocol/README.md, ``python -m protocol``)

# key -> (unit, meaning); one entry per key of ``JobLimits().as_dict()`` (tests/protocol check that they
# agree); the option that lowers a key comes from LIMIT_OPTIONS
LIMIT_DOCS: dict[str, tuple[str, str]] = {
    "max_message_bytes": ("bytes", "all frames of one submit request together; more is refused `too_large`"),
    "max_frame_bytes": ("bytes", "one frame; a bigger frame makes the server drop the connection unread (no reply)"),
    "max_header_bytes": (
        "bytes",
        "frame 0, the msgpack header, images sent as bin included; more is refused `too_large` (op and id nil)",
    ),
    "max_frames": ("frames", "frames of one message, the header included; more is refused `too_large` (op and id nil)"),
    "max_array_bytes": ("bytes", "one array (its frame)"),
    "max_captures": ("items", "`scene.captures` of one job"),
    "max_heldout": ("items", "`scene.heldout` of one job"),
    "max_trajectory": ("items", "`scene.trajectory` of one job"),
    "max_image_side": (
        "pixels",
        "a side of a capture image or mask, of a camera's width/height and of the `width`/`height` settings",
    ),
    "fetch_chunk_bytes": ("bytes", "a `fetch` without `length` returns this many bytes"),
    "max_fetch_chunk_bytes": ("bytes", "the largest `length` a `fetch` may ask for"),
    "max_queued_jobs": (
        "jobs",
        "jobs waiting on the server at once; a submit beyond it is refused `too_large` until some have left the queue",
    ),
    "max_queued_per_client": (
        "jobs",
        "jobs one client may have waiting at once (a client is a CurveZMQ key; a service without keys has one client)",
    ),
    "max_writing_bytes": (
        "bytes",
        "submits held in memory while their job folders are written; a submit that would pass it while others are "
        "written is refused `too_large` until they are (one alone always fits)",
    ),
}


def _amount(value: int, unit: str) -> str:
    if unit == "bytes" and value >= MIB and value % MIB == 0:
        return f"{value} ({value // MIB} MiB)"
    return str(value)


def limits_markdown() -> str:
    """The table of the ``hello`` reply's ``limits`` for protocol/README.md: key, unit, default, meaning."""
    head = [
        "| key | unit | default | meaning | lowered by `reconloop serve` |",
        "| --- | --- | --- | --- | --- |",
    ]
    defaults = JobLimits().as_dict()
    options = {HELLO_KEY.get(field, field): option for option, field, _scale, _help in LIMIT_OPTIONS}
    rows = []
    for key, (unit, meaning) in LIMIT_DOCS.items():
        option = options.get(key, "")
        value = defaults[key]
        rows.append(f"| `{key}` | {unit} | {_amount(value, unit)} | {meaning} | {f'`{option}`' if option else ''} |")
    return "\n".join(head + rows) + "\n"
