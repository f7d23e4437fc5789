"""Suite files: YAML validated into typed, frozen data.

A suite says *what* to benchmark (datasets x methods x seeds x conditions) and
*how big* (detector, schedule, resources). It is read with ``yaml.safe_load``
and validated by pydantic with ``extra="forbid"`` everywhere, so a typo is an
error naming the key path and the closest valid key, never a silently ignored
setting. Method-specific fields are validated against the plugin's own
``Config`` model (see :mod:`harness.method`), looked up in the registry.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import ConfigError

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3")
ARCHS = ("faster_rcnn", "retinanet")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSpec(Strict):
    """One split: a COCO instances JSON + image root, or a VisDrone-DET folder (``root``)."""
    annotations: str | None = None
    images: str | None = None
    root: str | None = None


class SyntheticSpec(Strict):
    """Parameters of the built-in synthetic shapes data (written as real COCO files)."""
    train_images: int = Field(160, ge=1)
    val_images: int = Field(48, ge=1)
    seed: int = 0
    image_size: int = Field(128, ge=32)
    max_objects: int = Field(4, ge=1)
    kind: Literal["coco", "visdrone"] = "coco"  # written in that dataset's real file format


class DatasetSpec(Strict):
    name: str
    format: Literal["coco", "visdrone", "synthetic"] = "coco"
    train: SplitSpec | None = None
    val: SplitSpec | None = None
    synthetic: SyntheticSpec | None = None

    @model_validator(mode="after")
    def _complete(self) -> "DatasetSpec":
        if self.format in ("coco", "visdrone") and (self.train is None or self.val is None):
            raise ValueError(f"a '{self.format}' dataset needs both 'train' and 'val' splits")
        need = ("root",) if self.format == "visdrone" else ("annotations", "images")
        for split in ("train", "val") if self.format != "synthetic" else ():
            missing = [k for k in need if getattr(getattr(self, split), k) is None]
            if missing:
                raise ValueError(f"{split}: a '{self.format}' split needs {' and '.join(need)}")
        if self.format == "synthetic" and self.synthetic is None:
            object.__setattr__(self, "synthetic", SyntheticSpec())
        return self


class RealCondition(Strict):
    """A real degraded test set (e.g. a foggy set), evaluated with the same models."""
    name: str
    format: Literal["coco", "voc"]
    annotations: str | None = None  # coco: instances JSON
    xml: str | None = None          # voc: folder of XML files
    images: str
    dataset: str | None = None      # the training dataset it belongs to (default: every dataset)

    @model_validator(mode="after")
    def _complete(self) -> "RealCondition":
        if (self.format == "coco") != (self.annotations is not None) or (self.format == "voc") != (self.xml is not None):
            raise ValueError("a 'coco' condition needs 'annotations', a 'voc' one needs 'xml'")
        return self


class DetectorSpec(Strict):
    """The detector every method of the suite builds on (a method may override fields)."""
    arch: Literal["faster_rcnn", "retinanet"] | None = None  # None: the method's own
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3"] = "resnet18"
    fpn_width: int = Field(64, ge=8)
    image_size: int = Field(128, ge=32)
    norm: Literal["bn", "gn", "frozen_bn"] = "bn"
    init_checkpoint: str | None = None  # local file, loaded with weights_only=True
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    detections_per_img: int = 100
    retina_fg_iou: float = 0.5  # RetinaNet anchor matcher (torchvision's defaults)
    retina_bg_iou: float = 0.4


class ScheduleSpec(Strict):
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.02, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = Field(50, ge=0)
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    grad_clip: float | None = 10.0
    eval_every: int = Field(1, ge=1)  # validation AP every N epochs (and always at the end)


Distribution = dict[Literal["uniform", "loguniform", "randint", "choice"], list[Any]]


class SearchSpec(Strict):
    """Hyperparameter search of one method: Optuna samples, ASHA stops early."""
    space: dict[str, Distribution]
    num_samples: int = Field(4, ge=1)
    metric: str = "AP"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)


class MethodSpec(Strict):
    name: str
    label: str | None = None  # leaderboard name; default = name[variant]
    config: dict[str, Any] = Field(default_factory=dict)
    detector: dict[str, Any] = Field(default_factory=dict)  # overrides of the suite detector
    schedule: dict[str, Any] = Field(default_factory=dict)  # overrides of the suite schedule
    search: SearchSpec | None = None
    datasets: list[str] | None = None  # only these datasets of the suite (default: all)
    baseline: str | None = None  # label of the row this method's gain is measured against


class ResourcesSpec(Strict):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int | Literal["auto"] = "auto"
    max_failures: int = Field(0, ge=0)  # Ray Train worker-group restarts per trial
    # Where a trial's workers go: PACK (fewest nodes) or SPREAD / STRICT_SPREAD (over nodes).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class Suite(Strict):
    name: str
    smoke: bool = False
    datasets: list[DatasetSpec] = Field(min_length=1)
    detector: DetectorSpec = Field(default_factory=DetectorSpec)
    methods: list[MethodSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    conditions: list[str | dict[str, Any]] = Field(default_factory=lambda: ["clean"])
    condition_seed: int = 0  # enters every corrupted image's seed
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    data_cache: str | None = None  # where generated data lives; default ~/.cache/detbench

    @field_validator("datasets")
    @classmethod
    def _unique_datasets(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        names = [d.name for d in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate dataset names {sorted(dup)}")
        return v

    def dataset(self, name: str) -> DatasetSpec:
        return next(d for d in self.datasets if d.name == name)


# ---------------------------------------------------------------- loading


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (to list its valid keys)."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        cur = next((a for a in getattr(ann, "__args__", (ann,)) + (ann,)
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        for a in getattr(ann, "__args__", ()):
            for b in getattr(a, "__args__", ()):
                if isinstance(b, type) and issubclass(b, BaseModel):
                    cur = b
        if cur is None:
            return None
    return cur


def format_validation_error(err: ValidationError, file: str, model: type[BaseModel],
                            prefix: tuple = ()) -> ConfigError:
    e = err.errors()[0]
    loc = prefix + tuple(e["loc"])
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        owner = _model_at(model, tuple(e["loc"]))
        valid = list(owner.model_fields) if owner else []
        msg = f"unknown key '{loc[-1]}'{_suggest(loc[-1], valid)}"
        if valid:
            msg += f"; valid keys: {', '.join(valid)}"
    elif e["type"] == "literal_error":
        msg = f"{msg}, got {e['input']!r}"
        expected = e.get("ctx", {}).get("expected", "")
        options = [o.strip(" '") for o in expected.replace(" or ", ",").split(",") if o.strip()]
        msg += _suggest(e["input"], options)
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(msg, file=file, field=path or None)


def load_suite(path: str | Path, *, check_paths: bool = True) -> Suite:
    """Read, validate and resolve a suite file; raise :class:`ConfigError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("suite file not found", file=path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}invalid YAML: {getattr(exc, 'problem', exc)}", file=path) from None
    if not isinstance(raw, dict):
        raise ConfigError("a suite must be a mapping of keys", file=path)
    raw.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, str(path), Suite) from None
    return resolve_suite(suite, path, check_paths=check_paths)


def _resolve_path(p: str, base: Path) -> str:
    p = os.path.expandvars(os.path.expanduser(p))
    return str((base / p).resolve()) if not os.path.isabs(p) else p


def resolve_suite(suite: Suite, path: Path, *, check_paths: bool = True) -> Suite:
    """Check names against the registries and make dataset paths absolute."""
    from harness.registry import METHODS  # the registry loads plugins lazily
    base = path.resolve().parent
    datasets = []
    for i, ds in enumerate(suite.datasets):
        upd = {}
        for split in ("train", "val"):
            sp = getattr(ds, split)
            if sp is None:
                continue
            resolved = SplitSpec(**{k: _resolve_path(v, base) for k, v in sp.model_dump().items() if v})
            for key, p in resolved.model_dump().items():
                if p and check_paths:
                    _check_exists(p, path, f"datasets[{i}].{split}.{key}")
            upd[split] = resolved
        datasets.append(ds.model_copy(update=upd))
    conditions = split_conditions(suite.conditions, path, base, check_paths)
    names = [d.name for d in suite.datasets]
    for i, m in enumerate(suite.methods):
        for k, d in enumerate(m.datasets or ()):
            if d not in names:
                raise ConfigError(f"unknown dataset '{d}'{_suggest(d, names)}; datasets: {', '.join(names)}",
                                  file=path, field=f"methods[{i}].datasets[{k}]")
        method = METHODS.get(m.name, file=path, field=f"methods[{i}].name")
        method.validate_config(m.config, file=str(path), prefix=("methods", i, "config"))
        for key, model, base_spec in (("detector", DetectorSpec, suite.detector),
                                      ("schedule", ScheduleSpec, suite.schedule)):
            try:
                model.model_validate({**base_spec.model_dump(), **getattr(m, key)})
            except ValidationError as err:
                raise format_validation_error(err, str(path), model, ("methods", i, key)) from None
        if m.search:
            for key in m.search.space:
                method.check_search_key(key, file=str(path), field=f"methods[{i}].search.space.{key}")
    labels = [method_label(m) for m in suite.methods]
    dup = {lab for lab in labels if labels.count(lab) > 1}
    if dup:
        raise ConfigError(f"two methods share the leaderboard label {sorted(dup)}; give one a 'label'",
                          file=path, field="methods")
    for i, m in enumerate(suite.methods):
        if m.baseline is not None and m.baseline not in labels:
            raise ConfigError(f"baseline '{m.baseline}' is not a method label of this suite"
                              f"{_suggest(m.baseline, labels)}; labels: {', '.join(labels)}",
                              file=path, field=f"methods[{i}].baseline")
    data_cache = suite.data_cache and _resolve_path(suite.data_cache, base)
    return suite.model_copy(update={"datasets": datasets, "data_cache": data_cache, "conditions": conditions})


def _check_exists(p: str, suite_file: Path, field: str) -> None:
    if os.path.exists(p):
        return
    hint = ""
    if "DETBENCH_DATA" not in os.environ and "$DETBENCH_DATA" in p:
        hint = " (set DETBENCH_DATA to the folder holding your datasets)"
    raise ConfigError(f"path does not exist: {p}{hint}", file=suite_file, field=field)


def split_conditions(items: list, path: Path, base: Path, check_paths: bool) -> list:
    """Validate ``conditions:``: corruption names/groups (expanded later) and real degraded sets."""
    from harness.data.degrade import expand_conditions
    out = []
    for k, item in enumerate(items):
        if isinstance(item, dict) and "format" in item:
            try:
                real = RealCondition.model_validate(item)
            except ValidationError as err:
                raise format_validation_error(err, str(path), RealCondition, ("conditions", k)) from None
            upd = {f: _resolve_path(getattr(real, f), base) for f in ("annotations", "xml", "images")
                   if getattr(real, f)}
            for f, p in upd.items():
                if check_paths:
                    _check_exists(p, path, f"conditions[{k}].{f}")
            out.append(real.model_copy(update=upd).model_dump())
        else:
            try:
                expand_conditions([item], field=f"conditions[{k}]")
            except ConfigError as err:
                raise ConfigError(err.message, file=path, field=err.field) from None
            out.append(item)
    return out


def method_label(m: MethodSpec) -> str:
    if m.label:
        return m.label
    variant = m.config.get("variant")
    return f"{m.name}[{variant}]" if variant else m.name


def detector_for(suite: Suite, m: MethodSpec) -> DetectorSpec:
    return DetectorSpec.model_validate({**suite.detector.model_dump(), **m.detector})


def schedule_for(suite: Suite, m: MethodSpec) -> ScheduleSpec:
    return ScheduleSpec.model_validate({**suite.schedule.model_dump(), **m.schedule})


def data_cache_dir(suite: Suite) -> Path:
    env = os.environ.get("DETBENCH_CACHE")
    return Path(suite.data_cache or env or Path.home() / ".cache" / "detbench")
