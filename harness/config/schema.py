"""Suite files: YAML validated into typed, frozen data.

A suite says *what* to benchmark (datasets x methods x seeds x conditions) and
*how big* (detector, schedule, resources). It is read with ``yaml.safe_load``
and validated by pydantic with ``extra="forbid"`` everywhere, so a typo is an
error naming the key path and the closest valid key, never a silently ignored
setting. The models are plain frozen data: nothing here looks up a plugin or
builds a model. Names that refer to plugins (method, arch, backbone, neck) and
method-specific fields are checked by :mod:`harness.plan` against the registries.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    arch: str | None = None            # a detector arch (harness.modeling.DETECTORS); None: the method's own
    backbone: str = "resnet18"         # a backbone plugin (harness.modeling.BACKBONES): resnet18..101, mobilenet_v3, ...
    fpn_width: int = Field(64, ge=8)   # the neck's width (every pyramid level)
    neck: str = "fpn"                  # a neck plugin (harness.modeling.NECKS): fpn, none, cfpt, ...
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
    # torchvision's exact detectors (harness.modeling.presets): fasterrcnn_resnet50_fpn(_v2),
    # retinanet_resnet50_fpn(_v2), fasterrcnn_mobilenet_v3_large_fpn; sizes 800/1333 unless set.
    preset: Literal["torchvision_v1", "torchvision_v2"] | None = None
    # A classification checkpoint for the backbone body: a local file, or
    # "torchvision:<Weights enum>.<member>" resolved to torchvision's cache file (never downloaded).
    backbone_weights: str | None = None
    # Backbone stages that get gradients, torchvision's meaning (ResNet 0..5, MobileNetV3 0..6; 0: none).
    # None: 3 with pretrained weights, else all.
    trainable_layers: int | None = Field(None, ge=0)
    init_checkpoint: str | None = None  # a whole detector: local file or "torchvision:<Weights>.<member>"
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    detections_per_img: int | None = Field(None, ge=1)  # None: 100 (torchvision's RetinaNet preset: 300)
    retina_fg_iou: float = 0.5  # RetinaNet anchor matcher (torchvision's defaults)
    retina_bg_iou: float = 0.4

    @model_validator(mode="after")
    def _sizes(self) -> "DetectorSpec":
        sizes = self.min_sizes
        if not sizes or any(not isinstance(v, int) or v < 32 for v in sizes):
            raise ValueError(f"min_size must be an integer >= 32 or a non-empty list of them, got {self.min_size!r}")
        if max(sizes) > self.resize_max:
            raise ValueError(f"min_size {max(sizes)} is larger than max_size {self.resize_max}")
        return self

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
    # Images per evaluation batch and worker (torchvision's references evaluate at 1; results do
    # not depend on it, speed does).
    eval_batch_size: int = Field(8, ge=1)
    # Training augmentation: "hflip" = torchvision references' RandomHorizontalFlip(0.5), boxes
    # flipped with the image, drawn per (seed, epoch, image).
    augment: list[Literal["hflip"]] = Field(default_factory=list)
    # Train only on images with a usable annotation (torchvision references'
    # _coco_remove_images_without_annotations).
    drop_empty_train_images: bool = False
    # DataLoader worker processes per training worker; None: the worker's CPUs minus one
    # (resources.cpus_per_worker). Results do not depend on it.
    loader_workers: int | None = Field(None, ge=0)

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
    published: str | None = None  # key of the reference number in suites/published.csv (harness.report.published)


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


#: Live monitoring of a sweep (harness.sweep.loggers): TensorBoard event files per trial by default;
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
