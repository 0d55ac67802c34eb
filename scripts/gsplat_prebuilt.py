"""gsplat's CUDA kernels carried from one device machine to the next (scripts/device_env.sh).

gsplat 1.5 compiles its kernels on first use (60-70 s on the H200), and every fresh device machine
compiles them again. gsplat first tries ``from gsplat import csrc`` (a prebuilt extension) and only then
compiles; this script writes that module for a library the JIT build of an earlier machine left, and the
stamp that says which torch, gsplat and CUDA architecture it was built for.

    python scripts/gsplat_prebuilt.py stamp            # torch, gsplat, TORCH_CUDA_ARCH_LIST of this machine
    python scripts/gsplat_prebuilt.py built             # path of the JIT build's library ('' when none)
    python scripts/gsplat_prebuilt.py shim PATH.so      # source of gsplat/csrc.py loading PATH.so
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from pathlib import Path

NAME = "gsplat_cuda"  # the extension gsplat's JIT build makes (gsplat/cuda/_backend.py)

SHIM = '''"""gsplat's kernels built by an earlier device machine (scripts/gsplat_prebuilt.py)."""
import importlib.util
import sys

import torch  # noqa: F401  (the extension links against torch's libraries, loaded by this import)

_spec = importlib.util.spec_from_file_location({name!r}, {path!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
sys.modules[__name__] = _module
'''


def stamp() -> str:
    """What a build depends on: torch (with its CUDA), gsplat, the architectures compiled for."""
    import torch

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    return f"torch {torch.__version__} gsplat {importlib.metadata.version('gsplat')} arch {arch}"


def built() -> str:
    """The JIT build's library where this machine built one, else ''."""
    from torch.utils.cpp_extension import _get_build_directory

    lib = Path(_get_build_directory(NAME, verbose=False)) / f"{NAME}.so"
    return str(lib) if lib.is_file() else ""


def shim(path: str) -> str:
    """Source of a module ``gsplat.csrc`` that is the extension at ``path``."""
    return SHIM.format(name=NAME, path=str(Path(path).resolve()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stamp")
    sub.add_parser("built")
    sub.add_parser("shim").add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "stamp":
        print(stamp())
    elif args.command == "built":
        print(built())
    else:
        print(shim(args.path), end="")


if __name__ == "__main__":
    main()
