"""Leaderboard: exact cell strings, best marking, failures, smoke banner."""
from __future__ import annotations

from pathlib import Path

import math

import pytest

from harness.report import (SMOKE_BANNER, build_leaderboard, format_for_terminal, render_leaderboard,
                            write_leaderboard)
from harness.results import ResultRow, ResultStore

BASE = dict(run_id="run1", suite="s", cell="voc/clean", stage="final", dataset="voc",
            config_hash="h", config_json="{}", detector="det", wall_s=1.0)
# (method, variant, seed) -> (AP, AP50)
VALUES = {("faster_rcnn", "", 0): (0.50, 0.70), ("faster_rcnn", "", 1): (0.52, 0.72),
          ("focal", "g2", 0): (0.55, 0.69), ("focal", "g2", 1): (0.56, 0.70)}


def _rows(smoke=False) -> dict[str, list[ResultRow]]:
    trials = {}
    for (method, variant, seed), (ap, ap50) in VALUES.items():
        tid = f"{method}-{seed}"
        common = dict(BASE, trial_id=tid, method=method, variant=variant, seed=seed,
                      status="ok", smoke=smoke)
        trials[tid] = [ResultRow(**common, metric="AP", value=ap),
                       ResultRow(**common, metric="AP50", value=ap50),
                       ResultRow(**common, metric="APs", value=math.nan),
                       # per-epoch, test-split and fog rows must not leak into clean/val cells
                       ResultRow(**common, metric="AP", value=0.99, epoch=3),
                       ResultRow(**common, metric="AP", value=0.99, split="test"),
                       ResultRow(**common, metric="AP", value=0.3 + seed / 100,
                                 condition="fog", severity=2)]
    trials["focal-2"] = [ResultRow.failure("CUDA OOM", **dict(
        BASE, trial_id="focal-2", method="focal", variant="g2", seed=2, smoke=smoke))]
    return trials


@pytest.fixture
def store(tmp_path):
    s = ResultStore(tmp_path)
    for tid, rows in _rows().items():
        s.write_trial(tid, rows)
    return s


def test_cells_exact(store):
    board = build_leaderboard(store.read())
    assert list(board.index) == ["focal[g2]", "faster_rcnn"]  # ranked by clean AP
    assert board.loc["faster_rcnn", ("voc", "clean", "AP")] == "51.0 ± 1.4"
    assert board.loc["faster_rcnn", ("voc", "clean", "AP50")] == "71.0 ± 1.4"
    assert board.loc["focal[g2]", ("voc", "clean", "AP")] == "55.5 ± 0.7"
    assert board.loc["focal[g2]", ("voc", "fog@2", "AP")] == "30.5 ± 0.7"
    assert board.loc["focal[g2]", ("seeds", "", "")] == 2
    assert board.loc["focal[g2]", ("failed", "", "")] == 1
    assert board.loc["faster_rcnn", ("failed", "", "")] == 0
    mean = board.attrs["mean"]
    assert mean.loc["focal[g2]", ("voc", "clean", "AP")] == pytest.approx(55.5)
    # clean before corrupted conditions
    assert [c[1] for c in board.columns] == ["clean", "clean", "fog@2", "", ""]  # no fog AP50


def test_single_seed_and_nan(store):
    df = store.read()
    one = df[df.seed == 0]
    board = build_leaderboard(one, metrics=("AP", "APs"))
    assert board.loc["faster_rcnn", ("voc", "clean", "AP")] == "50.0"
    assert board.loc["faster_rcnn", ("voc", "clean", "APs")] == "n/a"
    assert board.loc["focal[g2]", ("seeds", "", "")] == 1


def test_best_marked_in_all_formats(store):
    df = store.read()
    md = render_leaderboard(df, "md")
    assert "**55.5 ± 0.7**" in md and "**71.0 ± 1.4**" in md
    assert "**51.0" not in md and "**69.5" not in md
    assert md.splitlines()[0].startswith("| method |")
    csv_text = render_leaderboard(df, "csv")
    assert "55.5 ± 0.7*" in csv_text and "71.0 ± 1.4*" in csv_text
    assert "51.0 ± 1.4*" not in csv_text
    assert csv_text.splitlines()[0].startswith("method,voc/clean/AP,")
    html = render_leaderboard(df, "html", title="VOC <test>")
    assert "<b>55.5 ± 0.7</b>" in html and "<table>" in html and "VOC &lt;test&gt;" in html
    term = format_for_terminal(df)
    assert "55.5 ± 0.7*" in term and "faster_rcnn" in term and not term.startswith(SMOKE_BANNER)
    with pytest.raises(ValueError):
        render_leaderboard(df, "pdf")


def test_smoke_banner(tmp_path, store):
    assert render_leaderboard(store.read(), "md", smoke=True).startswith(SMOKE_BANNER)
    assert not render_leaderboard(store.read(), "md").startswith(SMOKE_BANNER)
    smoke_store = ResultStore(tmp_path / "smoke")
    for tid, rows in _rows(smoke=True).items():
        smoke_store.write_trial(tid, rows)
    for fmt in ("md", "csv", "html"):
        path = Path(write_leaderboard(smoke_store.storage, fmt))
        text = path.read_text(encoding="utf-8")
        assert path.name == f"leaderboard.{fmt}"
        assert SMOKE_BANNER in text.splitlines()[0]
    assert format_for_terminal(smoke_store.read()).startswith(SMOKE_BANNER)


def test_write_leaderboard(store):
    path = Path(write_leaderboard(store.storage))
    assert path == store.storage.local_path("leaderboard.md")
    assert "| focal[g2] | **55.5 ± 0.7** |" in path.read_text(encoding="utf-8")
    assert not list(path.parent.glob("*.tmp"))
    write_leaderboard(store.storage)  # overwrite is fine


def test_empty_and_failed_only(tmp_path):
    empty = ResultStore(tmp_path / "empty")
    for fmt in ("md", "csv", "html"):
        text = Path(write_leaderboard(empty.storage, fmt)).read_text(encoding="utf-8")
        assert "No successful final evaluations yet" in text
    assert "No successful" in format_for_terminal(empty.read())
    failed = ResultStore(tmp_path / "failed")
    failed.write_trial("focal-2", _rows()["focal-2"])
    text = Path(write_leaderboard(failed.storage)).read_text(encoding="utf-8")
    assert "1 failed trial" in text
    board = build_leaderboard(failed.read())
    assert board.loc["focal[g2]", ("failed", "", "")] == 1


def test_rerun_of_same_seed_supersedes(store):
    newer = [ResultRow(**dict(BASE, trial_id="faster_rcnn-0b", method="faster_rcnn", seed=0,
                              status="ok"), metric="AP", value=0.54,
                       created_at="2999-01-01T00:00:00+00:00")]
    store.write_trial("faster_rcnn-0b", newer)
    board = build_leaderboard(store.read(), metrics=("AP",))
    assert board.loc["faster_rcnn", ("voc", "clean", "AP")] == "53.0 ± 1.4"


def test_fewer_seeds_in_one_cell_is_flagged(store):
    df = store.read()
    df = df[~((df.method == "focal") & (df.seed == 1) & (df.condition == "fog"))]
    board = build_leaderboard(df, metrics=("AP",))
    assert board.loc["focal[g2]", ("voc", "fog@2", "AP")] == "30.0 (n=1)"


def _final_row(method, seed, value, *, stage="train", variant="", metric="AP"):
    from harness.results import ResultRow
    return ResultRow(run_id="r", suite="s", trial_id=f"{method}{variant}{stage}{seed}", cell="c",
                     method=method, variant=variant, stage=stage, dataset="d", seed=seed, metric=metric,
                     value=value, config_hash="h", config_json="{}", detector="x", wall_s=1.0,
                     status="ok").model_dump()


def test_multi_stage_methods_get_a_row_per_stage():
    import pandas as pd
    rows = [_final_row("defeat", 0, 0.40, stage="teacher"), _final_row("defeat", 0, 0.30, stage="student"),
            _final_row("focal", 0, 0.25)]
    board = build_leaderboard(pd.DataFrame(rows), metrics=("AP",))
    assert set(board.index) == {"defeat (teacher)", "defeat (student)", "focal"}


def test_gain_over_baseline_column():
    import pandas as pd
    rows = [_final_row("umop", s, v) for s, v in ((0, 0.33), (1, 0.35))]
    rows += [_final_row("focal", s, v) for s, v in ((0, 0.30), (1, 0.30))]
    board = build_leaderboard(pd.DataFrame(rows), metrics=("AP",), baselines={"umop": "focal"})
    col = ("ΔAP vs baseline", "d/clean", "")
    assert board.loc["umop", col] == "+4.0 (+13.3%) vs focal"
    assert board.loc["focal", col] == ""
    assert "ΔAP vs baseline/d/clean" in render_leaderboard(board, "md")


def test_baseline_applies_to_every_stage_row_of_a_method():
    import pandas as pd
    rows = [_final_row("defeat", 0, 0.40, stage="teacher"), _final_row("defeat", 0, 0.33, stage="student"),
            _final_row("faster_rcnn", 0, 0.30)]
    board = build_leaderboard(pd.DataFrame(rows), metrics=("AP",), baselines={"defeat": "faster_rcnn"})
    assert board.loc["defeat (student)", ("ΔAP vs baseline", "d/clean", "")] == "+3.0 (+10.0%) vs faster_rcnn"


def test_shared_earlier_stage_is_one_row_and_stages_compare_with_their_like():
    """FCTL: fctl and fctl[degraded_only] share one ideal model per seed (same artifact hash)."""
    import pandas as pd
    rows = []
    for seed, (ideal, dego, fctl) in enumerate(((0.40, 0.20, 0.25), (0.42, 0.22, 0.26))):
        for variant, value in (("", fctl), ("degraded_only", dego)):
            rows.append({**_final_row("fctl", seed, ideal, stage="ideal"), "variant": variant,
                         "config_hash": f"ideal-{seed}"})
            rows.append({**_final_row("fctl", seed, value, stage="corrective"), "variant": variant,
                         "config_hash": f"{variant}-{seed}"})
    board = build_leaderboard(pd.DataFrame(rows), metrics=("AP",),
                              baselines={"fctl": "fctl[degraded_only]"})
    assert set(board.index) == {"fctl (ideal)", "fctl (corrective)", "fctl[degraded_only] (corrective)"}
    assert board.loc["fctl (ideal)", ("d", "clean", "AP")] == "41.0 ± 1.4"
    col = ("ΔAP vs baseline", "d/clean", "")
    assert board.loc["fctl (corrective)", col] == "+4.5 (+21.4%) vs fctl[degraded_only] (corrective)"
    assert board.loc["fctl (ideal)", col] == ""
    # different ideal models (e.g. another detector) stay separate rows
    other = [{**r, "config_hash": r["config_hash"] + "x"} if r["variant"] and r["stage"] == "ideal" else r
             for r in rows]
    assert "fctl[degraded_only] (ideal)" in build_leaderboard(pd.DataFrame(other), metrics=("AP",)).index


def test_robustness_table_shows_a_shared_stage_once():
    import pandas as pd

    from harness.report import robustness_table
    rows = []
    for variant in ("", "degraded_only"):
        for stage, hash_, value in (("ideal", "ideal-0", 0.40), ("corrective", variant or "fctl", 0.30)):
            for cond, sev, v in (("clean", 0, value), ("fog", 3, value / 2)):
                rows.append({**_final_row("fctl", 0, v, stage=stage), "variant": variant, "config_hash": hash_,
                             "condition": cond, "severity": sev})
    text = robustness_table(pd.DataFrame(rows))
    names = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| fctl")]
    assert sorted(names) == ["fctl (corrective)", "fctl (ideal)", "fctl[degraded_only] (corrective)"]


def test_baseline_without_rows_on_a_dataset_leaves_an_empty_gain_and_a_note():
    import pandas as pd
    rows = [_final_row("umop", 0, 0.33), {**_final_row("umop", 0, 0.20), "dataset": "e", "trial_id": "u-e"},
            _final_row("focal", 0, 0.30)]  # focal (the baseline) never ran on dataset "e"
    board = build_leaderboard(pd.DataFrame(rows), metrics=("AP",), baselines={"umop": "focal"})
    assert board.loc["umop", ("ΔAP vs baseline", "d/clean", "")].startswith("+3.0")
    assert ("ΔAP vs baseline", "e/clean", "") not in board.columns or \
        board.loc["umop", ("ΔAP vs baseline", "e/clean", "")] == ""
    assert board.attrs["notes"] == ["baseline focal of umop has no AP on e/clean: that gain is left empty"]


def test_published_column_never_on_smoke_rows():
    import pandas as pd

    from harness.report import load_published
    ref = load_published()["tv_retinanet_r50_fpn_v1"]
    rows = [{**_final_row("focal", 0, 0.30), "dataset": "coco"}]
    board = build_leaderboard(pd.DataFrame(rows), metrics=("AP",), published={"focal": ref})
    assert board.loc["focal", ("published", "", "")].startswith("36.4")
    assert board.loc["focal", ("Δ vs published", "", "")] == "-6.4"
    smoke = build_leaderboard(pd.DataFrame([{**r, "smoke": True} for r in rows]), metrics=("AP",),
                              published={"focal": ref})
    assert ("published", "", "") not in smoke.columns


def test_latex_leaderboard_is_booktabs_with_grouped_headers(store):
    tex = render_leaderboard(store.read(), "tex")
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\multicolumn{2}{c}{voc/clean}" in tex and r"\textbf{55.5 $\pm$ 0.7}" in tex


def _wide_board(datasets=("coco", "visdrone", "weather"), conditions=("clean", "fog@3", "snow@3", "rain@3")):
    """A sweep-sized board: 5 rows x datasets x conditions x (AP, AP50), gains with intervals."""
    from harness.evaluate.bootstrap import DeltaInterval
    rows, methods = [], ["faster_rcnn", "fctl", "focal", "umop", "defeat"]
    for d in datasets:
        for c in conditions:
            name, sev = (c.split("@")[0], int(c.split("@")[1])) if "@" in c else (c, 0)
            for k, m in enumerate(methods):
                for seed in (0, 1):
                    common = dict(BASE, dataset=d, cell=f"{d}/{c}", trial_id=f"{m}-{d}-{seed}", method=m,
                                  variant="", seed=seed, status="ok", condition=name, severity=sev)
                    rows += [ResultRow(**common, metric="AP", value=0.30 + k / 50 + seed / 100),
                             ResultRow(**common, metric="AP50", value=0.50 + k / 50 + seed / 100)]
    import pandas as pd
    df = pd.DataFrame([r.__dict__ for r in rows])
    intervals = {(m, d, c): {"AP": DeltaInterval("AP", 0.02, 0.01 if m != "umop" else -0.01, 0.03, 1000, 0.95)}
                 for m in methods[1:] for d in datasets for c in conditions}
    return build_leaderboard(df, baselines={m: "faster_rcnn" for m in methods[1:]}, intervals=intervals)


def test_terminal_leaderboard_fits_120_columns_split_by_dataset():
    """The markdown board keeps every gain's interval and baseline; the terminal shows a gain
    as +x.x† and splits the table by dataset, no line over 120 characters (#34)."""
    board = _wide_board()
    assert "[+1.0, +3.0]† vs faster_rcnn" in render_leaderboard(board, "md")  # the long form stays there
    term = format_for_terminal(board)
    lines = term.splitlines()
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    assert [line for line in lines if line.startswith("[")] == \
        ["[coco]", "[coco (continued)]", "[visdrone]", "[visdrone (continued)]", "[weather]",
         "[weather (continued)]"]
    blocks = [b.splitlines() for b in term.split("\n\n")]
    coco_gains = next(b for b in blocks if b[0] == "[coco (continued)]")
    assert coco_gains[1].split() == ["method", "ΔAP/clean", "ΔAP/fog@3", "ΔAP/rain@3", "ΔAP/snow@3"]
    rows = {line.split()[0]: line.split()[1:] for line in coco_gains[2:]}
    assert rows["fctl"] == ["+2.0†"] * 4 and rows["umop"] == ["+6.0"] * 4 and rows["faster_rcnn"] == []
    assert "vs faster_rcnn" not in term and "[+1.0" not in term
    last = next(b for b in blocks if b[0] == "[weather (continued)]")
    assert last[1].split()[-2:] == ["seeds", "failed"]
    assert lines[-2].startswith("Δ: points over the row's baseline, †")
    coco = next(b for b in blocks if b[0] == "[coco]")
    assert coco[1].split()[1:3] == ["clean/AP", "clean/AP50"] and "38.5 ± 0.7*" in coco[2]


def test_terminal_leaderboard_in_one_table_when_it_fits(store):
    term = format_for_terminal(store.read())
    assert term.splitlines()[0].split() == ["method", "voc/clean/AP", "voc/clean/AP50", "voc/fog@2/AP", "seeds",
                                            "failed"]
    assert not [line for line in term.splitlines() if line.startswith("[")] and "Δ:" not in term


def test_terminal_leaderboard_wraps_a_dataset_wider_than_the_terminal():
    conditions = ("clean", *(f"{c}@{s}" for c in ("fog", "snow", "frost") for s in (1, 3, 5)))
    term = format_for_terminal(_wide_board(datasets=("coco",), conditions=conditions))
    lines = term.splitlines()
    assert max(map(len, lines)) <= 120
    assert lines[0] == "[coco]" and lines.count("[coco (continued)]") >= 2
    heads = " ".join(line for line in lines if line.startswith("method")).split()
    assert sorted(h for h in heads if h != "method") == \
        sorted([f"{c}/{m}" for c in conditions for m in ("AP", "AP50")] + [f"ΔAP/{c}" for c in conditions]
               + ["seeds", "failed"])
