"""Image payloads: PNG/JPEG files as bytes, or raw uint8 pixels.

The size of an encoded image is read from its header alone (no decoder, no PIL: this module runs in
Blender's Python), so an oversized image is refused before anything decodes it.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_IHDR_END = 24  # signature 8 + chunk length 4 + "IHDR" 4 + width 4 + height 4
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD9)) | {0x01}  # RSTn, SOI, EOI, TEM: no length


def image_format(data: bytes | memoryview) -> str | None:
    """``"png"``, ``"jpeg"`` or None, from the magic bytes."""
    head = bytes(data[:8])
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def encoded_image_size(data: bytes | memoryview) -> tuple[str, int, int]:
    """(format, width, height) of a PNG or JPEG from its header. Raises ValueError if unreadable."""
    fmt = image_format(data)
    if fmt == "png":
        if len(data) < PNG_IHDR_END or bytes(data[12:16]) != b"IHDR":
            raise ValueError("PNG without an IHDR chunk")
        width, height = struct.unpack(">II", bytes(data[16:24]))
        return fmt, width, height
    if fmt == "jpeg":
        return fmt, *_jpeg_size(data)
    raise ValueError(f"not a PNG or JPEG file (starts with {bytes(data[:8])!r})")


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    pos = 2  # after SOI
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG: expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        (length,) = struct.unpack(">H", bytes(data[pos + 2 : pos + 4]))
        if marker in JPEG_SOF_MARKERS:
            if pos + 9 > n:
                break
            height, width = struct.unpack(">HH", bytes(data[pos + 5 : pos + 9]))
            return width, height
        if length < 2:
            raise ValueError(f"JPEG: bad segment length {length} at byte {pos}")
        pos += 2 + length
    raise ValueError("JPEG without a start-of-frame segment")


def is_raw_pixels(image: Any) -> bool:
    """Whether an image field is raw pixels (uint8 [H, W, C]), not an encoded PNG/JPEG file (bytes or uint8 [N])."""
    return isinstance(image, np.ndarray) and image.ndim == 3


def image_bytes(image: bytes | np.ndarray) -> bytes | memoryview:
    """The encoded file of an image field given as bytes or as a 1-D uint8 array."""
    if isinstance(image, np.ndarray):
        return memoryview(np.ascontiguousarray(image)).cast("B")
    return image


def image_field_size(image: bytes | np.ndarray) -> tuple[int, int]:
    """(width, height) of an image field: raw pixels [H, W, C], or a PNG/JPEG file read by its header."""
    if is_raw_pixels(image):
        return int(image.shape[1]), int(image.shape[0])
    _fmt, w, h = encoded_image_size(image_bytes(image))
    return w, h
