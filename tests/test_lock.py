"""requirements.lock: it pins every dependency, and a run records whether its imports match it."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from harness.app.runner import LOCK_FILE, lock_status

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_lock_pins_every_dependency_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    wanted.add("imagecorruptions-imaug")  # installed with --no-deps (see pyproject.toml)
    lines = [ln for ln in LOCK_FILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    pinned = {_name(ln): ln.split("==", 1)[1] for ln in lines}
    assert all("==" in ln for ln in lines), [ln for ln in lines if "==" not in ln]
    assert wanted <= set(pinned), sorted(wanted - set(pinned))
    assert pinned["torch"] == "2.14.1" and pinned["torchvision"] == "0.29.1"
    assert "detbench" not in pinned


def test_lock_status_names_what_differs(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\nnumpy==2.0.0\nfaster_coco_eval==1.6.5\n")
    assert lock_status({"numpy": "2.0.0", "faster-coco-eval": "1.6.5", "detbench": "0.1.0"}, lock) == \
        {"file": str(lock), "matches": True, "differs": {}}
    status = lock_status({"numpy": "2.1.0", "faster-coco-eval": "1.6.5"}, lock)
    assert status["matches"] is False and status["differs"] == {"numpy": ["2.0.0", "2.1.0"]}
    assert lock_status({"numpy": "2.1.0"}, tmp_path / "none.lock") == {"file": None, "matches": None, "differs": {}}


def test_this_environment_matches_the_lock():
    """make install installs the lock: a mismatch here means the environment was built otherwise."""
    from harness.app.runner import package_versions
    status = lock_status(package_versions())
    assert status["matches"], status["differs"]
