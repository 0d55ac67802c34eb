"""Progress reporting and cancellation between the loop and whoever runs it (CLI, service worker)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace


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


STAGE_ATTR = "reconloop_stage"  # the attribute an exception gets: the stage it was raised in


def mark_stage(err: BaseException, stage: str) -> None:
    """Tag ``err`` with the stage that was running when it was raised, unless an inner stage did already
    (the innermost wins). ``outputs.StageMeter.measure`` tags what leaves a stage it times."""
    if getattr(err, STAGE_ATTR, None) is None:
        try:
            setattr(err, STAGE_ATTR, stage)
        except (AttributeError, TypeError):  # an exception type without a __dict__: it stays untagged
            pass


def failed_stage(err: BaseException) -> str | None:
    """The stage ``err`` was raised in (``mark_stage``), or None where no timed stage was running.

    Not the stage a job last reported: ``ProgressTracker.finish`` reports a stage as it ends, so that one is
    the stage before the failing one (an out-of-memory error in the fit read "in stage 'update'")."""
    stage = getattr(err, STAGE_ATTR, None)
    return stage if isinstance(stage, str) else None


ProgressFn = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """A progress callback that ignores everything."""


class ProgressTracker:
    """A job's progress bar cut into stage shares: each finished stage moves it by its share.

    Args:
        progress: the callback that gets every event (may raise :class:`Cancelled`).
        shares: stage name -> share of the bar (rough proportions; only the order matters).

    Example::

        >>> events = []
        >>> track = ProgressTracker(events.append, {"memory": 0.5, "fit": 0.5})
        >>> track.finish("memory", "100 points", ["points.ply"])
        >>> track.steps("fit", "Gaussians", 10)(5, 0.1)
        >>> [round(e.fraction, 2) for e in events], track.artifacts
        ([0.5, 0.75], ['points.ply'])
    """

    def __init__(self, progress: ProgressFn, shares: dict[str, float]) -> None:
        self.progress = progress
        self.shares = shares
        self.done = 0.0
        self.artifacts: list[str] = []

    def finish(self, stage: str, message: str, names: Sequence[str] = (), *, share: float | None = None) -> None:
        """Announce a finished stage (or ``share`` of one) with the files it wrote, and move the bar on."""
        self.done += self.shares[stage] if share is None else share
        self.artifacts.extend(names)
        self.progress(ProgressEvent(stage, min(self.done, 1.0), message, tuple(names)))

    def skip(self, stage: str) -> None:
        """Move the bar past a stage that does not run, without an event."""
        self.done += self.shares[stage]

    def steps(self, stage: str, what: str, total: int) -> Callable[[int, float], None]:
        """A fit's step callback ``(step, loss)``: its steps fill the stage's share from where the bar is."""
        start, share = self.done, self.shares[stage]

        def on_step(step: int, loss: float) -> None:
            fraction = min(start + share * step / max(total, 1), 1.0)
            self.progress(ProgressEvent(stage, fraction, f"{what}: step {step}/{total}, loss {loss:.4f}"))

        return on_step

    def nested(self, stage: str) -> ProgressFn:
        """A progress callback for a whole job run as this stage (the loop inside an evaluation): its events keep
        their stage and message, their fractions (0..1) fill the stage's share from where the bar is."""
        start, share = self.done, self.shares[stage]

        def on_event(event: ProgressEvent) -> None:
            self.progress(replace(event, fraction=min(start + share * event.fraction, 1.0)))

        return on_event

    def within(self, stage: str) -> Callable[[float, str], None]:
        """A ``(fraction, message)`` callback for work that has no share of the bar (a generator's
        preparation): its messages go out where the bar is, so a UI shows them and a cancel stops it."""

        def on_progress(fraction: float, message: str) -> None:
            self.progress(ProgressEvent(stage, min(self.done, 1.0), message))

        return on_progress
