"""Geometry estimators: build the initial memory M from posed captures (DESIGN.md section 1 step 1).

An estimator is any object with ``estimate(views, progress) -> GeometryMemory`` (``progress(fraction, message)``
says where it is, at least every ``PROGRESS_INTERVAL_S`` in long work, and raises ``Cancelled`` to stop it). Implementations register
under a lowercase name with ``@ESTIMATORS.register("name")`` and take their config in the
constructor; ``ESTIMATORS.make(name, cfg)`` builds one by name. ``mvs`` (plane-sweep multi-view stereo,
no learned weights) is the default; ``patchmatch`` (COLMAP's PatchMatch stereo through pycolmap's
CUDA build) is the job's ``geometry`` setting's other choice (docs/benchmarks.md, runs 29, 34 and
earlier: +0.1 to +0.5 dB on the door, -1.7 dB on the fern, the temple falls back to plane sweep); ``hull`` (space carving from the
captures' masks) holds at wide baselines. A feed-forward point-map model (pi3, VGGT) plugs in the same way:
its module named in the ``ESTIMATORS`` map below (only named modules are imported), its name among the
``geometry`` setting's choices (``protocol/settings.py``; ``python -m protocol`` regenerates the table in
``protocol/README.md``), its config in ``MemoryConfig`` if it has one (else it is built with none), and
what follows it when it fails in ``backend.stages.memory.FALLBACKS`` (plane sweep, then the hull, unless
named there).
Captures without cameras go through :mod:`backend.estimators.sfm` first.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ..progress import WorkProgress, no_work_progress
from ..registry import Registry
from ..types import GeometryMemory, Views


class GeometryError(ValueError):
    """An estimator cannot make geometry from these views (e.g. no neighbour with a baseline at wide
    baselines); the memory stage then falls back to another source (backend.stages.memory)."""


@runtime_checkable
class GeometryEstimator(Protocol):
    def estimate(self, views: Views, progress: WorkProgress = no_work_progress) -> GeometryMemory: ...


# Each implementation registers itself when its module is imported (on first use of its name).
ESTIMATORS: Registry[Any] = Registry(
    "geometry estimator",
    {"mvs": "backend.estimators.mvs", "hull": "backend.estimators.hull", "patchmatch": "backend.estimators.patchmatch"},
)
