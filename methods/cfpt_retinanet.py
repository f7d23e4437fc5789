"""Method ``cfpt``: RetinaNet with the CFPT neck (:mod:`methods.cfpt`) and the focal loss.

The leaderboard row of the neck: the same detector, data, schedule and loss as
``focal`` (RetinaNet + FPN), with the FPN replaced by CFPT, so ``baseline: focal``
gives the neck's ΔAP. The neck is not tied to this row: any RetinaNet method takes it
with ``detector: {neck: cfpt}`` (e.g. ``umop`` + CFPT).

``neck_config`` holds CFPT's own fields (validated by ``methods.cfpt.CFPTConfig``); a
suite's ``detector.neck_config`` is used when the suite's neck is already ``cfpt``.
Official recipe (``configs/CFPT/retinanet_r18_cfpt_1x_visdrone.py``): see
``suites/cfpt_visdrone.yaml``.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from harness.config import DetectorSpec
from methods.cfpt import CFPTConfig
from methods.focal import FocalConfig, FocalRetinaNet


class CFPTMethodConfig(FocalConfig):
    """Focal loss fields (alpha 0.25, gamma 2; ``variant: ce`` as in ``focal``) + the neck's config."""
    neck_config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("neck_config")
    @classmethod
    def _valid_neck_config(cls, v: dict) -> dict:
        CFPTConfig(**v)  # unknown keys and even windows are refused here, naming the key
        return v


class CFPTRetinaNet(FocalRetinaNet):
    name = "cfpt"
    Config = CFPTMethodConfig

    def stage_detector(self, stage: str, detector: DetectorSpec) -> DetectorSpec:
        neck_config = {**(detector.neck_config if detector.neck == "cfpt" else {}), **self.config.neck_config}
        return detector.model_copy(update={"neck": "cfpt", "neck_config": neck_config})
