"""Deterministic synthetic detection data, written in the real COCO format.

Writing real COCO files (non-contiguous category ids, large sparse image ids,
``file_name`` in a subfolder) means tests, smoke runs and CI all exercise the
same loader a user's dataset goes through, instead of a side path.

Each class is a distinct filled shape with a colour from its own hue band, on
a dark, noisy background: both shape and colour carry the class, so small
detectors trained from scratch on CPU for a few minutes learn it.  Object
sizes are log-uniform from 10 px to 60% of the image, covering COCO's small
(< 32^2) and medium bands, and large (>= 96^2) when the image is big enough.
"""
from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harness.errors import ConfigError, DataError

FORMAT_VERSION = 1
SHAPES = ("square", "circle", "triangle", "cross", "diamond")
MAX_OVERLAP = 0.3  # max intersection / smaller area (stricter than IoU: no hidden objects)
MIN_SIZE = 10


def _cat_id(k: int) -> int:
    return 3 + 4 * k  # 3, 7, 11, ...: non-contiguous on purpose


def _image_id(i: int) -> int:
    return 1000 + 7 * i  # large and sparse on purpose


def _shape_mask(shape: str, w: int, h: int) -> Image.Image:
    """An 'L' mask of size (w, h) whose filled pixels are the object."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if shape == "square":
        d.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif shape == "circle":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif shape == "triangle":
        d.polygon([((w - 1) / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    elif shape == "cross":
        tw, th = max(2, w // 3), max(2, h // 3)
        d.rectangle([(w - tw) // 2, 0, (w - tw) // 2 + tw - 1, h - 1], fill=255)
        d.rectangle([0, (h - th) // 2, w - 1, (h - th) // 2 + th - 1], fill=255)
    elif shape == "diamond":
        d.polygon([((w - 1) / 2, 0), (w - 1, (h - 1) / 2), ((w - 1) / 2, h - 1),
                   (0, (h - 1) / 2)], fill=255)
    return m


def _overlap(a, b) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def _make_image(rng: np.random.Generator, size: int, max_objects: int, classes):
    """One image and its objects as (class index, tight xywh box)."""
    base = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.3))
    img = Image.new("RGB", (size, size), tuple(int(255 * c) for c in base))
    objects, n_classes = [], len(classes)
    max_size = max(MIN_SIZE + 1, int(0.6 * size))
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            s = float(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(max_size))))
            aspect = float(np.exp(rng.uniform(-0.2, 0.2)))
            w = int(min(size, max(MIN_SIZE, round(s * aspect))))
            h = int(min(size, max(MIN_SIZE, round(s / aspect))))
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            k = int(rng.integers(n_classes))
            if all(_overlap((x, y, w, h), o[1]) <= MAX_OVERLAP for o in objects):
                break
        else:
            continue  # no room for another object; fewer objects is fine
        hue = (k + rng.uniform(0.15, 0.85)) / n_classes  # class's own hue band
        rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
        mask = _shape_mask(classes[k], w, h)
        bx0, by0, bx1, by1 = mask.getbbox()  # tight box of the drawn pixels
        img.paste(tuple(int(255 * c) for c in rgb), (x, y), mask)
        objects.append((k, (x + bx0, y + by0, bx1 - bx0, by1 - by0)))
    # Mild texture: per-pixel noise over everything, objects included.
    noise = rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB"), objects


def _is_complete(out_dir: Path, params: dict) -> bool | None:
    """True: same dataset is there; False: another synthetic dataset; None: not ours."""
    ann = out_dir / "annotations.json"
    try:
        data = json.loads(ann.read_text(encoding="utf-8"))
        stored = data["info"]["detbench_synthetic"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stored != params:
        return False
    return all((out_dir / im["file_name"]).is_file() for im in data["images"])


def write_synthetic_coco(out_dir, *, n_images: int, seed: int, image_size: int = 128,
                         max_objects: int = 4,
                         classes=("square", "circle", "triangle")) -> Path:
    """Write (or reuse) a synthetic COCO dataset; return ``out_dir/annotations.json``.

    Built in a temp dir next to ``out_dir`` then renamed into place, so a
    killed run never leaves half a dataset, and concurrent writers (e.g.
    several workers) end with one complete copy.  An existing dataset with the
    same parameters (kept in ``info.detbench_synthetic``) is reused as is; a
    synthetic one with other parameters is replaced; anything else in
    ``out_dir`` is never overwritten.  Image ``i`` depends only on
    ``(seed, i)`` and the parameters: same inputs, byte-identical files.
    """
    classes = tuple(classes)
    bad = [c for c in classes if c not in SHAPES]
    if bad or not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"classes must be distinct names from {SHAPES}, got {classes}",
                          field="classes")
    for name, v, lo in (("n_images", n_images, 1), ("image_size", image_size, 32),
                        ("max_objects", max_objects, 1), ("seed", seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"must be an integer >= {lo}, got {v!r}", field=name)
    out_dir = Path(out_dir)
    params = {"version": FORMAT_VERSION, "n_images": n_images, "seed": seed,
              "image_size": image_size, "max_objects": max_objects, "classes": list(classes)}
    ann_path = out_dir / "annotations.json"
    if out_dir.exists():
        state = _is_complete(out_dir, params)
        if state:
            return ann_path
        if state is None and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise DataError("exists and is not a detbench synthetic dataset; "
                            "refusing to overwrite it", file=out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _write(tmp, params, classes)
        _install(tmp, out_dir, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ann_path


def _write(root: Path, params: dict, classes) -> None:
    (root / "images").mkdir()
    images, annotations = [], []
    size = params["image_size"]
    for i in range(params["n_images"]):
        rng = np.random.default_rng([params["seed"], i])
        img, objects = _make_image(rng, size, params["max_objects"], classes)
        fn = f"images/{i:06d}.png"
        img.save(root / fn, format="PNG", compress_level=1)  # no tIME chunk: deterministic
        images.append({"id": _image_id(i), "file_name": fn, "width": size, "height": size})
        for k, (x, y, w, h) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": _image_id(i),
                "category_id": _cat_id(k), "bbox": [float(x), float(y), float(w), float(h)],
                "area": float(w * h), "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    data = {"info": {"description": "detbench synthetic shapes",
                     "detbench_synthetic": params},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": _cat_id(k), "name": c, "supercategory": "shape"}
                           for k, c in enumerate(classes)]}
    # Written last: a directory with annotations.json is a complete dataset.
    (root / "annotations.json").write_text(json.dumps(data, indent=1), encoding="utf-8")


def _install(tmp: Path, out_dir: Path, params: dict) -> None:
    """Atomically move ``tmp`` to ``out_dir``, replacing an old synthetic set."""
    old = None
    if _is_complete(out_dir, params):  # a concurrent writer finished first
        return
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        try:
            os.replace(out_dir, old / "d")
        except FileNotFoundError:  # another writer moved it meanwhile
            pass
    try:
        os.rename(tmp, out_dir)
    except OSError:
        # Another writer installed a dataset first; fine if it is ours.
        if not _is_complete(out_dir, params):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
