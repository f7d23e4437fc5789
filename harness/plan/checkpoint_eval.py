"""``detbench eval``: a given checkpoint on every dataset and test condition of a suite.

The evaluation runs exactly like a training run's last stage, through Ray and with the
same rows, leaderboard and robustness tables, but the stage's detector is loaded from
the checkpoint instead of trained (:func:`harness.engine.stage.evaluate_checkpoint`): images are
sharded over the trial's workers, corruption renders come from the cache, and a trial
checkpoints after each test condition, so a killed evaluation resumes per condition.
One trial per (method, dataset): a checkpoint's evaluation does not depend on a seed.

Label space: a detector written by detbench predicts the dataset's classes (labels
1..K). A torchvision COCO checkpoint predicts COCO category ids (91 outputs, with
"N/A" gaps); its labels are mapped to the dataset's categories by name (which is by id
on COCO itself, where names and ids agree). Dataset classes the checkpoint cannot
predict score 0 AP, as they would for any detector.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from harness.core import ConfigError, sha256_file
from harness.modeling import TORCHVISION_PREFIX, resolve_weights, torchvision_weights
from harness.plan.records import Cell

#: Where a detector's class count can be read: (state key, outputs per class slot).
_CLASS_KEYS = (("roi_heads.box_predictor.cls_score.weight", 1), ("head.classification_head.cls_logits.weight", 0))


def coco_category_names() -> list[str]:
    """torchvision's 91 COCO label names (index = COCO category id; 0 = background)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def predicted_labels(state: dict[str, torch.Tensor], num_anchors: int = 9) -> int:
    """Outputs of a detector state dict's classifier, background included."""
    for key, per_class in _CLASS_KEYS:
        if key in state:
            n = state[key].shape[0]
            return n if per_class else n // num_anchors
    raise ConfigError("not a Faster R-CNN or RetinaNet state dict (no classifier weights)", field="--checkpoint")


def checkpoint_classes(ref: str, state: dict[str, torch.Tensor], dataset_classes: list[str]) -> list[str] | None:
    """Names of the checkpoint's labels 1..N, or None when they are the dataset's own."""
    if ref.startswith(TORCHVISION_PREFIX):
        categories = torchvision_weights(ref, field="--checkpoint").meta.get("categories")
        return list(categories[1:]) if categories else None
    outputs = predicted_labels(state)
    if outputs == len(dataset_classes) + 1:
        return None
    if outputs == 91:
        return coco_category_names()[1:]
    raise ConfigError(f"the checkpoint predicts {outputs - 1} classes, the dataset has {len(dataset_classes)} "
                      "(and it is not a 91-output COCO checkpoint)", field="--checkpoint")


def eval_cells(cells: list[Cell], suite_path: Path, ref: str, method: str | None,
               class_names_of) -> list[Cell]:
    """The evaluation cells of a planned suite: one per (method, dataset), the last stage only.

    ``class_names_of(prepared_dataset)``: the dataset's training class names.
    """
    from harness.modeling import load_state
    labels = list(dict.fromkeys(c.label for c in cells))
    if method is None and len(labels) > 1:
        raise ConfigError(f"the suite has {len(labels)} methods: say which one the checkpoint is with --method "
                          f"({', '.join(labels)})", file=suite_path, field="--method")
    method = method or labels[0]
    if method not in labels:
        raise ConfigError(f"no method labelled {method!r} in the suite; labels: {', '.join(labels)}",
                          file=suite_path, field="--method")
    path = resolve_weights(ref, field="--checkpoint")
    state = load_state(path)
    digest = sha256_file(path)
    out, seen = [], set()
    for cell in cells:
        key = (cell.label, cell.dataset.name)
        if cell.label != method or key in seen:
            continue
        seen.add(key)
        classes = checkpoint_classes(ref, state, class_names_of(cell.dataset))
        out.append(replace(cell, cell_id=f"{cell.label}/{cell.dataset.name}/checkpoint", stages=cell.stages[-1:],
                           search=None, checkpoint=str(path), checkpoint_sha256=digest,
                           checkpoint_classes=tuple(classes) if classes else None))
    return out


__all__ = ["eval_cells", "checkpoint_classes", "predicted_labels", "coco_category_names"]
