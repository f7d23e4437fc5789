"""A synthetic dataset the size of COCO train2017, for benchmarks (never used by ``make test``).

:func:`ensure_coco_sized` writes, once, an instances file shaped like ``instances_train2017.json``
(same top-level keys, record fields and key order; sparse shuffled image ids; COCO's 80
non-contiguous category ids and names; polygon segmentations of 8-30 vertices whose area is the
``area``; ~1% crowd annotations with an RLE ``segmentation``; ~1% images without annotations; a long
tail of annotations per image; a few boxes with w or h <= 1; about the real file's 448 MB) and one
small real JPEG per image whose header size is its record's width x height.

The JPEGs: one tiny-quality JPEG is encoded per distinct (width, height) and every image file is a
hard link to it (a new copy every ``_LINKS_PER_INODE`` links, under the file system's link limit),
or a copy of its bytes where links fail -- the image folder costs a few MB, not 18 GB.

Layout under ``<root>/coco-sized-<images>-<annotations>-<seed>/``::

    annotations/instances_train2017.json
    train2017/000000391895.jpg ...
    .templates/                  the JPEG per size (the link targets)
    COMPLETE.json                written last, atomically: its presence means "generated"

``root`` defaults to ``$DETBENCH_BENCH_CACHE`` or ``~/.cache/detbench/bench``.
``python -m benchmarks.coco_scale [--root DIR] [--images N --annotations N --seed S]``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from harness.core import file_lock

COCO_TRAIN2017 = dict(images=118_287, annotations=860_001, categories=80)

# COCO's 80 categories: (id, name, supercategory); ids 1..90 with gaps, as in instances_*.json.
COCO_CATEGORIES = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"),
    (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
    (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
]
assert len(COCO_CATEGORIES) == COCO_TRAIN2017["categories"]

# (width, height) and how often: COCO's most common sizes (640x480 about 40% of train2017).
_SIZES = [((640, 480), 0.40), ((480, 640), 0.12), ((640, 427), 0.17), ((427, 640), 0.07),
          ((500, 375), 0.05), ((375, 500), 0.03), ((612, 612), 0.04), ((640, 424), 0.05),
          ((640, 360), 0.04), ((640, 640), 0.03)]
_LICENSES = [(1, "Attribution-NonCommercial-ShareAlike License"), (2, "Attribution-NonCommercial License"),
             (3, "Attribution-NonCommercial-NoDerivs License"), (4, "Attribution License"),
             (5, "Attribution-ShareAlike License"), (6, "Attribution-NoDerivs License"),
             (7, "No known copyright restrictions"), (8, "United States Government Work")]
_MAX_IMAGE_ID = 581_929          # train2017's ids lie in 9..581929
_MAX_ANN_ID = 2_232_119          # and its (non-crowd) annotation ids below this
_CROWD_ID_BASE = 900_100_000_000  # crowd annotation ids in COCO look like 900100581904
_EMPTY_FRACTION = 0.0087         # train2017: 1,021 images without annotations
_CROWD_FRACTION = 0.0105         # train2017: 9,000 crowd annotations
_TINY_FRACTION = 0.0002          # boxes with w or h <= 1 (COCO has a few dozen w or h < 1)
_MAX_PER_IMAGE = 93              # train2017's most annotated image
_VERTICES = (8, 30)              # polygon vertices, inclusive
_CHUNK_IMAGES = 4096             # images per generated (and written) chunk of annotations
_LINKS_PER_INODE = 30_000        # under ext4's 65,000 links per inode
ANN_NAME, IMAGE_DIR, MARKER = "annotations/instances_train2017.json", "train2017", "COMPLETE.json"


def default_root() -> Path:
    return Path(os.environ.get("DETBENCH_BENCH_CACHE") or Path.home() / ".cache" / "detbench" / "bench")


def dataset_dir(root: Path | None = None, *, images: int = COCO_TRAIN2017["images"],
                annotations: int = COCO_TRAIN2017["annotations"], seed: int = 0) -> Path:
    return Path(root or default_root()) / f"coco-sized-{images}-{annotations}-{seed}"


def ensure_coco_sized(root: Path | None = None, *, images: int = COCO_TRAIN2017["images"],
                      annotations: int = COCO_TRAIN2017["annotations"], seed: int = 0,
                      progress: bool = True) -> tuple[Path, Path]:
    """``(annotation_json, image_dir)`` of the synthetic set, generated first if not complete yet.

    Deterministic in ``(images, annotations, seed)``. Returns at once when the folder's completion
    marker exists; otherwise (re)generates the folder from scratch, under a file lock so concurrent
    callers generate it once.
    """
    if images < 1 or annotations < 0:
        raise ValueError(f"need images >= 1 and annotations >= 0, got {images}, {annotations}")
    d = dataset_dir(root, images=images, annotations=annotations, seed=seed)
    ann, img_dir = d / ANN_NAME, d / IMAGE_DIR
    if (d / MARKER).is_file():
        return ann, img_dir
    d.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(d.parent / f".{d.name}.lock"):
        if (d / MARKER).is_file():  # another process finished it while we waited
            return ann, img_dir
        if d.exists():  # an interrupted generation: start over
            shutil.rmtree(d)
        stats = _generate(d, images=images, annotations=annotations, seed=seed, progress=progress)
        tmp = d / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(stats, indent=1) + "\n")
        os.replace(tmp, d / MARKER)
    if progress:
        print(f"generated {d} in {stats['seconds']:.0f} s: {stats['images']:,} images, "
              f"{stats['annotations']:,} annotations, JSON {stats['json_bytes'] / 1e6:.0f} MB, "
              f"disk {stats['disk_bytes'] / 1e6:.0f} MB ({stats['image_files']})", flush=True)
    return ann, img_dir


# ---------------------------------------------------------------------------------------------------
# generation

def _per_image_counts(rng: np.random.Generator, images: int, annotations: int) -> np.ndarray:
    """Annotations per image summing to ``annotations``: ~1% zero, then a long tail (COCO: mean 7.3,
    median 4, a few images with 50+)."""
    counts = np.zeros(images, np.int64)
    n_empty = max(int(round(_EMPTY_FRACTION * images)), images - annotations)
    if annotations == 0 or n_empty >= images:
        return counts
    full = rng.permutation(images)[n_empty:]
    mean = annotations / len(full)
    cap = max(_MAX_PER_IMAGE, int(np.ceil(mean)))
    # 1 + negative binomial with a small shape parameter: the long tail of crowded scenes.
    shape = 0.9
    extra = max(mean - 1.0, 1e-9)
    draw = 1 + rng.negative_binomial(shape, shape / (shape + extra), len(full))
    counts[full] = np.minimum(draw, cap)
    diff = annotations - int(counts.sum())
    while diff:  # exact total: one more (or one fewer) annotation on random images, within [1, cap]
        step = 1 if diff > 0 else -1
        ok = full[(counts[full] < cap) if step > 0 else (counts[full] > 1)]
        pick = rng.choice(ok, min(abs(diff), len(ok)), replace=False)
        counts[pick] += step
        diff = annotations - int(counts.sum())
    return counts


def _image_records(rng: np.random.Generator, images: int) -> tuple[list[dict], np.ndarray]:
    ids = rng.choice(np.arange(1, max(_MAX_IMAGE_ID, 2 * images) + 1), images, replace=False)  # shuffled
    p = np.array([w for _, w in _SIZES])
    size_idx = rng.choice(len(_SIZES), images, p=p / p.sum())
    licenses = rng.integers(1, len(_LICENSES) + 1, images)
    days = rng.integers(0, 365, images)
    secs = rng.integers(0, 86400, images)
    recs = []
    for iid, s, lic, day, sec in zip(ids.tolist(), size_idx.tolist(), licenses.tolist(), days.tolist(),
                                     secs.tolist()):
        (w, h), fn = _SIZES[s][0], f"{iid:012d}.jpg"
        recs.append({"license": lic, "file_name": fn,
                     "coco_url": f"http://images.cocodataset.org/train2017/{fn}",
                     "height": h, "width": w,
                     "date_captured": time.strftime("%Y-%m-%d %H:%M:%S",
                                                    time.gmtime(1384387200 + day * 86400 + sec)),
                     "flickr_url": f"http://farm{1 + iid % 9}.staticflickr.com/{iid % 9000}/{iid}_x.jpg",
                     "id": iid})
    return recs, size_idx


def _category_probs(rng: np.random.Generator) -> np.ndarray:
    """person ~30% of COCO's annotations, the rest a skewed spread over the other 79."""
    rest = 1.0 / (np.arange(1, 80) + 3.0) ** 0.9
    rest = rng.permutation(rest) / rest.sum() * 0.7
    return np.concatenate([[0.3], rest])


def _annotation_chunk(rng: np.random.Generator, img_ids: np.ndarray, wh: np.ndarray, counts: np.ndarray,
                      ann_ids: np.ndarray, cat_p: np.ndarray) -> list[dict]:
    """The annotation records of a chunk of images (vectorised; Python only builds the dicts)."""
    n = int(counts.sum())
    if n == 0:
        return []
    img = np.repeat(np.arange(len(img_ids)), counts)
    W, H = wh[img, 0].astype(np.int64), wh[img, 1].astype(np.int64)
    cat_ids = np.array([c[0] for c in COCO_CATEGORIES])[rng.choice(80, n, p=cat_p)]
    crowd = rng.random(n) < _CROWD_FRACTION

    # boxes in integer hundredths of a pixel, inside the image: log-uniform width, varied aspect.
    fw = np.exp(rng.uniform(np.log(0.012), np.log(0.98), n))
    fh = np.clip(fw * np.exp(rng.normal(0.0, 0.6, n)), 0.01, 1.0)
    w = np.clip(np.floor(fw * W * 100), 150, W * 100)
    h = np.clip(np.floor(fh * H * 100), 150, H * 100)
    tiny = rng.random(n) < _TINY_FRACTION
    tiny_w = tiny & (rng.random(n) < 0.5)
    w[tiny_w] = rng.integers(20, 101, int(tiny_w.sum()))            # w in [0.2, 1.0]
    h[tiny & ~tiny_w] = rng.integers(20, 101, int((tiny & ~tiny_w).sum()))
    x = np.floor(rng.random(n) * (W * 100 - w + 1))
    y = np.floor(rng.random(n) * (H * 100 - h + 1))
    bbox = (np.stack([x, y, w, h], 1) / 100).tolist()

    # polygons: k vertices around an ellipse inscribed in the box, jittered radius; 2-decimal coords.
    # (skewed towards many vertices, mean ~23: the file then has about the real one's size)
    span = _VERTICES[1] - _VERTICES[0] + 1
    k_all = _VERTICES[0] + np.minimum(np.floor(span * np.sqrt(rng.random(n))), span - 1).astype(np.int64)
    polys: list = [None] * n
    area = np.zeros(n)
    for k in np.unique(k_all[~crowd]):
        sel = np.flatnonzero((k_all == k) & ~crowd)
        m = len(sel)
        theta = (np.arange(k) + rng.uniform(-0.35, 0.35, (m, k))) * (2 * np.pi / k) + rng.uniform(0, 2 * np.pi, (m, 1))
        r = rng.uniform(0.55, 1.0, (m, k))
        bx, by, bw, bh = (a[sel, None] / 100 for a in (x, y, w, h))
        px = np.clip(np.round((bx + bw / 2 + r * np.cos(theta) * bw / 2) * 100) / 100, bx, bx + bw)
        py = np.clip(np.round((by + bh / 2 + r * np.sin(theta) * bh / 2) * 100) / 100, by, by + bh)
        area[sel] = 0.5 * np.abs((px * np.roll(py, -1, 1) - np.roll(px, -1, 1) * py).sum(1))
        flat = np.empty((m, 2 * k))
        flat[:, 0::2], flat[:, 1::2] = px, py
        for j, p in zip(sel.tolist(), flat.tolist()):
            polys[j] = [p]

    out = []
    img_ids_l, img_l, cat_l, area_l = img_ids.tolist(), img.tolist(), cat_ids.tolist(), area.tolist()
    for j, aid in enumerate(ann_ids.tolist()):
        if crowd[j]:
            hh, ww = int(H[j]), int(W[j])
            cuts = np.unique(rng.integers(1, hh * ww, int(rng.integers(16, 64))))
            runs = np.diff(np.concatenate([[0], cuts, [hh * ww]])).tolist()
            seg, a, iscrowd, aid = {"counts": runs, "size": [hh, ww]}, float(sum(runs[1::2])), 1, _CROWD_ID_BASE + aid
        else:
            seg, a, iscrowd = polys[j], area_l[j], 0
        out.append({"segmentation": seg, "area": a, "iscrowd": iscrowd, "image_id": img_ids_l[img_l[j]],
                    "bbox": bbox[j], "category_id": cat_l[j], "id": aid})
    order = rng.permutation(n)  # COCO's annotations of one image are not contiguous in the file
    return [out[i] for i in order]


def _jpeg_bytes(w: int, h: int) -> bytes:
    """A tiny-quality real JPEG of w x h pixels (a gradient)."""
    from PIL import Image
    gx = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    gy = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(gx, (h, w)), np.broadcast_to(gy, (h, w)),
                    np.full((h, w), 128, np.float32)], 2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=10)
    return buf.getvalue()


def _write_images(d: Path, recs: list[dict], size_idx: np.ndarray, progress: bool) -> str:
    """One file per image record: a hard link to the template JPEG of its size, else a copy."""
    from tqdm.auto import tqdm
    img_dir, tpl_dir = d / IMAGE_DIR, d / ".templates"
    img_dir.mkdir(parents=True)
    tpl_dir.mkdir()
    payload = {s: _jpeg_bytes(*_SIZES[s][0]) for s in np.unique(size_idx).tolist()}
    # the j-th image of a size links to that size's template copy j // _LINKS_PER_INODE
    rank = np.zeros(len(recs), np.int64)
    for s in payload:
        sel = np.flatnonzero(size_idx == s)
        rank[sel] = np.arange(len(sel)) // _LINKS_PER_INODE
    templates = {}
    for s, r in set(zip(size_idx.tolist(), rank.tolist())):
        w, h = _SIZES[s][0]
        p = tpl_dir / f"{w}x{h}-{r}.jpg"
        p.write_bytes(payload[s])
        templates[s, r] = p
    links = {"ok": True}

    def write(i: int) -> None:
        dst = img_dir / recs[i]["file_name"]
        s = int(size_idx[i])
        if links["ok"]:
            try:
                os.link(templates[s, int(rank[i])], dst)
                return
            except FileExistsError:
                raise
            except OSError:  # no hard links here (or the link limit): copy the bytes from now on
                links["ok"] = False
        dst.write_bytes(payload[s])

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in tqdm(pool.map(write, range(len(recs)), chunksize=256), total=len(recs), unit="img",
                      desc="image files", disable=not progress, mininterval=0.5):
            pass
    return "hard links to one JPEG per size" if links["ok"] else "copies of one JPEG per size"


def _disk_bytes(d: Path) -> int:
    """Blocks allocated under ``d``, each inode counted once (hard links share theirs)."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(d):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _generate(d: Path, *, images: int, annotations: int, seed: int, progress: bool) -> dict:
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    recs, size_idx = _image_records(rng, images)
    counts = _per_image_counts(rng, images, annotations)
    ann_ids = rng.choice(np.arange(1, max(_MAX_ANN_ID, 2 * annotations) + 1), annotations, replace=False)
    cat_p = _category_probs(rng)
    wh = np.array([_SIZES[s][0] for s in range(len(_SIZES))])[size_idx]
    img_ids = np.array([r["id"] for r in recs])

    ann = d / ANN_NAME
    ann.parent.mkdir(parents=True)
    tmp = ann.with_name(ann.name + ".tmp")
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, check_circular=False).encode
    head = {"info": {"description": "detbench synthetic COCO-train2017-sized dataset",
                     "url": "https://github.com/detbench", "version": "1.0", "year": 2017,
                     "contributor": "detbench benchmarks/coco_scale.py",
                     "date_created": "2017/09/01", "seed": seed},
            "licenses": [{"url": f"http://creativecommons.org/licenses/{i}/2.0/", "id": i, "name": n}
                         for i, n in _LICENSES]}
    with open(tmp, "w", encoding="ascii", buffering=1 << 22) as f:
        f.write(dumps(head)[:-1] + ',"images":[')
        for s in range(0, images, 8192):
            f.write(("," if s else "") + dumps(recs[s:s + 8192])[1:-1])
        f.write('],"annotations":[')
        first, off = True, 0
        bar = tqdm(total=annotations, unit="ann", desc="annotations", disable=not progress, mininterval=0.5)
        for s in range(0, images, _CHUNK_IMAGES):
            c = counts[s:s + _CHUNK_IMAGES]
            n = int(c.sum())
            chunk = _annotation_chunk(rng, img_ids[s:s + _CHUNK_IMAGES], wh[s:s + _CHUNK_IMAGES], c,
                                      ann_ids[off:off + n], cat_p)
            off += n
            if chunk:
                f.write(("" if first else ",") + dumps(chunk)[1:-1])
                first = False
            bar.update(n)
        bar.close()
        f.write('],"categories":' + dumps([{"supercategory": sc, "id": i, "name": nm}
                                           for i, nm, sc in COCO_CATEGORIES]) + "}")
    os.replace(tmp, ann)
    t_json = time.perf_counter() - t0
    how = _write_images(d, recs, size_idx, progress)
    return {"images": images, "annotations": annotations, "seed": seed,
            "background_images": int((counts == 0).sum()), "max_per_image": int(counts.max()),
            "json_bytes": ann.stat().st_size, "disk_bytes": _disk_bytes(d), "image_files": how,
            "json_seconds": round(t_json, 1), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.coco_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=None, help=f"cache root (default {default_root()})")
    ap.add_argument("--images", type=int, default=COCO_TRAIN2017["images"])
    ap.add_argument("--annotations", type=int, default=COCO_TRAIN2017["annotations"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ann, img_dir = ensure_coco_sized(args.root, images=args.images, annotations=args.annotations, seed=args.seed)
    elapsed = time.perf_counter() - t0
    stats = json.loads((ann.parent.parent / MARKER).read_text())
    with open("/proc/self/status") as f:  # VmHWM, as benchmarks.common.peak_rss_mb (without importing torch)
        hwm = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), float("nan"))
    print(f"annotations: {ann}\nimages:      {img_dir}")
    print(f"counts:      {stats['images']:,} images ({stats['background_images']:,} without annotations), "
          f"{stats['annotations']:,} annotations (max {stats['max_per_image']} per image), "
          f"{len(COCO_CATEGORIES)} categories")
    print(f"JSON size:   {stats['json_bytes'] / 1e6:.1f} MB; disk used {stats['disk_bytes'] / 1e6:.1f} MB "
          f"(image files: {stats['image_files']})")
    print(f"elapsed:     {elapsed:.1f} s this call (generation took {stats['seconds']} s, "
          f"JSON {stats['json_seconds']} s); peak RSS {hwm:.0f} MiB")


if __name__ == "__main__":
    main()
