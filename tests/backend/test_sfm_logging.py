"""COLMAP's native logging goes to our log, and SIGTERM stays a quiet stop after pycolmap is imported."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backend.estimators.sfm import colmap_logging, forward_glog_lines, import_pycolmap
from tests.conftest import require_module

REPO = Path(__file__).resolve().parents[2]

# pycolmap's glog failure handler prints "*** SIGTERM (@0x...) received by PID ...; stack trace: ***".
SIGTERM_CHILD = """
import os, signal, threading, time
from {module} import {importer}
if {in_thread}:
    t = threading.Thread(target={importer})
    t.start()
    t.join()
else:
    {importer}()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
"""


@pytest.mark.parametrize(
    "module, importer",
    [("backend.estimators.sfm", "import_pycolmap"), ("backend.estimators.patchmatch", "has_cuda_patchmatch")],
    ids=["sfm", "patchmatch"],
)
@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "job-thread"])
def test_sigterm_after_pycolmap_import_prints_no_stack_trace(in_thread, module, importer):
    """SfM and PatchMatch (which first asks whether pycolmap has CUDA) import pycolmap the same way."""
    require_module("pycolmap")
    child = subprocess.run(
        [sys.executable, "-c", SIGTERM_CHILD.format(in_thread=in_thread, module=module, importer=importer)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGTERM, child.stderr
    assert "stack trace" not in child.stderr and "SIGTERM" not in child.stderr


# `reconloop serve`: a Python SIGTERM handler in the main thread, pycolmap imported by the job thread
SIGTERM_HANDLED_CHILD = """
import os, signal, threading, time
from backend.estimators.sfm import import_pycolmap
signal.signal(signal.SIGTERM, lambda signum, frame: print("handled", signum, flush=True))
t = threading.Thread(target=import_pycolmap)
t.start()
t.join()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
"""


def test_sigterm_reaches_serves_handler_after_a_job_thread_imports_pycolmap():
    """After a job that ran SfM, SIGTERM stopped `reconloop serve` with glog's abort and stack trace: the job
    thread could not give back CPython's handler. ``keeps_sigterm`` restores libc's disposition from any thread."""
    require_module("pycolmap")
    child = subprocess.run(
        [sys.executable, "-c", SIGTERM_HANDLED_CHILD], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0 and child.stdout == f"handled {int(signal.SIGTERM)}\n", child.stderr
    assert "stack trace" not in child.stderr


def test_colmap_lines_go_to_our_log_not_the_console(tmp_path, caplog, capfd):
    pycolmap = import_pycolmap()
    with caplog.at_level(logging.DEBUG, logger="backend.estimators.sfm.colmap"):
        with colmap_logging(pycolmap, tmp_path):
            pycolmap.logging.info("feature extraction: 5 images")
            pycolmap.logging.warning("could not register image 3")
            pycolmap.logging.error("bundle adjustment did not converge")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.endswith(".colmap")]
    assert records == [
        (logging.DEBUG, "feature extraction: 5 images"),
        (logging.INFO, "could not register image 3"),
        (logging.WARNING, "bundle adjustment did not converge"),
    ]
    captured = capfd.readouterr()
    assert "register image" not in captured.err + captured.out


def test_forward_glog_lines_skips_the_header():
    lines = [
        "Log file created at: 2026/12/01 23:28:20",
        "Log line format: [IWEF]yyyymmdd hh:mm:ss.uuuuuu threadid file:line] msg",
        "I20261201 23:28:20.169496 139914368691072 feature_extraction.cc:254] Processed file [1/12]",
        "F20261201 23:28:20.169718 139914368691072 x.cc:1] Check failed: ok",
    ]
    assert forward_glog_lines(lines) == 2
