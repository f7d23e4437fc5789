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
from pydantic_core import PydanticCustomError

from harness.errors import ConfigError

#: The built-in backbones (``detector.backbone`` accepts any in :data:`harness.backbones.BACKBONES`).
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3")
ARCHS = ("faster_rcnn", "retinanet")
#: pydantic error type of a name not in a plugin registry (its message already quotes the value).
UNKNOWN_PLUGIN = "unknown_plugin"


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
    seed: int = Field(0, ge=0)
    image_size: int = Field(128, ge=32)
    max_objects: int = Field(4, ge=1)
    kind: Literal["coco", "visdrone"] = "coco"  # written in that dataset's real file format


class DatasetSpec(Strict):
    name: str
    format: Literal["coco", "visdrone", "synthetic"] = "coco"
    repeat: int = Field(1, ge=1)  # the train split N times per epoch (mmdet's RepeatDataset)
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
    backbone: str = "resnet18"         # a backbone plugin (harness.backbones): resnet18..101, mobilenet_v3, ...
    fpn_width: int = Field(64, ge=8)   # the neck's width (every pyramid level)
    neck: str = "fpn"                  # a neck plugin (harness.necks): fpn, none, cfpt, ...
    neck_config: dict[str, Any] = Field(default_factory=dict)  # validated by the neck's own Config
    image_size: int = Field(128, ge=32)  # shorthand for min_size = max_size = image_size (square inputs)
    # Keep-ratio resizing as torchvision/detectron2 do it: the shorter side to min_size (one picked at
    # random per batch when a list: multi-scale training; the largest at test time), the longer at most
    # max_size. Unset: image_size.
    min_size: int | list[int] | None = None
    max_size: int | None = None
    # Backbone normalisation. None: frozen BN when pretrained weights are given (backbone_weights or
    # init_checkpoint; torchvision's rule, except its v2 recipes, which train BN), else BN.
    norm: Literal["bn", "gn", "frozen_bn"] | None = None
    # torchvision's exact detectors (harness.presets): fasterrcnn_resnet50_fpn(_v2),
    # retinanet_resnet50_fpn(_v2), fasterrcnn_mobilenet_v3_large_fpn; sizes 800/1333 unless set.
    preset: Literal["torchvision_v1", "torchvision_v2"] | None = None
    # A classification checkpoint for the backbone body: a local file, or
    # "torchvision:<Weights enum>.<member>" resolved to torchvision's cache file (never downloaded).
    backbone_weights: str | None = None
    # Backbone stages that get gradients, torchvision's meaning (ResNet 0..5, MobileNetV3 0..6; 0: none).
    # None: 3 with pretrained weights, else all.
    trainable_layers: int | None = Field(None, ge=0, le=6)
    init_checkpoint: str | None = None  # a whole detector: local file or "torchvision:<Weights>.<member>"
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    detections_per_img: int | None = Field(None, ge=1)  # None: 100 (torchvision's RetinaNet preset: 300)
    retina_fg_iou: float = 0.5  # RetinaNet anchor matcher (torchvision's defaults)
    retina_bg_iou: float = 0.4

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from harness.backbones import BACKBONES as REGISTRY  # loads the plugins on first use
        try:
            REGISTRY.get(v)
        except ConfigError as err:  # the registry's "unknown backbone 'x' (did you mean ...); available: ..."
            raise PydanticCustomError(UNKNOWN_PLUGIN, "{message}", {"message": err.message}) from None
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "DetectorSpec":
        sizes = self.min_sizes
        if not sizes or any(not isinstance(v, int) or v < 32 for v in sizes):
            raise ValueError(f"min_size must be an integer >= 32 or a non-empty list of them, got {self.min_size!r}")
        if max(sizes) > self.resize_max:
            raise ValueError(f"min_size {max(sizes)} is larger than max_size {self.resize_max}")
        if self.trainable_layers is not None and self.trainable_layers > self.backbone_stages:
            raise ValueError(f"trainable_layers of a {self.backbone} backbone is 0..{self.backbone_stages}, "
                             f"got {self.trainable_layers}")
        return self

    @property
    def backbone_stages(self) -> int:
        """Stages torchvision counts for ``trainable_layers``: 5 in a ResNet, 6 in MobileNetV3 (the plugin's)."""
        from harness.backbones import BACKBONES as REGISTRY
        return REGISTRY.get(self.backbone, field="detector.backbone").max_trainable_layers

    def max_detections(self, arch: str) -> int:
        """Detections kept per image: ``detections_per_img``, or torchvision's default for the detector."""
        if self.detections_per_img is not None:
            return self.detections_per_img
        return 300 if self.preset and arch == "retinanet" else 100

    @property
    def min_sizes(self) -> tuple[int, ...]:
        """Shorter-side sizes (training picks one per batch; evaluation uses the last).

        Unset: ``image_size``, or torchvision's 800 under a preset."""
        if self.min_size is None:
            return (800,) if self.preset else (self.image_size,)
        return tuple(self.min_size) if isinstance(self.min_size, list) else (self.min_size,)

    @property
    def resize_max(self) -> int:
        """The longer side's limit. Unset: ``image_size`` (square inputs), or 1333 under a preset."""
        if self.max_size is not None:
            return self.max_size
        return max(1333 if self.preset else self.image_size, *self.min_sizes)

    @property
    def pretrained(self) -> bool:
        """Whether the detector starts from pretrained weights (torchvision's ``is_trained``)."""
        return bool(self.backbone_weights or self.init_checkpoint)

    @property
    def norm_kind(self) -> str:
        """The backbone's normalisation: ``norm``, or torchvision's default for the recipe."""
        if self.norm is not None:
            return self.norm
        return "frozen_bn" if self.pretrained and self.preset != "torchvision_v2" else "bn"

    @property
    def trainable_stages(self) -> int:
        """Backbone stages with gradients: ``trainable_layers`` or torchvision's default (3 / 5)."""
        if self.trainable_layers is not None:
            return self.trainable_layers
        return 3 if self.pretrained else self.backbone_stages


class ScheduleSpec(Strict):
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.02, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = Field(50, ge=0)
    # Linear warm-up from this factor of the lr (torchvision references: 0.001); None: from 1/warmup_iters.
    warmup_factor: float | None = Field(None, ge=0, le=1)
    # cosine; step (x0.1 at 2/3 and 8/9 of training); multistep (x lr_gamma after each epoch of
    # lr_steps, as the references' MultiStepLR); constant.
    lr_schedule: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    lr_steps: list[int] = Field(default_factory=list)
    lr_gamma: float = Field(0.1, gt=0)
    # lr is given for this total batch (e.g. 16 in the references); the real total batch scales it
    # linearly (Goyal et al.). None: lr is used as given.
    lr_reference_batch: int | None = Field(None, ge=1)
    # Weight decay of normalisation layers and of parameters a module declares decay-free
    # (``no_weight_decay()``, e.g. relative position tables); None: weight_decay for all.
    norm_weight_decay: float | None = Field(None, ge=0)
    grad_clip: float | None = 10.0
    # Mixed precision: forward and losses under torch.autocast (fp16 + GradScaler on CUDA, bf16 on CPU);
    # loss terms that need full precision compute in fp32 inside it.
    amp: bool = False
    # Deterministic kernels where they exist (torch.use_deterministic_algorithms, cuDNN without
    # benchmarking, a fixed cuBLAS workspace). CPU training is deterministic already; on CUDA some
    # ops have no deterministic backward (roi_align's uses atomics): they warn, results still vary.
    deterministic: bool = False
    # Scales named loss terms before they are summed (every term is still logged as computed):
    # 0 switches a term off, for ablations and for the deliberately broken variants a CI smoke
    # check compares with (docs/ci.md). Terms not named keep weight 1.
    loss_weights: dict[str, float] = Field(default_factory=dict)
    # Batches of images with similar aspect ratios (torchvision references' GroupedBatchSampler):
    # 2 * factor + 1 bins of log2 aspect ratio; None: plain shuffled batches.
    aspect_ratio_group_factor: int | None = Field(None, ge=0)
    eval_every: int = Field(1, ge=1)  # validation AP every N epochs (and always at the end)

    @model_validator(mode="after")
    def _steps(self) -> "ScheduleSpec":
        if self.lr_schedule == "multistep" and not self.lr_steps:
            raise ValueError("lr_schedule multistep needs lr_steps (epochs after which lr *= lr_gamma)")
        if any(not 0 < e <= self.epochs for e in self.lr_steps) or self.lr_steps != sorted(self.lr_steps):
            raise ValueError(f"lr_steps must be ascending epochs in 1..{self.epochs}, got {self.lr_steps}")
        return self

    @property
    def base_lr(self) -> float:
        """The lr at the end of warm-up, after the linear scaling rule."""
        return self.lr * (self.batch_size / self.lr_reference_batch if self.lr_reference_batch else 1.0)


Distribution = dict[Literal["uniform", "loguniform", "randint", "choice"], list[Any]]


class SearchSpec(Strict):
    """Hyperparameter search of one method: Optuna samples, ASHA stops early.

    ``space: default`` takes the method's own declared space (``Method.default_search``).
    """
    space: dict[str, Distribution] | Literal["default"]
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
    published: str | None = None  # key of the reference number in suites/published.csv (harness.published)


class ResourcesSpec(Strict):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int | Literal["auto"] = "auto"
    max_failures: int = Field(0, ge=0)  # Ray Train worker-group restarts per trial
    # Where a trial's workers go: PACK (fewest nodes) or SPREAD / STRICT_SPREAD (over nodes).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class StorageSpec(Strict):
    """Where run directories go when ``--out`` is not given: a folder or ``s3://BUCKET/PREFIX``.

    ``endpoint_url`` / ``region`` select an S3-compatible server (MinIO, Ceph); they default
    to ``DETBENCH_STORAGE_ENDPOINT_URL`` / ``DETBENCH_STORAGE_REGION``. There is no
    credentials field on purpose: they come from the environment's standard chain only.
    """
    uri: str | None = None
    endpoint_url: str | None = None
    region: str | None = None

    def options(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "region": self.region}


class LeaderboardSpec(Strict):
    """How the leaderboard states uncertainty (docs/leaderboards.md).

    ``bootstrap``: resamples of the paired image-level bootstrap of ΔAP against each row's
    baseline (0 = no intervals); ``ci``: the interval's coverage; ``seed``: the resampling
    seed, so the same run gives the same intervals.
    """
    bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


#: Live monitoring of a sweep (harness.loggers): TensorBoard event files per trial by default;
#: MLflow and Weights & Biases when a suite names them.
LOGGERS = ("tensorboard", "mlflow", "wandb")


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
    storage: StorageSpec = Field(default_factory=StorageSpec)  # where run directories go (harness.storage)
    leaderboard: LeaderboardSpec = Field(default_factory=LeaderboardSpec)
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])

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
    elif (isinstance(e.get("input"), (int, float, str, bool)) and e["type"] not in ("missing", UNKNOWN_PLUGIN)
          and f"got {e['input']!r}" not in msg):
        msg = f"{msg}, got {e['input']!r}"  # the value as the user wrote it
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(msg, file=file, field=path or None)


#: Largest YAML document (in nodes, every alias counted as the copy it stands for) we read:
#: a real suite has a few hundred; an alias chain ("billion laughs") has billions.
YAML_MAX_NODES = 100_000


def _expanded_size(node, memo: dict) -> int:
    """Nodes of ``node`` with every alias expanded (a composed YAML graph shares aliased nodes)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once: safe_load refuses it later anyway
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    total = 1
    for child in children:
        total += _expanded_size(child, memo)
        if total > YAML_MAX_NODES:
            break
    memo[key] = total
    return total


def read_yaml(path: str | Path, *, what: str = "file"):
    """``yaml.safe_load`` of ``path`` with a size limit on the alias-expanded document.

    The one way this project reads YAML: errors are :class:`ConfigError` naming the
    file (and line/column), never a traceback or an exhausted memory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found", file=path)
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > YAML_MAX_NODES:
            raise ConfigError(f"the document expands to more than {YAML_MAX_NODES:,} values (an alias "
                              "chain?); refusing to read it", file=path)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}invalid YAML: {getattr(exc, 'problem', exc)}", file=path) from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"cannot read as YAML: {type(exc).__name__}", file=path) from None


def load_suite(path: str | Path, *, check_paths: bool = True) -> Suite:
    """Read, validate and resolve a suite file; raise :class:`ConfigError` on any problem."""
    path = Path(path)
    raw = read_yaml(path, what="suite file")
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
        method_config = method.validate_config(m.config, file=str(path), prefix=("methods", i, "config"))
        for key, model, base_spec in (("detector", DetectorSpec, suite.detector),
                                      ("schedule", ScheduleSpec, suite.schedule)):
            try:
                model.model_validate({**base_spec.model_dump(), **getattr(m, key)})
            except ValidationError as err:
                raise format_validation_error(err, str(path), model, ("methods", i, key)) from None
        plugin = method(method_config)
        for stage in plugin.active_stages:  # the detector each stage trains (a method may set the neck)
            stage_det = plugin.stage_detector(stage, detector_for(suite, m))
            check_neck(stage_det, method, path, m.detector, i)
            check_pretrained(stage_det, stage_det.arch or method.arch, path, m.detector, i, check_paths)
        if m.search and m.search.space == "default":
            if not method.default_search:
                raise ConfigError(f"method '{m.name}' declares no default search space; give one",
                                  file=path, field=f"methods[{i}].search.space")
            m = m.model_copy(update={"search": m.search.model_copy(update={"space": dict(method.default_search)})})
            suite.methods[i] = m  # the suite is this function's own parse: later checks see the space
        if m.search:
            for key, dist in m.search.space.items():
                field = f"methods[{i}].search.space.{key}"
                method.check_search_key(key, file=str(path), field=field)
                check_distribution(dist, _field_checker(suite, m, method, key), file=str(path), field=field)
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
    methods = [m.model_copy(update={"detector": _weights_paths(m.detector, base)}) for m in suite.methods]
    detector = DetectorSpec.model_validate(_weights_paths(suite.detector.model_dump(), base))
    return suite.model_copy(update={"datasets": datasets, "data_cache": data_cache, "conditions": conditions,
                                    "methods": methods, "detector": detector})


WEIGHT_FIELDS = ("backbone_weights", "init_checkpoint")


def _weights_paths(detector: dict, base: Path) -> dict:
    """Weight files named relative to the suite file made absolute (``torchvision:`` names kept)."""
    return {k: _resolve_path(v, base) if k in WEIGHT_FIELDS and v and not v.startswith("torchvision:") else v
            for k, v in detector.items()}


def check_pretrained(det: DetectorSpec, arch: str, path: Path, overrides: dict, i: int, check_files: bool) -> None:
    """A preset exists for the arch and backbone; weight files exist and fit the backbone (key by key)."""
    where = {k: (f"methods[{i}].detector.{k}" if k in overrides else f"detector.{k}")
             for k in ("preset", *WEIGHT_FIELDS)}
    if det.preset:
        from harness.presets import check_preset
        try:
            check_preset(det, arch)
        except ConfigError as err:
            raise ConfigError(err.message, file=path, field=where["preset"]) from None
    if not check_files:
        return
    from harness.weights import resolve
    for key in WEIGHT_FIELDS:
        ref = getattr(det, key)
        if not ref:
            continue
        try:
            if key == "backbone_weights":
                from harness.models import backbone_body
                backbone_body(det)  # builds the classifier and loads the file into it: every key checked
            else:
                resolve(ref, field=where[key])
        except ConfigError as err:
            raise ConfigError(err.message, file=err.file or path, field=where[key]) from None


def check_neck(det: DetectorSpec, method, path: Path, overrides: dict, i: int) -> None:
    """The detector's neck exists, serves the arch the method trains, and its config is valid."""
    from harness.necks import NECKS
    arch = det.arch or method.arch
    where = {k: (f"methods[{i}].detector.{k}" if k in overrides else f"detector.{k}")
             for k in ("neck", "neck_config")}
    neck = NECKS.get(det.neck, file=str(path), field=where["neck"])
    if arch not in neck.archs:
        raise ConfigError(f"neck '{det.neck}' cannot serve the {arch} detector of method '{method.name}' "
                          f"(it serves: {', '.join(neck.archs)})", file=path, field=where["neck"])
    prefix = ("methods", i, "detector", "neck_config") if "neck_config" in overrides else ("detector", "neck_config")
    neck.validate_config(det.neck_config, file=str(path), prefix=prefix)


def check_distribution(dist: dict, accepts, *, file: str, field: str) -> None:
    """A search distribution's form (bounds, kinds) and every value it can sample against its field.

    ``accepts(value)`` raises ``ValueError`` when the field cannot take ``value``; the
    bounds of a range and every ``choice`` are tried, so nothing invalid reaches Tune.
    """
    if len(dist) != 1:
        raise ConfigError(f"one distribution per key (uniform, loguniform, randint or choice), got {sorted(dist)}",
                          file=file, field=field)
    (kind, args), = dist.items()
    where = f"{field}.{kind}"
    if kind == "choice":
        if not args:
            raise ConfigError("needs at least one value", file=file, field=where)
        values = args
    else:
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"needs two numbers [low, high], got {args!r}", file=file, field=where)
        lo, hi = args
        if not lo < hi:
            raise ConfigError(f"low must be below high, got [{lo}, {hi}]", file=file, field=where)
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"a log-uniform range needs low > 0, got {lo}", file=file, field=where)
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"randint takes integers [low, high), got {args!r}", file=file, field=where)
        values = [lo, hi - 1] if kind == "randint" else [lo, hi]
    for k, v in enumerate(values):
        try:
            accepts(v)
        except ValidationError as err:
            msg = err.errors()[0]["msg"]
        except ConfigError as err:
            msg = err.message
        except ValueError as err:
            msg = str(err).splitlines()[0]
        else:
            continue
        shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
        raise ConfigError(f"value {shown} is not valid for the field: {msg}", file=file, field=f"{where}[{k}]")


def _field_checker(suite: Suite, m: MethodSpec, method, key: str):
    """``accepts(value)`` for a search key: the method's config or the schedule with ``key = value``."""
    group, _, name = key.rpartition(".")

    def accepts(value) -> None:
        if group == "schedule":
            ScheduleSpec.model_validate({**schedule_for(suite, m).model_dump(), name: value})
        else:
            method.validate_config({**m.config, name: value})
    return accepts


def missing_path_hint(p) -> str:
    """What to do about a missing path: set DETBENCH_DATA when the path uses it and it is unset."""
    if "DETBENCH_DATA" not in os.environ and "$DETBENCH_DATA" in str(p):
        return " (set DETBENCH_DATA to the folder holding your datasets)"
    return ""


def _check_exists(p: str, suite_file: Path, field: str) -> None:
    if not os.path.exists(p):
        raise ConfigError(f"path does not exist: {p}{missing_path_hint(p)}", file=suite_file, field=field)


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


def row_label(method: str, variant) -> str:
    """The method label of a results row: ``method[variant]``, or ``method`` without a variant.

    The one definition of the format (leaderboard, robustness tables, suite labels)."""
    return f"{method}[{variant}]" if variant else method


def method_label(m: MethodSpec) -> str:
    """The leaderboard label of a suite's method: its ``label``, else :func:`row_label` of name and variant."""
    if m.label:
        return m.label
    return row_label(m.name, m.config.get("variant"))


def detector_for(suite: Suite, m: MethodSpec) -> DetectorSpec:
    return DetectorSpec.model_validate({**suite.detector.model_dump(), **m.detector})


def schedule_for(suite: Suite, m: MethodSpec) -> ScheduleSpec:
    return ScheduleSpec.model_validate({**suite.schedule.model_dump(), **m.schedule})


def node_cache_dir() -> Path:
    """This node's local cache: ``DETBENCH_CACHE``, else ``~/.cache/detbench``."""
    return Path(os.environ.get("DETBENCH_CACHE") or Path.home() / ".cache" / "detbench")


def data_cache_dir(suite: Suite) -> Path:
    return Path(suite.data_cache) if suite.data_cache else node_cache_dir()
