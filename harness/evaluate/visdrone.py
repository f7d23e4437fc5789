"""VisDrone2019-DET box AP: the official protocol, scored by the COCO machinery.

The official toolkit (``VisDrone2018-DET-toolkit``, MATLAB and its Python
port) differs from plain COCOeval in three places; :func:`evaluate_visdrone`
applies them to the inputs and then lets COCOeval do the matching (the same
backends as :func:`harness.evaluate.coco.evaluate_coco`):

1. **Ignored regions** (category 0) are class-agnostic: a GT box or a
   detection whose area lies >= 50% inside the union of its image's ignored
   regions (intersection area / own box area, overlapping regions counted
   once) is dropped before matching.
2. **Others** (category 11) are never scored: "others" GT boxes are removed,
   and detections of a category that is not one of the GT's categories
   (11, 0, anything unknown) are dropped *before* the per-image cap, so they
   change nothing.
3. **Per-image cap**: only the ``max_dets`` highest-scoring detections of an
   image, all classes together, are counted (COCOeval's own ``maxDets`` is
   per image *and class*).  AP@[.5:.95] is read at ``max_dets`` (500).

Score-0 GT stay ``iscrowd`` boxes of their class: COCOeval's crowd rule
(matched by intersection / detection area, any number of detections, neither
TP nor FP) is exactly the toolkit's rule for ignored GT.

``AP_maxdets100`` is the same evaluation read at COCOeval's maxDets=100
(per image and class, after the rules above): the number papers that used
plain pycocotools report.  Known, deliberate differences from the toolkit:
AP is COCO's 101-point interpolated precision (the toolkit integrates VOC
style), the toolkit counts score-0 GT in its recall denominator, and it
tests coverage on a rounded integer pixel grid where we use exact geometry.
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.data import visdrone_to_coco
from harness.evaluate.coco import METRIC_KEYS, _check_detections, _coco_api, _coco_pair, _load_gt, _summarize

IGNORE_COVERAGE = 0.5
VISDRONE_METRIC_KEYS = METRIC_KEYS + ("AP_maxdets100",)


def _xyxy(bboxes) -> np.ndarray:
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def union_strips(rects: np.ndarray) -> np.ndarray:
    """Disjoint xyxy rectangles whose union is the union of ``rects`` [k, 4]."""
    rects = rects[(rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])]
    if not len(rects):
        return np.zeros((0, 4))
    xs, ys = np.unique(rects[:, [0, 2]]), np.unique(rects[:, [1, 3]])
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    r = rects[:, :, None, None]
    covered = ((r[:, 0] <= cx[None, None, :]) & (cx[None, None, :] < r[:, 2])
               & (r[:, 1] <= cy[None, :, None]) & (cy[None, :, None] < r[:, 3])).any(0)
    strips = []
    for j in range(len(cy)):  # merge covered cells of a row into runs
        d = np.diff(np.concatenate([[0], covered[j].astype(np.int8), [0]]))
        for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
            strips.append((xs[s], ys[j], xs[e], ys[j + 1]))
    return np.asarray(strips, dtype=np.float64).reshape(-1, 4)


def coverage(boxes: np.ndarray, strips: np.ndarray) -> np.ndarray:
    """Fraction of each xyxy box [n, 4] lying inside disjoint ``strips`` [m, 4]."""
    if not len(boxes) or not len(strips):
        return np.zeros(len(boxes))
    b, s = boxes[:, None, :], strips[None, :, :]
    iw = np.clip(np.minimum(b[..., 2], s[..., 2]) - np.maximum(b[..., 0], s[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], s[..., 3]) - np.maximum(b[..., 1], s[..., 1]), 0, None)
    inter = (iw * ih).sum(1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.where(area > 0, inter / np.where(area > 0, area, 1.0), 0.0)


def _load(gt) -> dict:
    if isinstance(gt, (str, Path)) and Path(gt).is_dir():
        return visdrone_to_coco(gt)
    return _load_gt(gt)  # private deep copy of a dict, or the JSON file


def apply_visdrone_protocol(data: dict, detections: list[dict],
                            max_dets: int) -> tuple[dict, list[dict]]:
    """(GT, detections) after rules 1-3 of the module doc; inputs untouched."""
    regions, kept = defaultdict(dict), []
    for a in data["annotations"]:
        kind = a.get("visdrone_ignore")
        if kind == "region":  # one copy per class: de-duplicate
            key = a.get("visdrone_region", tuple(a["bbox"]))
            regions[a["image_id"]][key] = a["bbox"]
        elif kind != "others":
            kept.append(a)
    strips = {iid: union_strips(_xyxy(list(r.values()))) for iid, r in regions.items()}

    def outside(items) -> list:
        by_image = defaultdict(list)
        for it in items:
            by_image[it["image_id"]].append(it)
        out = []
        for iid, its in by_image.items():
            if iid in strips:
                cov = coverage(_xyxy([it["bbox"] for it in its]), strips[iid])
                its = [it for it, c in zip(its, cov) if c < IGNORE_COVERAGE]
            out += its
        return out

    scored = {c["id"] for c in data["categories"]}
    dets = outside([d for d in detections if d["category_id"] in scored])
    per_image = defaultdict(list)
    for d in dets:
        per_image[d["image_id"]].append(d)
    capped = []
    for its in per_image.values():
        capped += sorted(its, key=lambda d: -d["score"])[:max_dets]  # stable on ties
    gt = dict(data, annotations=outside(kept))
    return gt, capped


def evaluate_visdrone(gt: Mapping[str, Any] | str | Path,
                      detections: Sequence[Mapping[str, Any]],
                      max_dets: int = 500, *,
                      backend: str = "faster_coco_eval") -> dict[str, float]:
    """VisDrone2019-DET box AP of ``detections`` (official protocol, module doc).

    Args:
        gt: a VisDrone-DET folder (``images/`` + ``annotations/``), or its
            COCO conversion (:func:`harness.data.visdrone.convert_visdrone`)
            as a dict (never modified) or a JSON path.  A COCO dict without
            ``visdrone_ignore`` marks is evaluated with plain COCO crowd rules
            plus the per-image cap.
        detections: COCO result dicts ``image_id, category_id, bbox (xywh),
            score``; image ids are those of the (converted) GT.
        max_dets: detections counted per image, all classes together.
        backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"``.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl`` at ``max_dets`` and
        ``AP_maxdets100``; fractions in [0, 1], NaN where COCOeval has no GT
        (as :func:`~harness.evaluate.coco.evaluate_coco`).

    Raises:
        DataError: unreadable GT, or a detection whose image_id is not in GT.
    """
    if max_dets < 1:
        raise ValueError("max_dets must be >= 1")
    max_dets = int(max_dets)
    COCO, COCOeval, kwargs = _coco_api(backend)
    data = _load(gt)
    dets = _check_detections(detections, {img["id"] for img in data["images"]})
    data, dets = apply_visdrone_protocol(data, dets, max_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = _coco_pair(COCO, data, dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox", **kwargs)
        ev.params.maxDets = sorted({1, 10, 100, max_dets})
        if not ev.params.catIds or not ev.params.imgIds:
            return {k: float("nan") for k in VISDRONE_METRIC_KEYS}
        ev.evaluate()
        ev.accumulate()
    precision = np.asarray(ev.eval["precision"])
    out = _summarize(precision, ev.params, max_dets)
    out["AP_maxdets100"] = _summarize(precision, ev.params, 100)["AP"]
    return out
