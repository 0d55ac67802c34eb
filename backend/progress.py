"""Progress reporting and cancellation between the loop and whoever runs it (CLI, service worker)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """One step of progress.

    Attributes:
        stage: the loop stage (``memory``, ``segments``, ``retrieval``, ``render``, ``generate``,
            ``update``, ``fit``, ``outputs``; ``queued``/``done`` from the service).
        fraction: overall progress of the job in [0, 1].
        message: plain-language detail for people.
        artifacts: names (relative to the job's output folder) of files finished since the last event.
    """

    stage: str
    fraction: float
    message: str = ""
    artifacts: tuple[str, ...] = ()


class Cancelled(Exception):
    """Raised by a progress callback to stop the job at the next step boundary."""


ProgressFn = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """A progress callback that ignores everything."""
