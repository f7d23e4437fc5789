"""From a suite's dataset spec to checked files, indexes and data loaders.

Preparation runs on the driver before any trial starts: generated data is
written once into the data cache, and user datasets are fully validated
(``load_coco`` with image checks) so that bad input fails in seconds with a
clear message instead of inside a Ray worker an hour later.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from harness.config import DatasetSpec
from harness.data.coco import (CocoDetection, CocoIndex, cached_index, check_image_files, collate_detection,
                               load_coco, open_index)
from harness.data.transfer import DetectionLoader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedDataset:
    """Absolute file locations of one dataset; JSON-able so it travels to workers."""
    name: str
    train_annotations: str
    train_images: str
    val_annotations: str
    val_images: str
    protocol: str = "coco"  # evaluation protocol: coco | visdrone
    repeat: int = 1         # the train split this many times per epoch
    train_index: str = ""   # the compact index of each split (harness.data.coco.save_index); "": none
    val_index: str = ""

    def split(self, split: str) -> tuple[str, str, str]:
        """``(index folder, annotation file, image folder)`` of ``split`` ("train" or "val")."""
        if split == "train":
            return self.train_index, self.train_annotations, self.train_images
        return self.val_index, self.val_annotations, self.val_images

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PreparedCondition:
    """One degraded test set of a dataset, ready for the workers (JSON-able).

    A corruption rendered into the cache (``images``: its image root, the dataset's own
    annotations) or a real degraded set (``by_name``: it has its own category ids, matched
    to the training classes by name).
    """
    label: str          # "fog@3", or a real set's name
    name: str           # the corruption's name, or the real set's
    severity: int       # 1..5; 0 for a real set
    annotations: str
    images: str
    protocol: str = "coco"
    by_name: bool = False
    index: str = ""     # the compact index of ``annotations`` ("": none)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def prepare_dataset(spec: DatasetSpec, cache_dir: Path, *, check: bool = True, check_level: str = "header",
                    progress: bool = False) -> PreparedDataset:
    """Materialise (synthetic) or locate (COCO) a dataset, validate and index both splits.

    The annotations are always validated and indexed (once per file content, into
    ``cache_dir/index``); ``check``: every image looked at too (:func:`check_images` at
    ``check_level``), the same checks as ``detbench data check``.
    """
    if spec.format == "synthetic":
        from harness.data.synthetic import write_synthetic_coco, write_synthetic_visdrone
        syn = spec.synthetic
        key = hashlib.sha256(json.dumps(syn.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
        root = Path(cache_dir) / f"synthetic-{key}"
        splits = {"train": (syn.train_images, 2 * syn.seed), "val": (syn.val_images, 2 * syn.seed + 1)}
        paths = {}
        for split, (n, seed) in splits.items():  # different seeds: val images are never train images
            if syn.kind == "visdrone":
                folder = write_synthetic_visdrone(root / split, n_images=n, seed=seed, image_size=syn.image_size,
                                                  max_objects=syn.max_objects)
                paths[split] = (str(_visdrone_json(folder, cache_dir)), str(folder))
            else:
                ann = write_synthetic_coco(root / split, n_images=n, seed=seed, image_size=syn.image_size,
                                           max_objects=syn.max_objects)
                paths[split] = (str(ann), str(ann.parent))
        prepared = PreparedDataset(spec.name, *paths["train"], *paths["val"], protocol=syn.kind)
    elif spec.format == "visdrone":
        tr, va = spec.train.root, spec.val.root
        prepared = PreparedDataset(spec.name, str(_visdrone_json(tr, cache_dir)), tr,
                                   str(_visdrone_json(va, cache_dir)), va, protocol="visdrone")
    else:
        prepared = PreparedDataset(spec.name, spec.train.annotations, spec.train.images,
                                   spec.val.annotations, spec.val.images)
    if spec.repeat != 1:
        prepared = dataclasses.replace(prepared, repeat=spec.repeat)
    indexes = {}
    for split in ("train", "val"):  # validated and indexed once, memory-mapped by every rank and loader worker
        _, ann, images = prepared.split(split)
        indexes[split], folder = cached_index(ann, images, cache_dir)
        prepared = dataclasses.replace(prepared, **{f"{split}_index": str(folder)})
    if check:
        check_images(indexes["train"], level=check_level, progress=progress)
        check_images(indexes["val"], level=check_level, progress=progress)
        if indexes["train"].class_names != indexes["val"].class_names:
            from harness.core import DataError
            raise DataError(f"train and val have different categories ({indexes['train'].class_names} vs "
                            f"{indexes['val'].class_names})", file=prepared.val_annotations, field="categories")
    return prepared


def check_images(index: CocoIndex, *, level: str = "header", progress: bool = False) -> None:
    """Every image of a split checked before anything runs; the time said when it was long."""
    seconds = check_image_files(index, level=level, progress=progress)
    if seconds > 5:
        print(f"detbench: checked {len(index)} images of {index.ann_file} ({level}) in {seconds:.0f} s")


def _visdrone_json(folder, cache_dir) -> Path:
    """The COCO conversion of a VisDrone-DET folder, made once per folder content."""
    from harness.data.visdrone import convert_visdrone
    folder = Path(folder)
    ann = sorted((folder / "annotations").glob("*.txt"))
    sig = hashlib.sha256(json.dumps([str(folder.resolve())] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                              for p in ann]).encode()).hexdigest()[:12]
    out = Path(cache_dir) / "visdrone-coco" / f"{folder.name}-{sig}.json"
    return out if out.is_file() else convert_visdrone(folder, out)


def load_split(prepared: PreparedDataset | dict, split: str, *, check_images: bool = True) -> CocoIndex:
    """A split's index: its saved compact index when the dataset has one (memory-mapped),
    else the annotation file validated now."""
    d = prepared if isinstance(prepared, dict) else prepared.to_dict()
    return split_index(d.get(f"{split}_index", ""), d[f"{split}_annotations"], d[f"{split}_images"],
                       check_images=check_images)


def split_index(folder: str, annotations: str, images: str, *, check_images: bool = False) -> CocoIndex:
    """The index of ``annotations`` at ``folder``; when this node cannot see ``folder`` (a node
    without the driver's data cache), built once into this node's cache from the annotations."""
    if not folder:
        return load_coco(annotations, images, check_images=check_images)
    if Path(folder, "meta.json").is_file():
        return open_index(Path(folder), images, annotations)
    from harness.core import node_cache_dir
    log.info("index %s is not on this node: building it from %s", folder, annotations)
    return cached_index(annotations, images, node_cache_dir())[0]


def _loader_options(num_workers: int, pin_memory: bool, *, persistent: bool = True) -> dict:
    """DataLoader options for ``num_workers`` loader processes, two batches ahead each; ``persistent``:
    kept alive across epochs (the epoch reaches them through :class:`~harness.data.coco.SharedEpoch`);
    ``pin_memory`` for asynchronous host-to-GPU copies."""
    opts = {"num_workers": num_workers, "pin_memory": pin_memory, "collate_fn": collate_detection}
    if num_workers > 0:
        opts.update(persistent_workers=persistent, prefetch_factor=2)
    return opts


def train_loader(dataset: torch.utils.data.Dataset, batch_size: int, *, seed: int, world_size: int = 1,
                 rank: int = 0, num_workers: int = 0, pin_memory: bool = False,
                 aspect_ratios: list[float] | None = None, group_factor: int | None = None) -> DataLoader:
    """Shuffled, sharded over DDP ranks; ``batch_size`` is per worker.

    With ``aspect_ratios`` (width / height per item) and ``group_factor``, batches hold images
    of one aspect-ratio group (:class:`~harness.data.samplers.GroupedBatchSampler` over each
    rank's shard, every image of the shard once per epoch). The batches depend on the seed
    only, never on ``num_workers``: the order comes from the samplers in this process, and
    every random choice of a sample from ``(seed, epoch, index)``.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    opts = _loader_options(num_workers, pin_memory)
    if aspect_ratios is not None and group_factor is not None:
        from harness.data.samplers import GroupedBatchSampler, aspect_ratio_groups
        batches = GroupedBatchSampler(sampler, aspect_ratio_groups(aspect_ratios, group_factor), batch_size)
        return DetectionLoader(dataset, batch_sampler=batches, generator=torch.Generator().manual_seed(seed), **opts)
    return DetectionLoader(dataset, batch_size=batch_size, sampler=sampler,
                           drop_last=len(dataset) > batch_size * world_size,
                           generator=torch.Generator().manual_seed(seed), **opts)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a :func:`train_loader` for ``epoch`` (its sampler or grouped batch sampler), and tell
    the dataset (e.g. :class:`~harness.data.DegradedTwins`) when it wants to know."""
    target = loader.batch_sampler if hasattr(loader.batch_sampler, "set_epoch") else loader.sampler
    target.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def eval_loader(index: CocoIndex, batch_size: int, *, world_size: int = 1, rank: int = 0,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Every image exactly once over all ranks (strided shards, no padding duplicates)."""
    dataset = torch.utils.data.Subset(CocoDetection(index), range(rank, len(index), world_size))
    opts = _loader_options(num_workers, pin_memory, persistent=False)  # one pass per evaluation
    return DetectionLoader(dataset, batch_size=batch_size, shuffle=False, **opts)


def prepare_conditions(items: list, prepared: PreparedDataset, cache_dir: Path, *, seed: int = 0,
                       progress: bool = False) -> list[PreparedCondition]:
    """Test conditions of one dataset other than clean, ready for the workers.

    Corruptions are rendered once per (image, corruption, severity) into the
    cache (reused by every trial and worker); real degraded sets are validated
    and, for VOC XML, converted to COCO once.
    """
    from harness.data.conditions import expand_conditions
    from harness.data.render_cache import render_condition
    out = []
    val = None
    corruptions = [c for c in items if not (isinstance(c, dict) and "format" in c)]
    for cond in expand_conditions(corruptions):
        if cond.is_clean:
            continue
        val = val or load_split(prepared, "val", check_images=False)
        root = render_condition(val, cond, Path(cache_dir) / "conditions", suite_seed=seed, progress=progress)
        out.append(PreparedCondition(cond.label, cond.name, cond.severity, prepared.val_annotations, str(root),
                                     prepared.protocol, by_name=False, index=prepared.val_index))
    for real in (c for c in items if isinstance(c, dict) and "format" in c):
        if real.get("dataset") not in (None, prepared.name):
            continue
        ann = real.get("annotations")
        if real["format"] == "voc":
            from harness.data.voc import write_voc_as_coco
            key = hashlib.sha256(f"{real['xml']}|{real['images']}".encode()).hexdigest()[:12]
            ann = str(write_voc_as_coco(real["xml"], real["images"], Path(cache_dir) / "voc" / f"{key}.json"))
        index, folder = cached_index(ann, real["images"], cache_dir)
        check_images(index, progress=progress)  # validated now, not inside a worker
        out.append(PreparedCondition(real["name"], real["name"], 0, ann, real["images"], "coco", by_name=True,
                                     index=str(folder)))
    return out
