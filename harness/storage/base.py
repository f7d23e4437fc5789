"""The storage interface every writer of a run directory goes through.

A run directory is a *root* (a local folder or an object-store prefix) holding
files named by ``/``-separated relative paths (``rows/<trial>.parquet``,
``run.json``, ``artifacts/<key>/detector.pt``). Two implementations:
:class:`harness.storage.local.LocalStorage` (POSIX: temp file + ``os.replace``,
``flock``) and :class:`harness.storage.s3.S3Storage` (one object written whole
by one PUT, ``If-None-Match: *`` conditional writes, leases). What holds on both:

* :meth:`Storage.write_bytes` publishes a file whole: a reader sees the old
  content, the new one, or nothing -- never part of a file;
* :meth:`Storage.create` writes only where nothing exists yet, atomically
  (a trial marker, a claim): of two concurrent creators exactly one wins;
* :meth:`Storage.exclusive` holds a claim on a name across processes and nodes
  for a ``with`` block; a claim whose holder died is released (POSIX: the
  kernel drops the lock) or expires after its lease (object store) and is taken over;
* several files forming one unit (an artifact) are published by writing a
  commit marker last (:mod:`harness.storage.artifacts`).

Ray Train and Tune write their own state through :meth:`Storage.arrow`
(``storage_path`` + ``storage_filesystem``), so checkpoints land in the same root.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path


class Storage(ABC):
    """A root of files addressed by relative ``/``-separated paths."""

    #: The root as the user writes it: a local path or ``s3://bucket/prefix``.
    uri: str
    #: Whether the root is a folder of this machine (its files have local paths).
    is_local: bool

    # ------------------------------------------------------------ the primitives

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The whole file; ``FileNotFoundError`` if there is none."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Publish ``data`` as ``rel`` whole (replacing any previous content)."""

    @abstractmethod
    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist; True if this call created it."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def list(self, rel_dir: str) -> list[str]:
        """Names of the files directly in ``rel_dir`` (sorted; temporary files excluded)."""

    @abstractmethod
    def versions(self, rel_dir: str) -> dict[str, str]:
        """``name -> version token`` of the files directly in ``rel_dir``, from one listing.

        A token changes whenever a file is republished (object store: its ETag;
        POSIX: inode, size and mtime), so a reader can tell which files it already has.
        """

    @abstractmethod
    def list_dirs(self, rel_dir: str) -> list[str]:
        """Names of the sub-folders (prefixes) directly in ``rel_dir`` (sorted)."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove a file if present."""

    @abstractmethod
    def delete_tree(self, rel_dir: str) -> None:
        """Remove a folder (prefix) and everything under it."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Move a file (POSIX: one rename; object store: copy, then delete the source)."""

    @abstractmethod
    def size(self, rel: str) -> int: ...

    @abstractmethod
    def upload(self, rel: str, local: Path) -> None:
        """Publish the local file ``local`` as ``rel`` whole (streamed, any size)."""

    @abstractmethod
    def download(self, rel: str, local: Path) -> None:
        """Copy ``rel`` to the local file ``local`` (written whole, then renamed)."""

    @abstractmethod
    def exclusive(self, rel: str, *, lease_s: float | None = None) -> contextlib.AbstractContextManager:
        """Hold the claim ``rel`` for a ``with`` block (waits while another holder has it)."""

    @abstractmethod
    def arrow(self, rel: str = "") -> tuple[object, str]:
        """``(pyarrow filesystem, path)`` of ``rel``: Ray's ``storage_filesystem`` / ``storage_path``."""

    @abstractmethod
    def local_path(self, rel: str = "") -> Path | None:
        """The local path of ``rel`` on a POSIX root, else None."""

    @abstractmethod
    def child(self, rel: str) -> "Storage":
        """The storage rooted at ``rel`` under this root."""

    @abstractmethod
    def check(self, *, write: bool = False) -> None:
        """Raise :class:`harness.core.errors.StorageError` naming the URI and the cause if unusable
        (``write``: for writing a run, not only reading one)."""

    def describe(self) -> dict:
        """What the manifest records of this storage: never credentials."""
        return {"uri": self.uri}

    # ------------------------------------------------------------ derived, shared

    def join(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p)

    def read_many(self, rels: list[str]) -> list[bytes | None]:
        """Several whole files (None where missing); parallel where the backend gains from it."""
        out: list[bytes | None] = []
        for rel in rels:
            try:
                out.append(self.read_bytes(rel))
            except FileNotFoundError:
                out.append(None)
        return out

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, data, **kw) -> None:
        self.write_bytes(rel, json.dumps(data, **kw).encode())

    def node_copy(self, rel: str = "") -> Path:
        """Where this node keeps its copy of ``rel`` of a remote root (its local cache,
        :func:`harness.core.node_cache_dir`; one folder per root URI)."""
        from harness.core import node_cache_dir
        root = node_cache_dir() / "remote" / hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return root / rel if rel else root

    def working_copy(self, rel: str) -> Path:
        """A local file for ``rel`` that a writer needing one (the driver's log, Optuna's journal)
        appends to: the file itself on POSIX; on an object store the node's copy, fetched from the
        store when it is there (a resumed driver continues it). Publish it with :meth:`publish_copy`."""
        path = self.local_path(rel)
        if path is None:
            path = self.node_copy(rel)
            try:
                self.download(rel, path)
            except FileNotFoundError:
                path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish_copy(self, rel: str, path: Path) -> None:
        """Publish a :meth:`working_copy` (one whole upload; nothing to do on POSIX)."""
        if self.local_path(rel) is None and path.is_file():
            self.upload(rel, path)

    def display(self, rel: str = "") -> str:
        """``rel`` as a user reads it in a message: a local path or a full URI."""
        local = self.local_path(rel)
        return str(local) if local is not None else self.uri.rstrip("/") + ("/" + rel if rel else "")
