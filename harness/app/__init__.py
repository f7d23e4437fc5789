"""The user's entry points: the ``detbench`` command line, ``run`` / ``resume`` end to end, ``status``."""
from harness.app.runner import resume_run, run_suite
from harness.app.status import format_status, run_status

__all__ = ["resume_run", "run_suite", "format_status", "run_status"]
