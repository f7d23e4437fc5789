"""Stage artifacts: produced once, never read half-written or corrupted -- on a local folder and on S3."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.storage.artifacts import ArtifactStore, ProducerClaims, artifact_key
from harness.storage import open_storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """The artifact store's root: a local folder, or a prefix on the local S3 server."""
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))  # a node's local copies of remote files
    if request.param == "local":
        return str(tmp_path / "a")
    return request.getfixturevalue("s3_uri") + "/artifacts"


def _files(tmp_path, payload: bytes = b"weights", name: str = "src.pt"):
    src = tmp_path / name
    src.write_bytes(payload)
    return {"detector.pt": src}


def _produce(store: ArtifactStore, key: str, make):
    """``(folder, reused)``: a producer as a trial is one (:func:`harness.sweep.trial.run_stages`):
    claim the artifact if it is missing, make it, publish it; reuse it if it exists."""
    with ProducerClaims(store) as claims:
        if not claims.acquire(key):
            return store.get(key), True
        files, meta = make()
        return store.put(key, files, meta), False


def test_key_is_content_addressed():
    a = artifact_key({"stage": "ideal", "seed": 0, "config": {"r0": 4}})
    assert a == artifact_key({"config": {"r0": 4}, "seed": 0, "stage": "ideal"})
    assert a != artifact_key({"stage": "ideal", "seed": 1, "config": {"r0": 4}})


def test_produce_once_then_reuse(tmp_path, root):
    store, calls = ArtifactStore(root), []

    def make():
        calls.append(1)
        return _files(tmp_path), {"output": {"status": "ok"}}
    folder, reused = _produce(store, "k1", make)
    assert not reused and (folder / "detector.pt").read_bytes() == b"weights"
    folder2, reused2 = _produce(store, "k1", make)
    assert reused2 and folder2 == folder and len(calls) == 1
    assert store.meta("k1") == {"output": {"status": "ok"}}
    assert [e["key"] for e in store.list()] == ["k1"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_artifact_detected_and_reproduced(tmp_path, root, damage):
    """The stored file is damaged behind the store's back (a local copy of it may still be good)."""
    store = ArtifactStore(root)
    _produce(store, "k", lambda: (_files(tmp_path, b"x" * 1000), {}))
    storage = open_storage(root)
    if damage == "truncate":
        storage.write_bytes("k/detector.pt", b"x" * 10)
    elif damage == "flip":
        storage.write_bytes("k/detector.pt", b"y" + b"x" * 999)
    else:
        storage.delete("k/detector.pt")
    assert store.get("k") is None
    calls = []
    folder, reused = _produce(store, "k", lambda: (calls.append(1) or _files(tmp_path, b"x" * 1000), {}))
    assert not reused and calls == [1] and (folder / "detector.pt").read_bytes() == b"x" * 1000
    assert storage.read_bytes("k/detector.pt") == b"x" * 1000
    assert len(storage.list(".corrupt")) == 1
    assert store.gc() and not storage.list(".corrupt") and store.get("k") is not None


def test_damaged_local_copy_of_a_remote_artifact_is_fetched_again(tmp_path, s3_uri, monkeypatch):
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(s3_uri + "/artifacts")
    folder, _ = _produce(store, "k", lambda: (_files(tmp_path, b"z" * 500), {}))
    (folder / "detector.pt").write_bytes(b"bad")
    assert (store.get("k") / "detector.pt").read_bytes() == b"z" * 500


def test_half_written_artifact_is_invisible(tmp_path, root):
    """Files without their manifest (a producer killed mid-upload) are no artifact; gc removes them."""
    store, storage = ArtifactStore(root), open_storage(root)
    storage.write_bytes("k/detector.pt", b"partial")
    assert store.get("k") is None and store.list() == []
    assert store.gc() == ["k"] and not storage.list("k")


def _producer(root, out_dir, i, cache):
    os.environ["DETBENCH_CACHE"] = cache
    store = ArtifactStore(root)

    def make():
        (out_dir / f"made-{i}").write_text("1")
        time.sleep(0.5)
        src = out_dir / f"src-{i}.pt"
        src.write_bytes(b"w")
        return {"detector.pt": src}, {"by": i}
    _produce(store, "shared", make)


def test_concurrent_producers_make_it_once(tmp_path, root):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_producer, args=(root, tmp_path, i, str(tmp_path / f"cache{i}")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(list(tmp_path.glob("made-*"))) == 1
    assert ArtifactStore(root).get("shared") is not None


HOLD_AND_DIE = """
import os, sys, time
from harness.storage import open_storage
lease = open_storage(sys.argv[1]).exclusive(".claims/k", lease_s=float(sys.argv[2]))
lease.__enter__()
print("held", flush=True)
time.sleep(600)
"""


def test_claim_of_a_dead_holder_is_taken_over_after_its_lease(tmp_path, s3_uri, monkeypatch, caplog):
    """A producer SIGKILLed while holding the claim: the next one waits out the lease, then takes it."""
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    root, lease_s = s3_uri + "/artifacts", 3.0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_DIE, root, str(lease_s)], stdout=subprocess.PIPE,
                              text=True, env=os.environ.copy())
    assert holder.stdout.readline().strip() == "held"
    claim = json.loads(open_storage(root).read_bytes(".claims/k"))
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.time()
    with caplog.at_level("WARNING", logger="harness.storage.lease"):
        folder, reused = _produce(ArtifactStore(root, lease_s=lease_s), "k", lambda: (_files(tmp_path), {}))
    waited = time.time() - t0
    assert not reused and (folder / "detector.pt").read_bytes() == b"weights"
    assert lease_s - 1.0 <= waited < lease_s + 10, waited  # HTTP dates have one-second resolution
    assert any("took over from " + claim["owner"] in r.getMessage() for r in caplog.records)
    assert not open_storage(root).exists(".claims/k")  # released after the put


def test_live_holder_keeps_its_claim_past_the_lease(s3_uri):
    """The heartbeat keeps a claim held for three leases; the waiter gets it only after release."""
    storage = open_storage(s3_uri)
    events = []
    import threading

    def hold():
        with storage.exclusive("c", lease_s=2.0):
            events.append("held")
            time.sleep(6.0)
            events.append("released")
    t = threading.Thread(target=hold)
    t.start()
    while not events:
        time.sleep(0.05)
    with storage.exclusive("c", lease_s=2.0) as lease:
        events.append("waiter")
        assert lease.took_over_from is None
    t.join()
    assert events == ["held", "released", "waiter"]


def test_producer_claim_is_released_when_its_artifact_is_committed(tmp_path, root):
    """A trial claims a missing artifact before its worker group starts; a second trial waits
    for it, and is let go as soon as the manifest is committed -- not when the first trial ends."""
    import threading

    store = ArtifactStore(root)
    first = ProducerClaims(store, poll_s=0.1)
    first.__enter__()
    assert first.acquire("k")                       # missing: this trial produces it
    first.start_watching()
    waited: dict = {}

    def second_trial():
        t0 = time.time()
        with ProducerClaims(ArtifactStore(root), poll_s=0.1) as claims:
            waited["produces"] = claims.acquire("k")
        waited["s"] = time.time() - t0
    waiter = threading.Thread(target=second_trial)
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()                        # blocked on the claim, holding no workers
    store.put("k", _files(tmp_path), {"by": "first"})  # rank 0 publishes mid-run
    waiter.join(30)
    assert not waiter.is_alive() and waited["produces"] is False  # found it made: reuses it
    assert waited["s"] < 10                         # released by the watcher, first still "running"
    first.__exit__(None, None, None)
    with ProducerClaims(store) as claims:           # a claim left held (a failed run) ends with the trial
        assert claims.acquire("other")
    with ProducerClaims(store) as claims:
        assert claims.acquire("other")
