"""ReconLoop wire protocol: message schemas, validation, codec, limits, versions, and a small client.

Pure Python + numpy + msgpack (the client adds pyzmq), so it runs inside Blender (Python 3.11 and
3.13) without torch. See ``protocol/README.md`` for the wire format.
"""

from .codec import decode, encode, pack, unpack
from .errors import ProtocolError
from .version import PROTOCOL_VERSION, SUPPORTED_VERSIONS

__all__ = ["PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "ProtocolError", "decode", "encode", "pack", "unpack"]
