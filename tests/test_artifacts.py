"""Stage artifacts: produced once, never read half-written or corrupted."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from harness.artifacts import ArtifactStore, artifact_key


def _files(tmp_path, payload: bytes = b"weights"):
    src = tmp_path / "src.pt"
    src.write_bytes(payload)
    return {"detector.pt": src}


def test_key_is_content_addressed():
    a = artifact_key({"stage": "ideal", "seed": 0, "config": {"r0": 4}})
    assert a == artifact_key({"config": {"r0": 4}, "seed": 0, "stage": "ideal"})
    assert a != artifact_key({"stage": "ideal", "seed": 1, "config": {"r0": 4}})


def test_produce_once_then_reuse(tmp_path):
    store, calls = ArtifactStore(tmp_path / "a"), []

    def make():
        calls.append(1)
        return _files(tmp_path), {"output": {"status": "ok"}}
    folder, reused = store.produce("k1", make)
    assert not reused and (folder / "detector.pt").read_bytes() == b"weights"
    folder2, reused2 = store.produce("k1", make)
    assert reused2 and folder2 == folder and len(calls) == 1
    assert store.meta("k1") == {"output": {"status": "ok"}}
    assert [e["key"] for e in store.list()] == ["k1"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_artifact_detected_and_reproduced(tmp_path, damage):
    store = ArtifactStore(tmp_path / "a")
    folder, _ = store.produce("k", lambda: (_files(tmp_path, b"x" * 1000), {}))
    target = folder / "detector.pt"
    if damage == "truncate":
        target.write_bytes(b"x" * 10)
    elif damage == "flip":
        target.write_bytes(b"y" + b"x" * 999)
    else:
        target.unlink()
    assert store.get("k") is None
    calls = []
    folder, reused = store.produce("k", lambda: (calls.append(1) or _files(tmp_path, b"x" * 1000), {}))
    assert not reused and calls == [1] and (folder / "detector.pt").read_bytes() == b"x" * 1000
    assert any(p.name.startswith(".corrupt-k") for p in store.root.iterdir())
    assert store.gc() and not any(p.name.startswith(".corrupt") for p in store.root.iterdir())


def test_half_written_artifact_is_invisible(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    (store.root / ".tmp-k-123").mkdir()
    (store.root / ".tmp-k-123" / "detector.pt").write_bytes(b"partial")
    (store.root / "k").mkdir()  # a folder without a manifest: an interrupted install
    assert store.get("k") is None and store.list() == []


def _producer(root, out_dir, i):
    store = ArtifactStore(root)

    def make():
        (out_dir / f"made-{i}").write_text("1")
        time.sleep(0.5)
        src = out_dir / f"src-{i}.pt"
        src.write_bytes(b"w")
        return {"detector.pt": src}, {"by": i}
    store.produce("shared", make)


def test_concurrent_producers_make_it_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_producer, args=(tmp_path / "a", tmp_path, i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert len(list(tmp_path.glob("made-*"))) == 1
    assert ArtifactStore(tmp_path / "a").get("shared") is not None
