"""Render cache: each (dataset, condition) rendered to disk once, reused by every trial.

Corrupting a split on the fly in every trial and DataLoader worker would
repeat the same (seeded, so identical) work many times; instead
:func:`render_condition` writes a condition's images once under
``cache_dir/<dataset_key>/<name>@<severity>/`` with a checksummed manifest,
resumes a killed render from its journal, and re-renders only what changed.
The pixels themselves come from :func:`harness.data.corruptions.corrupt`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from harness.core import TMP_SUFFIX, DataError, atomic_write, file_lock, sha256_file
from harness.data.conditions import Condition
from harness.data.corruptions import (DEGRADE_VERSION, _check_name_severity, _to_uint8, _version, corrupt,
                                      corruption_params, image_seed)

MANIFEST = "manifest.json"
JOURNAL = ".journal.jsonl"
_TMP_SUFFIX = TMP_SUFFIX
_STALE_TMP_S = 600.0
PNG_COMPRESS_LEVEL = 3
_KEY_MEMO: dict[tuple, str] = {}


def dataset_key(ann_file) -> str:
    """``<annotation stem>-<sha256 of its content, 12 hex>``: the cache folder of a split.

    Content-based, so moving/copying the dataset keeps its renders and any
    edit to the annotations gets a fresh folder.  Source *images* are checked
    per file (size + mtime, then sha256) by :func:`render_condition`.
    Memoised per process by (path, size, mtime).
    """
    p = Path(ann_file).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _KEY_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in p.stem)[:40]
        _KEY_MEMO[memo] = f"{stem}-{h.hexdigest()[:12]}"
    return _KEY_MEMO[memo]


def _cond_dirname(condition: Condition, suite_seed: int) -> str:
    return condition.label if int(suite_seed) == 0 else f"{condition.label}~s{int(suite_seed)}"


def condition_root(index, condition: Condition, cache_dir, *, suite_seed: int = 0) -> Path:
    """Where :func:`render_condition` puts (or has put) a condition's images."""
    if condition.is_clean:
        return Path(index.image_root)
    return Path(cache_dir) / dataset_key(index.ann_file) / _cond_dirname(condition, suite_seed)


def _render_params(condition: Condition, suite_seed: int) -> dict:
    return {"version": DEGRADE_VERSION, "name": condition.name, "severity": condition.severity,
            "suite_seed": int(suite_seed), "corruption": corruption_params(condition.name,
                                                                           condition.severity)}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_journal(path: Path, params: dict) -> dict:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    try:
        header = json.loads(lines[0]) if lines else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("params") != params:
        return {}
    recs = {}
    for line in lines[1:]:
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(obj, dict) and "file" in obj:
            recs[obj["file"]] = obj
    return recs


def _load_uint8(data: bytes) -> np.ndarray:
    from harness.data.coco import load_rgb
    x = load_rgb(io.BytesIO(data))  # same conversions (alpha, 16-bit, ...) as training
    return _to_uint8(x.permute(1, 2, 0).numpy())


def _render_one(src: str, dst: str, name: str, severity: int, seed: int,
                size: tuple[int, int]) -> dict:
    """Render one image; returns its journal record (without ``file``)."""
    src_p, dst_p = Path(src), Path(dst)
    st = src_p.stat()
    data = src_p.read_bytes()
    img = _load_uint8(data)
    if (img.shape[1], img.shape[0]) != tuple(size):
        raise ValueError(f"image {src_p} is {img.shape[1]}x{img.shape[0]} but the annotation "
                         f"says {size[0]}x{size[1]}")
    out = corrupt(img, name, severity, seed)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    png = buf.getvalue()
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst_p, png, fsync=False)
    return {"sha256": hashlib.sha256(png).hexdigest(), "size": len(png),
            "src_sha256": hashlib.sha256(data).hexdigest(), "src_size": st.st_size,
            "src_mtime_ns": st.st_mtime_ns}


def _render_job(job):  # top level: picklable for worker processes
    file_name, src, dst, name, severity, seed, size = job
    try:
        return file_name, _render_one(src, dst, name, severity, seed, size), None
    except (OSError, ValueError) as e:
        return file_name, None, str(e)


def _record_ok(rec: dict | None, dst: Path, src: Path, verify: bool) -> bool:
    if not rec:
        return False
    try:
        if dst.stat().st_size != rec.get("size"):
            return False
        if verify and sha256_file(dst) != rec.get("sha256"):
            return False
        st = src.stat()
    except OSError:
        return False
    if (st.st_size, st.st_mtime_ns) == (rec.get("src_size"), rec.get("src_mtime_ns")):
        return True
    # Touched or copied source: compare content; keep the render if unchanged.
    if st.st_size == rec.get("src_size") and sha256_file(src) == rec.get("src_sha256"):
        rec["src_mtime_ns"] = st.st_mtime_ns
        return True
    return False


def render_condition(index, condition: Condition, cache_dir, *, suite_seed: int = 0,
                     progress: bool = False, workers: int = 1, verify: bool = True) -> Path:
    """Render every image of ``index`` under ``condition`` once; return the image root.

    ``load_coco(index.ann_file, returned_root)`` then reads the degraded split
    (same relative ``file_name`` s; the bytes are always PNG, whatever the
    extension -- PIL reads by content).  ``clean`` returns ``index.image_root``.

    Layout: ``cache_dir/<dataset_key>/<name>@<severity>/`` (``...~s<k>`` when
    ``suite_seed`` != 0) holding the images and ``manifest.json`` (format
    version, parameters, per file sha256/size and the source's
    sha256/size/mtime), written last.  Reuse: when the manifest's parameters
    match, every file is there with its size and (``verify``) sha256, and its
    source is unchanged (size + mtime, else sha256).  Anything else is
    re-rendered, only that.  Each image is written to a temp file and
    ``os.replace`` d, then appended to a journal, so a killed render resumes
    where it stopped and never leaves a half file.  Renders of the same
    condition in several processes are serialised by a lock file; ``workers``
    > 1 renders in a process pool.  Image seeds: :func:`image_seed` of the
    image id, so a render is byte-identical wherever it runs.
    """
    if condition.is_clean:
        return Path(index.image_root)
    _check_name_severity(condition.name, condition.severity)
    root = condition_root(index, condition, cache_dir, suite_seed=suite_seed)
    params = _render_params(condition, suite_seed)
    with file_lock(root.parent / f".{root.name}.lock"):
        return _render_locked(index, condition, root, params, suite_seed=suite_seed,
                              progress=progress, workers=workers, verify=verify)


def _render_locked(index, condition, root: Path, params: dict, *, suite_seed, progress,
                   workers, verify) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    root_res = root.resolve()
    manifest = _read_json(root / MANIFEST)
    manifest_ok = isinstance(manifest, dict) and manifest.get("params") == params \
        and manifest.get("complete") is True
    if manifest_ok:
        records = {f: dict(r) for f, r in manifest.get("files", {}).items()}
    else:  # a killed render of the same parameters, else nothing (all re-rendered)
        records = _read_journal(root / JOURNAL, params)

    # One job per distinct file_name (duplicates share the first image's seed).
    todo, seen, files = [], set(), {}
    for i, info in enumerate(index.images):
        fn = info.file_name
        if fn in seen:
            continue
        seen.add(fn)
        dst = root / fn
        if not dst.resolve().is_relative_to(root_res):
            raise DataError(f"file_name {fn!r} points outside the image root",
                            file=index.ann_file, record=f"image id={info.id}",
                            field="file_name")
        src = index.image_path(i)
        rec = records.get(fn)
        if _record_ok(rec, dst, src, verify):
            files[fn] = {k: rec[k] for k in ("sha256", "size", "src_sha256", "src_size",
                                              "src_mtime_ns")}
        else:
            todo.append((fn, str(src), str(dst), condition.name, condition.severity,
                         image_seed(info.id, condition.name, condition.severity, suite_seed),
                         (info.width, info.height), info.id))
    _remove_stale_tmp(root)
    if manifest_ok and not todo and set(files) == set(manifest["files"]) \
            and all(files[f] == manifest["files"][f] for f in files):
        return root

    (root / MANIFEST).unlink(missing_ok=True)  # incomplete from here until rewritten
    journal = root / JOURNAL
    if not records or manifest_ok or not journal.exists():
        # fresh journal holding what is already known to be good
        lines = [json.dumps({"params": params})] + [json.dumps({"file": f, **r})
                                                   for f, r in files.items()]
        atomic_write(journal, ("\n".join(lines) + "\n").encode())

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=f"render {condition.label}", unit="img")
    try:
        with open(journal, "a", encoding="utf-8") as jf:
            for fn, rec, err, image_id in _run_jobs(todo, workers):
                if err is not None:
                    raise DataError(f"cannot render: {err}", file=index.ann_file,
                                    record=f"image id={image_id}", field="file_name")
                files[fn] = rec
                jf.write(json.dumps({"file": fn, **rec}) + "\n")
                jf.flush()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    doc = {"params": params, "condition": condition.label, "complete": True,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "source": {"annotations": str(index.ann_file), "image_root": str(index.image_root)},
           "software": {d: _version(d) for d in ("imagecorruptions-imaug", "numpy",
                                                  "scikit-image", "scipy", "pillow",
                                                  "opencv-contrib-python-headless")},
           "files": {f: files[f] for f in sorted(files)}}
    atomic_write(root / MANIFEST, json.dumps(doc, indent=1).encode())
    journal.unlink(missing_ok=True)
    return root


def _run_jobs(todo, workers: int):
    """Yield ``(file_name, record, error, image_id)``, serially or in a process pool."""
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            # module-level lookup of _render_one: tests count renders via monkeypatch
            fn, *args, image_id = job
            try:
                yield fn, _render_one(*args), None, image_id
            except (OSError, ValueError) as e:
                yield fn, None, str(e), image_id
        return
    from concurrent.futures import ProcessPoolExecutor
    ids = {job[0]: job[-1] for job in todo}
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for fn, rec, err in ex.map(_render_job, [job[:-1] for job in todo], chunksize=4):
            yield fn, rec, err, ids[fn]


def _remove_stale_tmp(root: Path) -> None:
    """Delete temp files left by killed renders (older than 10 min: not a live writer's)."""
    now = time.time()
    for p in root.rglob(f".*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_S:
                p.unlink()
