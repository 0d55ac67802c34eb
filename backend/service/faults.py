"""Plain messages for faults, and clean-up after them, shared by the worker and the request loop.

A job that dies of a fault fails with a sentence a person can act on; the worker then frees what it
can (Python garbage, the CUDA cache) and goes on with the next job. Example messages::

    out of memory in stage 'fit': CUDA out of memory. Tried to allocate 20.00 GiB; the job was stopped
    no space left on the server's disk (data dir /var/cache/reconloop/jobs): [Errno 28] ...
    RuntimeError: index out of range (in stage 'render')
"""

from __future__ import annotations

import errno
import gc
import logging
import sys
from typing import Any

from ..devices import is_out_of_memory
from ..progress import failed_stage

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
MAX_DETAIL_CHARS = 500


def is_disk_full(err: BaseException) -> bool:
    """An OSError saying the disk, the quota or the file-size limit is exhausted."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def _detail(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def describe_failure(err: BaseException, *, stage: str | None = None, data_dir: Any = None) -> str:
    """One plain sentence for a fault that ended a job or a request.

    It names the stage ``err`` was raised in (``progress.failed_stage``: a stage the loop times), else
    ``stage``, the stage the job last reported (often the one before the failing stage: the loop reports a
    stage as it ends).
    """
    stage = failed_stage(err) or stage
    where = f" in stage {stage!r}" if stage else ""
    if is_out_of_memory(err):
        kind = "GPU memory" if type(err).__name__ == "OutOfMemoryError" else "memory"
        return f"out of {kind}{where}: {_detail(err)}; the job was stopped (try a smaller resolution or fewer frames)"
    if is_disk_full(err):
        place = f" (data dir {data_dir})" if data_dir is not None else ""
        return f"no space left on the server's disk{place}{where}: {_detail(err)}; free space and submit again"
    return f"{type(err).__name__}: {_detail(err)}" + (f" (in stage {stage!r})" if stage else "")


def release_memory() -> None:
    """After every job (and a fault): collect garbage and, when torch is loaded with CUDA, empty its cache, so
    that the GPU memory a job reserved goes back to the device (other processes, ``nvidia-smi``). A generator's
    weights that ``GeneratorCache`` keeps stay loaded: they are referenced, not garbage."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception as err:  # a broken CUDA context must not take the worker down too
        log.warning("could not empty the CUDA cache: %s", err)
