"""Clean/degraded twins with identical geometry, for the FCTL method plugin.

FCTL compares a frozen ideal model's features of a clean image with the
trained model's features of its degraded twin, so both must show every object
in the same place: :func:`twin_conditions` refuses corruptions that move
pixels, and :class:`DegradedTwins` pairs each training image with one
condition drawn per epoch (corrupted on the fly or read from the render cache).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from harness.core import ConfigError, DataError
from harness.data.coco import SharedEpoch, read_image
from harness.data.conditions import Condition, expand_conditions
from harness.data.corruptions import CORRUPTIONS, _check_name_severity, _to_uint8, corrupt
from harness.data.render_cache import render_condition


def twin_conditions(conditions, *, field: str = "conditions") -> list[Condition]:
    """Expanded, de-duplicated conditions usable for clean/degraded twins (same geometry).

    Corruptions that move pixels raise :class:`ConfigError` naming ``field``.
    """
    conds = conditions if all(isinstance(c, Condition) for c in conditions) \
        else expand_conditions(conditions, field=field)
    conds = list(dict.fromkeys(conds))
    if not conds:
        raise ConfigError("needs at least one condition", field=field)
    for c in conds:
        if not c.is_clean:
            _check_name_severity(c.name, c.severity)
            if CORRUPTIONS[c.name].moves_pixels:
                ok = [n for n, ci in CORRUPTIONS.items() if not ci.moves_pixels]
                raise ConfigError(f"corruption {c.name!r} moves pixels, so a clean twin would not share "
                                  f"its geometry; usable: {', '.join(ok)}", field=field)
    return conds


class DegradedTwins(torch.utils.data.Dataset):
    """``(clean image, degraded image, target)`` with identical geometry, for FCTL.

    Wraps a :class:`~harness.data.coco.CocoDetection`-like dataset (items
    ``(image float [3,H,W] in [0,1], target)``).  Item ``i`` in epoch ``e``
    gets one condition drawn from ``conditions`` (uniformly, ``clean``
    allowed) and a corruption seed, both from ``(seed, e, i)`` only -- call
    :meth:`set_epoch` each epoch (the epoch is in shared memory: persistent DataLoader
    workers see it). Images stay uint8 when the wrapped dataset gives uint8.

    * ``cache_dir=None``: corrupted on the fly, after the wrapped dataset's
      own transform (so random flips/crops are shared by both twins).  The
      clean twin is returned as the dataset gave it; the degraded one is
      computed from its 8-bit rounding.
    * ``cache_dir`` given: every condition is rendered once with
      :func:`render_condition` (``suite_seed``), and the degraded twin is read
      from there; the corruption's own randomness is then fixed per image and
      only the condition varies per epoch.  The wrapped dataset must expose
      ``.index`` (a CocoIndex) and have no transform.

    Corruptions that move pixels (see :data:`CORRUPTIONS`) raise ConfigError.
    """

    def __init__(self, dataset, conditions, *, seed: int = 0, cache_dir=None,
                 suite_seed: int = 0, progress: bool = False, field: str = "conditions"):
        conds = twin_conditions(conditions, field=field)
        self.dataset, self.conditions, self.seed = dataset, conds, int(seed)
        self.epoch = SharedEpoch()
        self.suite_seed = int(suite_seed)
        self.roots: dict[Condition, Path] | None = None
        if cache_dir is not None:
            index = getattr(dataset, "index", None)
            if index is None or not hasattr(index, "ann_file"):
                raise ConfigError("rendering twins from the cache needs a dataset with a "
                                  "CocoIndex '.index'", field="cache_dir")
            if getattr(dataset, "transform", None) is not None:
                raise ConfigError("rendered twins cannot share a dataset transform's random "
                                  "geometry; use cache_dir=None (on the fly) instead",
                                  field="cache_dir")
            self.roots = {c: render_condition(index, c, cache_dir, suite_seed=suite_seed,
                                              progress=progress) for c in conds}

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def draw(self, i: int) -> tuple[Condition, int]:
        """The condition and corruption seed of item ``i`` in the current epoch."""
        rng = np.random.default_rng([self.seed & (2 ** 63 - 1), self.epoch.get(), int(i), 0x7717])
        cond = self.conditions[int(rng.integers(len(self.conditions)))]
        return cond, int(rng.integers(2 ** 63))

    def __getitem__(self, i: int):
        clean, target = self.dataset[i]
        cond, seed = self.draw(i)
        if cond.is_clean:
            return clean, clean.clone(), target
        if self.roots is None:
            hwc = clean.permute(1, 2, 0).numpy()
            u8 = hwc if clean.dtype == torch.uint8 else _to_uint8(hwc)
            out = corrupt(np.ascontiguousarray(u8), cond.name, cond.severity, seed)
            return clean, torch.from_numpy(out).permute(2, 0, 1).contiguous(), target
        k = self.dataset.image_index(i) if hasattr(self.dataset, "image_index") else i
        path = self.roots[cond] / self.dataset.index.images.file_name(k)
        degraded = read_image(path)
        if getattr(self.dataset, "flipped", lambda _: False)(i):  # the rendered file is unflipped; the clean twin was flipped
            degraded = degraded.flip(-1)
        if degraded.shape != clean.shape:
            raise DataError(f"rendered image {path} is {tuple(degraded.shape)}, clean is "
                            f"{tuple(clean.shape)}", file=path)
        return clean, degraded, target
