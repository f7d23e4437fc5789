"""Per-class AP and a TIDE-style error breakdown, for the leaderboard's tables.

A headline AP says how good a method is, not *why*: the per-class table shows
where the points are lost, the error table what kind of mistake loses them.

:func:`per_class_ap` reads the reference implementation (``faster_coco_eval``
by default, or ``pycocotools``) through :mod:`harness.evaluate.coco`: the AP
of category k is the mean of ``precision[:, :, k, 'all', max_dets]`` over its
entries > -1, so the mean over categories with GT is the headline AP.

:func:`error_breakdown` follows TIDE (Bolya et al., ECCV 2020), in our own
code (no ``tidecv`` dependency). **TIDE's definitions** (its code, v1.0.1):

* t_f = 0.5, t_b = 0.1. A false positive is, first match wins
  (:data:`FP_PRECEDENCE`; the paper gives no order, the code checks Loc
  before Cls): loc, t_b <= IoU < t_f with a GT of its class; cls, IoU >= t_f
  with a GT of another class; dupe, IoU >= t_f with a matched GT of its class;
  bkg, IoU < t_b with every GT; both, t_b <= IoU < t_f with another class's.
* Fixes: cls relabels the detection to its GT's class (the other-class GT of
  highest IoU) and loc makes it a TP on its GT (the same-class GT of highest
  IoU) -- only if that GT is unmatched, and only for the highest-scoring
  cls/loc error aiming at it; the others, and both/dupe/bkg, are suppressed.
  Miss: GTs matched by nothing and aimed at by no fixable cls/loc error; the
  fix *removes them from the GT count*. dAP = AP50(fixed) - AP50(base), each
  type fixed alone (TIDE's summary), clamped at 0.

**Our decisions**, where TIDE differs from COCOeval or is silent:

* The base is COCOeval's (matching at IoU 0.5, ties as COCOeval breaks them,
  ``max_dets`` per image *and class*, AP over the categories with non-crowd
  GT), so ``ap50`` is pycocotools' AP50. TIDE caps detections per image and
  also averages over categories that only have detections.
* A detection on a crowd region (COCOeval's rule) or beyond the cap is
  neither TP nor error (TIDE still types its ignored detections); detections
  of categories absent from the GT are dropped; error IoUs use non-crowd GT.
* Intervals are t_b <= IoU < t_f (TIDE's code mixes <= and <).
* A category whose GT are all missed scores AP 1 after the miss fix if it has
  no detections, 0 if it has some (TIDE gives 0 too, but drops the former
  from the mean -- dividing by zero when nothing is left).
"""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.evaluate.coco import _check_detections, _coco_api, _coco_pair, _load_gt

FOREGROUND_IOU = 0.5   # t_f: a match, and the AP50 threshold
BACKGROUND_IOU = 0.1   # t_b: below it with every GT, a detection is background
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
# The first type whose condition holds names a false positive (tidecv's TIDERun._eval_image).
FP_PRECEDENCE = ("loc", "cls", "dupe", "bkg", "both")
_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs
_CODE = {name: i for i, name in enumerate(FP_PRECEDENCE)}  # error code of a false positive


@dataclass(frozen=True)
class ClassAP:
    """COCO AP of one GT category (NaN where it has no non-crowd GT)."""
    category_id: int
    name: str
    ap: float      # AP@[.50:.95]
    ap50: float
    n_gt: int      # non-crowd GT boxes
    n_det: int     # detections given for the category (before the max_dets cap)


@dataclass(frozen=True)
class ErrorBreakdown:
    """Base AP50, and the AP50 gained by fixing each error type alone (fractions)."""
    ap50: float
    delta: dict[str, float]   # keys ERROR_TYPES
    counts: dict[str, int]    # keys ERROR_TYPES: false positives of each type, missed GTs


def per_class_ap(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], *,
                 max_dets: int = 100, backend: str = "faster_coco_eval") -> list[ClassAP]:
    """COCO AP and AP50 of every GT category (in id order), from the reference backend."""
    if max_dets < 1:
        raise ValueError("max_dets must be >= 1")
    COCO, COCOeval, kwargs = _coco_api(backend)
    data = _load_gt(gt)
    dets = _check_detections(detections, {img["id"] for img in data["images"]})
    n_gt = Counter(a["category_id"] for a in data["annotations"] if not a.get("iscrowd", 0))
    n_det = Counter(d["category_id"] for d in dets)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    ap = {c["id"]: (float("nan"), float("nan")) for c in categories}
    if categories and data["images"]:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt, coco_dt = _coco_pair(COCO, data, dets)
            ev = COCOeval(coco_gt, coco_dt, "bbox", **kwargs)
            ev.params.maxDets = sorted({1, 10, int(max_dets)})
            ev.evaluate()
            ev.accumulate()
        p = ev.params
        m, a = list(p.maxDets).index(max_dets), list(p.areaRngLbl).index("all")
        t50 = np.flatnonzero(np.isclose(np.asarray(p.iouThrs), FOREGROUND_IOU))
        precision = np.asarray(ev.eval["precision"])[:, :, :, a, m]
        for k, cat_id in enumerate(p.catIds):
            ap[cat_id] = (_mean_valid(precision[:, :, k]), _mean_valid(precision[t50, :, k]))
    return [ClassAP(category_id=c["id"], name=str(c.get("name", "")), ap=ap[c["id"]][0],
                    ap50=ap[c["id"]][1], n_gt=n_gt[c["id"]], n_det=n_det[c["id"]])
            for c in categories]


def _mean_valid(s: np.ndarray) -> float:
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else float("nan")


def _box_iou(dt: np.ndarray, gt: np.ndarray, crowd: bool = False) -> np.ndarray:
    """[D x G] IoU of xywh boxes, pycocotools' formula; for crowd GT, intersection / det area."""
    w = (np.minimum(dt[:, None, 2] + dt[:, None, 0], gt[None, :, 2] + gt[None, :, 0])
         - np.maximum(dt[:, None, 0], gt[None, :, 0]))
    h = (np.minimum(dt[:, None, 3] + dt[:, None, 1], gt[None, :, 3] + gt[None, :, 1])
         - np.maximum(dt[:, None, 1], gt[None, :, 1]))
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    dt_area = (dt[:, 2] * dt[:, 3])[:, None]
    union = dt_area if crowd else dt_area + (gt[:, 2] * gt[:, 3])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


def _greedy_match(iou: np.ndarray, same_class: np.ndarray) -> np.ndarray:
    """COCOeval's matching: rows in score order (per class), each takes the unmatched
    same-class GT of highest IoU >= t_f (the last one on ties); -1 where none."""
    candidate = same_class & (iou >= FOREGROUND_IOU)
    match = np.full(iou.shape[0], -1)
    free = np.ones(iou.shape[1], dtype=bool)
    for i in np.flatnonzero(candidate.any(axis=1)):
        cols = np.flatnonzero(candidate[i] & free)
        if cols.size:
            j = cols[cols.size - 1 - np.argmax(iou[i, cols][::-1])]
            match[i], free[j] = j, False
    return match


def _fp_types(iou: np.ndarray, same_class: np.ndarray, gt_used: np.ndarray):
    """(error code, target GT) of each row, read as a false positive."""
    if iou.shape[1] == 0:
        return np.full(iou.shape[0], _CODE["bkg"]), np.full(iou.shape[0], -1)
    same, other = np.where(same_class, iou, 0.0), np.where(same_class, 0.0, iou)
    best_same, best_other = same.max(axis=1), other.max(axis=1)
    holds = {"loc": (best_same >= BACKGROUND_IOU) & (best_same < FOREGROUND_IOU),
             "cls": best_other >= FOREGROUND_IOU,
             "dupe": np.where(gt_used[None, :], same, 0.0).max(axis=1) >= FOREGROUND_IOU,
             "bkg": np.maximum(best_same, best_other) < BACKGROUND_IOU,
             "both": (best_other >= BACKGROUND_IOU) & (best_other < FOREGROUND_IOU)}
    code = np.full(iou.shape[0], -1)
    for name in reversed(FP_PRECEDENCE):   # earlier types overwrite later ones
        code[holds[name]] = _CODE[name]
    assert (code >= 0).all(), "the five FP conditions cover every IoU pattern"
    target = np.where(code == _CODE["cls"], other.argmax(axis=1),
                      np.where(code == _CODE["loc"], same.argmax(axis=1), -1))
    return code, target


def _class_ap50(tp_ranked: np.ndarray, n_gt: int) -> float:
    """COCOeval's 101-point interpolated AP of detections ranked by score."""
    if n_gt <= 0:   # only after the miss fix: nothing left to find
        return 0.0 if tp_ranked.size else 1.0
    if tp_ranked.size == 0:
        return 0.0
    tp, fp = np.cumsum(tp_ranked, dtype=float), np.cumsum(~tp_ranked, dtype=float)
    recall, precision = tp / n_gt, tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, _RECALL_THRESHOLDS, side="left")
    at_threshold = np.where(idx < precision.size,
                            precision[np.minimum(idx, precision.size - 1)], 0.0)
    return float(at_threshold.mean())


def _mean_ap50(cls: np.ndarray, tp: np.ndarray, keep: np.ndarray, n_gt: np.ndarray,
               scored: np.ndarray) -> float:
    """Mean AP50 over the ``scored`` classes; arrays are in global score rank order."""
    cls, tp = cls[keep], tp[keep]
    by_class = np.argsort(cls, kind="stable")
    bounds = np.searchsorted(cls[by_class], np.arange(n_gt.size + 1))
    aps = [_class_ap50(tp[by_class[bounds[k]:bounds[k + 1]]], int(n_gt[k]))
           for k in np.flatnonzero(scored)]
    return float(np.mean(aps)) if aps else float("nan")


@dataclass(frozen=True)
class _Classified:
    """Kept detections in COCOeval's global rank (score, then image, then input order)."""
    cls: np.ndarray       # class index
    tp: np.ndarray        # matched at t_f
    keep: np.ndarray      # False: on a crowd region, neither TP nor error
    code: np.ndarray      # _CODE of a false positive, -1 otherwise
    target: np.ndarray    # cls/loc: the GT (index into gt_cls) the error points at, else -1
    is_best: np.ndarray   # the highest-scoring fixable cls/loc error of its unmatched GT
    gt_cls: np.ndarray    # class index of each non-crowd GT
    missed: np.ndarray    # per GT: matched by nothing and no fixable error's target


def _classify(data: dict, dets: list[dict], max_dets: int) -> _Classified:
    """COCOeval's matching at t_f, then TIDE's error type of every false positive."""
    image_ids = sorted({img["id"] for img in data["images"]})
    image_rank = {i: r for r, i in enumerate(image_ids)}
    class_of = {c["id"]: k for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    anns = [a for a in data["annotations"]
            if a["category_id"] in class_of and a["image_id"] in image_rank]
    g_img = np.array([image_rank[a["image_id"]] for a in anns], dtype=int)
    g_cls = np.array([class_of[a["category_id"]] for a in anns], dtype=int)
    g_box = np.array([a["bbox"] for a in anns], dtype=float).reshape(-1, 4)
    g_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    real = np.flatnonzero(~g_crowd)   # non-crowd GT, by image, then annotation order
    real = real[np.argsort(g_img[real], kind="stable")]
    crowd = np.flatnonzero(g_crowd)
    crowd = crowd[np.argsort(g_img[crowd], kind="stable")]

    dets = [d for d in dets if d["category_id"] in class_of]
    d_img = np.array([image_rank[d["image_id"]] for d in dets], dtype=int)
    d_cls = np.array([class_of[d["category_id"]] for d in dets], dtype=int)
    d_score = np.array([d["score"] for d in dets], dtype=float)
    d_box = np.array([d["bbox"] for d in dets], dtype=float).reshape(-1, 4)
    # per image, per class, by score (stable on input order), cut at max_dets
    order = np.lexsort((np.arange(len(dets)), -d_score, d_cls, d_img))
    group = d_img[order] * len(class_of) + d_cls[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if order.size else order
    rank_in_group = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    order = order[rank_in_group < max_dets]

    n = order.size
    tp, ignored = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    code, target = np.full(n, -1), np.full(n, -1)
    gt_used = np.zeros(real.size, dtype=bool)
    d_bounds, g_bounds, c_bounds = (np.searchsorted(img, np.arange(len(image_ids) + 1))
                                    for img in (d_img[order], g_img[real], g_img[crowd]))
    for r in range(len(image_ids)):
        ds, gs = slice(d_bounds[r], d_bounds[r + 1]), slice(g_bounds[r], g_bounds[r + 1])
        di, gi, ci = order[ds], real[gs], crowd[c_bounds[r]:c_bounds[r + 1]]
        if di.size == 0:
            continue
        iou = _box_iou(d_box[di], g_box[gi])
        same_class = d_cls[di][:, None] == g_cls[gi][None, :]
        match = _greedy_match(iou, same_class)
        used = np.zeros(gi.size, dtype=bool)
        used[match[match >= 0]] = True
        unmatched = match < 0
        if ci.size:
            on_crowd = ((d_cls[di][:, None] == g_cls[ci][None, :])
                        & (_box_iou(d_box[di], g_box[ci], crowd=True) >= FOREGROUND_IOU))
            ignored[ds] = unmatched & on_crowd.any(axis=1)
        fp = unmatched & ~ignored[ds]
        fp_code, fp_target = _fp_types(iou[fp], same_class[fp], used)
        tp[ds], gt_used[gs] = ~unmatched, used
        rows = d_bounds[r] + np.flatnonzero(fp)
        code[rows] = fp_code
        target[rows] = np.where(fp_target >= 0, fp_target + g_bounds[r], -1)

    # Fixable cls/loc errors aim at an unmatched GT; only the highest-scoring one per GT is fixed.
    fixable = np.isin(code, [_CODE["cls"], _CODE["loc"]]) & (target >= 0)
    fixable[fixable] = ~gt_used[target[fixable]]
    usable = np.zeros(real.size, dtype=bool)
    usable[target[fixable]] = True
    is_best = np.zeros(n, dtype=bool)
    by_score = np.flatnonzero(fixable)[np.lexsort((order[fixable], -d_score[order[fixable]]))]
    is_best[by_score[np.unique(target[by_score], return_index=True)[1]]] = True

    rank = np.lexsort((order, d_img[order], -d_score[order]))
    return _Classified(cls=d_cls[order][rank], tp=tp[rank], keep=~ignored[rank], code=code[rank],
                       target=target[rank], is_best=is_best[rank], gt_cls=g_cls[real],
                       missed=~gt_used & ~usable)


def error_breakdown(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], *,
                    max_dets: int = 100) -> ErrorBreakdown:
    """TIDE's error types and the AP50 gained by fixing each alone (see the module docstring
    for what is TIDE's and what is ours). ``ap50`` is pycocotools' AP50 at ``max_dets``."""
    if max_dets < 1:
        raise ValueError("max_dets must be >= 1")
    data = _load_gt(gt)
    dets = _check_detections(detections, {img["id"] for img in data["images"]})
    c = _classify(data, dets, int(max_dets))
    n_gt = np.bincount(c.gt_cls, minlength=len(data["categories"]))
    scored = n_gt > 0
    base = _mean_ap50(c.cls, c.tp, c.keep, n_gt, scored)
    fixed = {}
    for name in ("cls", "loc"):   # the best error per GT becomes a TP, the others go
        err = c.code == _CODE[name]
        made_tp = err & c.is_best
        cls = (np.where(made_tp, c.gt_cls[np.maximum(c.target, 0)], c.cls) if name == "cls"
               else c.cls)
        fixed[name] = _mean_ap50(cls, c.tp | made_tp, c.keep & ~(err & ~c.is_best), n_gt, scored)
    for name in ("both", "dupe", "bkg"):
        fixed[name] = _mean_ap50(c.cls, c.tp, c.keep & (c.code != _CODE[name]), n_gt, scored)
    n_gt_fixed = n_gt - np.bincount(c.gt_cls[c.missed], minlength=n_gt.size)
    fixed["miss"] = _mean_ap50(c.cls, c.tp, c.keep, n_gt_fixed, scored)
    counts = {name: int(np.sum(c.code == _CODE[name])) for name in FP_PRECEDENCE}
    counts["miss"] = int(c.missed.sum())
    return ErrorBreakdown(ap50=base, delta={k: max(fixed[k] - base, 0.0) for k in ERROR_TYPES},
                          counts={k: counts[k] for k in ERROR_TYPES})
