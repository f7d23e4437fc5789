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
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.core import DataError, sha256_file

_NUM = (int, float)


@dataclass(frozen=True)
class ImageInfo:
    """One image record of a :class:`CocoIndex`."""
    id: int
    file_name: str
    width: int
    height: int


class ImageTable(Sequence):
    """The image records of an index, read from its arrays on access (no per-image objects)."""

    def __init__(self, ids: np.ndarray, sizes: np.ndarray, name_offsets: np.ndarray, names: np.ndarray):
        self.ids, self.sizes, self.name_offsets, self.names = ids, sizes, name_offsets, names

    def __len__(self) -> int:
        return len(self.ids)

    def file_name(self, i: int) -> str:
        return bytes(self.names[self.name_offsets[i]:self.name_offsets[i + 1]]).decode("utf-8")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        return ImageInfo(int(self.ids[i]), self.file_name(i), int(self.sizes[i, 0]), int(self.sizes[i, 1]))


#: Arrays of a saved index (``<name>.npy`` each), memory-mapped when opened.
INDEX_ARRAYS = ("image_ids", "image_sizes", "name_offsets", "names", "ann_offsets", "ann_ids", "ann_boxes",
                "ann_labels", "ann_crowd", "ann_areas", "trainable")
#: Bumped whenever the saved layout or what load_coco keeps changes (old indexes are rebuilt).
INDEX_VERSION = 1


@dataclass
class CocoIndex:
    """A validated COCO instances file as flat arrays; ``target(i)`` is ready for torchvision.

    Why arrays: at COCO's size (118k images, 860k boxes) the parsed JSON is ~3.7 GiB per
    process, held by every DDP rank and touched (so copied) by every DataLoader worker.
    These arrays are ~40 MB, saved once into the data cache (:func:`save_index`) and
    memory-mapped by every rank and loader worker (:func:`open_index`): one copy per node,
    in the page cache. Polygons are not kept (no detector here reads masks).

    Annotations are grouped by image (``ann_offsets[i]:ann_offsets[i+1]``) in file order,
    boxes clipped to the image, xyxy, float64 (the evaluation ground truth is built from them
    exactly as from the file); zero-area boxes are dropped and counted.
    """
    ann_file: Path
    image_root: Path
    class_names: list[str]
    cat_ids: list[int]               # category id of label k+1 at position k
    categories: list[dict]           # the file's category records (for COCO tools)
    info: dict
    n_dropped_boxes: int
    n_file_annotations: int          # annotations in the file (dropped ones included)
    n_file_crowd: int                # crowd annotations in the file
    arrays: dict[str, np.ndarray] = field(repr=False)

    def __post_init__(self):
        a = self.arrays
        self.images = ImageTable(a["image_ids"], a["image_sizes"], a["name_offsets"], a["names"])
        self.cat_id_to_label = {cid: k + 1 for k, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = {k + 1: cid for k, cid in enumerate(self.cat_ids)}

    def __len__(self) -> int:
        return len(self.arrays["image_ids"])

    def image_path(self, i: int) -> Path:
        return self.image_root / self.images.file_name(i)

    def aspect_ratios(self) -> np.ndarray:
        """Width / height of every image (aspect-ratio grouping)."""
        sizes = np.asarray(self.arrays["image_sizes"], np.float64)
        return sizes[:, 0] / sizes[:, 1]

    def trainable(self) -> np.ndarray:
        """Indices of the images torchvision's references keep for training
        (``_coco_remove_images_without_annotations``: at least one annotation, crowd ones
        included, and not every box with a side <= 1 pixel as written in the file)."""
        return np.flatnonzero(self.arrays["trainable"])

    def _anns(self, i: int) -> slice:
        off = self.arrays["ann_offsets"]
        return slice(int(off[i]), int(off[i + 1]))

    def target(self, i: int) -> dict:
        """Training target of image ``i``: crowd boxes only in ``ignore_boxes``."""
        a, s = self.arrays, self._anns(i)
        crowd = np.asarray(a["ann_crowd"][s])
        boxes = np.asarray(a["ann_boxes"][s], np.float32)
        return {"boxes": torch.from_numpy(boxes[~crowd]).reshape(-1, 4),
                "labels": torch.from_numpy(np.asarray(a["ann_labels"][s][~crowd], np.int64)).reshape(-1),
                "image_id": int(a["image_ids"][i]),
                "ignore_boxes": torch.from_numpy(boxes[crowd]).reshape(-1, 4)}

    def gt_for_eval(self) -> dict:
        """COCO dict for COCOeval: clipped boxes, zero-area boxes removed,
        ``area``/``iscrowd``/``id`` filled in where the file omitted them."""
        a = self.arrays
        images = [{"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height}
                  for im in self.images]
        owner = np.repeat(a["image_ids"], np.diff(a["ann_offsets"]))
        boxes = np.asarray(a["ann_boxes"], np.float64)
        anns = [{"id": int(aid), "image_id": int(iid), "category_id": self.cat_ids[int(lab) - 1],
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area), "iscrowd": int(crowd)}
                for aid, iid, lab, (x1, y1, x2, y2), area, crowd
                in zip(a["ann_ids"].tolist(), owner.tolist(), a["ann_labels"].tolist(), boxes.tolist(),
                       a["ann_areas"].tolist(), a["ann_crowd"].tolist())]
        return {"info": self.info, "images": images, "annotations": anns, "categories": self.categories}


def save_index(index: CocoIndex, folder: Path) -> Path:
    """Write ``index`` to ``folder`` (arrays + ``meta.json``), atomically: a half-written index
    is never opened (the folder appears by rename once complete)."""
    import shutil
    import socket
    import tempfile
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in folder.parent.glob(f".{folder.name}.{host}.*"):  # left by a build killed on this host
        pid = stale.name.split(".")[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{host}.{os.getpid()}.", dir=folder.parent))
    try:
        for name in INDEX_ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(index.arrays[name]))
        meta = {"version": INDEX_VERSION, "ann_file": str(index.ann_file), "class_names": index.class_names,
                "cat_ids": index.cat_ids, "categories": index.categories, "info": index.info,
                "n_dropped_boxes": index.n_dropped_boxes, "n_file_annotations": index.n_file_annotations,
                "n_file_crowd": index.n_file_crowd}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(folder)
        except OSError:  # another process saved the same index first: theirs is as good
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_index(folder: Path, image_root, ann_file=None) -> CocoIndex:
    """A saved index, its arrays memory-mapped (pages shared by every process of the node)."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("version") != INDEX_VERSION:
        raise DataError(f"index {folder} has version {meta.get('version')}, expected {INDEX_VERSION}",
                        file=folder / "meta.json", field="version")
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in INDEX_ARRAYS}
    return CocoIndex(ann_file=Path(ann_file or meta["ann_file"]), image_root=Path(image_root),
                     class_names=meta["class_names"], cat_ids=meta["cat_ids"], categories=meta["categories"],
                     info=meta["info"], n_dropped_boxes=meta["n_dropped_boxes"],
                     n_file_annotations=meta["n_file_annotations"], n_file_crowd=meta["n_file_crowd"],
                     arrays=arrays)


def cached_index(ann_file, image_root, cache_dir) -> tuple[CocoIndex, Path]:
    """The index of ``ann_file`` from ``cache_dir/index/<content digest>``, built (validated,
    :func:`load_coco`) and saved there when missing; returns it and its folder.

    Keyed by the file's sha256, so an edited file never opens an index built from its old
    version (~0.3 s for COCO's 448 MB train file)."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise _err("annotation file not found", ann_file)
    folder = Path(cache_dir) / "index" / f"{sha256_file(ann_file)[:24]}-v{INDEX_VERSION}"
    if (folder / "meta.json").is_file():
        return open_index(folder, image_root, ann_file), folder
    index = load_coco(ann_file, image_root, check_images=False)  # the images: check_image_files
    save_index(index, folder)
    return open_index(folder, image_root, ann_file), folder


def _err(msg, ann_file, record=None, fld=None):
    return DataError(msg, file=ann_file, record=record, field=fld)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an image of a folder, from the name alone (no file system call)."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return f"must be a path inside the image folder, got {name!r}"
    return None


def link_problem(root: Path, path: Path) -> str | None:
    """Why ``path`` (a link, or under a linked folder inside ``root``) leaves ``root``."""
    real_root, real = Path(os.path.realpath(root)), Path(os.path.realpath(path))
    if real_root != real and real_root not in real.parents:
        return f"{str(path.relative_to(root))!r} is a link that leaves the image folder (to {real})"
    return None


def linked_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` or a folder between it and ``root`` is a symbolic link (``root`` itself may be one)."""
    return any(p.is_symlink() for p in (path, *path.parents) if p != root and root in p.parents)


def outside_root(root: Path, name: str) -> str | None:
    """Why image ``name`` is not a file of the image folder ``root`` (``None`` when it is one).

    Decision (the same for every loader): an image path is relative, has no ``..``
    component, and -- symlinks followed -- stays inside the image folder. A dataset is
    what lies under its root; a file name that leaves it (``../x``, ``/etc/x``, a link
    to elsewhere) is refused rather than read. The image folder itself may be a link.
    """
    why = name_problem(name)
    if why:
        return why
    path = root / name
    return link_problem(root, path) if linked_inside(root, path) else None


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
    Image files are not touched here (``check_images``: only that the image folder
    exists); :func:`check_image_files` looks at every file, in parallel.
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
        why = name_problem(fn)
        if why:
            raise _err(why, ann_file, rec, "file_name")
        pos[iid] = len(images)
        images.append((iid, fn, int(im["width"]), int(im["height"])))

    per_image = [[] for _ in images]  # (id, xyxy, label, crowd, area) in file order
    small = [[0, 0] for _ in images]   # annotations, and those with a side <= 1 px (torchvision's rule)
    seen_ids, n_dropped, n_crowd = set(), 0, 0
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
        _, _, W, H = images[i]
        small[i][0] += 1
        small[i][1] += w <= 1 or h <= 1
        crowd = bool(a.get("iscrowd", 0))
        n_crowd += crowd
        x1, y1 = min(max(x, 0.0), W), min(max(y, 0.0), H)
        x2, y2 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
        if x2 <= x1 or y2 <= y1:
            n_dropped += 1
            continue
        area = a.get("area", (x2 - x1) * (y2 - y1))
        if not isinstance(area, _NUM) or isinstance(area, bool) or not math.isfinite(area):
            raise _err(f"must be a finite number, got {area!r}", ann_file, rec, "area")
        per_image[i].append((aid, (x1, y1, x2, y2), cat_id_to_label[cid], crowd, float(area)))

    if n_dropped:
        warnings.warn(f"dropped {n_dropped} zero-area boxes (after clipping to the image) "
                      f"in {ann_file}", stacklevel=2)
    anns = [r for rows in per_image for r in rows]
    names = [fn.encode("utf-8") for _, fn, _, _ in images]
    arrays = {
        "image_ids": np.array([im[0] for im in images], np.int64),
        "image_sizes": np.array([im[2:] for im in images], np.int32).reshape(-1, 2),
        "name_offsets": np.concatenate([[0], np.cumsum([len(n) for n in names], dtype=np.int64)]).astype(np.int64),
        "names": np.frombuffer(b"".join(names), np.uint8).copy(),
        "ann_offsets": np.concatenate([[0], np.cumsum([len(r) for r in per_image], dtype=np.int64)]).astype(np.int64),
        "ann_ids": np.array([r[0] for r in anns], np.int64),
        "ann_boxes": np.array([r[1] for r in anns], np.float64).reshape(-1, 4),
        "ann_labels": np.array([r[2] for r in anns], np.int32),
        "ann_crowd": np.array([r[3] for r in anns], bool),
        "ann_areas": np.array([r[4] for r in anns], np.float64),
        "trainable": np.array([n > 0 and k < n for n, k in small], bool),
    }
    return CocoIndex(ann_file=ann_file, image_root=image_root, class_names=[cats[c] for c in cat_ids],
                     cat_ids=cat_ids, categories=data["categories"], info=data.get("info", {}),
                     n_dropped_boxes=n_dropped, n_file_annotations=len(data["annotations"]), n_file_crowd=n_crowd,
                     arrays=arrays)


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
    if tuple(size) != (info.width, info.height):
        raise DataError(f"image {index.image_path(i)} is {size[0]}x{size[1]} but the "
                        f"annotation says {info.width}x{info.height}",
                        file=index.ann_file, record=f"image id={info.id}", field="width")


_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec (not in the lock: it
# needs FFmpeg); they are libjpeg-turbo / libpng, the same pixels as PIL (tests/test_ingest.py).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def read_image(path: Path) -> torch.Tensor:
    """An image as ``[3,H,W]``: uint8 for 8-bit RGB / grey JPEG and RGB PNG (libjpeg-turbo /
    libpng through ``torchvision.io``, the same pixels as PIL), else float32 in [0,1] by
    :func:`load_rgb`'s rules (alpha composited on black, 16-bit scaled).

    Why uint8: the loader workers hand the GPU a quarter of the bytes of float32, pinned,
    and the conversion to float runs on the device (:func:`image_to_float`).
    """
    from torchvision.io import ImageReadMode, decode_image
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(_JPEG) or data.startswith(_PNG):
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data.startswith(_JPEG):
            return decode_image(raw, mode=ImageReadMode.RGB)
        image = decode_image(raw, mode=ImageReadMode.UNCHANGED)
        if image.dtype == torch.uint8 and image.shape[0] == 3 and b"tRNS" not in data[:data.find(b"IDAT")]:
            return image
    import io
    return load_rgb(io.BytesIO(data))


def image_to_float(image: torch.Tensor) -> torch.Tensor:
    """A :func:`read_image` image as float32 in [0,1] (on whatever device it is)."""
    return image.float().div_(255) if image.dtype == torch.uint8 else image


class CocoDetection(torch.utils.data.Dataset):
    """``(image [3,H,W], target)`` pairs of a :class:`CocoIndex`; images as :func:`read_image`
    gives them (uint8, or float for 16-bit / alpha images).

    ``flip_seed``: each image is flipped horizontally with probability 1/2, decided by
    ``(flip_seed, epoch, i)`` alone (the same whichever loader worker reads it); boxes and
    ignore boxes are flipped with it (``schedule.augment: [hflip]``, torchvision references'
    ``RandomHorizontalFlip(0.5)``). An image whose pixel size differs from the JSON
    ``width``/``height`` raises DataError: the boxes would not refer to its pixels.
    """

    def __init__(self, index: CocoIndex, transform=None, *, flip_seed: int | None = None,
                 items: Sequence[int] | None = None):
        self.index = index
        self.transform = transform
        self.flip_seed = flip_seed
        self.items = items  # image indices in use (None: all), e.g. torchvision's trainable images
        self.epoch = SharedEpoch()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.index) if self.items is None else len(self.items)

    def image_index(self, i: int) -> int:
        return i if self.items is None else int(self.items[i])

    def image_path(self, i: int) -> Path:
        return self.index.image_path(self.image_index(i))

    def aspect_ratios(self) -> np.ndarray:
        """Width / height of every item (aspect-ratio grouping)."""
        ratios = self.index.aspect_ratios()
        return ratios if self.items is None else ratios[self.items]

    def flipped(self, i: int) -> bool:
        if self.flip_seed is None:
            return False
        rng = np.random.default_rng([self.flip_seed & (2 ** 63 - 1), self.epoch.get(), int(i), 0xF11B])
        return bool(rng.random() < 0.5)

    def __getitem__(self, i: int):
        k = self.image_index(i)
        info = self.index.images[k]
        path = self.index.image_root / info.file_name
        try:
            image = read_image(path)
        except (OSError, ValueError, RuntimeError) as e:
            raise DataError(f"cannot read image {path}: {e}", file=self.index.ann_file,
                            record=f"image id={info.id}", field="file_name") from None
        _check_size(self.index, k, (image.shape[2], image.shape[1]))
        target = self.index.target(k)
        if self.flipped(i):
            image = image.flip(-1)
            target["boxes"] = hflip_boxes(target["boxes"], info.width)
            target["ignore_boxes"] = hflip_boxes(target["ignore_boxes"], info.width)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """xyxy boxes of an image of ``width`` mirrored left-right: ``width - x2, y1, width - x1, y2``."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1) \
        if len(boxes) else boxes


class SharedEpoch:
    """The epoch number in shared memory: ``set`` in the training process is seen by persistent
    DataLoader workers (which hold a copy of the dataset made when they started), so per-sample
    randomness keyed by ``(seed, epoch, i)`` changes every epoch without restarting them."""

    def __init__(self):
        self.value = torch.zeros((), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self.value.fill_(int(epoch))

    def get(self) -> int:
        return int(self.value)


#: ``--check-images`` / ``check_images`` levels: nothing; the header (size, format, structure,
#: with the file's existence); a full decode (finds truncated JPEGs, which a header check cannot).
CHECK_LEVELS = ("none", "header", "decode")


def _image_problem(index: CocoIndex, i: int, level: str, linked_dirs: set) -> DataError | None:
    path, info = index.image_path(i), index.images[i]
    where = dict(file=index.ann_file, record=f"image id={info.id}", field="file_name")
    try:
        st = os.lstat(path)  # the one metadata call: exists, is a file, is it a link
    except OSError:
        return DataError(f"image file not found: {path}", **where)
    if stat.S_ISLNK(st.st_mode) or path.parent in linked_dirs:
        why = link_problem(index.image_root, path)
        if why:
            return DataError(why, **where)
    elif not stat.S_ISREG(st.st_mode):
        return DataError(f"image file not found: {path} is not a file", **where)
    try:
        if level == "decode":
            size = tuple(read_image(path).shape[:0:-1])
        else:
            with Image.open(path) as img:  # reads the header: size and format
                size = img.size
                img.verify()               # file structure (PNG chunk CRCs, ...) without decoding pixels
    except Exception as e:  # PIL / libjpeg raise many types for empty, truncated or foreign files
        return DataError(f"unreadable image {path}: {e}", **where)
    try:
        _check_size(index, i, size)
    except DataError as err:
        return err
    return None


def _linked_dirs(index: CocoIndex, items: range) -> set:
    """Folders of the images that are (or lie under) links inside the image root: checked once
    per folder, not once per image."""
    root = index.image_root
    return {d for d in {index.image_path(i).parent for i in items} if linked_inside(root, d)}


def check_image_files(index: CocoIndex, *, level: str = "header", progress: bool = False,
                      workers: int | None = None, items: range | None = None) -> float:
    """Every image of ``index``: present, inside the image folder, readable at ``level``
    (:data:`CHECK_LEVELS`) and of the size its record says.

    The one image check of the project: ``detbench data check`` and every command that
    runs a suite call it, so a zero-byte or undecodable image is refused before any
    run directory exists. One ``lstat`` and one read per image, from a thread pool (the work
    is I/O, and decoding releases the GIL); the first problem in file order is raised.
    ``items``: only these images (a chunk of a check spread over a cluster).
    Returns the seconds it took.
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm
    if level not in CHECK_LEVELS:
        raise ValueError(f"check level {level!r}: one of {', '.join(CHECK_LEVELS)}")
    t0 = time.perf_counter()
    if level == "none":
        return 0.0
    if not index.image_root.is_dir():
        raise _err(f"image root {index.image_root} is not a directory", index.ann_file)
    items = range(len(index)) if items is None else items
    linked = _linked_dirs(index, items)
    pool = ThreadPoolExecutor(max_workers=workers or (16 if level == "header" else os.cpu_count() or 1))
    try:
        problems = pool.map(lambda i: _image_problem(index, i, level, linked), items, chunksize=256)
        for problem in tqdm(problems, total=len(items), desc=f"checking {index.ann_file.name}", unit="img",
                            disable=not progress or len(items) < 2000, leave=False):
            if problem is not None:
                raise problem
    finally:
        pool.shutdown(cancel_futures=True)
    return time.perf_counter() - t0


def check_coco(ann_file, image_root, *, level: str = "header") -> dict:
    """Validate annotations and every image (see :func:`check_image_files`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_coco(ann_file, image_root, check_images=True)
    seconds = check_image_files(index, level=level)
    a = index.arrays
    owner = np.repeat(np.arange(len(index)), np.diff(a["ann_offsets"]))
    boxes_per_image = np.bincount(owner[~np.asarray(a["ann_crowd"])], minlength=len(index))
    return {"images": len(index), "annotations": index.n_file_annotations,
            "categories": len(index.class_names), "class_names": list(index.class_names),
            "crowd": index.n_file_crowd,
            "boxes": int((~np.asarray(a["ann_crowd"])).sum()),
            "dropped_boxes": index.n_dropped_boxes,
            "background_images": int((boxes_per_image == 0).sum()),
            "trainable_images": int(np.asarray(a["trainable"]).sum()),
            "check_level": level, "check_seconds": round(seconds, 2)}


def collate_detection(batch):
    """DataLoader collate: images differ in size, so keep lists, don't stack."""
    return [b[0] for b in batch], [b[1] for b in batch]
