"""Compatibility module: the degradation code now lives in four modules by concern.

* :mod:`harness.data.corruptions` -- the corruption table (COCO-C 15 + 4
  extras, ``rain``, ``dark``), families and groups, :func:`corrupt`,
  :func:`image_seed`, :func:`corruption_params`, :data:`DEGRADE_VERSION`;
* :mod:`harness.data.conditions` -- :class:`Condition`, :data:`CLEAN` and
  :func:`expand_conditions` (a suite's ``conditions:`` list);
* :mod:`harness.data.render_cache` -- :func:`render_condition` and the
  on-disk cache of rendered conditions;
* :mod:`harness.data.twins` -- :func:`twin_conditions` and
  :class:`DegradedTwins` (clean/degraded twins for FCTL).

Existing ``from harness.data.degrade import ...`` lines keep working: the
public names are re-exported here, unchanged (same objects).  To monkeypatch
a name, patch it in the module that defines (and looks it up) instead.
"""
from __future__ import annotations

from harness.data.conditions import CLEAN, Condition, expand_conditions
from harness.data.corruptions import (BENCHMARK, CORRUPTIONS, DARK_PARAMS, DEGRADE_VERSION,
                                      FAMILIES, FAMILY, GROUPS, HAZE_COLOUR, MIN_SIDE,
                                      RAIN_COLOUR, RAIN_PARAMS, SEVERITIES, CorruptionInfo,
                                      corrupt, corruption_params, image_seed)
from harness.data.render_cache import (JOURNAL, MANIFEST, PNG_COMPRESS_LEVEL, condition_root,
                                       dataset_key, render_condition)
from harness.data.twins import DegradedTwins, twin_conditions

__all__ = [
    # corruptions
    "BENCHMARK", "CORRUPTIONS", "DARK_PARAMS", "DEGRADE_VERSION", "FAMILIES", "FAMILY", "GROUPS",
    "HAZE_COLOUR", "MIN_SIDE", "RAIN_COLOUR", "RAIN_PARAMS", "SEVERITIES", "CorruptionInfo",
    "corrupt", "corruption_params", "image_seed",
    # conditions
    "CLEAN", "Condition", "expand_conditions",
    # render cache
    "JOURNAL", "MANIFEST", "PNG_COMPRESS_LEVEL", "condition_root", "dataset_key", "render_condition",
    # twins
    "DegradedTwins", "twin_conditions",
]
