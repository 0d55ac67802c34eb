"""Who may connect, and whose jobs are whose: CurveZMQ keys, a ZAP allow-list, the bind policy.

Policy:

- Without keys the service listens on loopback only (``tcp://127.0.0.1``, ``tcp://[::1]``,
  ``tcp://localhost``, ``ipc://``, ``inproc://``); every peer is the one local owner, ``local``.
- Binding any other address (``tcp://*:5555``, ``tcp://0.0.0.0:5555``, a LAN address, an interface
  name) is refused unless CurveZMQ is configured: the server's secret key file (``--curve-secret``) and
  a folder of allowed client public keys (``--allow-keys``). A ZAP handler (pyzmq's
  ``ThreadAuthenticator``, its own thread and socket in the service's context) admits only clients
  whose public key is in that folder; the folder is re-read when its contents change, so a key can be
  added or removed while the service runs.
- With CurveZMQ every job belongs to the client key that submitted it (the ZAP User-Id, the client's
  z85 public key, carried as metadata on every received frame). A client sees, watches, fetches and
  cancels only its own jobs; another client's job id answers ``not_found``. Job ids are 128 random bits.

Key files are the ZeroMQ certificate files that ``zmq.auth.create_certificates`` writes:
``NAME.key`` (public key only: give it away) and ``NAME.key_secret`` (public and secret key, mode 0600:
keep it). ``reconloop keys DIR --name NAME`` makes a pair.

Example (server with one allowed client)::

    reconloop keys keys/ --name server
    reconloop keys keys/ --name alice
    mkdir allowed && cp keys/alice.key allowed/
    reconloop serve --bind tcp://0.0.0.0:5555 --curve-secret keys/server.key_secret --allow-keys allowed/
    # client: Client("tcp://gpu-box:5555", server_key="keys/server.key", client_key="keys/alice.key_secret")
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from protocol.curve import (
    PUBLIC_SUFFIX,
    AuthError,
    KeyPair,
    endpoint_is_local,
    generate_keys,
    load_public_key,
    load_secret_pair,
)

__all__ = [
    "LOCAL_OWNER",
    "AllowList",
    "AuthConfig",
    "AuthError",
    "KeyPair",
    "ServerAuth",
    "check_bind",
    "endpoint_is_local",
    "generate_keys",
    "may_access",
]

log = logging.getLogger(__name__)

LOCAL_OWNER = "local"  # the owner of every job when the service runs without keys
ZAP_DOMAIN = "reconloop"


@dataclass(frozen=True)
class AuthConfig:
    """CurveZMQ settings of the service.

    Attributes:
        secret_key_file: the server's ``NAME.key_secret`` (holds its public and secret key).
        allow_dir: folder of allowed client public keys (``*.key`` files).
    """

    secret_key_file: Path
    allow_dir: Path


# ----------------------------------------------------------------------------------------------
# Bind policy


def check_bind(endpoint: str, auth: AuthConfig | None) -> None:
    """Refuse a network-facing bind without CurveZMQ (raises AuthError saying what to do)."""
    if auth is None and not endpoint_is_local(endpoint):
        raise AuthError(
            f"refusing to bind {endpoint} without authentication: a non-loopback address needs "
            "CurveZMQ keys (--curve-secret SERVER.key_secret --allow-keys DIR; make keys with `reconloop keys`), "
            "or bind tcp://127.0.0.1:PORT"
        )


# ----------------------------------------------------------------------------------------------
# The server side


class AllowList:
    """The allowed client keys: ``*.key`` files of a folder, re-read when the folder changes.

    ``__call__(domain, z85_key) -> bool`` is the ZAP credentials callback (run by the auth thread).
    """

    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise AuthError(f"--allow-keys {folder}: not a folder of client public keys (*.key)")
        self.folder = folder
        self._lock = threading.Lock()
        self._stamp: tuple[Any, ...] | None = None
        self.keys: frozenset[bytes] = frozenset()
        self.reload()

    def _current_stamp(self) -> tuple[Any, ...]:
        files = sorted(self.folder.glob(f"*{PUBLIC_SUFFIX}"))
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)

    def reload(self) -> None:
        with self._lock:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return
            keys = set()
            for path in sorted(self.folder.glob(f"*{PUBLIC_SUFFIX}")):
                try:
                    keys.add(load_public_key(path))
                except AuthError as err:
                    log.warning("allow-list: %s skipped: %s", path, err)
            self.keys, self._stamp = frozenset(keys), stamp
            log.info("allow-list %s: %d client keys", self.folder, len(keys))

    def __call__(self, domain: str, z85_key: bytes) -> bool:
        try:
            self.reload()
        except OSError as err:  # the folder vanished: keep the keys we had
            log.warning("allow-list %s unreadable, keeping %d keys: %s", self.folder, len(self.keys), err)
        allowed = bytes(z85_key) in self.keys
        if not allowed:
            log.warning("refused a client key not in %s: %s", self.folder, bytes(z85_key).decode("ascii", "replace"))
        return allowed


class ServerAuth:
    """CurveZMQ for the service's ROUTER: keys, the ZAP thread, and owners of received frames.

    ``ServerAuth.start(context, config, bind)`` checks the bind policy and, when ``config`` is given,
    starts the ZAP handler on ``context`` (one per context). ``apply(socket)`` (before bind) makes the
    socket a CurveZMQ server. ``owner(frame)`` names whose request a frame is.
    """

    def __init__(
        self,
        config: AuthConfig | None,
        authenticator: ThreadAuthenticator | None,
        public: bytes | None,
        secret: bytes | None,
    ) -> None:
        self.config = config
        self.authenticator = authenticator
        self.public_key = public
        self._secret = secret

    @classmethod
    def start(cls, context: zmq.Context, config: AuthConfig | None, bind: str) -> ServerAuth:
        check_bind(bind, config)
        if config is None:
            return cls(None, None, None, None)
        public, secret = load_secret_pair(config.secret_key_file)
        allow = AllowList(Path(config.allow_dir))
        authenticator = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        authenticator.start()
        authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_Provider(allow))
        log.info(
            "CurveZMQ on: server key %s, %d allowed client keys in %s",
            public.decode(),
            len(allow.keys),
            config.allow_dir,
        )
        return cls(config, authenticator, public, secret)

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def apply(self, sock: zmq.Socket) -> None:
        if not self.enabled:
            return
        sock.curve_server = True
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self._secret
        sock.zap_domain = ZAP_DOMAIN.encode()

    def owner(self, frame: Any) -> str:
        """The owner of a received frame: the client's z85 public key under CurveZMQ, else ``local``."""
        if not self.enabled:
            return LOCAL_OWNER
        try:
            user = frame.get("User-Id")
        except (zmq.ZMQError, KeyError, TypeError, AttributeError):
            user = None
        if not user:  # cannot happen after a CURVE handshake; refuse rather than share
            raise PermissionError("a request without a CurveZMQ user id on an authenticated socket")
        return str(user)

    def stop(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


class _Provider:
    """Adapter: pyzmq calls ``provider.callback(domain, key)``."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow

    def callback(self, domain: str, key: bytes) -> bool:
        return self.allow(domain, key)


def may_access(job_owner: str | None, requester: str) -> bool:
    """Whether ``requester`` may see and control a job owned by ``job_owner`` (None: ``local``)."""
    return (job_owner or LOCAL_OWNER) == requester
