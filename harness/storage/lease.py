"""Claims on an object store: a lease object, created conditionally, kept alive by a heartbeat.

Why a lease: a POSIX ``flock`` dies with its holder, an object does not. A claim
is the object ``rel`` created with ``If-None-Match: *`` (one creator wins); its
holder rewrites it every ``lease_s / 4`` seconds (``If-Match`` its own version),
and a waiter that finds it unchanged for longer than ``lease_s`` (plus
:data:`CLOCK_RESOLUTION_S`) -- by the *server's* clock (the object's ``Last-Modified`` against the response's
``Date``), so nodes' clocks do not matter -- replaces it conditionally and holds
the claim: of several waiters exactly one takes it over. Release deletes the
object only if it is still the holder's version.

A holder that stalls longer than a lease (not only one that died) loses its claim;
its heartbeat then notices and logs it. ``lease_s`` defaults to 60 s
(``DETBENCH_LEASE_S``): a takeover waits at most about a minute after a death.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

log = logging.getLogger(__name__)
DEFAULT_LEASE_S = 60.0
#: HTTP dates (``Last-Modified``, ``Date``) have a resolution of one second: an age read from
#: them can be up to this much too large, so a claim expires only past the lease plus this.
CLOCK_RESOLUTION_S = 1.0


def default_lease_s() -> float:
    return float(os.environ.get("DETBENCH_LEASE_S", DEFAULT_LEASE_S))


class Lease:
    """``with Lease(s3_storage, rel):`` -- hold the claim ``rel`` for the block."""

    def __init__(self, storage, rel: str, *, lease_s: float | None = None, poll_s: float | None = None):
        self.storage, self.rel = storage, rel
        self.lease_s = float(lease_s or default_lease_s())
        self.poll_s = poll_s if poll_s is not None else min(2.0, self.lease_s / 4)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.lost = False
        self.took_over_from: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "lease_s": self.lease_s, "beat": time.time()}).encode()

    def acquire(self) -> None:
        waited_since, said = time.time(), False
        while True:
            self.etag = self.storage.put_if(self.rel, self._body(), etag=None)
            if self.etag:
                return
            found = self.storage.stat(self.rel)
            if found is None:
                continue  # released between our two requests
            etag, age = found
            if age > self.lease_s + CLOCK_RESOLUTION_S:
                holder = self._holder()
                self.etag = self.storage.put_if(self.rel, self._body(), etag=etag)
                if self.etag:
                    self.took_over_from = holder
                    log.warning("claim %s: took over from %s (no heartbeat for %.0f s > lease %.0f s)",
                                self.storage.display(self.rel), holder, age, self.lease_s)
                    return
            if not said and time.time() - waited_since > 10:
                log.info("claim %s is held by %s; waiting", self.storage.display(self.rel), self._holder())
                said = True
            time.sleep(self.poll_s)

    def _holder(self) -> str:
        try:
            return json.loads(self.storage.read_bytes(self.rel)).get("owner", "?")
        except (FileNotFoundError, ValueError):
            return "?"

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                etag = self.storage.put_if(self.rel, self._body(), etag=self.etag)
            except Exception as exc:  # a transient error: the next beat retries within the lease
                log.warning("claim %s: heartbeat failed (%s)", self.storage.display(self.rel), exc)
                continue
            if etag is None:
                self.lost = True
                log.error("claim %s: lost (taken over after this holder missed its lease)",
                          self.storage.display(self.rel))
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.etag and not self.lost:
            self.storage.delete_if(self.rel, self.etag)

    def __enter__(self) -> "Lease":
        self.acquire()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{self.rel}", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
