"""VisDrone2019-DET, read from the official layout and turned into COCO.

Layout (as downloaded)::

    SRC/images/<stem>.jpg
    SRC/annotations/<stem>.txt   one object per line:
        bbox_left,bbox_top,bbox_width,bbox_height,score,object_category,truncation,occlusion

A trailing comma (9 fields, the last empty) is common in the official files
and accepted; blank lines and CRLF line ends are too.

What each ground-truth line means -- the semantics of the official toolkit
(``VisDrone2018-DET-toolkit``: ``dropObjectsInIgr`` + ``evalRes``):

* ``object_category`` 0 -- an *ignored region*: class-agnostic.  Every GT box
  and detection lying >= 50% inside the union of an image's ignored regions
  is dropped before matching (see :mod:`harness.evaluate.visdrone`).
* ``object_category`` 11 -- *others*: never scored (no class to score it in).
* ``score`` 0 on a scored category 1..10 -- an *ignored GT* of that class: a
  detection of that class covering it is neither a TP nor an FP (the toolkit
  matches it by intersection / detection area, exactly COCO's crowd rule).
* categories 1..10 with score 1 -- the training and evaluation targets.

None of the ignore kinds is ever a training target.

COCO encoding written by :func:`convert_visdrone` / :func:`visdrone_to_coco`
(this is the contract :func:`harness.evaluate.visdrone.evaluate_visdrone` and
:func:`harness.data.coco.load_coco` rely on):

* category ids 1..10 = the official names, in the official order;
* a scored object: ``iscrowd 0``;
* a score-0 object of class ``c``: ``category_id c, iscrowd 1,
  "visdrone_ignore": "score0"`` -- plain COCOeval already treats it exactly
  as the official toolkit does;
* an ignored region (category 0) and an "others" box (category 11): written
  **once per scored category** (10 annotations, ``iscrowd 1``) with
  ``"visdrone_ignore": "region"`` / ``"others"`` and a shared
  ``"visdrone_region": k`` (unique per source line).  COCO tools match crowd
  boxes per class, so one copy per class makes *any* COCO tool (plain
  ``evaluate_coco`` included) ignore detections of every class there;
  ``evaluate_visdrone`` de-duplicates them by ``visdrone_region`` and applies
  the official rules instead.  ``load_coco`` puts all of them in
  ``ignore_boxes`` (never in ``boxes``), region/others boxes 10 times.

Every annotation also carries ``truncation`` and ``occlusion``.  Zero-size
boxes (a few exist in the official files) are not written; their count is in
``info["visdrone_zero_size_boxes"]``.

File pairing is strict both ways: an image without an annotation file, or an
annotation file without an image, is a :class:`DataError` (a partial download
must not be scored as if the missing objects were absent).
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from harness.core import DataError, atomic_write_json

CATEGORIES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle",
              "awning-tricycle", "bus", "motor")
SCORED_IDS = tuple(range(1, len(CATEGORIES) + 1))  # 1..10, same ids in COCO
IGNORED_REGION, OTHERS = 0, 11
FIELDS = ("bbox_left", "bbox_top", "bbox_width", "bbox_height", "score",
          "object_category", "truncation", "occlusion")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _line_error(msg: str, path: Path, lineno: int, fld: str | None = None) -> DataError:
    return DataError(msg, file=path, record=f"line {lineno}", field=fld)


def _parse_line(text: str, path: Path, lineno: int) -> dict:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == len(FIELDS) + 1 and parts[-1] == "":
        parts = parts[:-1]  # trailing comma, as in the official files
    if len(parts) != len(FIELDS):
        raise _line_error(f"expected {len(FIELDS)} comma-separated fields "
                          f"({','.join(FIELDS)}), got {len(parts)}: {text!r}",
                          path, lineno)
    vals = []
    for name, p in zip(FIELDS, parts):
        try:
            v = float(p)
        except ValueError:
            raise _line_error(f"not a number: {p!r}", path, lineno, name) from None
        if not math.isfinite(v):
            raise _line_error(f"not a finite number: {p!r}", path, lineno, name)
        vals.append(v)
    left, top, width, height, score, cat, trunc, occ = vals
    for name, v in (("bbox_width", width), ("bbox_height", height)):
        if v < 0:
            raise _line_error(f"negative size {v:g}", path, lineno, name)
    for name, v in (("score", score), ("object_category", cat),
                    ("truncation", trunc), ("occlusion", occ)):
        if v != int(v):
            raise _line_error(f"must be an integer, got {v:g}", path, lineno, name)
    cat, score = int(cat), int(score)
    if not 0 <= cat <= OTHERS:
        raise _line_error(f"unknown category {cat} (VisDrone-DET has 0..11)",
                          path, lineno, "object_category")
    if score not in (0, 1):
        raise _line_error(f"a ground-truth score must be 0 or 1, got {score} "
                          "(is this a detection results file?)", path, lineno, "score")
    if cat == IGNORED_REGION:
        kind = "region"
    elif cat == OTHERS:
        kind = "others"
    elif score == 0:
        kind = "score0"
    else:
        kind = "object"
    return {"line": lineno, "bbox": [left, top, width, height], "score": score,
            "category": cat, "truncation": int(trunc), "occlusion": int(occ),
            "kind": kind, "ignore": kind != "object"}


def parse_visdrone_annotation(path) -> list[dict]:
    """Parse one VisDrone-DET ground-truth ``.txt`` file.

    Returns one dict per object line, in file order: ``line`` (1-based),
    ``bbox`` ``[left, top, width, height]`` (floats, pixels, 0-based),
    ``score`` (0/1), ``category`` (0..11), ``truncation``, ``occlusion``,
    ``kind`` (``"object"``, ``"score0"``, ``"region"`` for category 0,
    ``"others"`` for 11) and ``ignore`` (``kind != "object"``).

    Raises:
        DataError: naming the file, ``line N`` and the field, for a wrong
            number of fields, a non-numeric field, a negative width/height,
            a category outside 0..11, a score other than 0/1, or an
            unreadable file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("annotation file not found", file=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file: {e}", file=path) from None
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            out.append(_parse_line(line.strip(), path, lineno))
    return out


def _index_images(src: Path) -> tuple[dict, dict]:
    img_dir, ann_dir = src / "images", src / "annotations"
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise DataError(f"not a VisDrone-DET folder: {d} is missing "
                            "(expected SRC/images and SRC/annotations)", file=src)
    images = {}
    for p in sorted(img_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            if p.stem in images:
                raise DataError(f"two images with stem {p.stem!r}: {images[p.stem].name} "
                                f"and {p.name}", file=img_dir)
            images[p.stem] = p
    anns = {p.stem: p for p in sorted(ann_dir.glob("*.txt")) if p.is_file()}
    for stem in sorted(set(images) - set(anns)):
        raise DataError(f"image has no annotation file {ann_dir / (stem + '.txt')}",
                        file=images[stem])
    for stem in sorted(set(anns) - set(images)):
        raise DataError(f"annotation file has no image {img_dir / stem}.jpg", file=anns[stem])
    if not images:
        raise DataError("no images found", file=img_dir)
    return images, anns


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image header: {e}", file=path) from None


def visdrone_to_coco(src) -> dict:
    """A VisDrone-DET folder as a COCO instances dict (see the module doc).

    Image ids are 1..N in sorted file-stem order; ``file_name`` is
    ``images/<name>`` relative to ``src`` (use ``src`` as the image root);
    width/height come from the image headers.
    """
    src = Path(src)
    images, anns = _index_images(src)
    out_images, out_anns, zero, region_id = [], [], 0, 0
    for image_id, stem in enumerate(sorted(images), start=1):
        w, h = _image_size(images[stem])
        out_images.append({"id": image_id, "file_name": f"images/{images[stem].name}",
                           "width": w, "height": h})
        for obj in parse_visdrone_annotation(anns[stem]):
            x, y, bw, bh = obj["bbox"]
            if bw <= 0 or bh <= 0:
                zero += 1
                continue
            base = {"image_id": image_id, "bbox": [x, y, bw, bh], "area": bw * bh,
                    "truncation": obj["truncation"], "occlusion": obj["occlusion"]}
            if obj["kind"] in ("object", "score0"):
                a = dict(base, category_id=obj["category"], iscrowd=int(obj["ignore"]))
                if obj["ignore"]:
                    a["visdrone_ignore"] = "score0"
                out_anns.append(a)
            else:
                region_id += 1
                for cid in SCORED_IDS:
                    out_anns.append(dict(base, category_id=cid, iscrowd=1,
                                         visdrone_ignore=obj["kind"],
                                         visdrone_region=region_id))
    for i, a in enumerate(out_anns, start=1):
        a["id"] = i
    return {"info": {"description": f"VisDrone2019-DET converted from {src}",
                     "visdrone_zero_size_boxes": zero},
            "licenses": [], "images": out_images, "annotations": out_anns,
            "categories": [{"id": cid, "name": n, "supercategory": "visdrone"}
                           for cid, n in zip(SCORED_IDS, CATEGORIES)]}


def convert_visdrone(src, out_json) -> Path:
    """Convert a VisDrone-DET folder to a COCO instances JSON; return its path.

    Load it with ``load_coco(out_json, image_root=src)``.  Written atomically
    (temp file + ``os.replace``): a killed conversion leaves no partial file.
    """
    return atomic_write_json(visdrone_to_coco(src), out_json)
