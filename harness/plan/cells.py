"""Suite -> cells: one :class:`~harness.plan.records.Cell` per (method, dataset, seed).

A cell is the unit of work a Tune trial runs: one method (all its stages) on one
dataset with one seed, every setting resolved and validated once here. A trial's
outputs become result rows in :mod:`harness.results`.
"""
from __future__ import annotations

from harness.config import Suite, detector_for, label_variant, method_label, schedule_for
from harness.core import ConfigError
from harness.data import PreparedCondition, PreparedDataset
from harness.plan.records import Cell
from harness.plugin import METHODS


def plan_cells(suite: Suite, prepared: dict[str, PreparedDataset],
               conditions: dict[str, list[PreparedCondition]] | None = None) -> list[Cell]:
    """One cell per (method, dataset, seed) in suite order; ``conditions``: degraded test sets per dataset.

    A method config is validated once, here; a method whose stages cannot train the
    suite's detector arch is refused naming its record.
    """
    cells = []
    for i, m in enumerate(suite.methods):
        method_cls = METHODS.get(m.name)
        det = detector_for(suite, m)
        arch = det.arch or method_cls.arch
        if arch not in (method_cls.arch, *method_cls.supported_archs):
            raise ConfigError(f"method '{m.name}' trains {', '.join((method_cls.arch, *method_cls.supported_archs))}"
                              f" detectors, not {arch}", field=f"methods[{i}].detector.arch")
        method = method_cls(method_cls.validate_config(m.config))
        config = method.config.model_dump(mode="json")  # JSON-native: the same on both sides of Ray
        schedule = schedule_for(suite, m)
        for ds in suite.datasets:
            if m.datasets is not None and ds.name not in m.datasets:
                continue
            for seed in suite.seeds:
                label = method_label(m)
                cells.append(Cell(
                    cell_id=f"{label}/{ds.name}/seed{seed}", method=m.name, label=label,
                    variant=label_variant(label, m.name),
                    stages=tuple(method.active_stages), method_config=config, detector=det, arch=arch,
                    schedule=schedule, dataset=prepared[ds.name], seed=seed, search=m.search,
                    conditions=tuple((conditions or {}).get(ds.name, ()))))
    return cells
