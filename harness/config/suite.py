"""Reading a suite file: YAML (safe, size-limited) -> validated :class:`Suite` with absolute paths.

Only the file's own content is checked here (keys, types, ranges, labels, paths).
Names that refer to plugins (methods, backbones, necks, detector archs) are checked
against their registries by :func:`harness.plan.load_suite`, which every command uses.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from harness.config.labels import method_label
from harness.config.schema import DetectorSpec, MethodSpec, RealCondition, ScheduleSpec, SplitSpec, Suite
from harness.core import ConfigError, format_validation_error, missing_path_hint, node_cache_dir, suggest

#: Largest YAML document (in nodes, every alias counted as the copy it stands for) we read:
#: a real suite has a few hundred; an alias chain ("billion laughs") has billions.
YAML_MAX_NODES = 100_000


def _expanded_size(node, memo: dict) -> int:
    """Nodes of ``node`` with every alias expanded (a composed YAML graph shares aliased nodes)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once: safe_load refuses it later anyway
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    total = 1
    for child in children:
        total += _expanded_size(child, memo)
        if total > YAML_MAX_NODES:
            break
    memo[key] = total
    return total


def read_yaml(path: str | Path, *, what: str = "file"):
    """``yaml.safe_load`` of ``path`` with a size limit on the alias-expanded document.

    The one way this project reads YAML: errors are :class:`ConfigError` naming the
    file (and line/column), never a traceback or an exhausted memory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found", file=path)
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > YAML_MAX_NODES:
            raise ConfigError(f"the document expands to more than {YAML_MAX_NODES:,} values (an alias "
                              "chain?); refusing to read it", file=path)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}invalid YAML: {getattr(exc, 'problem', exc)}", file=path) from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"cannot read as YAML: {type(exc).__name__}", file=path) from None




def read_suite(path: str | Path, *, check_paths: bool = True) -> Suite:
    """Read and validate a suite file, paths made absolute; raise :class:`ConfigError` on any problem.

    Plugin names are not looked up here: :func:`harness.plan.load_suite` does that.
    """
    path = Path(path)
    raw = read_yaml(path, what="suite file")
    if not isinstance(raw, dict):
        raise ConfigError("a suite must be a mapping of keys", file=path)
    raw.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, str(path), Suite) from None
    return resolve_paths(suite, path, check_paths=check_paths)


def _resolve_path(p: str, base: Path) -> str:
    p = os.path.expandvars(os.path.expanduser(p))
    return str((base / p).resolve()) if not os.path.isabs(p) else p



def resolve_paths(suite: Suite, path: Path, *, check_paths: bool = True) -> Suite:
    """Dataset, condition, cache and weight paths made absolute (relative to the suite file);
    each method's overrides, dataset names, labels and baselines checked."""
    base = path.resolve().parent
    datasets = []
    for i, ds in enumerate(suite.datasets):
        upd = {}
        for split in ("train", "val"):
            sp = getattr(ds, split)
            if sp is None:
                continue
            resolved = SplitSpec(**{k: _resolve_path(v, base) for k, v in sp.model_dump().items() if v})
            for key, p in resolved.model_dump().items():
                if p and check_paths:
                    _check_exists(p, path, f"datasets[{i}].{split}.{key}")
            upd[split] = resolved
        datasets.append(ds.model_copy(update=upd))
    conditions = split_conditions(suite.conditions, path, base, check_paths)
    names = [d.name for d in suite.datasets]
    for i, m in enumerate(suite.methods):
        for k, d in enumerate(m.datasets or ()):
            if d not in names:
                raise ConfigError(f"unknown dataset '{d}'{suggest(d, names)}; datasets: {', '.join(names)}",
                                  file=path, field=f"methods[{i}].datasets[{k}]")
        for key, model, base_spec in (("detector", DetectorSpec, suite.detector),
                                      ("schedule", ScheduleSpec, suite.schedule)):
            try:
                model.model_validate({**base_spec.model_dump(), **getattr(m, key)})
            except ValidationError as err:
                raise format_validation_error(err, str(path), model, ("methods", i, key)) from None
    labels = [method_label(m) for m in suite.methods]
    dup = {lab for lab in labels if labels.count(lab) > 1}
    if dup:
        raise ConfigError(f"two methods share the leaderboard label {sorted(dup)}; give one a 'label'",
                          file=path, field="methods")
    for i, m in enumerate(suite.methods):
        if m.baseline is not None and m.baseline not in labels:
            raise ConfigError(f"baseline '{m.baseline}' is not a method label of this suite"
                              f"{suggest(m.baseline, labels)}; labels: {', '.join(labels)}",
                              file=path, field=f"methods[{i}].baseline")
    data_cache = suite.data_cache and _resolve_path(suite.data_cache, base)
    methods = [m.model_copy(update={"detector": _weights_paths(m.detector, base)}) for m in suite.methods]
    detector = DetectorSpec.model_validate(_weights_paths(suite.detector.model_dump(), base))
    return suite.model_copy(update={"datasets": datasets, "data_cache": data_cache, "conditions": conditions,
                                    "methods": methods, "detector": detector})


WEIGHT_FIELDS = ("backbone_weights", "init_checkpoint")


def _weights_paths(detector: dict, base: Path) -> dict:
    """Weight files named relative to the suite file made absolute (``torchvision:`` names kept)."""
    return {k: _resolve_path(v, base) if k in WEIGHT_FIELDS and v and not v.startswith("torchvision:") else v
            for k, v in detector.items()}


def _check_exists(p: str, suite_file: Path, field: str) -> None:
    if not os.path.exists(p):
        raise ConfigError(f"path does not exist: {p}{missing_path_hint(p)}", file=suite_file, field=field)


def split_conditions(items: list, path: Path, base: Path, check_paths: bool) -> list:
    """Validate ``conditions:``' real degraded sets (paths made absolute); corruption names and
    groups are kept as written (checked against the corruption list by :func:`harness.plan.load_suite`)."""
    out = []
    for k, item in enumerate(items):
        if isinstance(item, dict) and "format" in item:
            try:
                real = RealCondition.model_validate(item)
            except ValidationError as err:
                raise format_validation_error(err, str(path), RealCondition, ("conditions", k)) from None
            upd = {f: _resolve_path(getattr(real, f), base) for f in ("annotations", "xml", "images")
                   if getattr(real, f)}
            for f, p in upd.items():
                if check_paths:
                    _check_exists(p, path, f"conditions[{k}].{f}")
            out.append(real.model_copy(update=upd).model_dump())
        else:
            out.append(item)
    return out


def detector_for(suite: Suite, m: MethodSpec) -> DetectorSpec:
    return DetectorSpec.model_validate({**suite.detector.model_dump(), **m.detector})


def schedule_for(suite: Suite, m: MethodSpec) -> ScheduleSpec:
    return ScheduleSpec.model_validate({**suite.schedule.model_dump(), **m.schedule})


def data_cache_dir(suite: Suite) -> Path:
    return Path(suite.data_cache) if suite.data_cache else node_cache_dir()
