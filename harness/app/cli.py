"""``detbench``: run suites, inspect results and data, list methods.

Every user error (suite, data, resources) exits with code 2 and one clear
line naming the file, record and field; nothing is left half-written.
"""
from __future__ import annotations

import argparse
import logging
import sys

from harness.core import DetbenchError


def cmd_run(args) -> int:
    from harness.app.runner import run_suite
    board = run_suite(args.suite, address=args.address, out_dir=args.out, name=args.name,
                      progress=not args.quiet, retry_failed=args.retry_failed, check_images=args.check_images)
    print(f"\nleaderboard: {board}")
    return 0


def cmd_eval(args) -> int:
    from harness.app.runner import run_suite
    board = run_suite(args.suite, address=args.address, out_dir=args.out, name=args.name,
                      progress=not args.quiet, checkpoint=args.checkpoint, method=args.method,
                      check_images=args.check_images)
    print(f"\nleaderboard: {board}")
    return 0


def cmd_plan(args) -> int:
    from harness.plan import format_plan, plan_suite
    print(format_plan(plan_suite(args.suite, cost_per_image_s=args.cost_per_image_s, measure=args.measure)))
    return 0


def cmd_resume(args) -> int:
    from harness.app.runner import resume_run
    board = resume_run(args.run_dir, address=args.address, progress=not args.quiet,
                       retry_failed=args.retry_failed)
    print(f"\nleaderboard: {board}")
    return 0


def cmd_status(args) -> int:
    from harness.app.status import format_status, run_status
    print(format_status(run_status(args.run_dir)))
    return 0


def cmd_cluster_info(args) -> int:
    from harness.sweep import cluster_report
    text, fits = cluster_report(args.address, args.suite)
    print(text)
    return 0 if fits else 2


def _run_outputs(args):
    """Rebuild every output of a run directory (harness.report.outputs) with the CLI's bootstrap settings."""
    from harness.report import write_run_outputs
    from harness.results import ResultStore, open_run, run_settings
    run_dir = open_run(args.run_dir)
    df = ResultStore(run_dir).read()
    if df.empty:
        raise DetbenchError("the run has no result rows yet (no trial has finished): nothing to tabulate",
                            file=run_dir.display())
    spec = run_settings(run_dir).leaderboard
    update = {k: v for k, v in (("bootstrap", args.bootstrap), ("ci", args.ci)) if v is not None}
    if update:
        from harness.config import LeaderboardSpec
        spec = LeaderboardSpec.model_validate({**spec.model_dump(), **update})
    return run_dir, df, write_run_outputs(run_dir, df=df, leaderboard=spec)


def cmd_leaderboard(args) -> int:
    from harness.report import format_for_terminal, render_leaderboard
    run_dir, df, outputs = _run_outputs(args)
    if args.seeds_table:
        from harness.report import final_rows, seeds_table, to_markdown
        print(to_markdown(seeds_table(final_rows(df)[0])))
    elif args.format == "md":
        print(format_for_terminal(outputs.board))
    else:
        print(render_leaderboard(outputs.board, args.format))
    for note in outputs.notes:
        print(f"note: {note}")
    print(f"\nleaderboard: {run_dir.display('leaderboard.md')}   report: {run_dir.display('report.html')}")
    return 0


def cmd_report(args) -> int:
    _, _, outputs = _run_outputs(args)
    for where in outputs.written:
        print(where)
    return 0


def cmd_compare(args) -> int:
    from harness.report import compare_runs, format_comparison, write_comparison
    comparison = compare_runs(args.run_a, args.run_b, bootstrap=args.bootstrap, ci=args.ci)
    text = format_comparison(comparison)
    print(text, end="")
    if args.out:
        print(f"\ncomparison: {write_comparison(text, args.out)}")
    return 0


def cmd_data_synth(args) -> int:
    from harness.data import write_synthetic_coco
    if args.format != "coco":
        raise DetbenchError(f"unknown format {args.format!r}; available: coco", field="--format")
    path = write_synthetic_coco(args.out, n_images=args.images, seed=args.seed,
                                image_size=args.image_size, max_objects=args.max_objects)
    print(f"wrote {args.images} images: {path}")
    return 0


def cmd_data_check(args) -> int:
    from harness.data import check_coco
    summary = check_coco(args.annotations, args.images, level=args.check_images)
    for key, value in summary.items():
        print(f"{key:>18}: {value}")
    print("ok")
    return 0


def cmd_data_convert(args) -> int:
    from harness.data import convert_visdrone
    path = convert_visdrone(args.src, args.out)
    print(f"wrote {path} (load with images root {args.src})")
    return 0


def cmd_artifacts(args) -> int:
    from harness.results import load_run, open_run
    from harness.storage import ArtifactStore
    storage = open_run(args.run_dir)
    run, _ = load_run(storage)
    store = ArtifactStore(run.artifacts_dir or storage.child("artifacts"))
    if not store.storage.list_dirs(""):
        raise DetbenchError("no artifacts in this run directory", file=store.storage.display())
    if args.action == "gc":
        removed = store.gc()
        print(f"removed {len(removed)} temporary/corrupt entr{'y' if len(removed) == 1 else 'ies'}")
        return 0
    for entry in store.list():
        print(f"{entry['key']}  {entry.get('method', '')}/{entry.get('stage', '')}  "
              f"dataset={entry.get('dataset', '')} seed={entry.get('seed', '')}  {entry['size_mb']:.1f} MB")
    return 0


def cmd_check(args) -> int:
    from harness.report import check_run, format_checks, write_golden
    if args.write:
        path = write_golden(args.run_dir, args.against)
        print(f"wrote the reference {path} from {args.run_dir}; commit it deliberately")
        return 0
    checks = check_run(args.run_dir, args.against)
    print(format_checks(checks, args.tolerance))
    return 1 if any(c.state(args.tolerance) in ("regressed", "missing") for c in checks) else 0


def _check_images_option(parser) -> None:
    from harness.data import CHECK_LEVELS
    parser.add_argument("--check-images", choices=CHECK_LEVELS, default="header",
                        help="before anything runs, look at every image: none; header (exists, size, format, "
                             "structure; default); decode (a full decode: also finds truncated JPEGs)")

def cmd_methods(args) -> int:
    from harness.plugin import METHODS
    if args.cost:
        from harness.plan import cost_table
        print(cost_table(args.cost))
        return 0
    for name in METHODS.names():
        cls = METHODS.get(name)
        print(f"{name}  ({cls.arch}; stages: {' -> '.join(cls.stage_names())})")
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        for field, typ, default in cls.describe():
            print(f"    {field}: {typ} = {default!r}")
        if cls.default_search:
            print(f"    search (space: default): {cls.default_search}")
    from harness.modeling import NECKS
    print("\nnecks (detector.neck; fields go in detector.neck_config):")
    for name in NECKS.names():
        cls = NECKS.get(name)
        print(f"{name}  (serves: {', '.join(cls.archs)})")
        for field, info in cls.Config.model_fields.items():
            print(f"    {field}: {getattr(info.annotation, '__name__', info.annotation)} = {info.default!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detbench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a suite on Ray (embedded local cluster by default)")
    r.add_argument("suite", help="suite YAML file, e.g. suites/smoke.yaml")
    r.add_argument("--address", default=None,
                   help="existing Ray cluster ('auto', 'ray://host:10001'); default: RAY_ADDRESS or local")
    r.add_argument("--out", default=None, help="where run directories go: a folder or s3://BUCKET/PREFIX "
                   "(default: the suite's storage.uri, else results/runs)")
    r.add_argument("--name", default=None, help="run directory name (default: suite-timestamp); "
                   "an existing run of that name is resumed")
    r.add_argument("--quiet", action="store_true", help="no progress display")
    r.add_argument("--retry-failed", action="store_true", help="when resuming: rerun the failed cells too")
    _check_images_option(r)
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="evaluate a checkpoint on every dataset and test condition of a suite "
                       "(through Ray; same rows and tables as a run)")
    e.add_argument("suite")
    e.add_argument("--checkpoint", required=True, help="detector weights: a file (e.g. a trial's detector.pt) or "
                   "torchvision:<Weights>.<member> from torchvision's cache")
    e.add_argument("--method", default=None, help="the suite method (label) whose detector the checkpoint is")
    e.add_argument("--address", default=None, help="Ray cluster (as for run)")
    e.add_argument("--out", default=None, help="a folder or s3://BUCKET/PREFIX (as for run)")
    e.add_argument("--name", default=None, help="run directory name (default: eval-suite-timestamp)")
    e.add_argument("--quiet", action="store_true", help="no progress display")
    _check_images_option(e)
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plan", help="dry run without Ray: cells, stages, epochs, images, resources, "
                        "device-hours estimate")
    pl.add_argument("suite")
    pl.add_argument("--cost-per-image-s", type=float, default=None,
                    help="training seconds per image per device, for the estimate")
    pl.add_argument("--measure", action="store_true",
                    help="measure the per-image cost: a few steps of each distinct detector on this machine")
    pl.set_defaults(func=cmd_plan)

    rs = sub.add_parser("resume", help="continue a run whose driver stopped (finished trials are kept)")
    rs.add_argument("run_dir")
    rs.add_argument("--address", default=None, help="Ray cluster (as for run)")
    rs.add_argument("--quiet", action="store_true", help="no progress display")
    rs.add_argument("--retry-failed", action="store_true", help="rerun the failed cells too")
    rs.set_defaults(func=cmd_resume)

    st = sub.add_parser("status", help="done / running / failed / pending per cell of a run")
    st.add_argument("run_dir")
    st.set_defaults(func=cmd_status)

    lb = sub.add_parser("leaderboard", help="(re)build the leaderboard (and every table) of a run; print it")
    rp = sub.add_parser("report", help="(re)build every output of a run (tables, plots, report.html); list them")
    for tables in (lb, rp):
        tables.add_argument("run_dir")
        tables.add_argument("--bootstrap", type=int, metavar="B", help="resamples of the ΔAP interval "
                            "(default: the suite's leaderboard.bootstrap, 1000; 0 = none)")
        tables.add_argument("--ci", type=float, help="the interval's coverage (default 0.95)")
    lb.add_argument("--format", choices=("md", "csv", "html", "tex"), default="md", help="what to print")
    lb.add_argument("--seeds-table", action="store_true", help="print every cell's seed values instead")
    lb.set_defaults(func=cmd_leaderboard)
    rp.set_defaults(func=cmd_report)

    cmp = sub.add_parser("compare", help="two runs' shared cells side by side: ΔAP (B - A) with its paired "
                         "bootstrap interval, the cells only one has, and what differs (configs, versions, git SHA)")
    cmp.add_argument("run_a", help="run directory A (the reference)")
    cmp.add_argument("run_b", help="run directory B (compared with A)")
    cmp.add_argument("--bootstrap", type=int, metavar="B", help="resamples of the ΔAP interval "
                     "(default: run A's leaderboard.bootstrap; 0 = none)")
    cmp.add_argument("--ci", type=float, help="the interval's coverage (default: run A's leaderboard.ci)")
    cmp.add_argument("--out", metavar="FILE", default=None, help="also write the Markdown to FILE "
                     "(a path or s3://BUCKET/KEY; published whole)")
    cmp.set_defaults(func=cmd_compare)

    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write a synthetic dataset in real COCO format")
    s.add_argument("out")
    s.add_argument("--format", default="coco")
    s.add_argument("--images", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--max-objects", type=int, default=4)
    s.set_defaults(func=cmd_data_synth)
    c = d.add_parser("check", help="validate a COCO instances JSON and its images")
    c.add_argument("annotations")
    c.add_argument("--images", required=True, help="image root folder")
    _check_images_option(c)
    c.set_defaults(func=cmd_data_check)

    v = d.add_parser("convert", help="convert a dataset to COCO instances JSON")
    v.add_argument("format", choices=("visdrone",))
    v.add_argument("src", help="VisDrone-DET folder (images/, annotations/)")
    v.add_argument("out", help="output JSON")
    v.set_defaults(func=cmd_data_convert)

    a = sub.add_parser("artifacts", help="list or clean a run's stage artifacts (teachers, ideal models, ...)")
    a.add_argument("action", choices=("ls", "gc"))
    a.add_argument("run_dir")
    a.set_defaults(func=cmd_artifacts)

    ck = sub.add_parser("check", help="compare a run with a committed reference (golden) file: exit 1 "
                        "naming every cell that regressed beyond the tolerance or is missing")
    ck.add_argument("run_dir")
    ck.add_argument("--against", required=True, metavar="FILE", help="reference CSV, e.g. results/golden/smoke.csv")
    ck.add_argument("--tolerance", type=float, default=0.02,
                    help="absolute, in metric units (0.02 = 2 AP points); default 0.02")
    ck.add_argument("--write", action="store_true", help="instead: write FILE from this run (a reviewed commit)")
    ck.set_defaults(func=cmd_check)

    cl = sub.add_parser("cluster", help="Ray cluster tools").add_subparsers(dest="cluster_command", required=True)
    ci = cl.add_parser("info", help="nodes, resources, and what a suite's trials would request")
    ci.add_argument("--address", default=None, help="Ray cluster ('auto', 'host:6379'); default: RAY_ADDRESS "
                    "or a fresh local one")
    ci.add_argument("--suite", default=None, help="suite YAML: show its per-trial request and whether it fits")
    ci.set_defaults(func=cmd_cluster_info)

    m = sub.add_parser("methods", help="list method plugins with their config fields and defaults")
    m.add_argument("--cost", metavar="SUITE", default=None,
                   help="instead: parameters and FLOPs of each method's detector and of every neck, at SUITE's sizes")
    m.set_defaults(func=cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except DetbenchError as err:
        print(f"detbench: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("detbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
