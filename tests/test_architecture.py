"""The layout the architecture doc promises: packages with public faces, and contracts that can fail.

The contracts themselves live in pyproject.toml (``[tool.importlinter]``) and run as ``make imports``
before the tests; here they are run once more on a copy of the tree with one deliberately upward
import, which must break them naming that import (a contract that cannot fail guards nothing).
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "harness"
LINT = Path(sys.executable).with_name("lint-imports")
FACES = ("harness.plugin", "harness.modeling", "harness.data", "harness.config", "harness.core")


def test_harness_is_a_handful_of_packages_each_with_a_documented_face():
    modules = [p for p in HARNESS.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()]
    assert len(modules) <= 15, sorted(p.name for p in modules)
    for pkg in (p for p in HARNESS.iterdir() if (p / "__init__.py").is_file()):
        tree = ast.parse((pkg / "__init__.py").read_text())
        assert ast.get_docstring(tree), f"harness/{pkg.name}/__init__.py: no docstring saying what the package is for"
        exported = next((n for n in tree.body if isinstance(n, ast.Assign)
                         and any(getattr(t, "id", "") == "__all__" for t in n.targets)), None)
        assert exported is not None, f"harness/{pkg.name}/__init__.py has no __all__ (its public face)"


def test_methods_import_only_the_plugin_faces():
    """Every harness import of a method plugin names a face, never a module behind it."""
    for path in sorted((ROOT / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("harness"):
                    assert name in FACES, f"{path.name}:{node.lineno} imports {name}; allowed: {', '.join(FACES)}"


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-logo", "--no-cache"], cwd=tree, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed in this environment (make install)")
def test_the_contracts_hold_and_an_upward_import_breaks_them(tmp_path):
    tree = tmp_path / "tree"
    for name in ("harness", "methods"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    kept = _lint(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    errors = tree / "harness" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from harness.app import cli  # noqa: F401\n")
    broken = _lint(tree)
    assert broken.returncode != 0
    assert "harness.core.errors -> harness.app" in broken.stdout and "BROKEN" in broken.stdout, broken.stdout
