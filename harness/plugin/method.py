"""The method-plugin interface. Methods import this module; it never imports them.

A method is a recipe for training a detector: which stages it has (most have
one, ``train``; FCTL has ``ideal -> corrective``, DeFeat ``teacher ->
student``), which model each stage trains, and which loss terms it adds. The
harness owns everything else: data, optimiser loop, DDP, evaluation,
checkpoints, reporting.

Contract for a plugin class (registered under the entry-point group
``detbench.methods``). Declared, as class attributes:

* ``name``: the registry name; ``Config``: a pydantic model of its
  hyperparameters, defaults from the method's paper (docs/methods.md), every field sweepable;
* ``stages``: :class:`Stage` records, in order: what each one reads of the config,
  whether it is evaluated, whether its model's forward takes ``progress``;
* ``arch`` / ``supported_archs``: the torchvision detector it trains by default / also;
* ``find_unused_parameters``: whether DDP must look for parameters without a gradient;
* ``curves``: metric-name prefixes of per-epoch scalars worth a plot (``harness.report.outputs``);
* ``default_search``: a search space a suite can ask for with ``search: {space: default}``.

Hooks (all but ``build_model`` optional):

* ``build_model(stage, ctx)`` returns an ``nn.Module`` whose
  ``forward(images, targets[, progress=...])`` returns a dict of named loss tensors in
  train mode (so DDP wraps the whole thing and every term is logged);
* ``training_losses(stage, model, images, targets, ctx)`` calls it; the harness sums the terms;
* ``detector_of(model)`` the torchvision detector evaluated and handed to later stages;
* ``stage_detector`` / ``stage_schedule`` / ``train_dataset`` what a stage trains and on what;
* ``after_step`` / ``epoch_metrics`` per-step updates (an EMA) and per-epoch scalars.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn
from torch.utils.data import Dataset

from harness.config import DetectorSpec, ScheduleSpec
from harness.core import ConfigError, Registry, format_validation_error
from harness.data import PreparedCondition
from harness.modeling import CLASSIFICATION_TERMS


@dataclass(frozen=True)
class Stage:
    """One stage of a method, as the harness runs it (declared, not switched on its name).

    ``reads``: for a stage before the last, the config fields its output depends on. Its
    output is cached by these (plus data, detector, schedule and seed), so sweeping any
    other field reuses it; the last stage reads the whole config. ``evaluates``: whether
    its detector is evaluated (not, e.g., self-supervised pretraining). ``takes_progress``:
    its model's forward takes ``progress=`` (fraction of training done, for schedules
    inside a loss).
    """
    name: str
    reads: tuple[str, ...] = ()
    evaluates: bool = True
    takes_progress: bool = False


class MethodConfig(BaseModel):
    """Base for plugins' ``Config``: unknown keys are errors, values are frozen."""
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageContext:
    """What a plugin may know about the run while it builds and trains a stage."""
    stage: str
    detector: DetectorSpec
    arch: str
    schedule: ScheduleSpec
    num_classes: int                      # foreground classes K (labels 1..K)
    class_names: list[str]
    device: torch.device
    seed: int
    world_size: int = 1
    rank: int = 0
    epoch: int = 0                        # 0-based epoch being trained
    step_in_epoch: int = 0
    steps_per_epoch: int = 1
    artifacts: dict[str, Path] = field(default_factory=dict)  # earlier stage -> weights file
    conditions: list[PreparedCondition] = field(default_factory=list)  # the dataset's degraded test sets

    @property
    def progress(self) -> float:
        """Fraction of training done: epoch / total epochs, fractional within an epoch."""
        return (self.epoch + self.step_in_epoch / max(1, self.steps_per_epoch)) / self.schedule.epochs

    def artifact(self, stage: str) -> dict[str, torch.Tensor]:
        """The detector weights an earlier stage produced (loaded with ``weights_only=True``)."""
        if stage not in self.artifacts:
            raise KeyError(f"stage {stage!r} has produced no artifact (have: {sorted(self.artifacts)})")
        return torch.load(self.artifacts[stage], map_location="cpu", weights_only=True)


class Method:
    """Base class of method plugins; see the module docstring for the contract."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("train"),)
    arch: ClassVar[str] = "faster_rcnn"                     # the detector trained by default
    supported_archs: ClassVar[tuple[str, ...]] = ()         # others it can train (suite detector.arch)
    find_unused_parameters: ClassVar[bool] = False          # DDP: some parameters get no gradient
    curves: ClassVar[dict[str, str]] = {}                   # metric prefix -> plot title (harness.report.outputs)
    default_search: ClassVar[dict[str, dict]] = {}          # ``search: {space: default}``
    def __init__(self, config: MethodConfig | dict | None = None):
        self.config = config if isinstance(config, MethodConfig) else self.Config(**(config or {}))

    # -- what the test suite needs of a plugin (timm's default configs, benchopt's test_config)
    def main_loss_term(self, arch: str) -> str:
        """The loss term the last stage's detector learns its classes from: the broken variant of the
        CI signal check weights it 0 (``schedule.loss_weights``) and must lose its AP (docs/ci.md).
        Default: the arch's classification term (:data:`harness.modeling.CLASSIFICATION_TERMS`)."""
        return CLASSIFICATION_TERMS[arch]

    @classmethod
    def test_config(cls, scratch: Path) -> dict:
        """A configuration small enough for one training step on a CPU in the test suite, with
        any cache it keeps inside ``scratch`` (a folder the test owns). Default: the defaults."""
        return {}

    def example_inputs(self, stage: str, images: list[Tensor]) -> list:
        """What ``stage``'s :meth:`train_dataset` hands :meth:`training_losses` for a batch whose
        clean images are ``images`` (tests and benchmarks feed a stage without building its
        dataset). Default: the images themselves."""
        return images

    # -- validation, used by harness.plan before anything runs
    @classmethod
    def validate_config(cls, raw: dict, *, file: str = "", prefix: tuple = ()) -> MethodConfig:
        try:
            return cls.Config(**raw)
        except ValidationError as err:
            raise format_validation_error(err, file, cls.Config, prefix) from None

    @classmethod
    def check_search_key(cls, key: str, *, file: str = "", field: str = "") -> None:
        """Search keys are the method's config fields or ``schedule.<field>``."""
        group, _, name = key.rpartition(".")
        valid = {"": cls.Config.model_fields, "schedule": ScheduleSpec.model_fields}
        if group not in valid or name not in valid[group]:
            options = list(cls.Config.model_fields) + [f"schedule.{f}" for f in ScheduleSpec.model_fields]
            raise ConfigError(f"'{key}' is not a field of method '{cls.name}' nor of the schedule; "
                              f"valid: {', '.join(options)}", file=file, field=field)

    @classmethod
    def stage_names(cls) -> tuple[str, ...]:
        return tuple(s.name for s in cls.stages)

    @classmethod
    def stage(cls, name: str) -> Stage:
        """The declared :class:`Stage` called ``name``."""
        for s in cls.stages:
            if s.name == name:
                return s
        raise ValueError(f"{cls.name} has stages {cls.stage_names()}, not {name!r}")

    def stage_detector(self, stage: str, detector: DetectorSpec) -> DetectorSpec:
        """The detector a stage trains (e.g. DeFeat's larger teacher); default: the suite's."""
        return detector

    def stage_schedule(self, stage: str, schedule: ScheduleSpec) -> ScheduleSpec:
        return schedule

    def stage_key(self, stage: str) -> dict:
        """What of this method's config determines ``stage``'s output (for the artifact key)."""
        if stage == self.stages[-1].name:
            return self.config.model_dump()
        return {f: getattr(self.config, f) for f in self.stage(stage).reads}

    @property
    def active_stages(self) -> tuple[str, ...]:
        """The stages this configuration runs (e.g. no teacher stage when a teacher file is given)."""
        return self.stage_names()

    def train_dataset(self, stage: str, ctx: StageContext, dataset: Dataset) -> Dataset:
        """What a stage trains on; default the detection dataset of (image, target) pairs.

        A dataset with ``set_epoch(epoch)`` (e.g. :class:`~harness.data.DegradedTwins`)
        is told the epoch before each one, like the distributed sampler.

        Samples must stay pairs ``(inputs, targets)``: the loader collates them into two
        lists, moves every tensor inside to the device and hands them to ``training_losses``.
        """
        return dataset

    def stage_train_images(self, stage: str) -> int | None:
        """Images a stage trains on per epoch when it does not train on the dataset's train split
        (e.g. pretraining on a folder of unlabeled images); None: the train split. ``detbench plan``
        counts with it, without building the stage's dataset."""
        return None

    def after_step(self, stage: str, model: nn.Module, ctx: StageContext) -> None:
        """Called after every optimiser step (e.g. an EMA target update)."""

    # -- what plugins implement
    def build_model(self, stage: str, ctx: StageContext) -> nn.Module:
        raise NotImplementedError

    def training_losses(self, stage: str, model: nn.Module, images: list[torch.Tensor],
                        targets: list[dict], ctx: StageContext) -> dict[str, torch.Tensor]:
        if self.stage(stage).takes_progress:
            return model(images, targets, progress=ctx.progress)
        return model(images, targets)

    def detector_of(self, model: nn.Module) -> nn.Module:
        model = getattr(model, "module", model)  # DDP-wrapped
        return getattr(model, "detector", model)

    def epoch_metrics(self, stage: str, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        return {}

    @property
    def variant(self) -> str:
        return str(getattr(self.config, "variant", "") or "")

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any]]:
        """(field, type, default) of every config field, for ``detbench methods``."""
        return [(n, getattr(f.annotation, "__name__", str(f.annotation)), f.default)
                for n, f in cls.Config.model_fields.items()]


#: Method plugins (:class:`Method` subclasses), loaded from the entry-point group ``detbench.methods``.
METHODS: Registry[type[Method]] = Registry("method", group="detbench.methods")
