"""Geometry estimators: build the initial memory M from posed captures (DESIGN.md section 1 step 1).

An estimator is any object with ``estimate(views) -> GeometryMemory``. Implementations register
under a lowercase name with ``@ESTIMATORS.register("name")`` and take their config in the
constructor; ``make_estimator(name, cfg)`` builds one by name. ``mvs`` (plane-sweep multi-view stereo,
no learned weights) is the CPU default; ``patchmatch`` (COLMAP's PatchMatch stereo through pycolmap's
CUDA build) the default where it can run (:func:`default_estimator`); ``hull`` (space carving from the
captures' masks) holds at wide baselines. A feed-forward point-map model (pi3, VGGT) plugs in the same way.
Captures without cameras go through :mod:`backend.estimators.sfm` first.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from ..registry import Registry
from ..stages.types import GeometryMemory, Views


class GeometryError(ValueError):
    """An estimator cannot make geometry from these views (e.g. no neighbour with a baseline at wide
    baselines); the memory stage then falls back to another source (backend.stages.memory)."""


@runtime_checkable
class GeometryEstimator(Protocol):
    def estimate(self, views: Views) -> GeometryMemory: ...


ESTIMATORS: Registry[Any] = Registry("geometry estimator")

# Modules that register estimators; imported lazily so that heavy ones load only when named.
_MODULES = {
    "mvs": "backend.estimators.mvs",
    "hull": "backend.estimators.hull",
    "patchmatch": "backend.estimators.patchmatch",
}


def available_estimators() -> list[str]:
    return sorted(set(_MODULES) | set(ESTIMATORS.names()))


def estimator_class(name: str) -> type:
    """The class registered under ``name``; an unknown name fails with the known ones."""
    if name in _MODULES and name not in ESTIMATORS:
        importlib.import_module(_MODULES[name])
    if name not in ESTIMATORS:
        raise ValueError(f"unknown geometry estimator {name!r}; known: {', '.join(available_estimators())}")
    return ESTIMATORS.get(name)


def make_estimator(name: str, cfg: Any = None) -> GeometryEstimator:
    """Build the estimator registered under ``name`` with its config (None: its defaults)."""
    cls = estimator_class(name)
    return cls() if cfg is None else cls(cfg)
