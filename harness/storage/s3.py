"""A run directory under an S3 (or S3-compatible: MinIO, Ceph RGW) prefix.

Why these primitives: an object store has no rename and no ``flock``, but a PUT
is atomic (an object appears whole or not at all) and S3 has conditional writes
(``If-None-Match: *`` creates only if absent, ``If-Match: <etag>`` replaces only
the version one has seen; AWS since 2024, MinIO, and ``moto`` for the tests).
So: a file is one object written whole; create-only-if-absent is a conditional
PUT; a claim is a lease object refreshed by a heartbeat (:mod:`harness.storage.lease`).

Our own objects go through ``boto3`` (it exposes the conditional headers);
Ray Train/Tune get a ``pyarrow.fs.S3FileSystem`` on the same endpoint. Credentials
come only from the standard chain (environment, ``~/.aws``, instance or pod role)
and are never passed, stored or printed by detbench.
"""
from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path

from harness.core import StorageError
from harness.storage.base import Storage

#: Parallel requests of :meth:`S3Storage.read_many` (latency-bound small GETs).
READ_THREADS = 16


def _code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _status(exc) -> int:
    return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``; ``endpoint_url`` / ``region`` for S3-compatible servers."""

    is_local = False

    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None):
        if not uri.startswith("s3://"):
            raise StorageError("not an s3:// URI", uri=uri)
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError("no bucket in the URI (s3://BUCKET/PREFIX)", uri=uri)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url or os.environ.get("DETBENCH_STORAGE_ENDPOINT_URL") or None
        self.region = region or os.environ.get("DETBENCH_STORAGE_REGION") or None
        self._local = threading.local()

    # boto3 clients are neither picklable nor to be shared across fork: one per process/thread.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def client(self, *, quick: bool = False):
        attr = "quick" if quick else "client"
        c = getattr(self._local, attr, None)
        if c is None:
            import boto3
            from botocore.config import Config
            cfg = (Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1})
                   if quick else Config(connect_timeout=10, read_timeout=120,
                                        retries={"mode": "standard", "max_attempts": 6}))
            c = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                                               region_name=self.region, config=cfg)
            setattr(self._local, attr, c)
        return c

    def key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def _missing(self, exc) -> bool:
        return _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound")

    # ------------------------------------------------------------ primitives

    def read_bytes(self, rel: str) -> bytes:
        from botocore.exceptions import ClientError
        try:
            return self.client().get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
        except ClientError as exc:
            if self._missing(exc):
                raise FileNotFoundError(self.display(rel)) from None
            raise

    def read_many(self, rels: list[str]) -> list[bytes | None]:
        def one(rel):
            try:
                return self.read_bytes(rel)
            except FileNotFoundError:
                return None
        if len(rels) < 4:
            return [one(r) for r in rels]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            return list(pool.map(one, rels))

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)

    def put_if(self, rel: str, data: bytes, *, etag: str | None) -> str | None:
        """Conditional PUT: create if absent (``etag`` None) or replace exactly version ``etag``.

        Returns the new object's ETag, or None when the condition failed (412, or 409: a
        concurrent conditional write to the same key won).
        """
        from botocore.exceptions import ClientError
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            return self.client().put_object(Bucket=self.bucket, Key=self.key(rel), Body=data, **cond)["ETag"]
        except ClientError as exc:
            if _status(exc) in (409, 412) or (etag is not None and self._missing(exc)):
                return None
            raise

    def create(self, rel: str, data: bytes) -> bool:
        return self.put_if(rel, data, etag=None) is not None

    def stat(self, rel: str) -> tuple[str, float] | None:
        """``(etag, age in seconds)`` of an object, both by the server's clock; None if absent."""
        from botocore.exceptions import ClientError
        try:
            head = self.client().head_object(Bucket=self.bucket, Key=self.key(rel))
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise
        now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        return head["ETag"], (now - head["LastModified"]).total_seconds()

    def delete_if(self, rel: str, etag: str) -> bool:
        """Delete the object only if it is still version ``etag`` (a released claim)."""
        from botocore.exceptions import ClientError
        try:
            self.client().delete_object(Bucket=self.bucket, Key=self.key(rel), IfMatch=etag)
            return True
        except ClientError as exc:
            if _status(exc) in (409, 412) or self._missing(exc):
                return False
            if _code(exc) in ("NotImplemented", "InvalidArgument"):  # a server without conditional delete
                found = self.stat(rel)
                if found and found[0] == etag:
                    self.delete(rel)
                    return True
                return False
            raise

    def exists(self, rel: str) -> bool:
        return self.stat(rel) is not None

    def _list(self, rel_dir: str, *, delimiter: bool = True):
        base = self.key(rel_dir)
        base = base + "/" if base else ""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, **({"Delimiter": "/"} if delimiter else {}))
        for page in pages:
            yield base, page

    def list(self, rel_dir: str) -> list[str]:
        # "" is a folder-marker object (``prefix/``) that pyarrow and consoles create: not a file
        return sorted(name for base, page in self._list(rel_dir) for o in page.get("Contents", ())
                      if (name := o["Key"][len(base):]))

    def versions(self, rel_dir: str) -> dict[str, str]:
        return {name: o["ETag"] for base, page in self._list(rel_dir) for o in page.get("Contents", ())
                if (name := o["Key"][len(base):])}

    def list_dirs(self, rel_dir: str) -> list[str]:
        return sorted(p["Prefix"][len(base):].rstrip("/")
                      for base, page in self._list(rel_dir) for p in page.get("CommonPrefixes", ()))

    def delete(self, rel: str) -> None:
        self.client().delete_object(Bucket=self.bucket, Key=self.key(rel))

    def delete_tree(self, rel_dir: str) -> None:
        keys = [o["Key"] for _, page in self._list(rel_dir, delimiter=False) for o in page.get("Contents", ())]
        for i in range(0, len(keys), 1000):
            self.client().delete_objects(Bucket=self.bucket,
                                         Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})

    def move(self, src: str, dst: str) -> None:
        self.client().copy({"Bucket": self.bucket, "Key": self.key(src)}, self.bucket, self.key(dst))
        self.delete(src)

    def size(self, rel: str) -> int:
        return int(self.client().head_object(Bucket=self.bucket, Key=self.key(rel))["ContentLength"])

    def upload(self, rel: str, local: Path) -> None:
        # A multipart upload becomes visible only when completed: still all or nothing.
        self.client().upload_file(str(local), self.bucket, self.key(rel))

    def download(self, rel: str, local: Path) -> None:
        from botocore.exceptions import ClientError
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.client().download_file(self.bucket, self.key(rel), str(tmp))
            os.replace(tmp, local)
        except ClientError as exc:
            if self._missing(exc):
                raise FileNotFoundError(self.display(rel)) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def exclusive(self, rel: str, *, lease_s: float | None = None):
        from harness.storage.lease import Lease
        return Lease(self, rel, lease_s=lease_s)

    def arrow(self, rel: str = "") -> tuple[object, str]:
        import pyarrow.fs
        kw = {}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kw = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        fs = pyarrow.fs.S3FileSystem(region=self.region, **kw) if self.region else pyarrow.fs.S3FileSystem(**kw)
        return fs, "/".join(p for p in (self.bucket, self.key(rel)) if p)

    def local_path(self, rel: str = "") -> Path | None:
        return None

    def child(self, rel: str) -> "S3Storage":
        return S3Storage(f"s3://{self.bucket}/{self.key(rel)}", endpoint_url=self.endpoint_url, region=self.region)

    def describe(self) -> dict:
        return {"uri": self.uri, "endpoint_url": self.endpoint_url, "region": self.region}

    def check(self, *, write: bool = False) -> None:
        """One quick request to the bucket; each way it can fail becomes one clear line.

        ``write``: also create and remove a probe object with ``If-None-Match: *`` -- a
        run needs write access and conditional writes, which some S3-compatible servers lack.
        """
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError,
                                         NoCredentialsError, PartialCredentialsError)
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        try:
            self.client(quick=True).head_bucket(Bucket=self.bucket)
        except (EndpointConnectionError, ConnectTimeoutError) as exc:
            raise StorageError(f"cannot reach the S3 endpoint{where} ({type(exc).__name__})", uri=self.uri) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StorageError("no S3 credentials found (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                               "~/.aws/credentials, or an instance/pod role)", uri=self.uri) from None
        except ClientError as exc:
            status = _status(exc)
            if status == 404 or _code(exc) == "NoSuchBucket":
                raise StorageError(f"bucket '{self.bucket}' does not exist{where}", uri=self.uri) from None
            if status in (401, 403):
                raise StorageError(f"access to bucket '{self.bucket}' denied{where}: check the credentials "
                                   f"and the bucket policy ({_code(exc) or status})", uri=self.uri) from None
            raise StorageError(f"the S3 endpoint{where} refused the request ({_code(exc) or status})",
                               uri=self.uri) from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 request failed{where} ({type(exc).__name__})", uri=self.uri) from None
        if write:
            probe = f".detbench-write-check-{uuid.uuid4().hex}"
            try:
                self.client(quick=True).put_object(Bucket=self.bucket, Key=self.key(probe), Body=b"",
                                                   IfNoneMatch="*")
                self.client(quick=True).delete_object(Bucket=self.bucket, Key=self.key(probe))
            except ClientError as exc:
                if _status(exc) in (401, 403):
                    raise StorageError(f"no write access to bucket '{self.bucket}'{where} "
                                       f"({_code(exc) or _status(exc)})", uri=self.uri) from None
                raise StorageError(f"the S3 server{where} refused a conditional write (If-None-Match: *; "
                                   f"{_code(exc) or _status(exc)}): detbench needs it for claims on object "
                                   "storage (AWS S3, MinIO and Ceph RGW recent releases have it)", uri=self.uri) from None
            except BotoCoreError as exc:
                raise StorageError(f"S3 request failed{where} ({type(exc).__name__})", uri=self.uri) from None
