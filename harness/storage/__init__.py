"""Where a run directory lives: a local folder or an object-store prefix (see :mod:`harness.storage.base`).

:func:`open_storage` is the one way to get a :class:`Storage` for a path or URI;
every module that reads or writes a run directory goes through it.
"""
from harness.storage.artifacts import ArtifactStore, ProducerClaims, artifact_key
from harness.storage.base import Storage
from harness.storage.local import LocalStorage
from harness.storage.uri import is_remote, open_storage

__all__ = ["ArtifactStore", "ProducerClaims", "artifact_key", "Storage", "LocalStorage", "is_remote", "open_storage"]
