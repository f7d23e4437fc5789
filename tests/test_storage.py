"""The storage contract, on a local folder and on a real S3 API server (moto on 127.0.0.1)."""
from __future__ import annotations

import subprocess
import threading

import pytest

from harness.core import StorageError
from harness.storage import open_storage
from runkit import DETBENCH, hang_guard
from s3kit import TEST_ENV, make_bucket, moto_server


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "root")
    return open_storage(request.getfixturevalue("s3_uri"))


def test_write_read_list_move_delete(storage, tmp_path):
    storage.write_bytes("rows/a.parquet", b"1")
    storage.write_json("rows/b.json", {"x": 1})
    storage.write_text("top.txt", "t")
    assert storage.read_bytes("rows/a.parquet") == b"1" and storage.read_json("rows/b.json") == {"x": 1}
    assert storage.list("rows") == ["a.parquet", "b.json"] and storage.list("") == ["top.txt"]
    assert storage.list_dirs("") == ["rows"] and storage.list("missing") == []
    storage.write_bytes("rows/a.parquet", b"2")  # replaced whole
    assert storage.read_bytes("rows/a.parquet") == b"2" and storage.size("rows/a.parquet") == 1
    storage.move("rows/a.parquet", "retired/a.parquet")
    assert not storage.exists("rows/a.parquet") and storage.read_bytes("retired/a.parquet") == b"2"
    assert storage.read_many(["rows/b.json", "nope", "top.txt"]) == [b'{"x": 1}', None, b"t"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("nope")
    storage.delete_tree("rows")
    assert storage.list("rows") == [] and storage.exists("retired/a.parquet")


def test_upload_download_and_arrow_see_the_same_files(storage, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    storage.upload("art/big.bin", src)
    storage.download("art/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    fs, path = storage.arrow("art")  # what Ray Train / Tune are given
    with fs.open_input_file(f"{path}/big.bin") as f:
        assert f.read() == src.read_bytes()


def test_create_is_won_by_exactly_one_of_concurrent_creators(storage):
    wins = []
    barrier = threading.Barrier(6)

    def create(i):
        barrier.wait()
        wins.append(storage.create("claim", f"{i}".encode()))
    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]
    assert storage.read_text("claim") in {str(i) for i in range(6)}


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(StorageError, match="gs:// is not supported"):
        open_storage("gs://bucket/x")


def _cli(args, env=None):
    """``detbench ARGS`` as a user runs it (its own process, the given environment)."""
    import os
    return subprocess.run(DETBENCH + args, capture_output=True, text=True, timeout=hang_guard(15),
                          env={**os.environ, **(env or {})})


def _in_process(args, capsys, monkeypatch, env=None):
    """``detbench ARGS`` in this process (the same ``main``, a few seconds cheaper per call)."""
    from harness.app.cli import main
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    code = main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _one_clear_line(out, *, uri: str, cause: str):
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and uri in lines[0] and cause in lines[0], out.stderr
    assert "Traceback" not in out.stderr and TEST_ENV["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr


def _suite(tmp_path, tiny_data):
    from runkit import TINY_DATA
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nsmoke: true\n" + TINY_DATA.format(**tiny_data) + "methods: [{name: faster_rcnn}]\n")
    return suite


def test_unreachable_endpoint_is_exit_2_before_anything_starts(tmp_path, s3_endpoint, tiny_data):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    out = _cli(["run", str(_suite(tmp_path, tiny_data)), "--out", "s3://some-bucket/runs"],
               {"DETBENCH_STORAGE_ENDPOINT_URL": dead})
    _one_clear_line(out, uri="s3://some-bucket/runs", cause="cannot reach the S3 endpoint")


def test_missing_bucket_or_a_prefix_that_is_not_a_run_is_exit_2(tmp_path, s3_endpoint, tiny_data, capsys,
                                                                 monkeypatch):
    suite = _suite(tmp_path, tiny_data)
    out = _in_process(["run", str(suite), "--out", "s3://no-such-bucket/runs"], capsys, monkeypatch)
    _one_clear_line(out, uri="s3://no-such-bucket/runs", cause="bucket 'no-such-bucket' does not exist")
    bucket = make_bucket(s3_endpoint)
    open_storage(f"s3://{bucket}/notarun").write_text("something/else.txt", "x")
    for cmd in (["status"], ["resume"], ["leaderboard"], ["artifacts", "ls"]):
        out = _in_process([*cmd, f"s3://{bucket}/notarun"], capsys, monkeypatch)
        _one_clear_line(out, uri=f"s3://{bucket}/notarun", cause="not a detbench run directory")
    out = _in_process(["run", str(suite), "--out", f"s3://{bucket}", "--name", "notarun"], capsys, monkeypatch)
    _one_clear_line(out, uri=f"s3://{bucket}/notarun", cause="exists but is not a detbench run")
    assert open_storage(f"s3://{bucket}/notarun").list("") == [] and not open_storage(f"s3://{bucket}").list("")


def test_wrong_credentials_are_exit_2_and_never_echoed(tmp_path, tiny_data, capsys, monkeypatch):
    """A server that checks keys (moto with authentication on) refuses ours: one line, no secret."""
    with moto_server(enforce_auth=True) as url:
        out = _in_process(["run", str(_suite(tmp_path, tiny_data)), "--out", "s3://locked-bucket/runs"],
                          capsys, monkeypatch, {**TEST_ENV, "DETBENCH_STORAGE_ENDPOINT_URL": url})
    _one_clear_line(out, uri="s3://locked-bucket/runs", cause="access to bucket 'locked-bucket' denied")


def test_a_server_without_conditional_writes_is_refused_before_a_run(s3_uri, monkeypatch):
    """Older S3-compatible servers answer If-None-Match with 501: a run there is refused up front."""
    from botocore.exceptions import ClientError
    storage = open_storage(s3_uri)
    real = storage.client(quick=True)

    class NoConditionalWrites:
        def head_bucket(self, **kw):
            return real.head_bucket(**kw)

        def put_object(self, **kw):
            if "IfNoneMatch" in kw:
                raise ClientError({"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}},
                                  "PutObject")
            return real.put_object(**kw)

        delete_object = staticmethod(real.delete_object)
    monkeypatch.setattr(storage, "client", lambda quick=False: NoConditionalWrites())
    storage.check()  # reading is fine
    with pytest.raises(StorageError, match="refused a conditional write .*NotImplemented"):
        storage.check(write=True)


def test_working_copy_is_fetched_appended_and_published(storage, tmp_path, monkeypatch):
    """The driver's log / Optuna's journal: a local file, continued from the store on resume."""
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    path = storage.working_copy("logs/driver.log")
    assert not path.exists() and path.parent.is_dir()
    path.write_text("first driver\n")
    storage.publish_copy("logs/driver.log", path)
    assert storage.read_text("logs/driver.log") == "first driver\n"
    if not storage.is_local:
        path.unlink()  # a resumed driver on another node: nothing cached there
    again = storage.working_copy("logs/driver.log")
    assert again.read_text() == "first driver\n" and (storage.is_local == (again == storage.local_path("logs/driver.log")))
