"""COCO box AP, computed by a reference implementation.

We never re-implement the matching: the numbers must be comparable with
published ones, so AP comes from ``faster_coco_eval`` (a C++ port, default) or
``pycocotools`` (the reference). Both fill the same ``eval["precision"]``
array [T x R x K x A x M]; we read the six headline numbers from it ourselves
instead of calling ``summarize()``, which prints and hard-codes the index of
``maxDets``. The test suite checks that the two backends agree to 1e-6.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.core import DataError

BACKENDS = ("faster_coco_eval", "pycocotools")
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# key -> (IoU threshold or None for the 0.50:0.95 mean, area range label)
_SELECT = {"AP": (None, "all"), "AP50": (0.5, "all"), "AP75": (0.75, "all"),
           "APs": (None, "small"), "APm": (None, "medium"), "APl": (None, "large")}


def _load_gt(gt: Mapping[str, Any] | str | Path) -> dict:
    """A private deep copy of the GT: both libraries mutate what they are given."""
    if isinstance(gt, (str, Path)):
        try:
            with open(gt, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DataError("annotation file not found", file=gt) from None
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read annotation JSON ({e})", file=gt) from None
    else:
        data = copy.deepcopy(dict(gt))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError("not a COCO instances file (no 'images' list)",
                        file=gt if isinstance(gt, (str, Path)) else None)
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    return data


def _check_detections(dets: Sequence[Mapping[str, Any]], image_ids: set) -> list[dict]:
    """Copy (loadRes mutates its input) and fail early with a usable message."""
    out = []
    for i, d in enumerate(dets):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                raise DataError(f"detection #{i} has no '{key}'", field=key)
        if d["image_id"] not in image_ids:
            raise DataError(f"detection #{i} refers to image_id {d['image_id']!r}, "
                            "which is not in the ground truth", field="image_id")
        if len(d["bbox"]) != 4:
            raise DataError(f"detection #{i}: bbox must be [x, y, w, h]", field="bbox")
        out.append({"image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
                    "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])})
    return out


def _coco_api(backend: str):
    """(COCO class, COCOeval class, extra COCOeval kwargs) for a backend."""
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster
        # print_function defaults to logger.info; route it nowhere.
        return COCO, COCOeval_faster, {"print_function": logging.getLogger(__name__).debug}
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval, {}
    raise ValueError(f"unknown COCO backend {backend!r}; expected one of {BACKENDS}")


def _summarize(precision: np.ndarray, params, max_dets: int) -> dict[str, float]:
    """Same reduction as COCOeval._summarize (mean over entries > -1)."""
    m = list(params.maxDets).index(max_dets)
    out = {}
    for key, (thr, area) in _SELECT.items():
        s = precision[:, :, :, list(params.areaRngLbl).index(area), m]
        if thr is not None:
            s = s[np.where(np.isclose(np.asarray(params.iouThrs), thr))[0]]
        valid = s[s > -1]
        out[key] = float(np.mean(valid)) if valid.size else float("nan")
    return out


def _coco_pair(COCO, data: dict, dets: list[dict]):
    """GT and result COCO objects for ``data`` and ``dets`` (an empty result set where there are none)."""
    coco_gt = COCO()
    coco_gt.dataset = data
    coco_gt.createIndex()
    if dets:
        return coco_gt, coco_gt.loadRes(dets)
    # pycocotools.loadRes crashes on [] -- build the empty result set.
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(data["images"]), "annotations": [],
                       "categories": copy.deepcopy(data["categories"])}
    coco_dt.createIndex()
    return coco_gt, coco_dt


def evaluate_coco(gt: Mapping[str, Any] | str | Path,
                  detections: Sequence[Mapping[str, Any]], *,
                  backend: str = "faster_coco_eval",
                  max_dets: int = 100) -> dict[str, float]:
    """COCO bbox AP of ``detections`` against ``gt``.

    Args:
        gt: a COCO instances dict (never modified) or a path to its JSON.
        detections: COCO result dicts ``image_id, category_id, bbox (xywh),
            score``. Detections of categories absent from the GT are ignored
            (COCOeval semantics).
        backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"``.
        max_dets: detections kept per image (highest scores first).

    Returns:
        ``AP, AP50, AP75, APs, APm, APl`` as fractions in [0, 1]. Where
        COCOeval reports -1 -- no non-crowd GT box in that area range (or no
        GT at all) -- the value is ``float('nan')``: AP is undefined there, and
        0 would wrongly drag down averages. Empty ``detections`` give 0.0
        wherever GT exists (NaN where it does not).

    Raises:
        DataError: unreadable GT, or a detection whose image_id is not in GT.
    """
    if max_dets < 1:
        raise ValueError("max_dets must be >= 1")
    COCO, COCOeval, kwargs = _coco_api(backend)
    data = _load_gt(gt)
    dets = _check_detections(detections, {img["id"] for img in data["images"]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = _coco_pair(COCO, data, dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox", **kwargs)
        ev.params.maxDets = sorted({1, 10, int(max_dets)})
        if not ev.params.catIds or not ev.params.imgIds:
            return {k: float("nan") for k in METRIC_KEYS}
        ev.evaluate()
        ev.accumulate()
    return _summarize(np.asarray(ev.eval["precision"]), ev.params, int(max_dets))


def _tolist(x) -> list:
    """Tensor / ndarray / sequence -> python list, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return x.tolist() if hasattr(x, "tolist") else list(x)


def coco_detections_from_outputs(image_ids: Sequence[int],
                                 outputs: Sequence[Mapping[str, Any]],
                                 label_to_cat_id: Mapping[int, int]) -> list[dict]:
    """torchvision detector outputs -> COCO result dicts for :func:`evaluate_coco`.

    ``outputs[i]`` (for image ``image_ids[i]``) has ``boxes`` (N x 4, xyxy),
    ``scores`` (N) and ``labels`` (N, contiguous 1..K); ``label_to_cat_id``
    maps those labels back to the dataset's (possibly non-contiguous) ids.
    """
    if len(image_ids) != len(outputs):
        raise ValueError(f"{len(image_ids)} image ids but {len(outputs)} outputs")
    results = []
    for image_id, out in zip(image_ids, outputs):
        boxes, scores, labels = (_tolist(out[k]) for k in ("boxes", "scores", "labels"))
        image_id = int(image_id)  # also unwraps 0-d tensors / numpy ints
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
            try:
                cat = label_to_cat_id[int(label)]
            except KeyError:
                raise ValueError(f"label {int(label)} has no category id mapping") from None
            results.append({"image_id": image_id, "category_id": int(cat),
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                            "score": float(score)})
    return results
