"""A run directory in a local (or NFS-mounted) folder: rename-based publication, ``flock`` claims."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from harness.core import TMP_SUFFIX, StorageError, atomic_write, file_lock, fsync_dir
from harness.storage.base import Storage


class LocalStorage(Storage):
    """Files under a folder; publication = temp file + fsync + ``os.replace`` (:mod:`harness.core.fileio`)."""

    is_local = True

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._p(rel).read_bytes()
        except IsADirectoryError:
            raise FileNotFoundError(self._p(rel)) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = atomic_write(self._p(rel), data)
        fsync_dir(path.parent)

    def create(self, rel: str, data: bytes) -> bool:
        # Written whole under a temporary name, then hard-linked to its name: link(2) fails
        # if the name exists, so the file appears complete and at most one creator wins.
        path = self._p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def list(self, rel_dir: str) -> list[str]:
        folder = self._p(rel_dir)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(TMP_SUFFIX))

    def versions(self, rel_dir: str) -> dict[str, str]:
        out = {}
        for name in self.list(rel_dir):
            try:
                st = (self._p(rel_dir) / name).stat()
            except FileNotFoundError:
                continue
            out[name] = f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"
        return out

    def list_dirs(self, rel_dir: str) -> list[str]:
        folder = self._p(rel_dir)
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def delete(self, rel: str) -> None:
        self._p(rel).unlink(missing_ok=True)

    def delete_tree(self, rel_dir: str) -> None:
        shutil.rmtree(self._p(rel_dir), ignore_errors=True)

    def move(self, src: str, dst: str) -> None:
        self._p(dst).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._p(src), self._p(dst))

    def size(self, rel: str) -> int:
        return self._p(rel).stat().st_size

    def upload(self, rel: str, local: Path) -> None:
        dst = self._p(rel)
        if Path(local).resolve() == dst:
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def download(self, rel: str, local: Path) -> None:
        self.__class__(Path(local).parent).upload(Path(local).name, self._p(rel))

    def exclusive(self, rel: str, *, lease_s: float | None = None):
        """``flock`` on ``rel``: released by the kernel when the holder dies, so no lease is needed."""
        return file_lock(self._p(rel))

    def arrow(self, rel: str = "") -> tuple[object, str]:
        import pyarrow.fs
        return pyarrow.fs.LocalFileSystem(), str(self._p(rel))

    def local_path(self, rel: str = "") -> Path | None:
        return self._p(rel)

    def child(self, rel: str) -> "LocalStorage":
        return LocalStorage(self._p(rel))

    def check(self, *, write: bool = False) -> None:
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK):
            raise StorageError("not a writable folder", uri=str(probe))
