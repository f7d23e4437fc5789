"""DeFeat: knowledge distillation with decoupled features (Guo et al., CVPR 2021).

Follows docs/methods.md, section "DeFeat". Two stages, ``teacher -> student``:

* ``teacher``: the harness trains the suite's detector with the larger
  backbone ``teacher_backbone`` (:meth:`DeFeat.stage_detector`); its artifact is
  keyed by ``teacher_backbone`` only (plus data / detector / schedule / seed),
  so sweeping any distillation weight reuses one teacher. With
  ``teacher_checkpoint`` (a local file, loaded with ``weights_only=True``) the
  stage is skipped (``active_stages == ("student",)``).
* ``student``: the suite's detector trained with its normal torchvision loss
  plus the DeFeat terms. The teacher is frozen: eval mode (also after
  ``model.train()``), ``requires_grad=False``, run under ``torch.no_grad()``;
  its features live only inside one step.

Neck term (Faster R-CNN and RetinaNet), per FPN level, :func:`decoupled_neck_loss`
with the GT masks of :func:`gt_level_masks` and one 3x3 conv adapter per level
(C -> C, no activation, weights N(0, 1).fmod(2) * 1e-4, bias at PyTorch's default: the released code)::

    L_fg = sum M (phi(S) - T)^2 / (2 max(1, C sum M))
    L_bg = sum (1-M) (phi(S) - T)^2 / (2 max(1, C sum (1-M)))
    L_neck = alpha_obj mean_levels(L_fg) + alpha_bg mean_levels(L_bg)

Head term (Faster R-CNN only), :func:`decoupled_kd_loss` on the RoI
classification logits. The decision (docs/methods.md): the TEACHER's RPN proposals after the
teacher's own sampler (``roi_heads.select_training_samples``), with the
teacher's labels (> 0 = positive), are pooled from both models' FPN features
through each model's own ``box_roi_pool / box_head / box_predictor``.

The student's detection loss is torchvision's own (its RPN, its sampler), from
the SAME backbone features the neck term uses: the student's forward is
written out with torchvision's pieces (transform, backbone, rpn, roi_heads /
head) so the backbone runs once per step.

Decisions where the specification (docs/methods.md) is silent (following the paper / released code where
it says something):

* All FPN levels take part in the neck term (P2..P6 of Faster R-CNN, P3..P7 of
  RetinaNet: the paper distils "the FPN features" without excluding a level).
  Padding added by the batch transform counts as background.
* Level assignment ``k = floor(log2(sqrt((w + 1)(h + 1)) / canonical_size + 1e-6))``
  is the released code's form (docs/methods.md; the paper writes ``sqrt(w h)``):
  boxes just under the 112/224/448 px boundaries go up a level. It counts from
  the FIRST available level: level 0 is P2 for Faster R-CNN (docs/methods.md) and P3 for
  RetinaNet, i.e. on RetinaNet a 56-px box lands on P3. Box coordinates are
  those of the transformed (resized) batch.
* The normalisers ``N_obj``, ``N_bg`` are taken over the whole batch of the
  worker (not per image).
* The teacher's RPN keeps its *training-time* pre/post-NMS top-n (the
  proposals its own RoI head was trained on) but runs with BN in eval mode and
  without computing its losses.
* KL divergence per RoI is summed over the K+1 classes (background included),
  then averaged over the RoIs of the group; an empty group contributes 0.
* Annealing (``anneal: true``) multiplies both terms by ``1 - progress`` with
  the harness's fractional progress (epoch + step / steps_per_epoch) / epochs,
  a per-step version of the documented ``1 - epoch / epochs``.
* ``parts: fg`` keeps only the foreground halves (``alpha_bg`` and ``beta_bg``
  forced to 0), ``parts: bg`` only the background halves (``alpha_obj`` and
  ``beta_obj`` forced to 0) -- the paper's ablations;
  ``use_neck: false`` / ``use_head: false`` drop a whole term.
* The teacher's detector is the suite's with ``backbone = teacher_backbone``
  and WITHOUT the suite's ``init_checkpoint`` (that file belongs to the
  student's backbone). ``teacher_checkpoint`` must hold a full detector of that
  spec (same arch, fpn_width, number of classes).
* A student stage built with no artifacts at all and no ``teacher_checkpoint``
  (only the registry's smoke test does that) gets a randomly initialised
  teacher and a logged warning "teacher has no trained weights".
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.rpn import concat_box_prediction_layers

from harness.config import DetectorSpec
from harness.core import ConfigError
from harness.modeling import (BACKBONES, FASTER_RCNN_STRIDES, RETINANET_STRIDES, build_detector, detection_losses,
                              load_state)
from harness.plugin import Method, MethodConfig, Stage, StageContext

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- masks
def gt_level_masks(boxes_per_image: Sequence[Tensor], feature_sizes: Sequence[tuple[int, int]],
                   strides: Sequence[int], canonical: float = 56.0) -> list[Tensor]:
    """Binary GT masks, one ``[N, H_l, W_l]`` float tensor per FPN level.

    ``boxes_per_image[i]``: ``[n_i, 4]`` boxes (x1, y1, x2, y2) in pixels of the
    (transformed) image; ``feature_sizes[l] = (H_l, W_l)``; ``strides[l]`` the
    level's stride, level 0 the first (largest) map.

    Each box is foreground on ONE level,
    ``k = floor(log2(sqrt((w + 1)(h + 1)) / canonical + 1e-6))`` (the released code's
    form) clamped to ``[0, L - 1]``; there it covers the cells
    ``[floor(x1/s), ceil(x2/s)) x [floor(y1/s), ceil(y2/s))`` clipped to the map
    and at least one cell. Other levels do not see the box (background there,
    unless another box assigned to them covers the pixels).
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(f"{len(feature_sizes)} feature sizes but {len(strides)} strides")
    n_levels = len(strides)
    device = boxes_per_image[0].device if len(boxes_per_image) else torch.device("cpu")
    masks = [torch.zeros(len(boxes_per_image), int(h), int(w), device=device) for h, w in feature_sizes]
    for i, boxes in enumerate(boxes_per_image):
        if boxes.numel() == 0:
            continue
        b = boxes.detach().to(torch.float64).reshape(-1, 4)
        side = (((b[:, 2] - b[:, 0]).clamp(min=0) + 1) * ((b[:, 3] - b[:, 1]).clamp(min=0) + 1)).sqrt()
        level = torch.floor(torch.log2(side / canonical + 1e-6)).clamp(0, n_levels - 1)
        for (x1, y1, x2, y2), k in zip(b.tolist(), level.long().tolist()):
            s = float(strides[k])
            h, w = masks[k].shape[1:]
            c0 = min(max(math.floor(x1 / s), 0), w - 1)
            r0 = min(max(math.floor(y1 / s), 0), h - 1)
            c1 = min(max(math.ceil(x2 / s), c0 + 1), w)
            r1 = min(max(math.ceil(y2 / s), r0 + 1), h)
            masks[k][i, r0:r1, c0:c1] = 1.0
    return masks


# --------------------------------------------------------------------------- losses
def _full_precision(x: Tensor) -> Tensor:
    """``x`` in at least float32: fp16 / bf16 (autocast outputs) upcast, float32 / float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _autocast_off(x: Tensor):
    """A context with autocast disabled for ``x``'s device: the ops inside run in their inputs' dtype."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def make_adapters(channels: int, levels: int) -> nn.ModuleList:
    """One 3x3 conv per level, C -> C, no activation, initialised as the released code does.

    Weights: N(0, 1) wrapped into (-2, 2) with ``fmod(2)``, times 1e-4 (so |w| < 2e-4);
    bias: PyTorch's default init, left as it is.
    """
    adapters = nn.ModuleList()
    for _ in range(levels):
        conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn_like(conv.weight).fmod(2).mul(1e-4))
        adapters.append(conv)
    return adapters


def _as_list(feats) -> list[Tensor]:
    return list(feats.values()) if isinstance(feats, Mapping) else list(feats)


def decoupled_neck_loss(student_feats, teacher_feats, masks: Sequence[Tensor], adapters: Sequence[nn.Module],
                        alpha_obj: float = 4.0, alpha_bg: float = 16.0) -> Tensor:
    """``alpha_obj L_fg + alpha_bg L_bg`` averaged over FPN levels (docs/methods.md).

    ``student_feats`` / ``teacher_feats``: per-level ``[N, C, H, W]`` maps (lists or
    ordered dicts, same shapes); ``masks``: per-level ``[N, H, W]`` from
    :func:`gt_level_masks`; ``adapters``: one module per level (phi).
    ``L_fg = sum M (phi(S) - T)^2 / (2 max(1, C sum M))``, ``L_bg`` likewise with
    ``1 - M``.

    Mixed precision: under autocast the features arrive in fp16 / bf16; the adapters and the
    squared error are computed in float32 with autocast disabled (the adapters' weights are
    ~1e-4, many below fp16's smallest normal 6e-5, and the sums run over whole FPN maps), result float32.
    Gradients flow back to the student features in their own dtype.
    """
    s_list, t_list = _as_list(student_feats), _as_list(teacher_feats)
    if not (len(s_list) == len(t_list) == len(masks) == len(adapters)) or not s_list:
        raise ValueError(f"levels differ: {len(s_list)} student, {len(t_list)} teacher, {len(masks)} masks, "
                         f"{len(adapters)} adapters")
    with _autocast_off(s_list[0]):
        return _neck_loss([_full_precision(x) for x in s_list], [_full_precision(x) for x in t_list], masks,
                          adapters, alpha_obj, alpha_bg)


def _neck_loss(s_list: list[Tensor], t_list: list[Tensor], masks: Sequence[Tensor], adapters: Sequence[nn.Module],
               alpha_obj: float, alpha_bg: float) -> Tensor:
    fg, bg = [], []
    for s, t, m, phi in zip(s_list, t_list, masks, adapters):
        if s.shape != t.shape or m.shape != (s.shape[0], *s.shape[2:]):
            raise ValueError(f"shape mismatch: student {tuple(s.shape)}, teacher {tuple(t.shape)}, "
                             f"mask {tuple(m.shape)}")
        c = s.shape[1]
        d = (phi(s) - t).pow(2).sum(dim=1)            # [N, H, W], summed over channels
        m = m.to(d.dtype)
        fg_sum = (d * m).sum()
        bg_sum = (d * (1 - m)).sum()
        n_obj = c * m.sum()
        n_bg = c * (m.numel() - m.sum())
        fg.append(fg_sum / (2 * n_obj.clamp(min=1)))
        bg.append(bg_sum / (2 * n_bg.clamp(min=1)))
    return alpha_obj * torch.stack(fg).mean() + alpha_bg * torch.stack(bg).mean()


def _group_kl(zs: Tensor, zt: Tensor, temperature: float) -> Tensor:
    """Mean over rows of ``T^2 KL(softmax(zt / T) || softmax(zs / T))``, in float32 at least
    (fp16 / bf16 logits from autocast are upcast, autocast is off: log-softmax differences and the
    sum over classes lose the KL's small values in half precision)."""
    with _autocast_off(zs):
        zs, zt = _full_precision(zs), _full_precision(zt)
        if zs.shape[0] == 0:
            return zs.sum() * 0.0  # keeps the graph connected
        return _kl_rows(zs, zt, temperature)


def _kl_rows(zs: Tensor, zt: Tensor, temperature: float) -> Tensor:
    kl = F.kl_div(F.log_softmax(zs / temperature, dim=1), F.log_softmax(zt / temperature, dim=1),
                  reduction="none", log_target=True).sum(dim=1)
    return kl.mean() * temperature ** 2


def decoupled_kd_loss(student_logits: Tensor, teacher_logits: Tensor, is_positive: Tensor,
                      T_obj: float = 1.0, T_bg: float = 1.0, beta_obj: float = 2.0, beta_bg: float = 2.0
                      ) -> Tensor:
    """``beta_obj L_obj + beta_bg L_bg`` on RoI classification logits ``[R, K + 1]`` (docs/methods.md).

    ``L_obj = T_obj^2 * mean over positive RoIs of KL(softmax(z_t / T_obj) || softmax(z_s / T_obj))``,
    ``L_bg`` likewise over the negative RoIs with ``T_bg``; an empty group contributes 0.
    Computed in float32 at least (autocast's fp16 / bf16 logits are upcast), result float32.
    """
    if student_logits.shape != teacher_logits.shape or is_positive.shape != student_logits.shape[:1]:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)}, is_positive {tuple(is_positive.shape)}")
    pos = is_positive.bool()
    zt = teacher_logits.detach()
    l_obj = _group_kl(student_logits[pos], zt[pos], T_obj)
    l_bg = _group_kl(student_logits[~pos], zt[~pos], T_bg)
    return beta_obj * l_obj + beta_bg * l_bg


# --------------------------------------------------------------------------- the student model
def _check_targets(targets: list[dict]) -> None:
    for i, t in enumerate(targets):
        b = t["boxes"]
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must be [N, 4], got {tuple(b.shape)}")
        if (b[:, 2:] <= b[:, :2]).any():
            raise ValueError(f"target {i}: all boxes need positive width and height")


def _teacher_proposals(rpn, images, features) -> list[Tensor]:
    """The RPN's proposals with its training-time top-n, no losses (call under no_grad)."""
    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(images, feats)
    per_level = [o[0].numel() for o in objectness]  # A * H * W
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    # float32 at least: under autocast the head's outputs are fp16 / bf16 and decoding in them
    # would round the boxes (bf16: 4 px steps at 512 px) and tie the top-n scores
    objectness, deltas = _full_precision(objectness), _full_precision(deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    was = rpn.training
    rpn.training = True  # only pre/post_nms_top_n() read it here
    try:
        boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    finally:
        rpn.training = was
    return boxes


def _roi_logits(roi_heads, features, proposals, image_sizes) -> Tensor:
    x = roi_heads.box_roi_pool(features, proposals, image_sizes)
    logits, _ = roi_heads.box_predictor(roi_heads.box_head(x))
    return logits


class DeFeatStudent(nn.Module):
    """Student detector + frozen teacher + neck adapters; ``forward`` returns the named losses.

    In eval mode ``forward(images)`` is the student's inference.
    """

    def __init__(self, detector: nn.Module, teacher: nn.Module, strides: Sequence[int], *,
                 use_neck: bool = True, use_head: bool = True, alpha_obj: float = 4.0, alpha_bg: float = 16.0,
                 beta_obj: float = 2.0, beta_bg: float = 2.0, T_obj: float = 1.0, T_bg: float = 1.0,
                 canonical: float = 56.0):
        super().__init__()
        if type(detector) is not type(teacher):
            raise ConfigError(f"teacher is a {type(teacher).__name__}, student a {type(detector).__name__}")
        self.detector = detector
        self.teacher = teacher
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.two_stage = isinstance(detector, FasterRCNN)
        self.use_neck, self.use_head = use_neck, use_head and self.two_stage
        self.strides = tuple(strides)
        self.alpha_obj, self.alpha_bg, self.beta_obj, self.beta_bg = alpha_obj, alpha_bg, beta_obj, beta_bg
        self.T_obj, self.T_bg, self.canonical = T_obj, T_bg, canonical
        channels = detector.backbone.out_channels
        if teacher.backbone.out_channels != channels:
            raise ConfigError(f"teacher FPN has {teacher.backbone.out_channels} channels, student {channels}")
        self.adapters = make_adapters(channels, len(self.strides)) if use_neck else None

    def train(self, mode: bool = True) -> "DeFeatStudent":
        super().train(mode)
        self.teacher.eval()  # frozen: BN statistics never move
        return self

    def forward(self, images: list[Tensor], targets: list[dict] | None = None, weight: float = 1.0):
        if not self.training:
            return self.detector(images)
        if targets is None:
            raise ValueError("targets are needed in training mode")
        _check_targets(targets)
        det, teacher = self.detector, self.teacher
        img_s, tgt_s = det.transform(images, targets)
        feats_s = det.backbone(img_s.tensors)
        losses = detection_losses(det, img_s, feats_s, tgt_s)

        with torch.no_grad():
            img_t, tgt_t = teacher.transform(images, targets)
            if img_t.tensors.shape != img_s.tensors.shape or img_t.image_sizes != img_s.image_sizes:
                raise RuntimeError(f"teacher and student transforms disagree: {tuple(img_t.tensors.shape)} "
                                   f"vs {tuple(img_s.tensors.shape)} (same image_size needed)")
            feats_t = teacher.backbone(img_t.tensors)
            if self.use_head:
                rois = _teacher_proposals(teacher.rpn, img_t, feats_t)
                rois, _, labels, _ = teacher.roi_heads.select_training_samples(rois, tgt_t)
                logits_t = _roi_logits(teacher.roi_heads, feats_t, rois, img_t.image_sizes)
        if self.use_neck:
            if len(feats_s) != len(self.strides):
                raise RuntimeError(f"{len(feats_s)} FPN levels but {len(self.strides)} strides")
            masks = gt_level_masks([t["boxes"] for t in tgt_s], [f.shape[-2:] for f in feats_s.values()],
                                   self.strides, self.canonical)
            losses["defeat_neck"] = weight * decoupled_neck_loss(feats_s, feats_t, masks, self.adapters,
                                                                 self.alpha_obj, self.alpha_bg)
        if self.use_head:
            logits_s = _roi_logits(det.roi_heads, feats_s, rois, img_s.image_sizes)
            losses["defeat_head"] = weight * decoupled_kd_loss(
                logits_s, logits_t, torch.cat(labels) > 0, self.T_obj, self.T_bg, self.beta_obj, self.beta_bg)
        del feats_t  # the teacher's features never outlive the step
        return losses


# --------------------------------------------------------------------------- the plugin
class DeFeatConfig(MethodConfig):
    """Defaults from docs/methods.md (COCO weights alpha 4 / 16, beta 2 / 2, temperatures 1)."""
    teacher_backbone: str = "resnet50"    # any registered backbone (harness.modeling.BACKBONES)
    teacher_checkpoint: str | None = None   # local detector weights: skips the teacher stage
    use_neck: bool = True
    use_head: bool = True                   # Faster R-CNN only (RetinaNet has no RoI head)
    parts: Literal["both", "fg", "bg"] = "both"
    alpha_obj: float = Field(4.0, ge=0)
    alpha_bg: float = Field(16.0, ge=0)
    beta_obj: float = Field(2.0, ge=0)
    beta_bg: float = Field(2.0, ge=0)
    T_obj: float = Field(1.0, gt=0)
    T_bg: float = Field(1.0, gt=0)
    canonical_size: float = Field(56.0, gt=0)  # level 0 size of the GT-box level assignment
    anneal: bool = False                    # both terms x (1 - progress)

    @field_validator("teacher_backbone")
    @classmethod
    def _registered_backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; available: {', '.join(BACKBONES.names())}")
        return v

    @model_validator(mode="after")
    def _parts(self) -> "DeFeatConfig":
        if not (self.use_neck or self.use_head):
            raise ValueError("use_neck and use_head are both false: nothing to distil "
                             "(train the student with its baseline method instead)")
        if self.parts == "fg":
            object.__setattr__(self, "alpha_bg", 0.0)
            object.__setattr__(self, "beta_bg", 0.0)
        elif self.parts == "bg":
            object.__setattr__(self, "alpha_obj", 0.0)
            object.__setattr__(self, "beta_obj", 0.0)
        return self


class DeFeat(Method):
    name = "defeat"
    Config = DeFeatConfig
    stages = (Stage("teacher", reads=("teacher_backbone",)), Stage("student"))
    arch = "faster_rcnn"
    supported_archs = ("retinanet",)
    default_search = {"alpha_obj": {"loguniform": [0.5, 16.0]}, "alpha_bg": {"loguniform": [2.0, 64.0]},
                      "beta_bg": {"loguniform": [0.5, 8.0]}}

    @property
    def active_stages(self) -> tuple[str, ...]:
        return ("student",) if self.config.teacher_checkpoint else self.stage_names()

    def stage_detector(self, stage: str, detector: DetectorSpec) -> DetectorSpec:
        if stage != "teacher":
            return detector
        return DetectorSpec.model_validate({**detector.model_dump(), "backbone": self.config.teacher_backbone,
                                            "init_checkpoint": None})

    def _teacher(self, ctx: StageContext) -> nn.Module:
        spec = self.stage_detector("teacher", ctx.detector)
        teacher = build_detector(spec, ctx.num_classes, arch=ctx.arch)
        path = self.config.teacher_checkpoint
        if path:
            path = os.path.expandvars(os.path.expanduser(path))
            state, source = load_state(path), path
        elif ctx.artifacts:  # KeyError naming the stages it has when "teacher" is missing
            state, source = ctx.artifact("teacher"), str(ctx.artifacts.get("teacher"))
        else:
            log.warning("defeat: teacher has no trained weights (no teacher artifact nor teacher_checkpoint); "
                        "distilling from a randomly initialised %s", spec.backbone)
            return teacher
        try:
            teacher.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"teacher weights do not fit a {ctx.arch}/{spec.backbone}/fpn{spec.fpn_width} "
                              f"detector with {ctx.num_classes} classes: {str(exc)[:300]}",
                              file=source, field="teacher_checkpoint") from None
        return teacher

    def build_model(self, stage: str, ctx: StageContext) -> nn.Module:
        if stage == "teacher":  # the harness already applied stage_detector to ctx.detector
            return build_detector(ctx.detector, ctx.num_classes, arch=ctx.arch)
        if stage != "student":
            raise ValueError(f"defeat has stages {self.stage_names()}, not {stage!r}")
        c = self.config
        if ctx.arch == "retinanet" and not c.use_neck:
            raise ConfigError("RetinaNet has no RoI head: use_neck: false leaves nothing to distil",
                              field="use_neck")
        student = build_detector(ctx.detector, ctx.num_classes, arch=ctx.arch)
        teacher = self._teacher(ctx)
        strides = FASTER_RCNN_STRIDES if ctx.arch == "faster_rcnn" else RETINANET_STRIDES
        return DeFeatStudent(student, teacher, strides, use_neck=c.use_neck, use_head=c.use_head,
                             alpha_obj=c.alpha_obj, alpha_bg=c.alpha_bg, beta_obj=c.beta_obj, beta_bg=c.beta_bg,
                             T_obj=c.T_obj, T_bg=c.T_bg, canonical=c.canonical_size)

    def distill_weight(self, ctx: StageContext) -> float:
        return max(0.0, 1.0 - ctx.progress) if self.config.anneal else 1.0

    def training_losses(self, stage: str, model: nn.Module, images: list[Tensor], targets: list[dict],
                        ctx: StageContext) -> dict[str, Tensor]:
        if stage == "teacher":
            return model(images, targets)
        return model(images, targets, weight=self.distill_weight(ctx))


__all__ = ["gt_level_masks", "make_adapters", "decoupled_neck_loss", "decoupled_kd_loss", "DeFeatStudent",
           "DeFeatConfig", "DeFeat"]
