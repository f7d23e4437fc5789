"""Detectors from parts: backbone, neck and detector-arch registries, torchvision's exact presets,
pretrained weights (never downloaded), and what a detector costs (parameters, FLOPs, latency)."""
from harness.modeling.backbones import (BACKBONES, BackboneInfo, build_backbone_body, freeze_stages, norm_layer,
                                        trainable_stages)
from harness.modeling.cost import DetectorCost, detector_cost, evaluation_size, inference_cost, peak_memory_mb
from harness.modeling.detectors import (CLASSIFICATION_TERMS, DETECTORS, FASTER_RCNN_STRIDES, RETINANET_STRIDES,
                                        BackboneWithNeck, backbone_body, build_detector, describe, detection_losses,
                                        load_checkpoint, replace_classification_head, retinanet_head_norm)
from harness.modeling.necks import LEVELS, NECKS, Neck, NeckConfig, build_neck
from harness.modeling.presets import check_preset
from harness.modeling.weights import PREFIX as TORCHVISION_PREFIX
from harness.modeling.weights import load_state, torchvision_weights, zero_eps_checkpoint
from harness.modeling.weights import resolve as resolve_weights

__all__ = ["BACKBONES", "BackboneInfo", "build_backbone_body", "freeze_stages", "norm_layer", "trainable_stages",
           "DetectorCost", "detector_cost", "evaluation_size", "inference_cost", "peak_memory_mb",
           "CLASSIFICATION_TERMS", "DETECTORS", "FASTER_RCNN_STRIDES", "RETINANET_STRIDES", "BackboneWithNeck",
           "backbone_body", "build_detector", "describe", "detection_losses", "load_checkpoint",
           "replace_classification_head", "retinanet_head_norm", "LEVELS", "NECKS", "Neck", "NeckConfig",
           "build_neck", "check_preset", "TORCHVISION_PREFIX", "load_state", "torchvision_weights",
           "zero_eps_checkpoint", "resolve_weights"]
