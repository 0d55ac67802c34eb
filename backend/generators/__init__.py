"""Generators: fill what the memory renders miss (DESIGN.md section 1 step 5).

A generator is any object with ``generate(cond, *, num_steps, seed) -> Frames``. Implementations
register under a lowercase name with ``@GENERATORS.register("name")``; ``make_generator`` builds one
by name from its config. Each implementation is one self-contained module in this package.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from ..registry import Registry
from ..stages.types import ConditionVideo, Frames


@runtime_checkable
class Generator(Protocol):
    def generate(self, cond: ConditionVideo, *, num_steps: int, seed: int) -> Frames: ...


GENERATORS: Registry[Any] = Registry("generator")

# Modules that register generators; imported lazily so that heavy ones (diffusers) load only when named.
_MODULES = {
    "reproject": "backend.generators.reproject",
    "anyrecon": "backend.generators.anyrecon",
    "refine": "backend.generators.refine",
}


def available_generators() -> list[str]:
    """Names a job may ask for (the heavy ones are listed whether or not their weights are present)."""
    return sorted(_MODULES)


def generator_class(name: str) -> type:
    """The class registered under ``name``; an unknown name fails with the known ones."""
    if name in _MODULES and name not in GENERATORS:
        importlib.import_module(_MODULES[name])
    if name not in GENERATORS and name not in _MODULES:
        raise ValueError(f"unknown generator {name!r}; known: {', '.join(available_generators())}")
    return GENERATORS.get(name)
