"""SoCo: object-level self-supervised pretraining of a detector (Wei et al., NeurIPS 2021).

Follows docs/methods.md, section "SoCo". Stages ``pretrain -> finetune``:

* ``pretrain`` (no labels read, no evaluation): images of the training split (or of the
  folder ``pretrain_images``) become three views V1/V2/V3 with K corresponding
  selective-search proposals each (:mod:`methods.soco_data`: proposals filtered by
  :func:`filter_proposals`, computed once per image and cached on disk). The online
  network IS a torchvision Faster R-CNN (so its state dict is the detector's, the stage
  artifact): backbone + FPN, then per box RoIAlign 7x7 (sampling ratio 2, like the
  detector's own box pooling) from the FPN level :func:`assign_fpn_level` picks, with
  ``spatial_scale = 1 / stride``, the detector's RoI box head (TwoMLPHead, d = 1024),
  the projector and the predictor. The target (backbone + FPN, box head, projector) is
  an EMA of the online weights, never trained by gradient, updated in ``after_step``
  with :func:`momentum`. Loss (:func:`byol_loss`): V1 online vs V2 target + V2 online vs
  V1 target, and the same with V3, summed (the term ``byol``).
* ``finetune``: the normal Faster R-CNN training, initialised with the pretrain
  artifact's backbone + FPN and RoI box head (``transfer_box_head``).

Decisions where the specification (docs/methods.md) is silent (following the paper / released code, hologerry/SoCo):

* Each view pair (V1, V2) and (V1, V3) draws its own K proposals ("lie in both views":
  the proposal's intersection with the crop is non-empty; V2/V3 boxes are the clipped
  proposals, V1 boxes the jittered whole proposals), as the released code does.
* Each box takes its level from its own size in its own view (so one object may be
  pooled from P3 in V1 and P4 in V2); every corresponding pair counts in the loss.
* Views are normalised with the detector's own mean/std (``detector.transform``) and fed
  to the backbone without the detector's resize. Target modules run in train mode (BN
  batch statistics, as BYOL/SoCo); only parameters are averaged, target BN running
  statistics follow the target's own forward passes. BN is per worker under DDP (the
  released code uses SyncBN). The projector/predictor are Linear-BN-ReLU-Linear.
* The online detector's RPN and box predictor take no part in pretraining: they are
  frozen (``requires_grad = False``) there and not handed over.
* Augmentation probabilities are the released code's (see :mod:`methods.soco_data`);
  blur sigma U(0.1, 2.0) is scaled by view_size / 224.
* Raw detection batches reaching ``training_losses("pretrain")`` (lists of image
  tensors, e.g. the plugin smoke test) become views on the fly through the same
  :class:`ViewBuilder`, with proposals from the fallback random generator.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.ops import roi_align

from harness.config import ScheduleSpec
from harness.core import ConfigError
from harness.modeling import FASTER_RCNN_STRIDES, build_detector
from harness.plugin import Method, MethodConfig, Stage, StageContext
from methods.soco_data import (ImageFolder, ProposalParams, ProposalStore, SoCoViews, ViewBuilder, default_cache_dir,
                               filter_proposals, has_selective_search, random_proposals, selective_search,
                               stack_views)

log = logging.getLogger(__name__)

__all__ = ["SoCo", "SoCoConfig", "SoCoPretrainModel", "assign_fpn_level", "momentum", "byol_loss",
           "filter_proposals", "selective_search", "random_proposals", "ProposalStore", "ViewBuilder",
           "SoCoViews", "has_selective_search"]


# --------------------------------------------------------------------------- functions
def assign_fpn_level(boxes: Tensor, sides: tuple[float, float, float] = (48.0, 96.0, 192.0)) -> Tensor:
    """FPN level of xyxy boxes (view pixels) from their side sqrt(area): 0 = P2 ... 3 = P5.

    ``side <= sides[0]`` -> 0, ``<= sides[1]`` -> 1, ``<= sides[2]`` -> 2, else 3.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    side = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    return torch.bucketize(side, torch.tensor(sides, dtype=side.dtype, device=side.device), right=False)


def momentum(step: int, total_steps: int, m0: float = 0.99) -> float:
    """EMA momentum at step k of K: ``1 - (1 - m0) (cos(pi k / K) + 1) / 2`` (m0 at k=0, 1 at k=K)."""
    total = max(1, int(total_steps))
    k = min(max(0, int(step)), total)
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * k / total) + 1.0) / 2.0


def _full_precision(x: Tensor) -> Tensor:
    """``x`` in at least float32: fp16 / bf16 (autocast outputs) upcast, float32 / float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _autocast_off(x: Tensor):
    """A context with autocast disabled for ``x``'s device: the ops inside run in their inputs' dtype."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def byol_loss(online_pred: Tensor, target_proj: Tensor) -> Tensor:
    """Mean over rows of ``2 - 2 cos(online_pred_i, target_proj_i)``; the target is detached.

    Computed in float32 at least with autocast off (under autocast the projections are fp16 /
    bf16: the norms and ``2 - 2 cos`` near an aligned pair cancel in half precision); the
    result is float32, the gradient flows back to ``online_pred`` in its own dtype.
    """
    with _autocast_off(online_pred):
        p = F.normalize(_full_precision(online_pred), dim=-1)
        z = F.normalize(_full_precision(target_proj.detach()), dim=-1)
        return (2 - 2 * (p * z).sum(dim=-1)).mean()


# --------------------------------------------------------------------------- model
class MLPHead(nn.Sequential):
    """Linear -> BN -> ReLU -> Linear (SoCo's projector and predictor)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class SoCoPretrainModel(nn.Module):
    """The pretraining network; ``forward(views) -> {"byol": loss}``.

    ``detector`` (the online network, a torchvision FasterRCNN) is what the stage hands
    over; ``projector`` and ``predictor`` sit beside it; ``target`` holds EMA copies of
    backbone, box head and projector with ``requires_grad = False``.
    """

    def __init__(self, detector: nn.Module, *, proj_hidden: int = 4096, proj_dim: int = 256,
                 pred_hidden: int = 4096, level_sides=(48.0, 96.0, 192.0)):
        super().__init__()
        self.detector = detector
        for part in (detector.rpn, detector.roi_heads.box_predictor):
            part.requires_grad_(False)
        head = detector.roi_heads.box_head
        d = head.fc7.out_features
        self.projector = MLPHead(d, proj_hidden, proj_dim)
        self.predictor = MLPHead(proj_dim, pred_hidden, proj_dim)
        self.target = nn.ModuleDict({"backbone": copy.deepcopy(detector.backbone),
                                     "box_head": copy.deepcopy(head),
                                     "projector": copy.deepcopy(self.projector)})
        self.target.requires_grad_(False)
        pool = detector.roi_heads.box_roi_pool
        self.roi_size = tuple(pool.output_size) if not isinstance(pool.output_size, int) else (pool.output_size,) * 2
        self.sampling_ratio = int(pool.sampling_ratio)
        self.level_sides = tuple(float(s) for s in level_sides)

    def online_target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.detector.backbone, self.target["backbone"]),
                (self.detector.roi_heads.box_head, self.target["box_head"]),
                (self.projector, self.target["projector"])]

    @torch.no_grad()
    def update_target(self, m: float) -> None:
        """``target = m * target + (1 - m) * online`` for every parameter."""
        for online, target in self.online_target_pairs():
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(m).add_(po.detach(), alpha=1.0 - m)

    def _features(self, backbone: nn.Module, images: Tensor) -> list[Tensor]:
        feats = backbone(self.detector.transform.normalize(images))
        return list(feats.values())[:4]  # P2..P5 (the max-pool P6 is not used)

    def _embed(self, feats: list[Tensor], boxes: Tensor, box_head: nn.Module, projector: nn.Module) -> Tensor:
        """``[N, L, 4]`` view-pixel boxes -> ``[N * L, proj_dim]`` projections."""
        n, per = boxes.shape[:2]
        # float32 at least, not the features' dtype: under autocast those are fp16 / bf16, which
        # would round the box coordinates (bf16: 1 px steps at 128-256 px) and the batch index;
        # roi_align's autocast rule pools in float32
        flat = boxes.reshape(-1, 4).to(torch.promote_types(feats[0].dtype, torch.float32))
        levels = assign_fpn_level(flat, self.level_sides)
        batch = torch.arange(n, device=flat.device).repeat_interleave(per).to(flat.dtype)
        rois = torch.cat([batch[:, None], flat], dim=1)
        parts, order = [], []
        for lvl, (feat, stride) in enumerate(zip(feats, FASTER_RCNN_STRIDES)):
            idx = torch.nonzero(levels == lvl).flatten()
            if len(idx):
                parts.append(roi_align(feat, rois[idx], self.roi_size, spatial_scale=1.0 / stride,
                                       sampling_ratio=self.sampling_ratio))
                order.append(idx)
        pooled = torch.cat(parts)[torch.argsort(torch.cat(order))]
        return projector(box_head(pooled))

    def forward(self, views: dict[str, Tensor], targets=None) -> dict[str, Tensor]:
        K = views["b2"].shape[1]
        b1 = torch.cat([views["b1_12"], views["b1_13"]], dim=1)  # one pass for both V1 box sets
        head = self.detector.roi_heads.box_head
        f1, f2, f3 = (self._features(self.detector.backbone, views[v]) for v in ("v1", "v2", "v3"))
        q1 = self.predictor(self._embed(f1, b1, head, self.projector)).unflatten(0, (-1, 2 * K))
        q2 = self.predictor(self._embed(f2, views["b2"], head, self.projector))
        q3 = self.predictor(self._embed(f3, views["b3"], head, self.projector))
        with torch.no_grad():
            t = self.target
            g1, g2, g3 = (self._features(t["backbone"], views[v]) for v in ("v1", "v2", "v3"))
            z1 = self._embed(g1, b1, t["box_head"], t["projector"]).unflatten(0, (-1, 2 * K))
            z2 = self._embed(g2, views["b2"], t["box_head"], t["projector"])
            z3 = self._embed(g3, views["b3"], t["box_head"], t["projector"])
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        loss = (byol_loss(flat(q1[:, :K]), z2) + byol_loss(q2, flat(z1[:, :K]))
                + byol_loss(flat(q1[:, K:]), z3) + byol_loss(q3, flat(z1[:, K:])))
        # Every FPN output takes part in the graph (a level may get no box this step): DDP
        # then needs no find_unused_parameters. Adds exactly zero. Summed in float32: an fp16
        # map's sum overflows to inf under autocast, and 0 * inf is NaN.
        loss = loss + 0.0 * sum(f.sum(dtype=torch.promote_types(f.dtype, torch.float32)) for f in f1 + f2 + f3)
        return {"byol": loss}


# --------------------------------------------------------------------------- plugin
class SoCoConfig(MethodConfig):
    """Defaults from docs/methods.md (SoCo); the smoke suite shrinks the views and MLP widths."""
    pretrain_images: str | None = None     # folder of unlabeled images; None: the training split
    proposal_cache: str | None = None      # None: <data cache>/soco_proposals
    pretrain_epochs: int | None = Field(None, ge=1)   # None: the suite's schedule
    pretrain_lr: float | None = Field(None, gt=0)
    view_size: int = Field(224, ge=32)
    small_view_size: int = Field(112, ge=16)
    num_proposals: int = Field(4, ge=1)    # K per view pair
    crop_scale_min: float = Field(0.5, gt=0, le=1)
    jitter_prob: float = Field(0.5, ge=0, le=1)
    jitter_ratio: float = Field(0.1, ge=0, lt=0.5)
    base_momentum: float = Field(0.99, ge=0, lt=1)    # m0
    proj_hidden: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden: int = Field(4096, ge=1)
    level_sides: tuple[float, float, float] = (48.0, 96.0, 192.0)
    ss_scale: float = Field(300, gt=0)
    ss_sigma: float = Field(0.9, ge=0)
    ss_min_size: int = Field(100, ge=1)
    min_box_side: float = Field(32, ge=0)
    max_aspect: float = Field(3.0, ge=1)
    min_area_ratio: float = Field(0.3, ge=0)
    max_area_ratio: float = Field(0.8, le=1)
    transfer_box_head: bool = True         # hand over the RoI box head too (docs/methods.md: yes)

    @model_validator(mode="after")
    def _check(self) -> "SoCoConfig":
        if not self.min_area_ratio < self.max_area_ratio:
            raise ValueError("need min_area_ratio < max_area_ratio")
        if not 0 < self.level_sides[0] < self.level_sides[1] < self.level_sides[2]:
            raise ValueError("level_sides must be increasing and positive")
        return self


class SoCo(Method):
    name = "soco"
    Config = SoCoConfig
    arch = "faster_rcnn"
    #: Pretraining reads every field but the cache folder and the hand-over switch (its artifact
    #: is keyed by those it reads); it has no labels to evaluate against.
    stages = (Stage("pretrain", reads=tuple(f for f in SoCoConfig.model_fields
                                            if f not in ("proposal_cache", "transfer_box_head")), evaluates=False),
              Stage("finetune"))
    curves = {"train/byol": "SoCo pretraining loss"}

    def __init__(self, config=None):
        super().__init__(config)
        self.last_momentum: float | None = None

    # -- pieces
    def proposal_params(self) -> ProposalParams:
        c = self.config
        return ProposalParams(scale=c.ss_scale, sigma=c.ss_sigma, min_size=c.ss_min_size, min_side=c.min_box_side,
                              max_aspect=c.max_aspect, area_ratio=(c.min_area_ratio, c.max_area_ratio))

    def view_builder(self) -> ViewBuilder:
        c = self.config
        return ViewBuilder(view_size=c.view_size, small_view_size=c.small_view_size, num_proposals=c.num_proposals,
                           crop_scale=(c.crop_scale_min, 1.0), jitter_prob=c.jitter_prob, jitter_ratio=c.jitter_ratio)

    def proposal_store(self) -> ProposalStore:
        cache = self.config.proposal_cache or default_cache_dir()
        return ProposalStore(self.proposal_params(), cache)

    def views_from_images(self, images: list[Tensor]) -> dict[str, Tensor]:
        """Views of raw image tensors (no dataset, no cache): fallback random proposals."""
        builder, filter_kw = self.view_builder(), self.proposal_params().filter_kw()
        out = []
        for im in images:
            g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
            h, w = im.shape[-2:]
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=g)))
            out.append(builder(im.detach().cpu(), random_proposals(w, h, rng, **filter_kw), g))
        device = images[0].device
        return {k: v.to(device) for k, v in stack_views(out).items()}

    # -- harness hooks
    def stage_schedule(self, stage: str, schedule: ScheduleSpec) -> ScheduleSpec:
        if stage != "pretrain":
            return schedule
        update = {k: v for k, v in (("epochs", self.config.pretrain_epochs), ("lr", self.config.pretrain_lr))
                  if v is not None}
        return schedule.model_copy(update=update) if update else schedule

    @classmethod
    def test_config(cls, scratch: Path) -> dict:
        """Small views and heads, and the proposal cache in the test's folder."""
        return {"view_size": 64, "small_view_size": 32, "proj_hidden": 64, "proj_dim": 32, "pred_hidden": 64,
                "proposal_cache": str(scratch / "soco_proposals")}

    def stage_train_images(self, stage: str) -> int | None:
        if stage == "pretrain" and self.config.pretrain_images:
            return len(ImageFolder(self.config.pretrain_images))
        return None

    def train_dataset(self, stage: str, ctx: StageContext, dataset: Dataset) -> Dataset:
        if stage != "pretrain":
            return dataset
        source = ImageFolder(self.config.pretrain_images) if self.config.pretrain_images else dataset
        return SoCoViews(source, self.view_builder(), self.proposal_store(), seed=ctx.seed)

    def build_model(self, stage: str, ctx: StageContext) -> nn.Module:
        detector = build_detector(ctx.detector, ctx.num_classes, arch="faster_rcnn")
        c = self.config
        if stage == "pretrain":
            return SoCoPretrainModel(detector, proj_hidden=c.proj_hidden, proj_dim=c.proj_dim,
                                     pred_hidden=c.pred_hidden, level_sides=c.level_sides)
        if stage != "finetune":
            raise ValueError(f"SoCo has no stage {stage!r}")
        if "pretrain" not in ctx.artifacts:
            log.warning("SoCo finetune: no pretrain artifact, the detector starts from scratch")
            return detector
        self.load_pretrained(detector, ctx.artifact("pretrain"))
        return detector

    def load_pretrained(self, detector: nn.Module, state: dict[str, Tensor]) -> None:
        """Copy backbone + FPN (and the RoI box head) from a pretrain artifact into ``detector``."""
        prefixes = ("backbone.",) + (("roi_heads.box_head.",) if self.config.transfer_box_head else ())
        own = detector.state_dict()
        wanted = [k for k in own if k.startswith(prefixes)]
        missing = [k for k in wanted if k not in state]
        wrong = [k for k in wanted if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            raise ConfigError(f"the SoCo pretrain artifact does not fit the finetune detector "
                              f"({len(missing)} tensors missing, e.g. {missing[:2]}; {len(wrong)} of another "
                              f"shape, e.g. {wrong[:2]})", field="detector")
        detector.load_state_dict({k: state[k] for k in wanted}, strict=False)
        log.info("SoCo finetune: %d pretrained tensors loaded (%s)", len(wanted), ", ".join(prefixes))

    def training_losses(self, stage: str, model: nn.Module, images, targets, ctx: StageContext
                        ) -> dict[str, Tensor]:
        if stage != "pretrain":
            return model(images, targets)
        views = self.views_from_images(images) if torch.is_tensor(images[0]) else stack_views(images)
        return model(views)

    def after_step(self, stage: str, model: nn.Module, ctx: StageContext) -> None:
        if stage != "pretrain":
            return
        k = ctx.epoch * ctx.steps_per_epoch + ctx.step_in_epoch
        m = momentum(k, ctx.schedule.epochs * ctx.steps_per_epoch, self.config.base_momentum)
        getattr(model, "module", model).update_target(m)
        self.last_momentum = m

    def epoch_metrics(self, stage: str, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        if stage == "pretrain" and self.last_momentum is not None:
            return {"soco/momentum": self.last_momentum}
        return {}
