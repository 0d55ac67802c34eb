"""Wire limits. One place for every size the codec, the validator and the service enforce.

A message larger than a limit gets a ``too_large`` error (or, above ``MAX_FRAME_BYTES``, is dropped by
the socket itself before it reaches Python), so a request can cost no memory beyond these numbers.
"""

from __future__ import annotations

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

# A scene in a submit request.
MAX_CAPTURES = 1024
MAX_HELDOUT = 256
MAX_TRAJECTORY = 4096
MAX_SETTINGS = 64

# Strings and containers inside a header.
MAX_NAME_CHARS = 255  # capture names, artifact names
MAX_STR_BYTES = 64 * 1024  # any single string (messages, prompts)
MAX_LIST_LEN = MAX_TRAJECTORY  # any msgpack array
MAX_MAP_LEN = 256  # any msgpack map
MAX_DEPTH = 16  # nesting of maps and lists
MAX_ID_CHARS = 64  # request ids and submit keys given as strings
MAX_ID_INT = 2**63 - 1

# Fetch: artifacts come back in chunks.
FETCH_CHUNK_BYTES = 16 * MIB  # the default chunk
MAX_FETCH_CHUNK_BYTES = MAX_ARRAY_BYTES
MAX_JOBS_LISTED = 1000


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
