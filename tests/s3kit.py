"""The tests' local S3 API server: :mod:`harness.storage.local_server`, skipped with its reason if
it cannot run here."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest

from harness.storage.local_server import TEST_CREDENTIALS as TEST_ENV
from harness.storage.local_server import LocalServerUnavailable, local_s3_server, make_bucket

__all__ = ["TEST_ENV", "moto_server", "make_bucket"]


@contextmanager
def moto_server(*, enforce_auth: bool = False) -> Iterator[str]:
    try:
        server = local_s3_server(enforce_auth=enforce_auth)
        url = server.__enter__()
    except LocalServerUnavailable as exc:
        pytest.skip(f"no local S3 server: {exc}")
    try:
        yield url
    finally:
        server.__exit__(None, None, None)
