"""SIGTERM kept through native libraries that take it over.

SIGTERM is how systemd, ``docker stop`` and ``kill`` stop the service, and ``reconloop serve`` handles it as
Ctrl-C (``backend.cli``). Some libraries install their own handler when they load or start: pycolmap on import
(glog's failure handler, which prints a C++ stack trace) and ``ray.init`` (Ray's, which exits at once, and glog's
in its core worker, which aborts with 134). ``keeps_sigterm`` gives SIGTERM back what it had.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def keeps_sigterm() -> Iterator[None]:
    """Run the body, then give SIGTERM back the handler it had before: in the main thread through ``signal``; in
    another thread (the service's job thread), where only the default action can be restored, through libc."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        elif previous == signal.SIG_DFL and os.name == "posix":
            ctypes.CDLL(None).signal(signal.SIGTERM, ctypes.c_void_p(0))  # SIG_DFL
