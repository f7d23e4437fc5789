"""A run's rows as publishable outputs: leaderboards (Markdown, CSV, HTML, LaTeX) with gains and
their intervals, robustness tables, seeds / cost / per-class / error tables, plots, the HTML
report, published reference numbers, run comparison and the golden check."""
from harness.report.compare import compare_runs, format_comparison, write_comparison
from harness.report.golden import check_run, format_checks, write_golden
from harness.report.leaderboard import (SMOKE_BANNER, build_leaderboard, final_rows, format_for_terminal,
                                        render_leaderboard, write_leaderboard)
from harness.report.outputs import robustness_table, write_report, write_run_outputs
from harness.report.published import load_published
from harness.report.run_tables import seeds_table
from harness.report.tables import Table, to_csv, to_latex, to_markdown

__all__ = ["compare_runs", "format_comparison", "write_comparison", "check_run", "format_checks", "write_golden",
           "SMOKE_BANNER", "build_leaderboard", "final_rows", "format_for_terminal", "render_leaderboard",
           "write_leaderboard", "robustness_table", "write_report", "write_run_outputs", "load_published",
           "seeds_table", "Table", "to_csv", "to_latex", "to_markdown"]
