"""CurveZMQ key files for clients and servers: make a pair, load one, set up a client socket; which endpoints
need them.

Pure pyzmq (``zmq.auth``), no torch, so the Blender add-on uses it too. Key files are ZeroMQ
certificate files: ``NAME.key`` holds the public key (give it away), ``NAME.key_secret`` holds both
keys (keep it; written with mode 0600). ``reconloop keys DIR --name NAME`` calls ``generate_keys``.

Example::

    pair = generate_keys("keys", "alice")          # keys/alice.key, keys/alice.key_secret
    sock = zmq.Context.instance().socket(zmq.DEALER)
    configure_client_socket(sock, "keys/server.key", pair.secret_file)
    sock.connect("tcp://gpu-box:5555")
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SECRET_FILE_MODE = 0o600
Z85_KEY_CHARS = 40
LOCAL_TRANSPORTS = ("ipc", "inproc")
LOOPBACK_NAMES = frozenset({"localhost"})


class AuthError(ValueError):
    """Keys or a bind address that cannot be used; the message says which file or address and why."""


@dataclass(frozen=True)
class KeyPair:
    """Files of one key pair, as written by ``generate_keys``."""

    public_file: Path
    secret_file: Path
    public_key: str  # z85, 40 characters


def generate_keys(folder: str | os.PathLike, name: str) -> KeyPair:
    """Write ``folder/name.key`` and ``folder/name.key_secret`` (mode 0600); refuse to overwrite.

    Raises:
        AuthError: ``name`` is not a plain file name, or a file of that name exists.
    """
    folder = Path(folder)
    if not name or name != Path(name).name or name.startswith("."):
        raise AuthError(f"keys: --name must be a plain file name (no folders, not hidden); got {name!r}")
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise AuthError(f"keys: {path} exists; pick another --name or remove it first")
    folder.mkdir(parents=True, exist_ok=True)
    public_str, secret_str = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret_str, SECRET_FILE_MODE)
    key, _ = zmq.auth.load_certificate(public_str)
    return KeyPair(public_file=Path(public_str), secret_file=Path(secret_str), public_key=key.decode("ascii"))


def load_public_key(source: str | os.PathLike | bytes) -> bytes:
    """A z85 public key from a ``.key``/``.key_secret`` file, or given as the 40 z85 characters."""
    if isinstance(source, bytes):
        text = source
    elif isinstance(source, str) and len(source) == Z85_KEY_CHARS and not Path(source).exists():
        text = source.encode("ascii")
    else:
        path = Path(source)
        if not path.is_file():
            raise AuthError(f"public key file {path} not found")
        try:
            key, _secret = zmq.auth.load_certificate(str(path))
        except (ValueError, OSError) as err:
            raise AuthError(f"{path}: not a ZeroMQ certificate file: {err}") from None
        text = key
    if len(text) != Z85_KEY_CHARS:
        raise AuthError(f"a public key must be {Z85_KEY_CHARS} z85 characters; got {len(text)}")
    return text


def load_secret_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``NAME.key_secret`` file; AuthError when it has no secret key."""
    path = Path(path)
    if not path.is_file():
        raise AuthError(f"secret key file {path} not found (make one with `reconloop keys DIR --name NAME`)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as err:
        raise AuthError(f"{path}: not a ZeroMQ certificate file: {err}") from None
    if not secret:
        raise AuthError(f"{path} holds only a public key; give the NAME{SECRET_SUFFIX} file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret key file %s is readable by others (mode %o); chmod 600 it", path, mode)
    return public, secret


def configure_client_socket(
    sock: zmq.Socket, server_key: str | os.PathLike | bytes, client_secret_file: str | os.PathLike
) -> None:
    """Make ``sock`` a CurveZMQ client of a server with public key ``server_key`` (before connect)."""
    public, secret = load_secret_pair(client_secret_file)
    sock.curve_serverkey = load_public_key(server_key)
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def endpoint_is_local(endpoint: str) -> bool:
    """Whether an endpoint is reachable only from this machine (loopback TCP, ipc, inproc): the service binds
    one without keys, any other only with them (``backend.service.auth.check_bind``)."""
    transport, sep, address = endpoint.partition("://")
    if not sep:
        raise AuthError(f"bind must be a ZeroMQ endpoint like tcp://127.0.0.1:5555; got {endpoint!r}")
    if transport in LOCAL_TRANSPORTS:
        return True
    if transport != "tcp":
        return False  # pgm, epgm, udp, ws, ...: treat as network
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if ";" in host:  # tcp://source;destination: only the part after ';' is bound
        host = host.split(";", 1)[1]
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: may face the network
