"""Work that says where it is and stops when cancelled: ``throttled`` and ``run_reporting`` (backend.progress)."""

from __future__ import annotations

import threading

import pytest

from backend import progress as progress_module
from backend.progress import Cancelled, run_reporting, throttled


def test_throttled_passes_the_first_call_then_one_an_interval_and_each_new_step(monkeypatch):
    """Within an interval only a call whose fraction moved a tenth passes (a new step: SfM's matching after its
    extraction, plane sweep's fusion), so the message a long step shows is its own."""
    clock = iter([0.0, 0.5, 1.9, 2.0, 2.1, 4.5, 4.6, 4.7])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    heard = []
    report = throttled(lambda f, m: heard.append(m), interval_s=2.0)
    for n, fraction in enumerate([0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.4, 0.45]):
        report(fraction, f"m{n}")
    assert heard == ["m0", "m3", "m5", "m6"]


def test_run_reporting_says_where_the_work_is_while_it_runs():
    release, heard = threading.Event(), []

    def report(fraction, message):
        heard.append((fraction, message))
        if len(heard) == 4:
            release.set()

    assert run_reporting(lambda: release.wait(10) and "done", report, 0.4, "SfM: matching", interval_s=0.01) == "done"
    assert heard[0] == (0.4, "SfM: matching")  # at once, before the work starts
    assert len(heard) >= 4 and all(m.startswith("SfM: matching (") and m.endswith(" s)") for _, m in heard[1:])


def test_a_cancel_stops_the_work_and_is_raised_once_it_has_ended():
    """The report raises (a client's cancel): the work is asked to stop and waited for, then Cancelled is raised,
    not the work's own error for being stopped (pycolmap raises InterruptedError)."""
    stop, ended = threading.Event(), threading.Event()

    def work():
        assert stop.wait(10), "never asked to stop"
        ended.set()
        raise InterruptedError("Operation cancelled")

    calls = []

    def report(fraction, message):
        calls.append(message)
        if len(calls) == 3:
            raise Cancelled("cancelled by a client")

    with pytest.raises(Cancelled):
        run_reporting(work, report, 0.0, "SfM: finding features", cancel=stop.set, interval_s=0.01)
    assert ended.is_set() and len(calls) == 3


def test_a_cancel_already_asked_for_starts_no_work():
    started = []

    def report(fraction, message):
        raise Cancelled("cancelled by a client")

    with pytest.raises(Cancelled):
        run_reporting(lambda: started.append(1), report, 0.0, "PatchMatch stereo")
    assert started == []


def test_the_works_own_error_is_raised_as_it_is():
    def work():
        raise RuntimeError("COLMAP: no GPU")

    with pytest.raises(RuntimeError, match="COLMAP: no GPU"):
        run_reporting(work, lambda f, m: None, 0.0, "PatchMatch stereo", interval_s=0.01)


def test_a_message_the_work_updates_is_read_at_each_report():
    placed, release, heard = [0], threading.Event(), []

    def work():
        for _ in range(3):
            placed[0] += 1
        release.wait(10)

    def report(fraction, message):
        heard.append(message)
        if placed[0] == 3 and len(heard) > 1:
            release.set()

    run_reporting(work, report, 0.7, lambda: f"SfM: placing the photos, {placed[0]} of 3 placed", interval_s=0.01)
    assert heard[-1].startswith("SfM: placing the photos, 3 of 3 placed (")


def test_work_is_waited_for_even_when_its_cancel_is_cut_short():
    """A second Ctrl-C landing in ``cancel()`` (or a cancel that fails) still leaves no work running: it is waited
    for, then the interrupt goes on up."""
    ended = threading.Event()

    def work():
        threading.Event().wait(0.3)  # stops on its own, a moment later
        ended.set()

    def report(fraction, message):
        if message.endswith(" s)"):
            raise Cancelled("cancelled by a client")

    def cancel():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_reporting(work, report, 0.0, "SfM: matching", cancel=cancel, interval_s=0.01)
    assert ended.is_set()


def test_a_cancel_cut_short_by_a_second_ctrl_c_is_asked_again():
    """The second Ctrl-C lands inside the first ``cancel()``: the wait asks again, so the work stops (it ran to its
    own end, with no cancel in effect)."""
    stop, calls, stopped = threading.Event(), [], []

    def work():
        stopped.append(stop.wait(2))

    def report(fraction, message):
        if message.endswith(" s)"):
            raise KeyboardInterrupt

    def cancel():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # before it asked anything
        stop.set()

    with pytest.raises(KeyboardInterrupt):
        run_reporting(work, report, 0.0, "SfM: matching", cancel=cancel, interval_s=0.01)
    assert len(calls) == 2 and stopped == [True]


def test_a_cancel_that_fails_when_asked_again_still_leaves_no_work_running(caplog):
    ended, calls = threading.Event(), []

    def work():
        threading.Event().wait(0.3)
        ended.set()

    def report(fraction, message):
        if message.endswith(" s)"):
            raise Cancelled("cancelled by a client")

    def cancel():
        calls.append(1)
        raise KeyboardInterrupt if len(calls) == 1 else RuntimeError("token gone")

    with pytest.raises(KeyboardInterrupt):
        run_reporting(work, report, 0.0, "SfM: matching", cancel=cancel, interval_s=0.01)
    assert ended.is_set() and len(calls) == 2
    assert "could not ask it to stop (RuntimeError: token gone)" in caplog.text
