"""Progress reporting and cancellation between the loop and whoever runs it (CLI, service worker)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# At most this long without a progress call (a job's progress bar, and the service's cancel, which is read there):
# every progress_every steps of a fit took 54-62 s on the CPU at 320x240 with 250k Gaussians and no budget, and SfM's
# feature extraction of 12 photos 30 s in one call into COLMAP
PROGRESS_INTERVAL_S = 2.0


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
# ``progress(fraction, message)`` of work inside a stage (a generator's segment, SfM, a geometry estimator), fraction
# in [0, 1] of that work; it may raise ``Cancelled`` to stop the work there
WorkProgress = Callable[[float, str], None]
THROTTLE_STEP = 0.1  # a work progress call whose fraction moved this far is a new step: ``throttled`` passes it


def no_work_progress(fraction: float, message: str) -> None:
    """A work progress callback that ignores everything."""


def throttled(
    report: WorkProgress, interval_s: float = PROGRESS_INTERVAL_S, step: float = THROTTLE_STEP
) -> WorkProgress:
    """``report``, called at most once per ``interval_s`` (the first call at once), and whenever the fraction has
    moved by ``step`` since the last call passed (a new step of the work: SfM's matching after its extraction, plane
    sweep's fusion, a fallback estimator): for work that could say where it is many times a second (plane sweep on a
    GPU: a capture in milliseconds), so a job's journal gets a line an interval, not one a capture. A cancel is
    read as often as the calls pass."""
    last, last_fraction = -math.inf, -math.inf

    def call(fraction: float, message: str) -> None:
        nonlocal last, last_fraction
        now = time.monotonic()
        if now - last >= interval_s or abs(fraction - last_fraction) >= step:
            last, last_fraction = now, fraction
            report(fraction, message)

    return call


def _wait_out(done: threading.Event, what: str, cancel: Callable[[], None] | None, *, ask: bool) -> None:
    """Wait for stopped work to end (the work writes into a folder its caller then deletes, and a daemon thread
    inside a library at exit can abort the interpreter). ``ask``: ``cancel`` has not run to its end yet (a second
    Ctrl-C landed in it), so it is asked first; another Ctrl-C meanwhile is said and asks again; a cancel that fails
    (or is itself cut short) is logged, and the wait goes on."""
    while True:
        if ask and cancel is not None:
            ask = False
            try:
                cancel()
            except KeyboardInterrupt:
                log.warning("%s: stopping; waiting for it to end", what)
            except Exception as err:  # the wait matters more than the request to stop
                log.warning(
                    "%s: could not ask it to stop (%s: %s); waiting for it to end", what, type(err).__name__, err
                )
        try:
            done.wait()
            return
        except KeyboardInterrupt:
            log.warning("%s: stopping; waiting for it to end", what)
            ask = True


def run_reporting(
    work: Callable[[], T],
    report: WorkProgress,
    fraction: float,
    what: str | Callable[[], str],
    *,
    cancel: Callable[[], None] | None = None,
    interval_s: float | None = None,
) -> T:
    """``work()`` (one long call into a library that says nothing while it runs: COLMAP's feature extraction) on a
    thread of its own, while this thread calls ``report(fraction, "what (12 s)")`` every ``interval_s``.

    ``report`` is where a cancel is read: when it raises (``Cancelled``; or KeyboardInterrupt, Ctrl-C in the
    CLI's main thread), ``cancel()`` asks the work to stop (pycolmap's ``CancellationToken``), and the error is
    raised once the work has ended: it is never left running (it writes into a folder its caller deletes). Without
    ``cancel`` the work runs to its end first. An error of the work itself is raised as it is.

    Args:
        what: the message, or a callable giving it (a count the work updates through its own callbacks).
        interval_s: seconds between reports; None: ``PROGRESS_INTERVAL_S``.
    """
    interval_s = PROGRESS_INTERVAL_S if interval_s is None else interval_s
    text = what if callable(what) else lambda: what
    report(fraction, text())  # a cancel already asked for stops it before it starts
    result: list[T] = []
    error: list[BaseException] = []
    done = threading.Event()

    def target() -> None:
        try:
            result.append(work())
        except BaseException as err:  # raised in the caller's thread
            error.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=target, name="reconloop-work", daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        while not done.wait(interval_s):
            report(fraction, f"{text()} ({time.monotonic() - start:.0f} s)")
    except BaseException:
        asked = cancel is None
        try:
            if cancel is not None:
                cancel()
            asked = True
        finally:
            _wait_out(done, text(), cancel, ask=not asked)
        if error:  # the work's answer to being stopped (pycolmap: InterruptedError), under the caller's error
            log.debug("%s ended with %s: %s", text(), type(error[0]).__name__, error[0])
        raise
    thread.join()
    if error:
        raise error[0]
    return result[0]


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

    def within(self, stage: str) -> WorkProgress:
        """A ``(fraction, message)`` callback for work that has no share of the bar (a generator's
        preparation): its messages go out where the bar is, so a UI shows them and a cancel stops it."""

        def on_progress(fraction: float, message: str) -> None:
            self.progress(ProgressEvent(stage, min(self.done, 1.0), message))

        return on_progress
