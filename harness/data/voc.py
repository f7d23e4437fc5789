"""Pascal VOC XML annotations (e.g. real degraded sets such as foggy RTTS) as COCO.

One ``<annotation>`` XML per image, each ``<object>`` with ``<name>``,
``<bndbox>`` (``xmin ymin xmax ymax``) and optionally ``<difficult>``.

Conventions:

* **Coordinates**: VOC pixel indices are 1-based and inclusive, so the box
  ``xmin..xmax`` covers the continuous 0-based span ``[xmin - 1, xmax]``:
  COCO ``bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``.
  Fractional coordinates (some datasets have them) are kept as floats.
* **difficult=1** -> ``iscrowd: 1``: never a training target (``load_coco``
  puts it in ``ignore_boxes``) and ignored in evaluation, as in VOC's own
  protocol (COCOeval matches crowd boxes by intersection / detection area,
  where VOC uses IoU; the effect -- neither TP nor FP -- is the same).
* **Images**: ``<filename>`` names the file in ``image_dir`` (else the XML's
  stem with a common image extension); ``file_name`` is relative to
  ``image_dir`` (use it as the image root).  Width/height are read from the
  image header -- the ``<size>`` element is wrong or zero in several real
  datasets, and the pixels are what the boxes refer to.
* **Classes**: ``class_names`` fixes the category order (ids 1..K); without
  it, the sorted set of names found.  An object whose name is not in an
  explicit ``class_names`` is a :class:`DataError`.  Names are stripped of
  surrounding whitespace.
* Image ids are 1..N in sorted XML file name order.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from harness.core import DataError, atomic_write_json
from harness.data.coco import outside_root

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
_COORDS = ("xmin", "ymin", "xmax", "ymax")


def _text(el, tag):
    child = el.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _find_image(root, xml_path: Path, image_dir: Path) -> Path:
    fn = _text(root, "filename")
    if fn:
        p = image_dir / fn
        why = outside_root(image_dir, fn)
        if why:
            raise DataError(why, file=xml_path, field="filename")
        if p.is_file():
            return p
        if not Path(fn).suffix:  # some datasets omit the extension
            for ext in IMAGE_EXTS:
                if (image_dir / (fn + ext)).is_file():
                    return image_dir / (fn + ext)
        raise DataError(f"image not found: {p}", file=xml_path, field="filename")
    for ext in IMAGE_EXTS:
        if (image_dir / (xml_path.stem + ext)).is_file():
            return image_dir / (xml_path.stem + ext)
    raise DataError(f"no <filename> and no image {xml_path.stem}.* in {image_dir}",
                    file=xml_path, field="filename")


def _parse_xml(xml_path: Path, image_dir: Path):
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise DataError(f"malformed XML at line {line} column {col}", file=xml_path) from None
    except OSError as e:
        raise DataError(f"cannot read annotation file: {e}", file=xml_path) from None
    img_path = _find_image(root, xml_path, image_dir)
    try:
        with Image.open(img_path) as im:  # header only
            width, height = im.size
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image header of {img_path}: {e}",
                        file=xml_path, field="filename") from None
    objects = []
    for n, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        rec = f"object #{n}" + (f" ({name})" if name else "")
        if not name:
            raise DataError("missing or empty <name>", file=xml_path, record=rec, field="name")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError("missing <bndbox>", file=xml_path, record=rec, field="bndbox")
        vals = []
        for c in _COORDS:
            t = _text(bnd, c)
            try:
                v = float(t)
            except (TypeError, ValueError):
                raise DataError(f"missing or non-numeric coordinate: {t!r}", file=xml_path,
                                record=rec, field=f"bndbox/{c}") from None
            if not math.isfinite(v):
                raise DataError(f"non-finite coordinate: {t!r}", file=xml_path,
                                record=rec, field=f"bndbox/{c}")
            vals.append(v)
        x1, y1, x2, y2 = vals
        for lo, hi, c in ((x1, x2, "xmax"), (y1, y2, "ymax")):
            if hi < lo - 1:  # xmax == xmin - 1 is an empty box; below that is nonsense
                raise DataError(f"{c} {hi:g} is before {'xmin' if c == 'xmax' else 'ymin'} "
                                f"{lo:g}", file=xml_path, record=rec, field=f"bndbox/{c}")
        diff = _text(obj, "difficult")
        if diff in (None, ""):
            difficult = 0
        elif diff in ("0", "1"):
            difficult = int(diff)
        else:
            raise DataError(f"must be 0 or 1, got {diff!r}", file=xml_path, record=rec,
                            field="difficult")
        objects.append((rec, name, [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], difficult))
    return img_path, width, height, objects


def voc_to_coco(xml_dir, image_dir, class_names=None) -> dict:
    """Every ``*.xml`` in ``xml_dir`` as one COCO instances dict (module doc).

    Raises:
        DataError: naming the XML file, ``object #i`` and the field, for a
            missing ``<bndbox>``/``<name>``, a missing or non-numeric
            coordinate, a bad ``<difficult>``, an unknown class name; or the
            file for malformed XML or a missing/unreadable image.
    """
    xml_dir, image_dir = Path(xml_dir), Path(image_dir)
    if not xml_dir.is_dir():
        raise DataError("annotation folder not found", file=xml_dir)
    if not image_dir.is_dir():
        raise DataError("image folder not found", file=image_dir)
    xmls = sorted(p for p in xml_dir.glob("*.xml") if p.is_file())
    if not xmls:
        raise DataError("no *.xml annotation files", file=xml_dir)
    parsed = [(p, *_parse_xml(p, image_dir)) for p in xmls]
    if class_names is None:
        class_names = sorted({o[1] for *_, objs in parsed for o in objs})
    else:
        class_names = [str(c).strip() for c in class_names]
        if len(set(class_names)) != len(class_names) or not class_names:
            raise DataError(f"class_names must be distinct and non-empty, got {class_names}",
                            field="class_names")
    cat_ids = {n: k + 1 for k, n in enumerate(class_names)}
    images, anns = [], []
    for image_id, (xml_path, img_path, w, h, objects) in enumerate(parsed, start=1):
        images.append({"id": image_id, "file_name": img_path.relative_to(image_dir).as_posix(),
                       "width": w, "height": h})
        for rec, name, bbox, difficult in objects:
            if name not in cat_ids:
                raise DataError(f"class {name!r} is not in class_names {class_names}",
                                file=xml_path, record=rec, field="name")
            anns.append({"id": len(anns) + 1, "image_id": image_id,
                         "category_id": cat_ids[name], "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": difficult})
    return {"info": {"description": f"Pascal VOC XML converted from {xml_dir}"},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": cat_ids[n], "name": n} for n in class_names]}


def write_voc_as_coco(xml_dir, image_dir, out_json, class_names=None) -> Path:
    """:func:`voc_to_coco` written atomically to ``out_json``; returns its path.

    Load it with ``load_coco(out_json, image_root=image_dir)``.
    """
    return atomic_write_json(voc_to_coco(xml_dir, image_dir, class_names), out_json)
