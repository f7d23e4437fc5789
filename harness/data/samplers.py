"""Batches of images with similar aspect ratio (torchvision's detection recipe).

Why: detectors resize keeping the aspect ratio, then pad every image of a batch to
the largest height *and* the largest width in it.  A portrait and a landscape image
in one batch pad to a near square holding both sides, so close to half the pixels
are padding.  Batching images of one aspect-ratio group removes most of that waste.

What follows torchvision (``references/detection/group_by_aspect_ratio.py``):

* groups are bins of log2 aspect ratio, edges ``2 ** linspace(-1, 1, 2k + 1)``,
  an image in the bin ``bisect_right(edges, ratio)``, so ``2k + 2`` groups;
* batches are built in the wrapped sampler's order: an image goes into its group's
  buffer, and a full buffer is one batch;
* at the end of an epoch, leftover partial groups are filled up to ``batch_size``
  with this epoch's first samples of the same group (repeated if the group has
  fewer), largest leftovers first -- every batch is full.

Differences: ratios here are width / height (torchvision uses height / width); the
edges are symmetric, so the grouping is the mirror image -- group 0 is the tallest
images -- except for images exactly on an edge (a square image, 1.0, goes with the
wide ones).  ``factor=0`` splits at 1.0 (tall vs wide), as torchvision's ``k=0``;
ties between equal-size leftovers go to the lower group id; ``drop_last=False`` is
an addition (see :class:`GroupedBatchSampler`).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


def aspect_ratio_groups(aspect_ratios: Sequence[float], factor: int) -> list[int]:
    """Group id of every image: its bin among ``2 ** linspace(-1, 1, 2 * factor + 1)``.

    Ratios are width / height.  ``factor=0`` gives two groups, tall and wide (torchvision's ``k=0``); ``factor=3``
    (torchvision's default) gives groups ``0..7``, edges 0.5, 0.63, 0.79, 1, 1.26,
    1.59, 2.  An image exactly on an edge goes to the group above it.
    """
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    bad = [r for r in aspect_ratios if not (math.isfinite(r) and r > 0)]
    if bad:
        raise ValueError(f"aspect ratios must be positive and finite, got {bad[:5]}")
    # factor 0: one edge at 1.0 (tall vs wide), as torchvision's k=0
    edges = [1.0] if factor == 0 else [2.0 ** (i / factor - 1) for i in range(2 * factor + 1)]  # exact at 0.5, 1, 2
    return [bisect.bisect_right(edges, r) for r in aspect_ratios]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices, all of one group, in ``sampler``'s order.

    ``sampler`` yields dataset indices -- under DDP a ``DistributedSampler``, so each
    rank batches only its own shard; ``group_ids[i]`` is the group of index ``i``.
    Given the order ``sampler`` yields, the batches are fully determined.  Every
    batch is full; a group smaller than ``batch_size`` repeats its images.

    With ``n = len(sampler)``, ``m = min(n, number of distinct group ids)``:

    * ``drop_last=True`` -- torchvision exactly: ``n // batch_size`` batches.  Leftover
      groups are filled largest first; the smallest leftovers are not seen this epoch
      (a reshuffled epoch sees them), so an epoch does not cover every image.
    * ``drop_last=False`` (default) -- every image of the shard is in a batch: each
      leftover group is filled and yielded.  How many batches that takes depends on
      the shuffle, but ranks must step the same number of times, so the count is the
      bound ``m + (n - m) // batch_size`` (the worst case), reached by repeating this
      epoch's first batches.  That costs at most about ``m`` extra batches an epoch.

    Either count depends only on ``n``, so it is the same on every rank and every
    epoch.  ``set_epoch`` is passed to ``sampler`` (reshuffles a DistributedSampler).
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._num_groups = len(set(self.group_ids))

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        if self.drop_last:
            return n // self.batch_size
        m = min(n, self._num_groups)
        return m + (n - m) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the wrapped sampler (if it takes one)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        want, done = len(self), 0
        buffers: dict[int, list[int]] = {}
        seen: dict[int, list[int]] = {}   # per group, this epoch, in order
        emitted: list[list[int]] = []     # only kept to pad when not drop_last
        for idx in self.sampler:
            g = self.group_ids[idx]
            seen.setdefault(g, []).append(idx)
            buf = buffers.setdefault(g, [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                del buffers[g]
                done += 1
                if not self.drop_last:
                    emitted.append(buf)
                yield buf
        leftovers = sorted(buffers.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        for g, buf in leftovers:
            if done == want:
                return
            need = self.batch_size - len(buf)
            pool = seen[g] * math.ceil(need / len(seen[g]))
            batch = buf + pool[:need]
            done += 1
            emitted.append(batch)
            yield batch
        for i in range(want - done):  # drop_last=False: pad the count to the bound
            yield list(emitted[i % len(emitted)])
