"""This node's folders: where detbench keeps what it caches on the machine it runs on."""
from __future__ import annotations

import os
from pathlib import Path


def node_cache_dir() -> Path:
    """This node's local cache: ``DETBENCH_CACHE``, else ``~/.cache/detbench``."""
    return Path(os.environ.get("DETBENCH_CACHE") or Path.home() / ".cache" / "detbench")


def missing_path_hint(p) -> str:
    """What to do about a missing path: set DETBENCH_DATA when the path uses it and it is unset."""
    if "DETBENCH_DATA" not in os.environ and "$DETBENCH_DATA" in str(p):
        return " (set DETBENCH_DATA to the folder holding your datasets)"
    return ""

