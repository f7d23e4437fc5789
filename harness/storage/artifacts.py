"""Content-addressed store of stage outputs (teacher, ideal model, pretrained backbone).

A stage output is keyed by a hash of everything that determines it (method,
stage, the config fields that stage reads, dataset files, detector, schedule,
seed), so a sweep over a later stage's parameters trains the earlier stage
once and every trial reuses it. The store lives in the run's storage
(:mod:`harness.storage`: a local folder or an object-store prefix), one
folder per key: the files, then ``MANIFEST.json``.

Guarantees, on both kinds of storage:

* a half-written artifact is never read: each file is published whole, and the
  manifest (names, sizes, sha256) is written last -- it is the commit marker;
  a key without one does not exist;
* a damaged artifact (truncated, altered or missing file) is detected by its
  checksum on every read, its manifest is moved to ``.corrupt/``, and it is
  produced again;
* two trials needing the same missing artifact produce it once: producers hold
  the claim ``.claims/<key>`` (:meth:`harness.storage.Storage.exclusive`: a POSIX
  ``flock``, or on an object store a conditional-write lease a dead holder loses),
  and the second one finds it made.

On an object store the files are read through a local cache (``DETBENCH_CACHE``,
per node); a cached file is used only while its sha256 and the remote object's
ETag are both unchanged, so a replaced or damaged object is always seen.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

from harness.core import atomic_write, sha256_file
from harness.storage.base import Storage
from harness.storage.uri import open_storage

log = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"
CORRUPT, CLAIMS = ".corrupt", ".claims"


def artifact_key(spec: dict) -> str:
    """Stable key of a JSON-able description of everything that determines an output."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ArtifactStore:
    def __init__(self, root: str | Path | Storage, *, lease_s: float | None = None):
        self.storage = open_storage(root)
        self.lease_s = lease_s
        self.cache = self.storage.local_path() or self.storage.node_copy()

    def folder(self, key: str) -> Path:
        """The local folder an artifact's files are read from (the store itself on POSIX)."""
        return self.cache / key

    def _manifest(self, key: str) -> dict | None:
        try:
            return self.storage.read_json(f"{key}/{MANIFEST}")
        except FileNotFoundError:
            return None
        except ValueError:
            return {"files": {MANIFEST: "unreadable"}}

    def _fetch(self, key: str, name: str, digest: str) -> Path | None:
        """A verified local copy of one file of a remote artifact, or None if it is damaged."""
        local = self.folder(key) / name
        stamp = local.with_name(f".{name}.etag")
        found = self.storage.stat(f"{key}/{name}")
        if found is None:
            return None
        if not (local.is_file() and stamp.is_file() and stamp.read_text() == found[0]
                and sha256_file(local) == digest):
            self.storage.download(f"{key}/{name}", local)
            atomic_write(stamp, found[0], fsync=False)
        return local if sha256_file(local) == digest else None

    def get(self, key: str) -> Path | None:
        """The artifact's local folder if it exists and every checksum matches, else None."""
        manifest = self._manifest(key)
        if manifest is None:
            return None
        bad = []
        for name, digest in manifest.get("files", {}).items():
            if self.storage.is_local:
                ok = (self.folder(key) / name).is_file() and sha256_file(self.folder(key) / name) == digest
            else:
                ok = self._fetch(key, name, digest) is not None
            if not ok:
                bad.append(name)
        if bad or "files" not in manifest:
            aside = f"{CORRUPT}/{key}-{int(time.time())}-{uuid.uuid4().hex[:6]}.json"
            log.warning("artifact %s failed its checksum (%s); manifest moved to %s, it will be produced again",
                        key, ", ".join(bad) or MANIFEST, aside)
            self.storage.move(f"{key}/{MANIFEST}", aside)
            return None
        return self.folder(key)

    def meta(self, key: str) -> dict:
        return self.storage.read_json(f"{key}/{MANIFEST}")["meta"]

    def put(self, key: str, files: dict[str, Path], meta: dict) -> Path:
        """Publish copies of ``files`` (name -> local path) under ``key``; the manifest last."""
        digests, sizes = {}, {}
        for name, src in files.items():
            digests[name], sizes[name] = sha256_file(src), Path(src).stat().st_size
            self.storage.upload(f"{key}/{name}", Path(src))
            if not self.storage.is_local:  # the producer's node keeps its copy: no download back
                local = self.folder(key) / name
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, local)
                atomic_write(local.with_name(f".{name}.etag"), self.storage.stat(f"{key}/{name}")[0], fsync=False)
        self.storage.write_json(f"{key}/{MANIFEST}", {"key": key, "files": digests, "sizes": sizes,
                                                      "meta": meta, "created": time.time()}, default=str)
        found = self.get(key)
        if found is None:
            raise OSError(f"artifact {key}: published files do not match their checksums")
        return found

    def list(self) -> list[dict]:
        out = []
        for key in self.storage.list_dirs(""):
            if key.startswith("."):
                continue
            m = self._manifest(key)
            if not m or "meta" not in m:
                continue
            size = sum(m.get("sizes", {}).values()) if "sizes" in m else sum(
                self.storage.size(f"{key}/{n}") for n in m.get("files", {}))
            out.append({"key": key, "size_mb": size / 2**20, "created": m.get("created"),
                        **{k: v for k, v in m.get("meta", {}).items() if isinstance(v, (str, int, float))}})
        return out

    def gc(self, keep: set[str] | None = None) -> list[str]:
        """Remove corrupt manifests, uncommitted keys and (if ``keep`` is given) unreferenced ones."""
        removed = [f"{CORRUPT}/{n}" for n in self.storage.list(CORRUPT)]
        self.storage.delete_tree(CORRUPT)
        for key in self.storage.list_dirs(""):
            if key.startswith("."):
                continue
            if self._manifest(key) is None or (keep is not None and key not in keep):
                self.storage.delete_tree(key)
                removed.append(key)
        return removed


class ProducerClaims:
    """The claims a trial holds on the artifacts its worker group is producing.

    Why a claim separate from the writing: a trial runs all its stages in one worker group
    (:mod:`harness.sweep.worker`), so the artifact of an earlier stage is published (:meth:`ArtifactStore.put`)
    by the group's rank 0 mid-run, not by the trial. The trial takes the claim *before* the group starts --
    a second trial needing the same artifact then waits for it holding no workers -- and a
    watcher releases it as soon as the artifact's manifest is committed, so the waiters start
    while this trial trains its later stages. Whatever is still held (a failed stage, a lost
    worker group) is released on exit: the next waiter then produces the artifact itself.
    """

    def __init__(self, store: ArtifactStore, *, poll_s: float = 5.0):
        self.store, self.poll_s = store, poll_s
        self._held: dict[str, object] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def acquire(self, key: str) -> bool:
        """True, holding ``key``'s claim, if the artifact is missing: this trial produces it. False,
        holding nothing, if it exists -- already (the common case takes no claim) or once the
        producer that held the claim meanwhile (this call waited for it) has committed it."""
        if self.store.get(key) is not None:
            return False
        claim = self.store.storage.exclusive(f"{CLAIMS}/{key}", lease_s=self.store.lease_s)
        claim.__enter__()
        if self.store.get(key) is not None:
            claim.__exit__(None, None, None)
            return False
        with self._lock:
            self._held[key] = claim
        return True

    def _release(self, key: str) -> None:
        with self._lock:
            claim = self._held.pop(key, None)
        if claim is not None:
            claim.__exit__(None, None, None)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for key in list(self._held):
                if self.store._manifest(key) is not None:
                    self._release(key)

    def __enter__(self) -> "ProducerClaims":
        return self

    def start_watching(self) -> None:
        """Release each claim when its artifact is committed (from now until exit)."""
        if self._held and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="detbench-claims", daemon=True)
            self._watcher.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        for key in list(self._held):
            self._release(key)
