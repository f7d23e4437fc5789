"""Suite -> checked cells: names resolved against the registries, one typed :class:`Cell` per
(method, dataset, seed), each stage's engine job and artifact key, ``detbench plan``'s estimates,
and the evaluation cells of ``detbench eval``. Nothing here starts Ray."""
from harness.plan.cells import plan_cells
from harness.plan.check import check_suite, load_suite
from harness.plan.checkpoint_eval import eval_cells
from harness.plan.estimate import cost_table, format_plan, plan_suite
from harness.plan.records import Cell, RunInfo, StageOutput
from harness.plan.stages import stage_artifact_key, stage_job

__all__ = ["plan_cells", "check_suite", "load_suite", "eval_cells", "cost_table", "format_plan", "plan_suite", "Cell",
           "RunInfo", "StageOutput", "stage_artifact_key", "stage_job"]
