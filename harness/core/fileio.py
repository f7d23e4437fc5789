"""Atomic file writes, checksums and file locks: the one implementation every writer uses.

A file is written to a temporary name in the same folder (``.<name>.<pid>.<hex>.tmp``),
flushed to disk, then renamed over the target in one step, so a reader (or a
resumed run) sees either the old file or the complete new one, never a half
file. Leftover ``*.tmp`` files of a killed writer are never read.
:func:`file_lock` serialises writers of the same output across processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(data, path: str | Path, **kw) -> Path:
    return atomic_write(path, json.dumps(data, **kw))


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the ``with`` block.

    A POSIX advisory lock (``fcntl.flock``): it excludes other processes taking
    the same lock, on local disks and on NFSv4 shared by several nodes, and is
    released when the block ends or the process dies. A no-op where ``fcntl``
    is absent (not POSIX: no cross-process lock). Creates the parent folder.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
