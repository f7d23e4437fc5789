"""Content-addressed store of stage outputs (teacher, ideal model, pretrained backbone).

A stage output is keyed by a hash of everything that determines it (method,
stage, the config fields that stage reads, dataset files, detector, schedule,
seed), so a sweep over a later stage's parameters trains the earlier stage
once and every trial reuses it.

Guarantees:
* a half-written artifact is never read: files are assembled in a temporary
  folder beside the store, checksummed into ``MANIFEST.json``, then renamed
  into place in one step;
* a damaged artifact (truncated or altered file) is detected by its checksum
  on every read, moved aside, and produced again;
* two trials needing the same missing artifact produce it once: producers
  take an exclusive file lock per key (:func:`harness.fileio.file_lock`,
  ``fcntl.flock``; works on local disks and on NFS v4 shared by several
  nodes), and the second one finds it made.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from harness.fileio import file_lock, sha256_file

log = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"


def artifact_key(spec: dict) -> str:
    """Stable key of a JSON-able description of everything that determines an output."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Path | None:
        """The artifact's folder if it exists and every checksum matches, else None."""
        folder = self.path(key)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return None
        try:
            meta = json.loads(manifest.read_text())
            bad = [name for name, digest in meta["files"].items()
                   if not (folder / name).is_file() or sha256_file(folder / name) != digest]
        except (OSError, ValueError, KeyError) as exc:
            bad = [f"{MANIFEST} ({exc})"]
        if bad:
            aside = self.root / f".corrupt-{key}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
            log.warning("artifact %s failed its checksum (%s); moved to %s and will be produced again",
                        key, ", ".join(bad), aside.name)
            os.replace(folder, aside)
            return None
        return folder

    def meta(self, key: str) -> dict:
        return json.loads((self.path(key) / MANIFEST).read_text())["meta"]

    def put(self, key: str, files: dict[str, Path], meta: dict) -> Path:
        """Install copies of ``files`` (name -> source path) atomically under ``key``."""
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            digests = {}
            for name, src in files.items():
                shutil.copyfile(src, tmp / name)
                digests[name] = sha256_file(tmp / name)
            (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": digests, "meta": meta,
                                                    "created": time.time()}, default=str))
            folder = self.path(key)
            if folder.exists():  # a previous, now invalid copy (get() moves corrupt ones aside)
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.path(key)

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with file_lock(self.root / f".{key}.lock"):
            yield

    def produce(self, key: str, make: Callable[[], tuple[dict[str, Path], dict]]) -> tuple[Path, bool]:
        """Return ``(folder, reused)``; ``make()`` runs only when no valid artifact exists."""
        with self.lock(key):
            found = self.get(key)
            if found is not None:
                return found, True
            files, meta = make()
            return self.put(key, files, meta), False

    def list(self) -> list[dict]:
        out = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                m = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError):
                continue
            size = sum(f.stat().st_size for f in folder.iterdir())
            out.append({"key": folder.name, "size_mb": size / 2**20, "created": m.get("created"),
                        **{k: v for k, v in m.get("meta", {}).items() if isinstance(v, (str, int, float))}})
        return out

    def gc(self, keep: set[str] | None = None) -> list[str]:
        """Remove temporary, corrupt and (if ``keep`` is given) unreferenced entries."""
        removed = []
        for p in self.root.iterdir():
            stale = p.name.startswith((".tmp-", ".corrupt-"))
            unref = keep is not None and p.is_dir() and not p.name.startswith(".") and p.name not in keep
            if stale or unref:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed
