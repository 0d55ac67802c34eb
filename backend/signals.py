"""SIGTERM kept through native libraries that take it over.

SIGTERM is how systemd, ``docker stop`` and ``kill`` stop the service, and ``reconloop serve`` handles it as
Ctrl-C (``backend.cli``). Some libraries install their own handler when they load or start: pycolmap on import
(glog's failure handler, which prints a C++ stack trace and aborts) and ``ray.init`` (Ray's, which exits at once,
and glog's in its core worker). ``keeps_sigterm`` gives SIGTERM back what it had.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator

SIGACTION_BYTES = 512  # more than any libc's struct sigaction (glibc x86-64: 152, musl: 152, macOS: 16)
_LOCK = threading.RLock()  # one save-to-restore at a time: overlapping ones would restore each other's library's


def _libc_sigaction(signum: int, new: ctypes.Array | None, old: ctypes.Array | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sigaction(signum, new, old) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sigaction({signum}): {os.strerror(err)}")


@contextlib.contextmanager
def keeps_sigterm() -> Iterator[None]:
    """Run the body, then give SIGTERM back the handler it had before, in any thread.

    Two layers are restored: Python's handler (``signal.signal``, in the main thread only, where a library such as
    Ray replaced it) and the C handler behind it (libc's ``sigaction``, process-wide, so also from the service's job
    thread, where pycolmap's glog replaced CPython's own handler, which runs the Python one, under ``reconloop
    serve``'s SIGTERM handler). Uses in two threads at once take turns.

    A SIGTERM that arrives while the body runs, after the library took it over, still meets the library's handler:
    about 0.1 s of pycolmap's import, and the seconds ``ray.init`` takes when ``serve --ray`` starts.
    """
    with _LOCK:
        previous = signal.getsignal(signal.SIGTERM)
        saved = ctypes.create_string_buffer(SIGACTION_BYTES) if os.name == "posix" else None
        if saved is not None:
            _libc_sigaction(signal.SIGTERM, None, saved)
        try:
            yield
        finally:
            if threading.current_thread() is threading.main_thread() and previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if saved is not None:
                _libc_sigaction(signal.SIGTERM, saved, None)
