"""A path or URI -> its :class:`Storage`: local folders, ``file://`` and ``s3://`` (S3-compatible servers)."""
from __future__ import annotations

from pathlib import Path

from harness.core import StorageError
from harness.storage.base import Storage
from harness.storage.local import LocalStorage

#: URI schemes detbench can run on, and what it says of the others.
UNSUPPORTED = {
    "gs": "gs:// is not supported: claims need conditional writes, which detbench implements for the "
          "S3 API; use s3://BUCKET/PREFIX with endpoint_url https://storage.googleapis.com and HMAC keys "
          "(untested), or mount the bucket",
    "gcs": "see gs://",
    "hdfs": "hdfs:// is not supported (no conditional writes); mount it or use s3://",
}


def is_remote(where: str | Path) -> bool:
    return "://" in str(where)


def open_storage(where: str | Path | Storage, *, endpoint_url: str | None = None,
                 region: str | None = None) -> Storage:
    """The storage of a local path or an ``s3://bucket/prefix`` URI.

    ``endpoint_url`` / ``region`` (S3-compatible servers) default to the environment
    variables ``DETBENCH_STORAGE_ENDPOINT_URL`` / ``DETBENCH_STORAGE_REGION``;
    credentials always come from the environment's standard chain.
    """
    if isinstance(where, Storage):
        return where
    text = str(where)
    if not is_remote(text):
        return LocalStorage(text)
    scheme = text.split("://", 1)[0].lower()
    if scheme == "s3":
        from harness.storage.s3 import S3Storage
        return S3Storage(text, endpoint_url=endpoint_url, region=region)
    if scheme == "file":
        return LocalStorage(text[len("file://"):])
    raise StorageError(UNSUPPORTED.get(scheme, f"unsupported storage scheme {scheme}:// (local paths and s3://)"),
                       uri=text)
