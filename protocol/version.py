"""Protocol versions.

A message header's ``v`` is the protocol version it is written in. The server checks ``v`` before it
reads any other field. ``hello`` is the exception that makes negotiation possible: its request fields
(``versions``) and reply fields (``version``, ``server``) keep their meaning in every version, so a
client may send ``hello`` with any ``v`` and learn which version to speak.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1  # the version this code writes
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)  # versions this code reads, oldest first


def choose_version(client_versions: list[int] | tuple[int, ...]) -> int | None:
    """The highest version both sides speak, or None when they share none."""
    common = set(client_versions) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None
