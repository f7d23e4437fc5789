"""Bootstrap intervals of each leaderboard gain, from the detections the trials kept.

For every row with a ``baseline:`` and every (dataset, condition) both were evaluated on,
the paired image-level bootstrap (:func:`harness.evaluate.bootstrap.paired_bootstrap`)
gives a confidence interval of ΔAP and ΔAP50: the same resampled images for the method
and its baseline, each side's AP of a resample the mean over its seeds. Detections
come from ``detections/`` of the run directory (:mod:`harness.evaluate.detections`), the
ground truth from the test set's annotations recorded in ``run.json`` -- prepared the
same way as at evaluation time (:meth:`harness.data.coco.CocoIndex.gt_for_eval`), so
the point estimate equals the rows' ΔAP.

Where an interval cannot be computed (no detections kept, ground truth not on this
machine, the VisDrone protocol, whose ignore regions the COCO matching does not model),
the gain is shown without one and :attr:`Intervals.notes` says why, once per reason.
Matching a trial's detections to the ground truth is the expensive step (about
100 s for COCO val with pycocotools); each is done once per call, and only for rows
that have a baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from harness.config import LeaderboardSpec
from harness.evaluate import (DeltaInterval, Matches, condition_key, detections_rel, match_detections,
                              paired_bootstrap, read_detections)


@dataclass
class Intervals:
    """(row label, dataset, condition) -> metric -> interval; and why some are missing."""
    spec: LeaderboardSpec
    by_cell: dict[tuple[str, str, str], dict[str, DeltaInterval]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def legend(self) -> str:
        """One line under a table that shows the intervals."""
        if not self.by_cell:
            return ""
        return (f"[low, high]: {self.spec.ci:.0%} interval of the gain (paired image bootstrap, "
                f"B = {self.spec.bootstrap}, seed {self.spec.seed}, seeds pooled); † it excludes 0.")


class GroundTruth:
    """The evaluation ground truth of each (dataset, condition) of a run, loaded once."""

    def __init__(self, cells):
        self._where: dict[tuple[str, str], tuple[str, str, str]] = {}
        for c in cells:
            d = c.dataset
            self._where[(d.name, "clean")] = (d.val_annotations, d.val_images, d.protocol)
            for cond in c.conditions:
                self._where[(d.name, condition_key(cond.name, cond.severity))] = (
                    cond.annotations, cond.images, cond.protocol)
        self._loaded: dict[tuple[str, str], dict] = {}

    def get(self, dataset: str, cond: str) -> tuple[dict | None, str]:
        """(COCO ground truth for COCOeval, "") or (None, why not)."""
        if (dataset, cond) in self._loaded:
            return self._loaded[(dataset, cond)], ""
        where = self._where.get((dataset, cond))
        if where is None:
            return None, f"{dataset}/{cond}: not in the run's plan (run.json)"
        annotations, images, protocol = where
        if protocol != "coco":
            return None, f"{dataset}/{cond}: no interval for the {protocol} protocol (COCO matching only)"
        from harness.core import DataError
        from harness.data import load_coco
        try:
            gt = load_coco(annotations, images, check_images=False).gt_for_eval()
        except DataError:
            return None, f"{dataset}/{cond}: ground truth {annotations} is not on this machine"
        self._loaded[(dataset, cond)] = gt
        return gt, ""


def bootstrap_intervals(storage, final: pd.DataFrame, pairs: list[tuple[str, str]], cells,
                        spec: LeaderboardSpec) -> Intervals:
    """Intervals for each (row, baseline) pair in ``pairs`` on every cell both have.

    ``final``: :func:`harness.report.leaderboard.final_rows`'s frame; ``cells``: the run's planned
    cells (for the ground truth of each test set).
    """
    out = Intervals(spec)
    if spec.bootstrap <= 0 or not pairs:
        return out
    gts = GroundTruth(cells)
    matched: dict[tuple, Matches | None] = {}
    missing: list[str] = []

    def side(label: str, dataset: str, cond: str) -> list[Matches] | None:
        rows = final[(final["label"] == label) & (final["dataset"] == dataset) & (final["cond"] == cond)]
        trials = rows.drop_duplicates("seed")[["trial_id", "stage", "condition", "severity"]]
        if trials.empty:
            return None
        gt, why = gts.get(dataset, cond)
        if gt is None:
            out.note(why)
            return None
        got = []
        for t in trials.itertuples(index=False):
            key = (t.trial_id, t.stage, t.condition, int(t.severity))
            if key not in matched:
                try:
                    dets = read_detections(storage, detections_rel(*key))
                    matched[key] = match_detections(gt, dets)
                except FileNotFoundError:
                    missing.append(t.trial_id)
                    matched[key] = None
            if matched[key] is None:
                return None
            got.append(matched[key])
        return got

    for lab, ref in pairs:
        for dataset, cond in sorted(set(zip(final.loc[final["label"] == lab, "dataset"],
                                            final.loc[final["label"] == lab, "cond"]))):
            mine, theirs = side(lab, dataset, cond), side(ref, dataset, cond)
            if mine and theirs:
                out.by_cell[(lab, dataset, cond)] = paired_bootstrap(
                    mine, theirs, resamples=spec.bootstrap, seed=spec.seed, ci=spec.ci)
    if missing:
        out.note(missing_detections_note(missing, "those gains have no interval"))
    return out


def missing_detections_note(trial_ids: list[str], consequence: str) -> str:
    """One line for every trial whose detections are not in the run directory."""
    ids = list(dict.fromkeys(trial_ids))
    return (f"no detections kept for {len(ids)} trial(s) ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}): "
            f"a run from before they were kept, or a stage reused from the artifact store; {consequence}")


__all__ = ["missing_detections_note", "Intervals", "GroundTruth", "bootstrap_intervals"]
