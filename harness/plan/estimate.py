"""``detbench plan SUITE``: what a suite will run and roughly what it will cost, without Ray.

A dry run reads the suite (``load_suite(check_paths=False)``, so a dataset that
is not downloaded yet does not stop it) and the annotation files only: no Ray,
no image is generated, decoded or rendered. It lists every cell (method label x
dataset x seed, as :func:`harness.plan.cells.plan_cells` makes them), its trials
(``search.num_samples`` for a searched method, else 1), its stages (e.g.
DeFeat's ``teacher -> student``, FCTL's ``ideal -> corrective``) and, per
stage, the epochs, the training images per epoch (the train split times the
dataset's ``repeat``) and the evaluation images.

Image counts come from the dataset's files: ``synthetic.train_images`` /
``val_images`` for synthetic data, ``len(images)`` of a COCO instances JSON,
the annotation ``*.txt`` files of a VisDrone-DET folder, the XML files of a VOC
condition. A file that is missing or unreadable is named on its dataset's line
(``annotations not found: PATH``) and its counts stay unknown; totals then sum
what is known and say which datasets they leave out.

What is counted, as the engine (:func:`harness.engine.stage.run_stage`) and the trial
(:func:`harness.sweep.trial.run_trial`) do it:

* training images = runs x epochs x images per epoch, per stage. The last stage
  runs once per trial. An earlier stage is a shared artifact: trained once per
  distinct artifact key (:func:`stage_key`, as :func:`harness.sweep.trial.stage_artifact_key`), so e.g.
  ``fctl`` and ``fctl[degraded_only]`` share one ``ideal`` stage per dataset and
  seed, and a search over a field the earlier stage does not read trains it
  once, not ``num_samples`` times. A reused stage shows ``runs 0`` and the cell
  whose run it reuses.
* evaluation images = per run of an evaluated stage (not SoCo's ``pretrain``),
  the val split at every ``eval_every``-th epoch and at the last one, plus every
  test condition once after the last epoch: each corruption of
  ``suite.conditions`` (expanded by :func:`harness.data.expand_conditions`)
  on the val images, each real condition (of that dataset) on its own images.

Estimate::

    device-seconds = sum over stages of cost_per_image_s
                     x (training images + EVAL_WEIGHT x evaluation images)

with ``EVAL_WEIGHT = 1/3``: evaluation is a forward pass only (no backward, no
optimiser step), roughly a third of a training step's arithmetic. A
device-second is one second of one worker's device (a GPU, or the CPU cores of
one worker): under data parallelism the images of a trial are shared by its
``workers_per_trial`` workers, so the device-seconds are the same and the
trial's wall clock is about device-seconds / workers at ideal scaling. Reserved
GPU-hours = device-hours x ``gpus_per_worker`` (CPU-hours likewise).

The per-image cost is ``--cost-per-image-s`` (one value for every stage), or
``--measure``: each distinct (stage detector, arch) of the suite is built with
:func:`harness.modeling.detectors.build_detector` and timed for ``MEASURE_STEPS`` training
steps (forward + backward + SGD step; one more untimed warm-up) on random images
of its evaluation size (:func:`harness.modeling.cost.evaluation_size`) at the schedule's
per-worker batch size capped at ``MEASURE_MAX_BATCH``, on CUDA when this
machine has it, else CPU; every stage then uses its own detector's cost.

Not included, so read the result as the order of magnitude of the training
and evaluation compute, not a wall-clock promise:

* start-up and overheads: Ray and worker start, data preparation (synthetic
  generation, VisDrone conversion, rendering corrupted test sets, checking
  every image), data loading and augmentation, checkpoints and reports per
  epoch, DDP communication, queueing for resources;
* method extras in the measured cost: the plain detector's step is timed, not
  DeFeat's teacher forward, FCTL's frozen ideal model on the clean twin or
  SoCo's pretraining views; those stages cost more per image. Mixed precision
  (``amp``) and pretrained weights are not timed (a weight file is not loaded;
  its norm and frozen stages are kept);
* the measurement machine: ``--measure`` times *this* machine's device, which
  need not be the cluster's; small batches (<= 2) and few steps make it noisy;
* early stopping: ASHA stops searched trials early, so their counts are an
  upper bound; an artifact store that already holds earlier stages (a resumed
  run, a shared ``artifacts_dir``) makes the real run cheaper;
* the last incomplete batch each epoch (``drop_last``) and DistributedSampler's
  padding: images per epoch are the split's size, ``steps`` what the loader does.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import DatasetSpec, DetectorSpec, Suite, data_cache_dir, detector_for, method_label
from harness.core import ConfigError, missing_path_hint
from harness.data import PreparedDataset, expand_conditions, load_split, prepare_dataset
from harness.modeling import NECKS, build_detector, describe, detector_cost, evaluation_size
from harness.plan.cells import plan_cells
from harness.plan.check import load_suite
from harness.plan.records import Cell
from harness.plan.stages import stage_artifact_key
from harness.plugin import METHODS

EVAL_WEIGHT = 1 / 3       # an evaluation image costs this fraction of a training image (forward only)
MEASURE_WARMUP = 1        # untimed steps before timing (allocations, cudnn autotuning)
MEASURE_STEPS = 2         # timed training steps per distinct detector
MEASURE_MAX_BATCH = 2     # images per timed step at most
DEFAULT_CLASSES = 80      # classes of a measured detector when no dataset of the suite says


# --------------------------------------------------------------------------- records
@dataclass
class DatasetCounts:
    """Image counts of one dataset's splits (None: unknown, ``note`` says why)."""
    name: str
    format: str
    train_images: int | None
    val_images: int | None
    repeat: int = 1
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_epoch(self) -> int | None:
        return None if self.train_images is None else self.train_images * self.repeat


@dataclass
class EvalSet:
    """A test condition of one dataset other than clean: a corruption of val, or a real set."""
    label: str
    kind: str               # "corruption" | "real"
    images: int | None
    note: str = ""


@dataclass
class StagePlan:
    stage: str
    detector: str           # harness.modeling.detectors.describe of the stage's detector
    arch: str
    epochs: int
    batch_per_worker: int
    images_per_epoch: int | None   # train split x repeat
    steps_per_epoch: int | None    # per worker, as the loader does them
    runs: int                      # times trained for this cell (0: reused, see shared_with)
    evaluated: bool
    val_evaluations: int           # evaluations of the val split per run
    eval_images_per_run: int | None
    shared_with: str | None = None  # the cell whose run of this stage is reused
    cost_per_image_s: float | None = None
    cost_key: str = ""             # the measured detector this stage's cost comes from

    @property
    def train_images(self) -> int | None:
        if self.runs == 0:
            return 0
        return None if self.images_per_epoch is None else self.runs * self.epochs * self.images_per_epoch

    @property
    def eval_images(self) -> int | None:
        if not self.evaluated or self.runs == 0:
            return 0
        return None if self.eval_images_per_run is None else self.runs * self.eval_images_per_run

    @property
    def total_epochs(self) -> int:
        return self.runs * self.epochs

    @property
    def device_s(self) -> float | None:
        if self.cost_per_image_s is None or self.train_images is None or self.eval_images is None:
            return None
        return self.cost_per_image_s * (self.train_images + EVAL_WEIGHT * self.eval_images)


@dataclass
class CellPlan:
    cell_id: str
    label: str
    method: str
    dataset: str
    seed: int
    trials: int
    stages: list[StagePlan]
    search: bool = False

    def _sum(self, attr: str):
        values = [getattr(s, attr) for s in self.stages]
        return None if any(v is None for v in values) else sum(values)

    @property
    def epochs(self) -> int:
        return sum(s.total_epochs for s in self.stages)

    @property
    def train_images(self) -> int | None:
        return self._sum("train_images")

    @property
    def eval_images(self) -> int | None:
        return self._sum("eval_images")

    @property
    def device_s(self) -> float | None:
        return self._sum("device_s")


@dataclass
class MeasuredCost:
    """A timed training step of one distinct detector."""
    key: str
    detector: str
    arch: str
    image_hw: tuple[int, int]
    batch: int
    device: str
    seconds_per_image: float | None
    error: str = ""


@dataclass
class SuitePlan:
    suite: str
    path: str
    datasets: list[DatasetCounts]
    conditions: dict[str, list[EvalSet]]   # dataset -> test conditions other than clean
    cells: list[CellPlan]
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    cost_per_image_s: float | None = None  # the given cost, or the image-weighted mean of measured ones
    cost_source: str = "none (give --cost-per-image-s or --measure)"
    measured: list[MeasuredCost] = field(default_factory=list)
    eval_weight: float = EVAL_WEIGHT

    @property
    def trials(self) -> int:
        return sum(c.trials for c in self.cells)

    @property
    def epochs(self) -> int:
        return sum(c.epochs for c in self.cells)

    def _known(self, attr: str) -> int | float:
        return sum(getattr(s, attr) for c in self.cells for s in c.stages if getattr(s, attr) is not None)

    @property
    def train_images(self) -> int:
        """Training images processed, over the stages whose counts are known (see ``unknown``)."""
        return self._known("train_images")

    @property
    def eval_images(self) -> int:
        return self._known("eval_images")

    @property
    def device_s(self) -> float | None:
        """Device-seconds over the stages with known counts and cost; None when no cost is known."""
        if not any(s.device_s is not None for c in self.cells for s in c.stages if s.runs):
            return None
        return float(self._known("device_s"))

    @property
    def device_hours(self) -> float | None:
        return None if self.device_s is None else self.device_s / 3600

    @property
    def unknown(self) -> list[str]:
        """Datasets whose image counts are unknown (missing or unreadable files)."""
        out = [d.name for d in self.datasets if d.train_images is None or d.val_images is None]
        out += [f"{ds}:{e.label}" for ds, sets in self.conditions.items() for e in sets
                if e.images is None and e.kind == "real"]
        return out

    @property
    def complete(self) -> bool:
        return not self.unknown and all(s.device_s is not None for c in self.cells for s in c.stages)


# --------------------------------------------------------------------------- counting
def _not_found(path) -> str:
    return f"annotations not found: {path}{missing_path_hint(path)}"


def _coco_counts(path: str | None) -> tuple[int | None, int | None, str]:
    """(images, categories, note) of a COCO instances JSON."""
    if not path:
        return None, None, "no annotations file given"
    p = Path(path)
    if not p.is_file():
        return None, None, _not_found(path)
    try:
        with open(p, "rb") as f:
            data = json.load(f)
        return len(data["images"]), len(data.get("categories") or []) or None, ""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, None, f"cannot read annotations {path}: {type(exc).__name__}: {str(exc)[:120]}"


def _visdrone_count(root: str | None) -> tuple[int | None, str]:
    folder = Path(root or "") / "annotations"
    if not root or not folder.is_dir():
        return None, _not_found(folder)
    return sum(1 for _ in folder.glob("*.txt")), ""


def _xml_count(folder: str | None) -> tuple[int | None, str]:
    if not folder or not Path(folder).is_dir():
        return None, _not_found(folder)
    return sum(1 for _ in Path(folder).glob("*.xml")), ""


def dataset_counts(ds: DatasetSpec) -> DatasetCounts:
    """Train / val image counts of a dataset from its annotation files only."""
    notes: list[str] = []
    if ds.format == "synthetic":
        syn = ds.synthetic
        from harness.data import VISDRONE_CATEGORIES as VISDRONE
        classes = len(VISDRONE) if syn.kind == "visdrone" else 3  # write_synthetic_coco's shapes
        return DatasetCounts(ds.name, f"synthetic/{syn.kind}", syn.train_images, syn.val_images, ds.repeat, classes)
    counts, classes = {}, None
    for split in ("train", "val"):
        sp = getattr(ds, split)
        if ds.format == "visdrone":
            n, note = _visdrone_count(sp.root)
            if n is not None:
                from harness.data import VISDRONE_CATEGORIES as VISDRONE
                classes = len(VISDRONE)
        else:
            n, k, note = _coco_counts(sp.annotations)
            classes = classes or k
        counts[split] = n
        if note:
            notes.append(f"{split}: {note}")
    return DatasetCounts(ds.name, ds.format, counts["train"], counts["val"], ds.repeat, classes, notes)


def eval_sets(suite: Suite, counts: DatasetCounts) -> list[EvalSet]:
    """The dataset's test conditions other than clean, as ``prepare_conditions`` makes them."""
    corruptions = [c for c in suite.conditions if not (isinstance(c, dict) and "format" in c)]
    out = [EvalSet(c.label, "corruption", counts.val_images)
           for c in expand_conditions(corruptions) if not c.is_clean]
    for real in (c for c in suite.conditions if isinstance(c, dict) and "format" in c):
        if real.get("dataset") not in (None, counts.name):
            continue
        if real["format"] == "voc":
            n, note = _xml_count(real.get("xml"))
        else:
            n, _, note = _coco_counts(real.get("annotations"))
        out.append(EvalSet(real["name"], "real", n, note))
    return out


def val_evaluations(epochs: int, every: int) -> int:
    """Evaluations of the val split in a stage: every ``every``-th epoch and the last one."""
    return sum(1 for e in range(1, epochs + 1) if e % every == 0 or e == epochs)


def steps_per_epoch(images: int, batch: int, world: int) -> int:
    """Optimiser steps per epoch of one worker (DistributedSampler + DataLoader as train_loader sets them)."""
    per_rank = math.ceil(images / world)
    return per_rank // batch if images > batch * world else math.ceil(per_rank / batch)


# --------------------------------------------------------------------------- sharing
def _search_values(dist: dict) -> list:
    (kind, args), = dist.items()
    if kind == "choice":
        return list(args)
    lo, hi = args
    return [lo, hi - 1] if kind == "randint" else [lo, hi]


def stage_key(cell: Cell, stage: str) -> str:
    """What determines an earlier stage's output: the run's own artifact key (shared stages train once)."""
    return stage_artifact_key(cell, stage)


def _searched_stages(cell: Cell) -> set[str]:
    """Earlier stages whose key changes with a sampled value (each trial trains its own)."""
    if not cell.search:
        return set()
    out = set()
    for stage in cell.stages[:-1]:
        for key, dist in cell.search.space.items():
            try:
                keys = {stage_key(cell.with_sampled({key: v}), stage) for v in _search_values(dist)}
            except Exception:  # a value the plugin refuses at build time: assume it matters
                keys = {None, 0}
            if len(keys) > 1:
                out.add(stage)
    return out


# --------------------------------------------------------------------------- measuring
def _spec_for_timing(spec: DetectorSpec) -> DetectorSpec:
    """The spec without weight files (never read by a dry run), keeping their norm and frozen stages."""
    if not spec.pretrained:
        return spec
    return spec.model_copy(update={"backbone_weights": None, "init_checkpoint": None,
                                   "norm": spec.norm_kind, "trainable_layers": spec.trainable_stages})


def measure_step_cost(spec: DetectorSpec, num_classes: int, *, arch: str, batch: int = MEASURE_MAX_BATCH,
                      warmup: int = MEASURE_WARMUP, steps: int = MEASURE_STEPS,
                      device: str | None = None) -> MeasuredCost:
    """Seconds per training image of ``build_detector(spec, num_classes, arch=arch)``.

    ``warmup`` + ``steps`` training steps (forward, backward, SGD step) on random images of
    the detector's evaluation size with two random boxes each; the timed steps' mean over
    ``batch`` images. Deterministic inputs (seeded), not deterministic timings.
    """
    import torch


    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    h, w = evaluation_size(spec)
    where = dev.type if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = MeasuredCost(key="", detector=describe(spec, arch), arch=arch, image_hw=(h, w), batch=batch,
                          device=where, seconds_per_image=None)
    try:
        torch.manual_seed(0)
        model = build_detector(_spec_for_timing(spec), num_classes, arch=arch).to(dev).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        images, targets = [], []
        for _ in range(batch):
            images.append(torch.rand(3, h, w, generator=g).to(dev))
            side = torch.tensor([w, h, w, h], dtype=torch.float32)
            xy = torch.rand(2, 2, generator=g) * 0.5
            wh = 0.1 + torch.rand(2, 2, generator=g) * 0.4
            boxes = torch.cat([xy, xy + wh], 1) * side
            labels = torch.randint(1, num_classes + 1, (2,), generator=g)
            targets.append({"boxes": boxes.to(dev), "labels": labels.to(dev)})

        def step() -> None:
            losses = model(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        result.seconds_per_image = (time.perf_counter() - t0) / (steps * batch)
    except Exception as exc:  # a detector that cannot be built here: its stages stay without a cost
        result.error = f"{type(exc).__name__}: {str(exc)[:160]}"
    return result


# --------------------------------------------------------------------------- planning
def plan_suite(path: str | Path, *, cost_per_image_s: float | None = None, measure: bool = False) -> SuitePlan:
    """The dry run of a suite file: cells, stages, image counts and (with a cost) device-hours."""

    if cost_per_image_s is not None and measure:
        raise ConfigError("give --cost-per-image-s or --measure, not both", field="--cost-per-image-s")
    if cost_per_image_s is not None and not (cost_per_image_s > 0 and math.isfinite(cost_per_image_s)):
        raise ConfigError(f"must be a positive number of seconds, got {cost_per_image_s}",
                          field="--cost-per-image-s")
    path = Path(path)
    suite = load_suite(path, check_paths=False)
    res = suite.resources
    datasets = {d.name: dataset_counts(d) for d in suite.datasets}
    conditions = {name: eval_sets(suite, c) for name, c in datasets.items()}
    workers = res.workers_per_trial

    # The run's own cells (harness.plan.cells.plan_cells), over placeholders of the datasets' files: a dry run
    # prepares no data. Each placeholder holds its dataset's spec, so artifact keys differ per dataset.
    stubs = {d.name: PreparedDataset(d.name, *[f"(dry run) {d.model_dump_json()}"] * 4, repeat=d.repeat)
             for d in suite.datasets}
    try:
        planned = plan_cells(suite, stubs)
    except ConfigError as err:
        raise ConfigError(err.message, file=path, field=err.field) from None
    cells: list[CellPlan] = []
    seen_stage: dict[str, str] = {}                  # artifact key -> cell that trains it
    to_measure: dict[str, tuple[DetectorSpec, str, int]] = {}
    for like in planned:
        plugin, det, schedule, arch = like.plugin, like.detector, like.schedule, like.arch
        stages, cell_id, trials = like.stages, like.cell_id, like.trials
        counts, sets = datasets[like.dataset.name], conditions[like.dataset.name]
        per_trial = _searched_stages(like)
        plans = []
        for k, stage in enumerate(stages):
            spec = plugin.stage_detector(stage, det)
            sched = plugin.stage_schedule(stage, schedule)
            batch = max(1, sched.batch_size // workers)
            shared = None
            if k == len(stages) - 1 or stage in per_trial:
                runs = trials
            else:
                key = stage_key(like, stage)
                shared = seen_stage.get(key)
                runs = 0 if shared else 1
                seen_stage.setdefault(key, cell_id)
            evaluated = plugin.stage(stage).evaluates
            n_val = val_evaluations(sched.epochs, sched.eval_every) if evaluated else 0
            per_run = None
            if counts.val_images is not None and all(e.images is not None for e in sets):
                per_run = n_val * counts.val_images + sum(e.images for e in sets) if evaluated else 0
            n_epoch = _stage_images(plugin, stage, counts)
            cost_key = f"{spec.model_dump_json()}|{arch}|{min(batch, MEASURE_MAX_BATCH)}"
            if measure:
                to_measure.setdefault(cost_key, (spec, arch, min(batch, MEASURE_MAX_BATCH)))
            plans.append(StagePlan(
                stage=stage, detector=describe(spec, arch), arch=arch, epochs=sched.epochs,
                batch_per_worker=batch, images_per_epoch=n_epoch,
                steps_per_epoch=None if n_epoch is None else steps_per_epoch(n_epoch, batch, workers),
                runs=runs, evaluated=evaluated, val_evaluations=n_val, eval_images_per_run=per_run,
                shared_with=shared, cost_per_image_s=cost_per_image_s, cost_key=cost_key))
        cells.append(CellPlan(cell_id, like.label, like.method, like.dataset.name, like.seed,
                              trials, plans, bool(like.search)))

    plan = SuitePlan(suite=suite.name, path=str(path), datasets=list(datasets.values()), conditions=conditions,
                     cells=cells, workers_per_trial=workers, cpus_per_worker=res.cpus_per_worker,
                     gpus_per_worker=res.gpus_per_worker)
    if cost_per_image_s is not None:
        plan.cost_per_image_s, plan.cost_source = cost_per_image_s, "given (--cost-per-image-s)"
    elif measure:
        classes = max((d.num_classes for d in datasets.values() if d.num_classes), default=DEFAULT_CLASSES)
        for key, (spec, arch, batch) in to_measure.items():
            mc = measure_step_cost(spec, classes, arch=arch, batch=batch)
            mc.key = key
            plan.measured.append(mc)
        by_key = {mc.key: mc.seconds_per_image for mc in plan.measured}
        for c in cells:
            for s in c.stages:
                s.cost_per_image_s = by_key.get(s.cost_key)
        weights = [(s.cost_per_image_s, (s.train_images or 0) + EVAL_WEIGHT * (s.eval_images or 0))
                   for c in cells for s in c.stages if s.cost_per_image_s is not None]
        total = sum(w for _, w in weights)
        if total:
            plan.cost_per_image_s = sum(v * w for v, w in weights) / total
        where = plan.measured[0].device if plan.measured else "nothing to measure"
        plan.cost_source = (f"measured (--measure) on this machine's {where}: {MEASURE_WARMUP} warm-up + "
                            f"{MEASURE_STEPS} timed training steps per distinct detector, random images at "
                            f"its evaluation size, batch <= {MEASURE_MAX_BATCH}, {classes} classes; "
                            "each stage uses its detector's cost (the value above is their image-weighted mean)")
    return plan


def _stage_images(plugin, stage: str, counts: DatasetCounts) -> int | None:
    """Training images per epoch of a stage: the train split x repeat, or the stage's own images
    (:meth:`Method.stage_train_images`, e.g. SoCo pretraining on an unlabeled folder) x repeat."""
    try:
        own = plugin.stage_train_images(stage)
    except Exception:  # a folder that cannot be listed yet: unknown, as a missing dataset is
        return None
    return counts.images_per_epoch if own is None else own * counts.repeat


def cost_table(suite_path: str) -> str:
    """``detbench methods --cost SUITE``: each method's detector and each neck on the suite's detector.

    Built from scratch on CPU with the class count of the suite's first dataset (synthetic
    data is generated into the cache if needed); nothing is trained.
    """
    suite = load_suite(suite_path)
    classes = len(load_split(prepare_dataset(suite.datasets[0], data_cache_dir(suite), check=False), "train",
                             check_images=False).class_names)

    def row(label: str, spec: DetectorSpec, arch: str) -> str:
        c = detector_cost(build_detector(spec, classes, arch=arch), spec)
        return (f"| {label} | {arch} | {spec.backbone} | {spec.neck} | {c.image_hw[0]}x{c.image_hw[1]} | "
                f"{c.params / 1e6:.2f} | {c.neck_params / 1e6:.3f} | {c.flops / 1e9:.2f} | {c.neck_flops / 1e9:.3f} |")

    head = ["| entry | arch | backbone | neck | image | params (M) | neck params (M) | GFLOPs | neck GFLOPs |",
            "|---|---|---|---|---|---|---|---|---|"]
    lines = [f"Cost at the suite's evaluation size ({suite_path}, {classes} classes), per image:", ""] + head
    seen = {}
    for m in suite.methods:
        cls = METHODS.get(m.name)
        plugin = cls(m.config)
        spec = plugin.stage_detector(plugin.active_stages[-1], detector_for(suite, m))
        arch = spec.arch or cls.arch
        lines.append(row(method_label(m), spec, arch))
        seen.setdefault(arch, spec)
    lines += ["", "Necks on the suite's detector:", ""] + head
    for arch, spec in seen.items():
        for name in NECKS.names():
            if arch in NECKS.get(name).archs:
                lines.append(row(f"neck {name}", spec.model_copy(update={"neck": name, "neck_config": {}}), arch))
    return "\n".join(lines)



# --------------------------------------------------------------------------- formatting
def _n(v) -> str:
    return "?" if v is None else f"{v:,}"


def _hours(s: float | None) -> str:
    return "?" if s is None else f"{s / 3600:,.3g}"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                   .rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def format_plan(plan: SuitePlan) -> str:
    """A plain-text report: datasets, cells x stages, measured costs and the totals."""
    lines = [f"Plan of suite '{plan.suite}' ({plan.path}): dry run, nothing is trained", "", "Datasets:"]
    for d in plan.datasets:
        sets = plan.conditions.get(d.name, [])
        corr = [e.label for e in sets if e.kind == "corruption"]
        cond = [f"{len(corr)} corruption(s) of val ({', '.join(corr[:6])}{', ...' if len(corr) > 6 else ''})"
                ] if corr else []
        cond += [f"{e.label} ({_n(e.images)} images)" for e in sets if e.kind == "real"]
        lines.append(f"  {d.name} [{d.format}]: train {_n(d.train_images)} x repeat {d.repeat} = "
                     f"{_n(d.images_per_epoch)} images/epoch, val {_n(d.val_images)}; test sets besides "
                     f"clean: {'; '.join(cond) or 'none'}")
        for note in d.notes + [f"condition {e.label}: {e.note}" for e in sets if e.note]:
            lines.append(f"    {note}")
    lines += ["", "Cells (runs: times a stage is trained; 0 = reused from the cell named):", ""]
    rows = [["cell", "trials", "stage", "detector", "epochs", "img/epoch", "steps/ep", "runs", "train img",
             "val evals", "eval img", "device-h"]]
    for c in plan.cells:
        for k, s in enumerate(c.stages):
            runs = str(s.runs) + (f" (= {s.shared_with})" if s.shared_with else "")
            rows.append([c.cell_id if k == 0 else "", str(c.trials) + (" search" if c.search and k == 0 else "")
                         if k == 0 else "", s.stage, s.detector, str(s.epochs), _n(s.images_per_epoch),
                         _n(s.steps_per_epoch), runs, _n(s.train_images),
                         str(s.val_evaluations) if s.evaluated else "-", _n(s.eval_images), _hours(s.device_s)])
    lines += ["  " + r for r in _table(rows, right={1, 4, 5, 6, 8, 9, 10, 11})]
    if plan.measured:
        lines += ["", "Measured per-image training cost:", ""]
        rows = [["detector", "image", "batch", "device", "s/image"]]
        for mc in plan.measured:
            rows.append([mc.detector, f"{mc.image_hw[0]}x{mc.image_hw[1]}", str(mc.batch), mc.device,
                         f"{mc.seconds_per_image:.4g}" if mc.seconds_per_image is not None else f"failed: {mc.error}"])
        lines += ["  " + r for r in _table(rows, right={2, 4})]
    res = f"{plan.workers_per_trial} worker(s) x ({plan.cpus_per_worker:g} CPU" + (
        f", {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else "") + ")"
    unknown = plan.unknown
    partial = f" (known datasets only; unknown: {', '.join(unknown)})" if unknown else ""
    lines += ["", "Totals:",
              f"  cells:              {len(plan.cells)}",
              f"  trials:             {plan.trials}",
              f"  resources/trial:    {res}",
              f"  stage epochs:       {plan.epochs:,}",
              f"  train images:       {plan.train_images:,}{partial}",
              f"  eval images:        {plan.eval_images:,}{partial}"]
    if plan.cost_per_image_s is None:
        lines.append(f"  device-hours:       ? (per-image cost: {plan.cost_source})")
    elif plan.device_hours is None:
        lines += [f"  per-image cost:     {plan.cost_per_image_s:.4g} s, {plan.cost_source}",
                  f"  device-hours:       ? (no image counts known{partial[len(' (known datasets only'):]}"]
    else:
        h = plan.device_hours
        lines += [f"  per-image cost:     {plan.cost_per_image_s:.4g} s, {plan.cost_source}",
                  f"  device-hours:       {h:,.3g} = (train images + {plan.eval_weight:.2g} x eval images: "
                  f"evaluation is forward only) x per-image cost / 3600{partial}",
                  f"  trial-hours:        ~{h / plan.workers_per_trial:,.3g} (trials' wall clock summed, "
                  f"at ideal scaling over {plan.workers_per_trial} worker(s) per trial)"]
        if plan.gpus_per_worker:
            lines.append(f"  reserved GPU-hours: {h * plan.gpus_per_worker:,.3g} "
                         f"(device-hours x {plan.gpus_per_worker:g} GPU/worker)")
        lines.append(f"  reserved CPU-hours: {h * plan.cpus_per_worker:,.3g} "
                     f"(device-hours x {plan.cpus_per_worker:g} CPU/worker)")
        if any(s.cost_per_image_s is None for c in plan.cells for s in c.stages):
            lines.append("  (stages whose detector could not be measured are left out)")
    lines.append("  excludes start-up, data preparation and loading, checkpoints, DDP traffic, queueing, "
                 "method extras (teacher / twin / view passes) in a measured cost; see harness/dryrun.py")
    return "\n".join(lines)


__all__ = ["DatasetCounts", "EvalSet", "StagePlan", "CellPlan", "MeasuredCost", "SuitePlan", "plan_suite",
           "format_plan", "dataset_counts", "eval_sets", "measure_step_cost", "val_evaluations",
           "steps_per_epoch", "stage_key", "EVAL_WEIGHT"]
