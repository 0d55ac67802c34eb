"""Atomic file writes and checksums, shared by the job store and the loop's outputs."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

CHUNK_BYTES = 1 << 20


def _process_umask() -> int:
    """The process's umask, read once at import: from /proc on Linux (reading it does not change it);
    elsewhere by setting it and back, the only portable way (at import, before the service's threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# a new file's mode, as open() would give it: mkstemp makes its temporary file 0600 whatever the umask
FILE_MODE = 0o666 & ~_process_umask()


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader sees the old file or the whole new one, never a part; the file gets the mode open()
    would give a new one (:data:`FILE_MODE`). Raises OSError (a full disk included) with the file
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()
