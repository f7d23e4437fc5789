"""``detbench status RUN_DIR``: where a sweep stands, cell by cell.

Read from the run directory only (no Ray needed): the planned cells
(``run.json``), the committed result rows (done / failed / stopped, with the
failure reason), the markers trials leave when they start (``trials/``) and
the driver's pid file (``driver.json``). A trial that started but has no rows
is *running* while its driver is alive, else *interrupted* (``detbench resume``
continues it from its last epoch checkpoint).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from harness.results import ResultStore
from harness.storage import Storage, open_storage


def driver_state(run_dir: str | Path | Storage) -> str:
    """'running' (driver alive), 'finished', or 'stopped' (driver gone before the end)."""
    from harness.results import DRIVER_FILE
    try:
        d = open_storage(run_dir).read_json(DRIVER_FILE)
    except FileNotFoundError:
        return "stopped"
    if d.get("finished"):
        return "finished"
    if d.get("host") == socket.gethostname():
        try:
            os.kill(int(d["pid"]), 0)
            return "running"
        except (ProcessLookupError, PermissionError, ValueError):
            return "stopped"
    return "running"  # another host's driver: cannot check from here


def run_status(run_dir: str | Path) -> dict:
    """``{"driver": ..., "cells": [{"cell", "state", "trials", "detail"}, ...], "counts": {...}}``."""
    from harness.results import load_run, open_run

    storage = open_run(run_dir)
    _, cells = load_run(storage)
    driver = driver_state(storage)
    df = ResultStore(storage).read()
    started: dict[str, set[str]] = {}
    names = [f"trials/{n}" for n in storage.list("trials") if n.endswith(".json")]
    for data in storage.read_many(names):
        try:
            m = json.loads(data)
        except (TypeError, ValueError):  # None: removed meanwhile
            continue
        started.setdefault(m["cell"], set()).add(m["trial_id"])
    out, counts = [], {}
    for cell in cells:
        cid = cell.cell_id
        rows = df[df["cell"] == cid] if len(df) else df
        expected = cell.trials
        per_trial = {}
        for tid, g in rows.groupby("trial_id"):
            if (g["epoch"].isna() & (g["status"] == "ok")).any():
                per_trial[tid] = ("done", "")
            elif (g["status"] == "failed").any():
                per_trial[tid] = ("failed", str(g.loc[g["status"] == "failed", "reason"].iloc[0]))
            else:
                per_trial[tid] = ("stopped", str(g["reason"].dropna().iloc[0]) if g["reason"].notna().any() else "")
        unfinished = started.get(cid, set()) - set(per_trial)
        live = "running" if driver == "running" else "interrupted"
        states = [s for s, _ in per_trial.values()] + [live] * len(unfinished)
        states += ["pending"] * max(0, expected - len(states))
        order = ("failed", "interrupted", "running", "pending", "stopped", "done")
        if cell.search or expected > 1:  # a search: counted per trial
            state = ", ".join(f"{states.count(s)} {s}" for s in order if s in states)
            tally = states
        else:                                   # a plain cell: its most telling trial state
            state = next(s for s in order if s in states)
            tally = [state]
        for s in tally:
            counts[s] = counts.get(s, 0) + 1
        detail = "; ".join(r for s, r in per_trial.values() if s == "failed" and r)
        out.append({"cell": cid, "state": state, "trials": len(per_trial) + len(unfinished), "detail": detail})
    return {"run_dir": storage.display(), "driver": driver, "cells": out, "counts": counts}


def format_status(status: dict) -> str:
    width = max([len(c["cell"]) for c in status["cells"]] + [4])
    lines = [f"run {status['run_dir']}  (driver: {status['driver']})"]
    for c in status["cells"]:
        line = f"  {c['cell']:<{width}}  {c['state']}"
        if c["detail"]:
            line += f"  -- {c['detail'][:200]}"
        lines.append(line)
    lines.append("total: " + ", ".join(f"{n} {s}" for s, n in sorted(status["counts"].items())))
    if status["driver"] == "stopped" and any(s in status["counts"] for s in ("interrupted", "pending")):
        lines.append(f"the driver stopped before the end: detbench resume {status['run_dir']}")
    if "failed" in status["counts"]:
        lines.append(f"rerun the failed cells: detbench resume {status['run_dir']} --retry-failed")
    return "\n".join(lines)
