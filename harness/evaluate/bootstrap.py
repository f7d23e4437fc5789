"""Paired image-level bootstrap of COCO AP: confidence intervals of ΔAP without re-evaluating.

Why: run-to-run noise of about 0.2-0.3 COCO AP is the size of many claimed gains,
so a ΔAP needs an interval. Resampling the evaluation images with replacement and
recomputing AP is the standard way, but rerunning COCOeval per resample costs a
full evaluation each time (minutes on COCO val). It is not needed: matching a
detection to ground truth happens *within* one image, so it does not change when
images are resampled. We therefore

1. match once (:func:`match_detections`: pycocotools' own ``evaluateImg``, area
   "all", ``maxDets`` 100) and keep, per category, every detection's image, its
   true/false-positive status at each IoU threshold (in COCOeval's global score
   order) and each image's count of non-ignored GT boxes;
2. for a resample, give each image a weight = how often it was drawn: the
   cumulative TP/FP counts become weighted cumulative sums and the GT count a
   weighted sum; precision, its envelope and the 101-point interpolation are
   then exactly COCOeval's ``accumulate`` (:func:`weighted_ap`, vectorised over
   resamples).

This equals a COCOeval of the resampled set in which each drawn copy of an image
is a new image (tested to 1e-9 against pycocotools on such sets), provided no
two detections of one image and category share a score exactly (COCOeval's
order of tied detections depends on where the copies sit; float scores of a
detector practically never tie).

:func:`paired_bootstrap` draws the same resamples for a method and its baseline;
with several seeds each side's AP of a resample is the mean over its seeds (the
protocol in docs/methods.md, "Uncertainty").
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

#: Resamples processed at once (memory: a few arrays of CHUNK x true positives per category).
CHUNK = 100


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections in COCOeval's global score order (stable)."""
    image: np.ndarray   # [D] index into Matches.image_ids of each detection's image
    tp: np.ndarray      # [T, D] bool: matched and not ignored
    counted: np.ndarray  # [T, D] bool: not ignored (TP or FP)
    gt: np.ndarray      # [I] non-ignored GT boxes of the category per image

    @cached_property
    def segments(self) -> tuple[list[np.ndarray], "object", np.ndarray]:
        """What :func:`weighted_ap` needs, per IoU threshold: the image of each true positive
        (in score order) and, as one sparse matrix over all thresholds, how many false positives
        of each image come before each true positive but after the previous one.

        Why only the true positives: recall grows only at a TP, so every recall threshold's
        first position is a TP, and the precision envelope's maximum over a suffix is reached
        at a TP (false positives after a TP only lower precision until the next one); the
        false positives enter through the running count of detections seen.
        """
        from scipy.sparse import csr_matrix
        n_img = len(self.gt)
        tp_images, rows, cols, offsets, start = [], [], [], [0], 0
        for t in range(self.tp.shape[0]):
            positions = np.flatnonzero(self.tp[t])
            fp = np.flatnonzero(self.counted[t] & ~self.tp[t])
            seg = np.searchsorted(positions, fp)          # FPs before the seg-th TP (M: after the last)
            keep = seg < len(positions)                   # trailing FPs change no TP's precision
            rows.append(start + seg[keep])
            cols.append(self.image[fp[keep]])
            tp_images.append(self.image[positions])
            start += len(positions)
            offsets.append(start)
        rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
        fp_counts = csr_matrix((np.ones(len(rows_a)), (rows_a, cols_a)), shape=(start, n_img))
        return tp_images, fp_counts, np.asarray(offsets)


@dataclass(frozen=True)
class Matches:
    """What AP needs of one evaluation, with detections matched to the GT once."""
    image_ids: np.ndarray         # [I] the evaluated images, COCOeval's (sorted) order
    categories: tuple[CategoryMatches, ...]
    iou_thrs: np.ndarray          # [T]
    rec_thrs: np.ndarray          # [R]

    def ap(self) -> dict[str, float]:
        """AP and AP50 of the evaluation itself (every image once)."""
        out = weighted_ap(self, np.ones((1, len(self.image_ids))))
        return {k: float(v[0]) for k, v in out.items()}


def match_detections(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], *,
                     max_dets: int = 100) -> Matches:
    """Match detections to GT once per image with pycocotools (the reference implementation)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from harness.evaluate.coco import _check_detections, _coco_pair, _load_gt
    data = _load_gt(gt)
    dets = _check_detections(detections, {img["id"] for img in data["images"]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = _coco_pair(COCO, data, dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.areaRng, ev.params.areaRngLbl = [[0 ** 2, 1e5 ** 2]], ["all"]
        ev.params.maxDets = [int(max_dets)]
        ev.evaluate()
    p = ev.params
    n_img, n_thr = len(p.imgIds), len(p.iouThrs)
    cats = []
    for k in range(len(p.catIds)):
        entries = [(i, ev.evalImgs[k * n_img + i]) for i in range(n_img)]
        entries = [(i, e) for i, e in entries if e is not None]
        gt_count = np.zeros(n_img)
        for i, e in entries:
            gt_count[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        if entries:
            scores = np.concatenate([np.asarray(e["dtScores"][:max_dets]) for _, e in entries])
            image = np.concatenate([np.full(len(e["dtScores"][:max_dets]), i) for i, e in entries]).astype(int)
            matched = np.concatenate([np.asarray(e["dtMatches"])[:, :max_dets] for _, e in entries], axis=1)
            ignored = np.concatenate([np.asarray(e["dtIgnore"])[:, :max_dets] for _, e in entries], axis=1)
            order = np.argsort(-scores, kind="mergesort")  # COCOeval.accumulate's order
            image, matched, ignored = image[order], matched[:, order].astype(bool), ignored[:, order].astype(bool)
        else:
            image = np.zeros(0, int)
            matched = ignored = np.zeros((n_thr, 0), bool)
        cats.append(CategoryMatches(image=image, tp=matched & ~ignored, counted=~ignored, gt=gt_count))
    return Matches(image_ids=np.asarray(p.imgIds), categories=tuple(cats),
                   iou_thrs=np.asarray(p.iouThrs), rec_thrs=np.asarray(p.recThrs))


def _rowwise_searchsorted(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``searchsorted(rows[b], values, side='left')`` for every row of a matrix of non-decreasing
    rows, in one call: numpy orders complex numbers by (real, imaginary), so ``row index + 1j *
    value`` is sorted and compares exactly (no offset added to the values, which would round
    ``recall >= threshold`` ties -- 0.5 vs 0.5, 3/10 vs linspace's 0.3 -- differently from COCOeval)."""
    b, d = rows.shape
    row = np.arange(b)[:, None]
    flat = (row + 1j * rows).ravel()
    queries = (row + 1j * values[None, :]).ravel()
    return np.searchsorted(flat, queries, side="left").reshape(b, -1) - d * row


def weighted_ap(matches: Matches, counts: np.ndarray) -> dict[str, np.ndarray]:
    """AP and AP50 for each row of ``counts`` ([B, I]: how often each image is drawn).

    COCOeval's ``accumulate`` + summarize (area "all", the matched ``maxDets``) with
    each image's detections and GT boxes counted ``counts[b, i]`` times. A category
    with no GT box in a resample is left out of that resample's mean, as COCOeval does.
    Cost per category: one sparse product (false positives per image and segment) and
    a few passes over [B, true positives], not over [B, detections].
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_b, n_t, eps = counts.shape[0], len(matches.iou_thrs), np.spacing(1)
    sums, n_valid = np.zeros((n_b, n_t)), np.zeros(n_b)
    for cat in matches.categories:
        gt = counts @ cat.gt                                   # [B] weighted GT count
        valid = gt > 0
        n_valid += valid
        if not cat.image.size or not valid.any():
            continue                                           # no detections: precision 0 everywhere
        tp_images, fp_counts, offsets = cat.segments
        fp_all = np.asarray((fp_counts @ counts.T).T)          # [B, sum of TPs over thresholds]
        gt_safe = np.where(valid, gt, 1.0)[:, None]
        for t in range(n_t):
            m = len(tp_images[t])
            if not m:
                continue                                       # no true positive: precision 0
            tp = np.cumsum(counts[:, tp_images[t]], axis=1)    # weighted TPs up to each TP
            seen = tp + np.cumsum(fp_all[:, offsets[t]:offsets[t + 1]], axis=1)  # TPs + FPs so far
            recall = np.where(valid[:, None], tp / gt_safe, 0.0)
            precision = tp / (seen + eps)
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            idx = _rowwise_searchsorted(recall, matches.rec_thrs)
            q = np.where(idx < m, np.take_along_axis(envelope, np.minimum(idx, m - 1), axis=1), 0.0)
            sums[:, t] += np.where(valid, q.mean(axis=1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_t = sums / n_valid[:, None]
    t50 = int(np.argmin(np.abs(matches.iou_thrs - 0.5)))
    return {"AP": per_t.mean(axis=1), "AP50": per_t[:, t50]}


def draw_counts(n_images: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[resamples, n_images]`` draw counts of resampling the images with replacement."""
    idx = rng.integers(0, n_images, size=(resamples, n_images))
    flat = (idx + n_images * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n_images).reshape(resamples, n_images).astype(np.float64)


@dataclass(frozen=True)
class DeltaInterval:
    """ΔAP of a method against its baseline (fractions, not %), with a bootstrap interval."""
    metric: str
    delta: float          # on the evaluation itself
    low: float
    high: float
    resamples: int
    ci: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(method: Sequence[Matches], baseline: Sequence[Matches], *, resamples: int = 1000,
                     seed: int = 0, ci: float = 0.95) -> dict[str, DeltaInterval]:
    """Percentile intervals of ΔAP / ΔAP50, the same image resamples for both sides.

    ``method`` / ``baseline``: one :class:`Matches` per seed, all on the same images;
    each side's AP of a resample is the mean over its seeds.
    """
    ids = method[0].image_ids
    if any(not np.array_equal(m.image_ids, ids) for m in (*method, *baseline)):
        raise ValueError("the method and its baseline were evaluated on different images")
    rng = np.random.default_rng(seed)
    deltas: dict[str, list[np.ndarray]] = {"AP": [], "AP50": []}
    for start in range(0, resamples, CHUNK):
        counts = draw_counts(len(ids), min(CHUNK, resamples - start), rng)
        side = []
        for group in (method, baseline):
            per_seed = [weighted_ap(m, counts) for m in group]
            side.append({k: np.mean([ap[k] for ap in per_seed], axis=0) for k in deltas})
        for k in deltas:
            deltas[k].append(side[0][k] - side[1][k])
    point = [{k: np.mean([m.ap()[k] for m in group]) for k in deltas} for group in (method, baseline)]
    alpha = (1 - ci) / 2
    out = {}
    for k, parts in deltas.items():
        d = np.concatenate(parts)
        d = d[np.isfinite(d)]
        lo, hi = np.quantile(d, [alpha, 1 - alpha]) if d.size else (np.nan, np.nan)
        out[k] = DeltaInterval(k, float(point[0][k] - point[1][k]), float(lo), float(hi), resamples, ci)
    return out
