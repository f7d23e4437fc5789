"""The method-plugin interface. Methods import this module; it never imports them.

A method is a recipe for training a detector: which stages it has (most have
one, ``train``; FCTL has ``ideal -> corrective``, DeFeat ``teacher ->
student``), which model each stage trains, and which loss terms it adds. The
harness owns everything else: data, optimiser loop, DDP, evaluation,
checkpoints, reporting.

Contract for a plugin class (registered under the entry-point group
``detbench.methods``):

* ``name``: the registry name; ``Config``: a pydantic model of its
  hyperparameters, defaults from SPEC.md, every field sweepable;
* ``arch``: the torchvision detector it trains by default;
* ``build_model(stage, ctx)`` returns an ``nn.Module`` whose
  ``forward(images, targets, **kw)`` returns a dict of named loss tensors in
  train mode (so DDP wraps the whole thing and every term is logged);
* ``training_losses(stage, model, images, targets, ctx)`` calls it (override
  to pass extra arguments such as ``progress``); the harness sums the terms;
* ``detector_of(model)`` returns the torchvision detector used for
  evaluation and handed to later stages;
* ``epoch_metrics(stage, model, ctx)`` optional per-epoch scalars for the
  results (e.g. UMOP's gamma_ad per level);
* ``search_space()`` optional default Tune space.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from torch.utils.data import Dataset

from harness.config import DetectorSpec, ScheduleSpec, format_validation_error
from harness.errors import ConfigError


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
    conditions: list[dict] = field(default_factory=list)      # the dataset's degraded test sets

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
    stages: ClassVar[tuple[str, ...]] = ("train",)
    arch: ClassVar[str] = "faster_rcnn"                     # the detector trained by default
    supported_archs: ClassVar[tuple[str, ...]] = ()         # others it can train (suite detector.arch)

    def __init__(self, config: MethodConfig | dict | None = None):
        self.config = config if isinstance(config, MethodConfig) else self.Config(**(config or {}))

    # -- validation, used by harness.config before anything runs
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

    #: For stages before the last: the config fields each one reads. An earlier stage's
    #: output is cached by these (plus data, detector, schedule, seed), so sweeping
    #: any other field reuses it. Stages not listed read no field.
    stage_fields: ClassVar[dict[str, tuple[str, ...]]] = {}

    def stage_detector(self, stage: str, detector: DetectorSpec) -> DetectorSpec:
        """The detector a stage trains (e.g. DeFeat's larger teacher); default: the suite's."""
        return detector

    def stage_schedule(self, stage: str, schedule: ScheduleSpec) -> ScheduleSpec:
        return schedule

    def stage_key(self, stage: str) -> dict:
        """What of this method's config determines ``stage``'s output (for the artifact key)."""
        if stage == self.stages[-1]:
            return self.config.model_dump()
        return {f: getattr(self.config, f) for f in self.stage_fields.get(stage, ())}

    @property
    def active_stages(self) -> tuple[str, ...]:
        """The stages this configuration runs (e.g. no teacher stage when a teacher file is given)."""
        return self.stages

    def train_dataset(self, stage: str, ctx: StageContext, dataset: Dataset) -> Dataset:
        """What a stage trains on; default the detection dataset of (image, target) pairs.

        A dataset with ``set_epoch(epoch)`` (e.g. :class:`~harness.data.degrade.DegradedTwins`)
        is told the epoch before each one, like the distributed sampler.

        Samples must stay pairs ``(inputs, targets)``: the loader collates them into two
        lists, moves every tensor inside to the device and hands them to ``training_losses``.
        """
        return dataset

    def evaluates(self, stage: str) -> bool:
        """Whether a stage's detector is evaluated (not, e.g., for self-supervised pretraining)."""
        return True

    def after_step(self, stage: str, model: nn.Module, ctx: StageContext) -> None:
        """Called after every optimiser step (e.g. an EMA target update)."""

    # -- what plugins implement
    def build_model(self, stage: str, ctx: StageContext) -> nn.Module:
        raise NotImplementedError

    def training_losses(self, stage: str, model: nn.Module, images: list[torch.Tensor],
                        targets: list[dict], ctx: StageContext) -> dict[str, torch.Tensor]:
        return model(images, targets)

    def detector_of(self, model: nn.Module) -> nn.Module:
        model = getattr(model, "module", model)  # DDP-wrapped
        return getattr(model, "detector", model)

    def epoch_metrics(self, stage: str, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        return {}

    def search_space(self) -> dict[str, Any]:
        return {}

    @property
    def variant(self) -> str:
        return str(getattr(self.config, "variant", "") or "")

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any]]:
        """(field, type, default) of every config field, for ``detbench methods``."""
        return [(n, getattr(f.annotation, "__name__", str(f.annotation)), f.default)
                for n, f in cls.Config.model_fields.items()]
