"""A local S3 API server (``moto``'s standalone server on 127.0.0.1) for the tests and ``make bench``.

Why a separate process and not moto's in-process mocks: detbench's Ray workers,
drivers started as subprocesses and pyarrow's C++ S3 client must all reach the
same server over HTTP, exactly as they would reach MinIO or AWS. ``moto[server]``
is a test dependency (``pip install -e '.[test]'``), not a runtime one.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

#: Credentials the local server accepts (it checks none unless asked to); never real ones.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "detbench-test-key", "AWS_SECRET_ACCESS_KEY": "detbench-test-secret-0451",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class LocalServerUnavailable(RuntimeError):
    """moto is not installed, or its server did not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3_server(*, enforce_auth: bool = False, timeout_s: float = 30) -> Iterator[str]:
    """Run a moto S3 server for the block; yields its endpoint URL.

    ``enforce_auth``: the server refuses keys it does not know (every key, here).
    """
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise LocalServerUnavailable(f"moto[server] is not installed ({exc}); make install installs it") from None
    port = _free_port()
    env = {**os.environ, **TEST_CREDENTIALS}
    if enforce_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > end:
                    raise LocalServerUnavailable(f"the local S3 server (moto) did not start on {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket (a fresh random name by default) on the server; returns its name."""
    import boto3
    name = name or f"detbench-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
