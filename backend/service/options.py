"""Command-line options for security and limits: ``reconloop keys``, ``serve``'s keys and limits, ``submit``'s keys.

Kept here so that ``backend/cli.py`` only wires them in.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from protocol import limits

from .auth import AuthConfig, generate_keys


def add_keys_command(sub: Any) -> None:
    """The ``keys`` subcommand."""
    p = sub.add_parser(
        "keys",
        help="make a CurveZMQ key pair (for a server or a client)",
        description=(
            "Write DIR/NAME.key (the public key: give it away) and DIR/NAME.key_secret (keep it; mode 0600). "
            "A server uses its NAME.key_secret with `serve --curve-secret`; each client's NAME.key goes into the "
            "server's --allow-keys folder; a client uses the server's NAME.key and its own NAME.key_secret."
        ),
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="folder for the two files (made if missing)")
    p.add_argument("--name", required=True, help="file name stem, e.g. server or alice")
    p.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    pair = generate_keys(args.dir, args.name)
    print(f"public key  {pair.public_file}  ({pair.public_key})")
    print(f"secret key  {pair.secret_file}  (keep it private)")
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """``serve``'s CurveZMQ and per-job limit options."""
    g = p.add_argument_group("authentication (needed to bind anything but loopback)")
    g.add_argument(
        "--curve-secret",
        type=Path,
        default=None,
        metavar="FILE",
        help="the server's NAME.key_secret (from `reconloop keys`)",
    )
    g.add_argument(
        "--allow-keys",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of allowed client public keys (*.key); re-read on change",
    )
    g = p.add_argument_group("per-job limits (defaults: the protocol's limits)")
    defaults = limits.JobLimits()
    for option, field, scale, doc in limits.LIMIT_OPTIONS:
        g.add_argument(option, type=int, default=getattr(defaults, field) // scale, help=f"{doc} (default %(default)s)")


def serve_security(args: argparse.Namespace) -> dict[str, Any]:
    """``ServiceConfig`` keyword arguments ``auth`` and ``job_limits`` from ``serve``'s options."""
    if (args.curve_secret is None) != (args.allow_keys is None):
        raise ValueError("--curve-secret and --allow-keys go together; got one of them")
    auth = AuthConfig(args.curve_secret, args.allow_keys) if args.curve_secret is not None else None
    values = {
        field: getattr(args, option[2:].replace("-", "_")) * scale
        for option, field, scale, _doc in limits.LIMIT_OPTIONS
    }
    return {"auth": auth, "job_limits": limits.JobLimits(**values)}


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """A client command's CurveZMQ options."""
    p.add_argument(
        "--server-key", type=Path, default=None, metavar="FILE", help="the server's public key file NAME.key"
    )
    p.add_argument("--client-key", type=Path, default=None, metavar="FILE", help="this client's NAME.key_secret")


def client_keys(args: argparse.Namespace) -> dict[str, Any]:
    """``Client`` keyword arguments from the client options."""
    return {"server_key": args.server_key, "client_key": args.client_key}


def add_generator_arguments(p: argparse.ArgumentParser) -> None:
    """``serve``'s options locating learned generators' weights (``backend.generators.GeneratorWeights``)."""
    g = p.add_argument_group("generator weights (else RECONLOOP_<NAME>_WEIGHTS / _LORA; docs/anyrecon.md)")
    g.add_argument("--weights", action="append", default=[], metavar="NAME=PATH", help="base model folder or hub id")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="checkpoint merged on top")
    g.add_argument(
        "--trained-attention",
        action="append",
        default=[],
        metavar="NAME=MODE",
        help="attention the checkpoint was trained with: full (AnyRecon's release, default) or block",
    )
    g.add_argument("--allow-download", action="store_true", help="let a missing model download from the hub")


def _name_values(option: str, items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} must be NAME=VALUE (e.g. anyrecon=/models/x); got {item!r}")
        out[name] = value
    return out


def serve_generator_weights(args: argparse.Namespace) -> dict[str, Any]:
    """Per generator name, its ``GeneratorWeights`` from ``serve``'s options (names checked)."""
    from ..generators import GENERATORS, GeneratorWeights

    given = {
        "path": _name_values("--weights", args.weights),
        "lora": _name_values("--lora", args.lora),
        "trained_attention": _name_values("--trained-attention", args.trained_attention),
    }
    names = set().union(*given.values())
    unknown = sorted(names - set(GENERATORS.names()))
    if unknown:
        raise ValueError(f"generator weights for unknown generator(s) {unknown}; known: {GENERATORS.names()}")
    return {
        name: GeneratorWeights(
            path=given["path"].get(name),
            lora=given["lora"].get(name),
            trained_attention=given["trained_attention"].get(name, "full"),
            allow_download=args.allow_download,
        )
        for name in sorted(names)
    }


class GeneratorLoopRunner:
    """The service's runner holding the loaded generator between jobs: each job's generator is built
    from its settings (``GeneratorConfig.from_settings``) on the models of ``cache``."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def __call__(self, scene: Any, out_dir: Path, *, device: str, progress: Any) -> Any:
        from ..generators import GeneratorConfig
        from ..loop import run_loop

        generator = self.cache.get(GeneratorConfig.from_settings(scene.settings), device)
        return run_loop(scene, out_dir, device=device, progress=progress, generator=generator)
