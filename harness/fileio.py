"""Atomic file writes and checksums: the one implementation every writer uses.

A file is written to a temporary name in the same folder (``.<name>.<pid>.<hex>.tmp``),
flushed to disk, then renamed over the target in one step, so a reader (or a
resumed run) sees either the old file or the complete new one, never a half
file. Leftover ``*.tmp`` files of a killed writer are never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

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


def atomic_write_json(data, path: str | Path, **kw) -> Path:
    return atomic_write(path, json.dumps(data, **kw))
