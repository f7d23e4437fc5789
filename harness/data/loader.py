"""From a suite's dataset spec to checked files, indexes and data loaders.

Preparation runs on the driver before any trial starts: generated data is
written once into the data cache, and user datasets are fully validated
(``load_coco`` with image checks) so that bad input fails in seconds with a
clear message instead of inside a Ray worker an hour later.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from harness.config import DatasetSpec
from harness.data.coco import CocoDetection, CocoIndex, collate_detection, load_coco


@dataclass(frozen=True)
class PreparedDataset:
    """Absolute file locations of one dataset; JSON-able so it travels to workers."""
    name: str
    train_annotations: str
    train_images: str
    val_annotations: str
    val_images: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def prepare_dataset(spec: DatasetSpec, cache_dir: Path, *, check: bool = True) -> PreparedDataset:
    """Materialise (synthetic) or locate (COCO) a dataset and validate both splits."""
    if spec.format == "synthetic":
        from harness.data.synthetic import write_synthetic_coco
        syn = spec.synthetic
        key = hashlib.sha256(json.dumps(syn.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
        root = Path(cache_dir) / f"synthetic-{key}"
        common = dict(image_size=syn.image_size, max_objects=syn.max_objects)
        # Different seeds for the splits: validation images are never training images.
        tr = write_synthetic_coco(root / "train", n_images=syn.train_images, seed=2 * syn.seed, **common)
        va = write_synthetic_coco(root / "val", n_images=syn.val_images, seed=2 * syn.seed + 1, **common)
        prepared = PreparedDataset(spec.name, str(tr), str(tr.parent), str(va), str(va.parent))
    else:
        prepared = PreparedDataset(spec.name, spec.train.annotations, spec.train.images,
                                   spec.val.annotations, spec.val.images)
    if check:
        train, val = load_split(prepared, "train"), load_split(prepared, "val")
        if train.class_names != val.class_names:
            from harness.errors import DataError
            raise DataError(f"train and val have different categories ({train.class_names} vs "
                            f"{val.class_names})", file=prepared.val_annotations, field="categories")
    return prepared


def load_split(prepared: PreparedDataset | dict, split: str, *, check_images: bool = True) -> CocoIndex:
    d = prepared if isinstance(prepared, dict) else prepared.to_dict()
    return load_coco(d[f"{split}_annotations"], d[f"{split}_images"], check_images=check_images)


def train_loader(dataset: torch.utils.data.Dataset, batch_size: int, *, seed: int, world_size: int = 1,
                 rank: int = 0, num_workers: int = 0) -> DataLoader:
    """Shuffled, sharded over DDP ranks; ``batch_size`` is per worker."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_detection, drop_last=len(dataset) > batch_size * world_size,
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(index: CocoIndex, batch_size: int, *, world_size: int = 1, rank: int = 0) -> DataLoader:
    """Every image exactly once over all ranks (strided shards, no padding duplicates)."""
    dataset = torch.utils.data.Subset(CocoDetection(index), range(rank, len(index), world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
