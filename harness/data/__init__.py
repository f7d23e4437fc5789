"""Datasets as users have them (COCO, VisDrone, VOC, generated shapes), degraded test sets
(corruptions, conditions, the render cache, FCTL's twins) and the loaders a worker trains from."""
from harness.data.coco import (CHECK_LEVELS, CocoDetection, CocoIndex, ImageInfo, SharedEpoch, cached_index,
                               check_coco, check_image_files, collate_detection, hflip_boxes, image_to_float, load_coco, load_rgb,
                               open_index, read_image, save_index)
from harness.data.conditions import CLEAN, Condition, expand_conditions
from harness.data.corruptions import BENCHMARK, CORRUPTIONS, FAMILIES, FAMILY, GROUPS, SEVERITIES, corrupt, image_seed
from harness.data.loader import (PreparedCondition, PreparedDataset, eval_loader, load_split, prepare_conditions,
                                 prepare_dataset, set_loader_epoch, split_index, train_loader)
from harness.data.render_cache import render_condition
from harness.data.synthetic import write_synthetic_coco, write_synthetic_visdrone
from harness.data.twins import DegradedTwins, twin_conditions
from harness.data.visdrone import CATEGORIES as VISDRONE_CATEGORIES
from harness.data.visdrone import convert_visdrone, visdrone_to_coco

__all__ = ["CHECK_LEVELS", "CocoDetection", "CocoIndex", "ImageInfo", "SharedEpoch", "cached_index", "check_coco", "check_image_files",
           "collate_detection", "hflip_boxes", "image_to_float", "load_coco", "load_rgb", "open_index", "read_image",
           "save_index", "split_index", "CLEAN",
           "Condition", "expand_conditions", "BENCHMARK", "CORRUPTIONS", "FAMILIES", "FAMILY", "GROUPS", "SEVERITIES",
           "corrupt", "image_seed", "PreparedCondition", "PreparedDataset", "eval_loader", "load_split",
           "prepare_conditions", "prepare_dataset", "set_loader_epoch", "train_loader", "render_condition",
           "write_synthetic_coco", "write_synthetic_visdrone", "DegradedTwins", "twin_conditions",
           "VISDRONE_CATEGORIES", "convert_visdrone", "visdrone_to_coco"]
