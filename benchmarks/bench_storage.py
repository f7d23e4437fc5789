"""Run directories on object storage (issue: S3 run directories): local POSIX vs a local S3 server.

Both measured in this one run, on this machine: the S3 side is ``moto``'s server on
127.0.0.1 in its own process (:mod:`harness.storage.local_server`), so the ratios
show detbench's own cost per request and its parallelism, not a network's latency.

(a) Writing the rows of 1,000 trials (one Parquet file + one finished-index entry each,
    as trials do), then the first read of every row (``ResultStore.read``: one request
    per rows file, then the rows snapshot is written).
(b) The leaderboard of that 1,000-trial run read from the store and rendered
    (``write_leaderboard``: one listing + the snapshot). Target: S3 <= 3x local.
(c) One 50 MB artifact: ``ArtifactStore.put`` (upload + manifest), then ``get`` on a
    node with an empty cache (download + checksum).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

TRIALS, ARTIFACT_MB = 1000, 50
METHODS, DATASETS, CONDITIONS = ("faster_rcnn", "focal", "fctl", "defeat"), ("coco", "visdrone"), 5


def trial_rows(i: int):
    """About the rows of a real trial: final AP/AP50/APs per condition, plus a per-epoch loss curve."""
    from harness.results import ResultRow
    method, dataset, seed = METHODS[i % 4], DATASETS[(i // 4) % 2], i // 8
    base = dict(run_id="bench", suite="bench", trial_id=f"t{i:04d}", cell=f"{method}/{dataset}/seed{seed}",
                method=method, stage="train", dataset=dataset, seed=seed, config_hash=f"h{i}",
                config_json="{}", detector="fasterrcnn_resnet50_fpn", wall_s=100.0, status="ok")
    rows = [ResultRow(**base, metric=m, value=0.3 + 0.001 * i, condition=c, severity=s)
            for m in ("AP", "AP50", "APs") for c, s in [("clean", 0)] + [("fog", k) for k in range(1, CONDITIONS)]]
    rows += [ResultRow(**base, metric="train/loss", value=1.0 / e, epoch=e) for e in range(1, 13)]
    return rows


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_rows(local_root: Path, s3_uri: str) -> None:
    from harness.report import write_leaderboard
    from harness.results import ResultStore
    rows = [trial_rows(i) for i in range(TRIALS)]
    figures = {}
    for where, root in (("local", str(local_root / "run")), ("s3", s3_uri + "/run")):
        store = ResultStore(root)
        write_s = _time(lambda: [store.write_trial(r[0].trial_id, r) for r in rows])
        read_s = _time(lambda: store.read())
        board_s = _time(lambda: write_leaderboard(root, "md"))
        figures[where] = (write_s, read_s, board_s)
        n = len(store.read())
        print(f"  {where:>5}: write {TRIALS} trials {write_s:6.2f} s ({1e3 * write_s / TRIALS:.1f} ms/trial), "
              f"first read of {n} rows {read_s:5.2f} s, leaderboard {board_s:5.2f} s")
    (lw, lr, lb), (sw, sr, sb) = figures["local"], figures["s3"]
    print(f"  ratios s3/local: write {sw / lw:.1f}x, first read {sr / lr:.1f}x, "
          f"leaderboard {sb / lb:.2f}x (target <= 3x)")


def bench_artifact(tmp: Path, s3_uri: str) -> None:
    from harness.storage.artifacts import ArtifactStore
    src = tmp / "detector.pt"
    src.write_bytes(os.urandom(ARTIFACT_MB << 20))
    figures = {}
    for where, root in (("local", str(tmp / "artifacts")), ("s3", s3_uri + "/artifacts")):
        store = ArtifactStore(root)
        put_s = _time(lambda: store.put("k", {"detector.pt": src}, {"bench": True}))
        os.environ["DETBENCH_CACHE"] = str(tmp / f"fresh-cache-{where}")  # another node: nothing cached
        get_s = _time(lambda: ArtifactStore(root).get("k"))
        figures[where] = (put_s, get_s)
        print(f"  {where:>5}: {ARTIFACT_MB} MB artifact put {put_s:5.2f} s, get (empty cache) {get_s:5.2f} s")
    (lp, lg), (sp, sg) = figures["local"], figures["s3"]
    print(f"  ratios s3/local: put {sp / lp:.1f}x, get {sg / lg:.1f}x")


def main() -> None:
    from harness.storage.local_server import TEST_CREDENTIALS, LocalServerUnavailable, local_s3_server, make_bucket
    saved = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory() as d, local_s3_server() as url:
            os.environ.update({**TEST_CREDENTIALS, "DETBENCH_STORAGE_ENDPOINT_URL": url,
                               "DETBENCH_CACHE": str(Path(d) / "cache")})
            s3_uri = f"s3://{make_bucket(url)}/bench"
            print(f"(a, b) rows of {TRIALS} trials ({len(trial_rows(0))} rows each) and their leaderboard:")
            bench_rows(Path(d), s3_uri)
            print(f"(c) one {ARTIFACT_MB} MB artifact:")
            bench_artifact(Path(d), s3_uri)
    except LocalServerUnavailable as exc:
        print(f"skipped: {exc}")
    finally:
        os.environ.clear()
        os.environ.update(saved)


if __name__ == "__main__":
    main()
