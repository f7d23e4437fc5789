"""COCO-format detection data, as real COCO users have it.

Real instances files have arbitrary (large, sparse) image ids, non-contiguous
category ids, ``file_name`` values with subfolders, crowd regions, boxes that
stick out of the image and degenerate boxes.  torchvision detectors want
contiguous labels ``1..K`` (0 is background) and clean xyxy boxes, so this
module validates the file once, up front, and turns every problem into a
:class:`DataError` naming file, record and field -- a bad dataset must fail at
load time with a fixable message, not hours into a run with a traceback.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.core import DataError

_NUM = (int, float)


@dataclass
class CocoIndex:
    """A validated COCO instances file; ``target(i)`` is ready for torchvision.

    ``gt`` is the file exactly as loaded (for COCO tools, which handle
    ``iscrowd`` themselves); :meth:`gt_for_eval` is the same data with the
    boxes cleaned like the training targets.
    """
    ann_file: Path
    image_root: Path
    images: list[dict]
    class_names: list[str]
    cat_id_to_label: dict[int, int]
    label_to_cat_id: dict[int, int]
    n_dropped_boxes: int
    gt: dict = field(repr=False)
    _boxes: list = field(default_factory=list, repr=False)    # per image [n,4]
    _labels: list = field(default_factory=list, repr=False)   # per image [n]
    _ignore: list = field(default_factory=list, repr=False)   # per image [m,4]
    _clean_anns: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, i: int) -> Path:
        return self.image_root / self.images[i]["file_name"]

    def target(self, i: int) -> dict:
        """Training target of image ``i``: crowd boxes only in ``ignore_boxes``."""
        return {"boxes": torch.tensor(self._boxes[i], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(self._labels[i], dtype=torch.int64).reshape(-1),
                "image_id": int(self.images[i]["id"]),
                "ignore_boxes": torch.tensor(self._ignore[i], dtype=torch.float32).reshape(-1, 4)}

    def gt_for_eval(self) -> dict:
        """COCO dict for COCOeval: clipped boxes, zero-area boxes removed,
        ``area``/``iscrowd``/``id`` filled in where the file omitted them."""
        return {"info": self.gt.get("info", {}), "images": self.images,
                "annotations": self._clean_anns, "categories": self.gt["categories"]}


def _err(msg, ann_file, record=None, fld=None):
    return DataError(msg, file=ann_file, record=record, field=fld)


def outside_root(root: Path, name: str) -> str | None:
    """Why image ``name`` is not a file of the image folder ``root`` (``None`` when it is one).

    Decision (the same for every loader): an image path is relative, has no ``..``
    component, and -- symlinks followed -- stays inside the image folder. A dataset is
    what lies under its root; a file name that leaves it (``../x``, ``/etc/x``, a link
    to elsewhere) is refused rather than read. The image folder itself may be a link.
    """
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return f"must be a path inside the image folder, got {name!r}"
    path = root / name
    if path.is_symlink() or any(p.is_symlink() for p in path.parents if p != root and root in p.parents):
        real_root, real = Path(os.path.realpath(root)), Path(os.path.realpath(path))
        if real_root != real and real_root not in real.parents:
            return f"{name!r} is a link that leaves the image folder (to {real})"
    return None

def _read_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise _err("annotation file not found", ann_file)
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise _err(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
                   ann_file) from None
    except (UnicodeDecodeError, OSError) as e:
        raise _err(f"cannot read annotation file: {e}", ann_file) from None
    if not isinstance(data, dict):
        raise _err("top level must be a JSON object with 'images', 'annotations', "
                   "'categories'", ann_file)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise _err(f"missing top-level key '{key}'", ann_file, fld=key)
        if not isinstance(data[key], list):
            raise _err(f"'{key}' must be a list", ann_file, fld=key)
    return data


def _int_id(rec, key, ann_file, record):
    v = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(v, int) or isinstance(v, bool):
        raise _err(f"must be an integer, got {v!r}", ann_file, record, key)
    return v


def load_coco(ann_file, image_root, *, check_images: bool = True) -> CocoIndex:
    """Load and validate a COCO instances file.

    Labels are ``1..K`` in order of ascending category id.  Crowd boxes go to
    ``ignore_boxes`` only.  Boxes are clipped to the image; boxes with zero
    area after clipping are dropped and counted (one warning per file).
    """
    ann_file, image_root = Path(ann_file), Path(image_root)
    data = _read_json(ann_file)
    if check_images and not image_root.is_dir():
        raise _err(f"image root {image_root} is not a directory", ann_file)

    cats = {}
    for c in data["categories"]:
        cid = _int_id(c, "id", ann_file, "category")
        rec = f"category id={cid}"
        if cid in cats:
            raise _err("duplicate category id", ann_file, rec, "id")
        if not isinstance(c.get("name"), str):
            raise _err("missing or non-string name", ann_file, rec, "name")
        cats[cid] = c["name"]
    if not cats:
        raise _err("no categories defined", ann_file, fld="categories")
    cat_ids = sorted(cats)
    cat_id_to_label = {cid: k + 1 for k, cid in enumerate(cat_ids)}
    label_to_cat_id = {k: cid for cid, k in cat_id_to_label.items()}

    images, pos = [], {}
    for im in data["images"]:
        iid = _int_id(im, "id", ann_file, "image")
        rec = f"image id={iid}"
        if iid in pos:
            raise _err("duplicate image id", ann_file, rec, "id")
        fn = im.get("file_name")
        if not isinstance(fn, str) or not fn:
            raise _err("missing or empty file_name", ann_file, rec, "file_name")
        for key in ("width", "height"):
            v = im.get(key)
            if not isinstance(v, _NUM) or isinstance(v, bool) or not v >= 1:
                raise _err(f"must be a positive number, got {v!r}", ann_file, rec, key)
        why = outside_root(image_root, fn)
        if why:
            raise _err(why, ann_file, rec, "file_name")
        if check_images and not (image_root / fn).is_file():
            raise _err(f"image file not found: {image_root / fn}", ann_file, rec, "file_name")
        pos[iid] = len(images)
        images.append({"id": iid, "file_name": fn,
                       "width": int(im["width"]), "height": int(im["height"])})

    boxes, labels, ignore = ([[] for _ in images] for _ in range(3))
    clean, seen_ids, n_dropped = [], set(), 0
    next_id = 1 + max([a.get("id") for a in data["annotations"] if isinstance(a, dict)
                       and isinstance(a.get("id"), int)] or [0])
    for n, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise _err("annotation must be an object", ann_file, f"annotation #{n}")
        aid = a.get("id")
        rec = f"annotation id={aid}" if aid is not None else f"annotation #{n} (no id)"
        if aid is not None:
            if aid in seen_ids:
                raise _err("duplicate annotation id", ann_file, rec, "id")
            seen_ids.add(aid)
        else:
            aid, next_id = next_id, next_id + 1
        iid = a.get("image_id")
        if not isinstance(iid, int) or isinstance(iid, bool) or iid not in pos:
            raise _err(f"refers to unknown image id {iid!r}", ann_file, rec, "image_id")
        cid = a.get("category_id")
        if not isinstance(cid, int) or isinstance(cid, bool) or cid not in cat_id_to_label:
            known = cat_ids if len(cat_ids) <= 20 else f"{cat_ids[0]}..{cat_ids[-1]}"
            raise _err(f"unknown category id {cid!r} (known: {known})",
                       ann_file, rec, "category_id")
        bb = a.get("bbox")
        if (not isinstance(bb, list) or len(bb) != 4
                or not all(isinstance(v, _NUM) and not isinstance(v, bool)
                           and math.isfinite(v) for v in bb)):
            raise _err(f"must be 4 finite numbers [x, y, w, h], got {bb!r}", ann_file, rec, "bbox")
        x, y, w, h = (float(v) for v in bb)
        if w < 0 or h < 0:
            raise _err(f"negative width/height in {bb!r}", ann_file, rec, "bbox")
        i = pos[iid]
        W, H = images[i]["width"], images[i]["height"]
        x1, y1 = min(max(x, 0.0), W), min(max(y, 0.0), H)
        x2, y2 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
        if x2 <= x1 or y2 <= y1:
            n_dropped += 1
            continue
        crowd = bool(a.get("iscrowd", 0))
        (ignore if crowd else boxes)[i].append([x1, y1, x2, y2])
        labels[i] += [] if crowd else [cat_id_to_label[cid]]
        ca = dict(a, id=aid, bbox=[x1, y1, x2 - x1, y2 - y1], iscrowd=int(crowd))
        ca.setdefault("area", (x2 - x1) * (y2 - y1))
        clean.append(ca)

    if n_dropped:
        warnings.warn(f"dropped {n_dropped} zero-area boxes (after clipping to the image) "
                      f"in {ann_file}", stacklevel=2)
    return CocoIndex(
        ann_file=ann_file, image_root=image_root, images=images,
        class_names=[cats[c] for c in cat_ids], cat_id_to_label=cat_id_to_label,
        label_to_cat_id=label_to_cat_id, n_dropped_boxes=n_dropped, gt=data,
        _boxes=[np.asarray(b, np.float32).reshape(-1, 4) for b in boxes],
        _labels=[np.asarray(lb, np.int64) for lb in labels],
        _ignore=[np.asarray(b, np.float32).reshape(-1, 4) for b in ignore],
        _clean_anns=clean)


def load_rgb(path: Path) -> torch.Tensor:
    """Open any image as float32 ``[3,H,W]`` in ``[0,1]``, always RGB.

    * Images with alpha (RGBA, LA, P/PA with transparency) are composited on
      black (colour multiplied by alpha): what lies under transparent pixels
      is arbitrary, black is a deterministic choice.
    * 16-bit greyscale (``I;16*``) is scaled by 65535; 32-bit ``I``/``F`` by
      255 when its values fit 0..255, else by 65535 (or its max) -- PIL's own
      ``convert("RGB")`` would clip these to 255 and whiten the image.
    * EXIF orientation is NOT applied: COCO boxes refer to the stored pixels.
    """
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode.startswith("I") or mode == "F":
            a = np.asarray(img, dtype=np.float64)
            scale = 65535.0 if mode.startswith("I;16") else (
                255.0 if a.max(initial=0) <= 255 else max(65535.0, float(a.max())))
            g = torch.from_numpy(np.clip(a / scale, 0, 1).astype(np.float32))
            return g.unsqueeze(0).expand(3, -1, -1).contiguous()
        if mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            rgb = rgba[..., :3] * rgba[..., 3:4]
        else:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _check_size(index: CocoIndex, i: int, size) -> None:
    info = index.images[i]
    if tuple(size) != (info["width"], info["height"]):
        raise DataError(f"image {index.image_path(i)} is {size[0]}x{size[1]} but the "
                        f"annotation says {info['width']}x{info['height']}",
                        file=index.ann_file, record=f"image id={info['id']}", field="width")


class CocoDetection(torch.utils.data.Dataset):
    """``(image [3,H,W] float RGB in [0,1], target)`` pairs of a :class:`CocoIndex`.

    See :func:`load_rgb` for how non-RGB images are converted.  An image whose
    pixel size differs from the JSON ``width``/``height`` raises DataError:
    the boxes would not refer to its pixels.
    """

    def __init__(self, index: CocoIndex, transform=None):
        self.index = index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        info = self.index.images[i]
        path = self.index.image_path(i)
        try:
            image = load_rgb(path)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}", file=self.index.ann_file,
                            record=f"image id={info['id']}", field="file_name") from None
        _check_size(self.index, i, (image.shape[2], image.shape[1]))
        target = self.index.target(i)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def _image_problem(index: CocoIndex, i: int) -> DataError | None:
    path, info = index.image_path(i), index.images[i]
    try:
        with Image.open(path) as img:  # reads the header: size and format
            size = img.size
            img.verify()               # file structure (PNG chunk CRCs, ...) without decoding pixels
    except Exception as e:  # PIL raises many types for empty, truncated or foreign files
        return DataError(f"unreadable image {path}: {e}", file=index.ann_file,
                         record=f"image id={info['id']}", field="file_name")
    try:
        _check_size(index, i, size)
    except DataError as err:
        return err
    return None


def check_image_files(index: CocoIndex, *, progress: bool = False) -> float:
    """Open every image of ``index`` (header + structure, no pixel decoding) and check its size.

    The one image check of the project: ``detbench data check`` and every command that
    runs a suite call it, so a zero-byte or undecodable image is refused before any
    run directory exists. Files are read by a thread pool (the work is I/O); the first
    problem in file order is raised. Returns the seconds it took.
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        problems = pool.map(lambda i: _image_problem(index, i), range(len(index)), chunksize=64)
        for problem in tqdm(problems, total=len(index), desc=f"checking {index.ann_file.name}", unit="img",
                            disable=not progress or len(index) < 2000, leave=False):
            if problem is not None:
                raise problem
    finally:
        pool.shutdown(cancel_futures=True)
    return time.perf_counter() - t0


def check_coco(ann_file, image_root) -> dict:
    """Validate annotations and open every image (see :func:`check_image_files`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_coco(ann_file, image_root, check_images=True)
    seconds = check_image_files(index)
    anns = index.gt["annotations"]
    return {"images": len(index), "annotations": len(anns),
            "categories": len(index.class_names), "class_names": list(index.class_names),
            "crowd": sum(1 for a in anns if a.get("iscrowd")),
            "boxes": int(sum(len(b) for b in index._boxes)),
            "dropped_boxes": index.n_dropped_boxes,
            "background_images": sum(1 for b in index._boxes if len(b) == 0),
            "check_seconds": round(seconds, 2)}


def collate_detection(batch):
    """DataLoader collate: images differ in size, so keep lists, don't stack."""
    return [b[0] for b in batch], [b[1] for b in batch]
