"""Detection metrics: COCO and VisDrone AP, robustness (P / mPC / rPC), kept detections, the paired
bootstrap, per-class AP and error breakdowns. Import-light: the COCO backends load on first use."""
from harness.evaluate.analysis import ERROR_TYPES, error_breakdown, per_class_ap
from harness.evaluate.bootstrap import DeltaInterval, Matches, draw_counts, match_detections, paired_bootstrap
from harness.evaluate.coco import coco_detections_from_outputs, evaluate_coco
from harness.evaluate.detections import (condition_key, detections_prefix, detections_rel, read_detections,
                                         to_coco_results, write_detections)
from harness.evaluate.robustness import plot_ap_vs_severity, robustness_metrics
from harness.evaluate.visdrone import evaluate_visdrone

__all__ = ["ERROR_TYPES", "error_breakdown", "per_class_ap", "DeltaInterval", "Matches", "draw_counts",
           "match_detections", "paired_bootstrap", "coco_detections_from_outputs", "evaluate_coco", "condition_key",
           "detections_prefix", "detections_rel", "read_detections", "to_coco_results", "write_detections",
           "plot_ap_vs_severity", "robustness_metrics", "evaluate_visdrone"]
