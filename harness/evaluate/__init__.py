"""Detection metrics. Import-light: the COCO backends load on first use."""
from harness.evaluate.coco import coco_detections_from_outputs, evaluate_coco

__all__ = ["evaluate_coco", "coco_detections_from_outputs"]
