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

from harness.core import ConfigError, DataError

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
    _materialise(out_dir, params, _is_complete, lambda tmp: _write(tmp, params, classes))
    return out_dir / "annotations.json"


def _materialise(out_dir: Path, params: dict, is_complete, write) -> None:
    """Reuse a complete dataset of the same parameters, else build it in a temp folder and install it."""
    if out_dir.exists():
        state = is_complete(out_dir, params)
        if state:
            return
        if state is None and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise DataError("exists and is not a detbench synthetic dataset; "
                            "refusing to overwrite it", file=out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        write(tmp)
        _install(tmp, out_dir, params, is_complete=is_complete)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _install(tmp: Path, out_dir: Path, params: dict, is_complete=None) -> None:
    """Atomically move ``tmp`` to ``out_dir``, replacing an old synthetic set."""
    done = is_complete or _is_complete
    old = None
    if done(out_dir, params):  # a concurrent writer finished first
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
        if not done(out_dir, params):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------
# VisDrone-DET format: dense small objects, ignore regions and every quirk of
# the official text files, so tests exercise the real parser and protocol.
# --------------------------------------------------------------------------
VISDRONE_FORMAT_VERSION = 1
VISDRONE_MARKER = "detbench_synthetic.json"  # written last: its presence = complete
VISDRONE_N_CLASSES = 10  # categories 1..10 scored; 0 = ignored region, 11 = others
VISDRONE_OBJECT_SIZE = (6, 24)


def _visdrone_image(rng: np.random.Generator, width: int, height: int,
                    min_objects: int, max_objects: int):
    """One image and its annotation lines (as tuples of ints, file order)."""
    base = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.15, 0.3))
    img = Image.new("RGB", (width, height), tuple(int(255 * c) for c in base))
    draw = ImageDraw.Draw(img)
    lines, placed = [], []  # placed: xywh of every region and object (no overlaps)

    def free_box(lo, hi):
        for _attempt in range(30):
            w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            w, h = min(w, width), min(h, height)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if all(_overlap((x, y, w, h), p) <= 0 for p in placed):
                placed.append((x, y, w, h))
                return x, y, w, h
        return None

    def hue_rgb(k, sat=(0.6, 1.0)):
        hue = (k + rng.uniform(0.15, 0.85)) / VISDRONE_N_CLASSES
        rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(*sat), rng.uniform(0.75, 1.0))
        return tuple(int(255 * c) for c in rgb)

    # Ignored regions (category 0, score 0): a grey patch full of unannotated
    # object-like clutter, like the crowds and car parks of the real set.
    lo_r, hi_r = 16, max(17, min(64, width // 3, height // 3))
    for _ in range(int(rng.integers(1, 3))):
        box = free_box(lo_r, hi_r)
        if box is None:
            continue
        x, y, w, h = box
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(90, 90, 90))
        for _c in range(int(rng.integers(2, 6))):
            s = int(rng.integers(3, 9))
            cx = x + int(rng.integers(0, max(1, w - s)))
            cy = y + int(rng.integers(0, max(1, h - s)))
            draw.rectangle([cx, cy, min(cx + s, x + w) - 1, min(cy + s, y + h) - 1],
                           fill=hue_rgb(int(rng.integers(VISDRONE_N_CLASSES))))
        lines.append((x, y, w, h, 0, 0, 0, 0))

    n = int(rng.integers(min_objects, max_objects + 1))
    for j in range(n):
        box = free_box(*VISDRONE_OBJECT_SIZE)
        if box is None:
            continue  # image full; fewer objects is fine
        x, y, w, h = box
        k = int(rng.integers(VISDRONE_N_CLASSES))
        u = rng.random()
        kind = "others" if j == 0 or u < 0.05 else "score0" if j == 1 or u < 0.1 else "object"
        if kind == "others":  # category 11: real objects of no scored class, greyish
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=hue_rgb(k, sat=(0.0, 0.15)))
            lines.append((x, y, w, h, 1, 11, 0, int(rng.integers(0, 3))))
            continue
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=hue_rgb(k))
        trunc = int(x == 0 or y == 0 or x + w == width or y + h == height)
        lines.append((x, y, w, h, 0 if kind == "score0" else 1, k + 1, trunc,
                      int(rng.integers(0, 3))))
    order = rng.permutation(len(lines))
    lines = [lines[i] for i in order]
    noise = rng.integers(-10, 11, size=(height, width, 3), dtype=np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB"), lines


def _visdrone_complete(out_dir: Path, params: dict) -> bool | None:
    """True: same dataset is there; False: another synthetic one; None: not ours."""
    try:
        marker = json.loads((out_dir / VISDRONE_MARKER).read_text(encoding="utf-8"))
        stored, stems = marker["detbench_synthetic_visdrone"], marker["stems"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stored != params:
        return False
    return all((out_dir / "images" / f"{s}.jpg").is_file()
               and (out_dir / "annotations" / f"{s}.txt").is_file() for s in stems)


def write_synthetic_visdrone(out_dir, *, n_images: int, seed: int,
                             image_size: int | tuple[int, int] = 256,
                             min_objects: int = 5, max_objects: int = 30) -> Path:
    """Write (or reuse) a synthetic VisDrone2019-DET folder; return ``out_dir``.

    ``out_dir/images/<stem>.jpg`` (JPEG quality 95) and
    ``out_dir/annotations/<stem>.txt`` in the official format, read by
    :func:`harness.data.visdrone.convert_visdrone` like the real set.  Each
    image (``image_size`` = side, or ``(width, height)``) has ``min_objects``
    to ``max_objects`` small boxes (6-24 px) of classes 1..10 (class = hue
    band, like :func:`write_synthetic_coco`), at least one "others" box
    (category 11, greyish) and one score-0 box, 1-2 ignored regions
    (category 0: grey patches of unannotated object-like clutter, which no
    annotated box overlaps) and a trailing comma on about half the lines.
    Deterministic (image ``i`` depends on ``(seed, i)`` and the parameters),
    atomic and reused exactly like :func:`write_synthetic_coco`; the
    parameters live in ``out_dir/detbench_synthetic.json``.
    """
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        width = height = image_size
    elif (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)):
        width, height = image_size
    else:
        raise ConfigError(f"must be an integer or (width, height), got {image_size!r}",
                          field="image_size")
    for name, v, lo in (("n_images", n_images, 1), ("width", width, 64),
                        ("height", height, 64), ("min_objects", min_objects, 0),
                        ("max_objects", max_objects, 2), ("seed", seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"must be an integer >= {lo}, got {v!r}",
                              field="image_size" if name in ("width", "height") else name)
    if min_objects > max_objects:
        raise ConfigError(f"min_objects {min_objects} > max_objects {max_objects}",
                          field="min_objects")
    out_dir = Path(out_dir)
    params = {"version": VISDRONE_FORMAT_VERSION, "n_images": n_images, "seed": seed,
              "width": width, "height": height, "min_objects": min_objects,
              "max_objects": max_objects}
    _materialise(out_dir, params, _visdrone_complete, lambda tmp: _write_visdrone(tmp, params))
    return out_dir


def _write_visdrone(root: Path, params: dict) -> None:
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    stems = []
    for i in range(params["n_images"]):
        rng = np.random.default_rng([params["seed"], i, 7])
        img, lines = _visdrone_image(rng, params["width"], params["height"],
                                     params["min_objects"], params["max_objects"])
        stem = f"{i + 1:07d}_00000_d_{i + 1:07d}"  # the official naming pattern
        img.save(root / "images" / f"{stem}.jpg", format="JPEG", quality=95)
        comma = rng.random(len(lines)) < 0.5
        if len(lines) >= 2:
            comma[0], comma[1] = True, False  # both styles in every file
        text = "".join(",".join(str(v) for v in ln) + ("," if c else "") + "\n"
                       for ln, c in zip(lines, comma))
        (root / "annotations" / f"{stem}.txt").write_text(text, encoding="utf-8")
        stems.append(stem)
    (root / VISDRONE_MARKER).write_text(
        json.dumps({"detbench_synthetic_visdrone": params, "stems": stems}, indent=1),
        encoding="utf-8")
