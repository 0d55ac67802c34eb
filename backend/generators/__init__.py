"""Generators: fill what the memory renders miss (DESIGN.md section 1 step 5).

A generator is any object with ``generate(cond, *, num_steps, seed) -> Frames``. Implementations
register under a lowercase name with ``@GENERATORS.register("name")``; ``make_generator`` builds one
by name from its config. Each implementation is one self-contained module in this package.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import torch

from ..registry import Registry
from ..types import ConditionVideo, Frames


@runtime_checkable
class Generator(Protocol):
    def generate(self, cond: ConditionVideo, *, num_steps: int, seed: int) -> Frames: ...


# Each implementation registers itself when its module is imported; heavy ones (diffusers) load only when named.
GENERATORS: Registry[Any] = Registry(
    "generator", {"reproject": "backend.generators.reproject", "anyrecon": "backend.generators.anyrecon"}
)


# Where a learned generator's weights are: a local folder or hub id, and an optional LoRA file
# (docs/anyrecon.md). Hub downloads happen only when RECONLOOP_ALLOW_DOWNLOAD=1.
WEIGHTS_ENV = "RECONLOOP_{NAME}_WEIGHTS"
LORA_ENV = "RECONLOOP_{NAME}_LORA"
ALLOW_DOWNLOAD_ENV = "RECONLOOP_ALLOW_DOWNLOAD"

_LOADED_GENERATORS: dict[tuple[str, str, str, str], Generator] = {}


def make_generator(name: str, device: torch.device) -> Generator:
    """The generator registered under ``name``: built from its defaults, or, for a learned one
    (it has ``from_pretrained``), loaded from ``RECONLOOP_<NAME>_WEIGHTS`` (a folder or hub id;
    default the class's hub id) with ``RECONLOOP_<NAME>_LORA``. A learned generator is loaded once
    per process and reused by later jobs (a 14B model takes minutes to load)."""
    cls = GENERATORS.get(name)
    if not hasattr(cls, "from_pretrained"):
        return cls()
    weights = os.environ.get(WEIGHTS_ENV.format(NAME=name.upper()), "")
    lora = os.environ.get(LORA_ENV.format(NAME=name.upper()), "")
    key = (name, weights, lora, str(device))
    if key not in _LOADED_GENERATORS:
        kwargs: dict[str, Any] = {"device": device, "local_files_only": os.environ.get(ALLOW_DOWNLOAD_ENV) != "1"}
        if weights:
            kwargs["path_or_hub_id"] = weights
        if lora:
            kwargs["lora_path"] = lora
        try:
            _LOADED_GENERATORS.clear()  # one learned model in memory at a time
            _LOADED_GENERATORS[key] = cls.from_pretrained(**kwargs)
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"generator {name!r}: cannot load its weights ({err}); set "
                f"{WEIGHTS_ENV.format(NAME=name.upper())} to a local folder (docs/anyrecon.md)"
            ) from err
    return _LOADED_GENERATORS[key]
