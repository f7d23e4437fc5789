"""Suite -> cells (method x dataset x seed), and a trial's outputs -> result rows.

A *cell* is the unit of work a Tune trial runs: one method (all its stages)
on one dataset with one seed, with every setting resolved into a JSON-able
dict so it can travel to any Ray node.
"""
from __future__ import annotations

import hashlib
import json
import math

from harness.config import Suite, detector_for, method_label, schedule_for
from harness.data.loader import PreparedDataset
from harness.errors import ConfigError
from harness.models import describe
from harness.registry import METHODS
from harness.results import ResultRow


def plan_cells(suite: Suite, prepared: dict[str, PreparedDataset],
               conditions: dict[str, list[dict]] | None = None) -> list[dict]:
    """One cell per (method, dataset, seed); ``conditions``: degraded test sets per dataset."""
    cells = []
    for i, m in enumerate(suite.methods):
        method_cls = METHODS.get(m.name)
        det = detector_for(suite, m)
        arch = det.arch or method_cls.arch
        if arch not in (method_cls.arch, *method_cls.supported_archs):
            raise ConfigError(f"method '{m.name}' trains {', '.join((method_cls.arch, *method_cls.supported_archs))}"
                              f" detectors, not {arch}", field=f"methods[{i}].detector.arch")
        method = method_cls(method_cls.validate_config(m.config))
        config = method.config.model_dump()
        for ds in suite.datasets:
            if m.datasets is not None and ds.name not in m.datasets:
                continue
            for seed in suite.seeds:
                label = method_label(m)
                cells.append({
                    "cell_id": f"{label}/{ds.name}/seed{seed}",
                    "method": m.name, "label": label, "stages": list(method.active_stages),
                    "variant": label[len(m.name):].strip("[]") if label.startswith(m.name) else label,
                    "method_config": config,
                    "detector": det.model_dump(), "arch": arch,
                    "schedule": schedule_for(suite, m).model_dump(),
                    "dataset": prepared[ds.name].to_dict(), "seed": seed,
                    "search": m.search.model_dump() if m.search else None,
                    "conditions": (conditions or {}).get(ds.name, []),
                })
    return cells


def config_hash(cell: dict) -> str:
    keep = {k: v for k, v in cell.items() if k not in ("cell_id", "label", "search", "stages", "conditions")}
    keep["dataset"] = cell["dataset"]["name"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def rows_for_trial(run: dict, cell: dict, trial_id: str, outputs: dict[str, dict],
                   wall_s: float) -> list[ResultRow]:
    """All rows of one trial: per-epoch curves, final evaluation, or a failure row, per stage."""
    from harness.config import DetectorSpec

    variant = cell["variant"]
    if cell.get("search"):  # each sampled configuration is its own leaderboard row
        sampled = {k: cell["method_config"].get(k, cell["schedule"].get(k.split(".")[-1]))
                   for k in cell["search"]["space"]}
        variant = (variant + " " if variant else "") + " ".join(f"{k}={v:.3g}" if isinstance(v, float)
                                                                else f"{k}={v}" for k, v in sampled.items())
    common = dict(run_id=run["run_id"], suite=run["suite"], trial_id=trial_id, cell=cell["cell_id"],
                  method=cell["method"], variant=variant, dataset=cell["dataset"]["name"],
                  seed=cell["seed"], config_hash=config_hash(cell),
                  config_json=json.dumps({k: cell[k] for k in ("method_config", "detector", "schedule")},
                                         sort_keys=True),
                  wall_s=wall_s, metric_backend="faster_coco_eval", versions_json=run["versions_json"],
                  git_sha=run["git_sha"], smoke=run["smoke"])
    rows = []
    method = METHODS.get(cell["method"])(cell["method_config"])
    for stage, out in outputs.items():
        detector = describe(method.stage_detector(stage, DetectorSpec(**cell["detector"])), cell["arch"])
        base = dict(common, stage=stage, detector=detector, restarts=int(out.get("resumes", 0)),
                    node_id=out.get("node_id", ""))
        if out.get("artifact"):  # a shared earlier stage: identified by what determines it
            base["config_hash"] = out["artifact"][:16]
        for record in out.get("history", []):
            for key, value in record.items():
                v = _number(value)
                if key == "epoch" or v is None:
                    continue
                split = "val" if key.startswith("val/") else "train"
                rows.append(ResultRow(**base, split=split, epoch=int(record["epoch"]), metric=key,
                                      value=v, status="ok"))
        if out["status"] == "ok":
            by_label = {c["label"]: c for c in cell.get("conditions", [])}
            evals = [("clean", 0, out.get("final", {}))] + [
                (by_label[lab]["name"], by_label[lab]["severity"], m)
                for lab, m in out.get("conditions", {}).items() if lab in by_label]
            for condition, severity, metrics in evals:
                for key, value in metrics.items():
                    v = _number(value)
                    rows.append(ResultRow(**base, split="val", condition=condition, severity=severity,
                                          metric=key, value=math.nan if v is None else v, status="ok"))
        else:
            rows.append(ResultRow.failure(out.get("reason") or "unknown failure", **base))
    return rows
