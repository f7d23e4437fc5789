"""A suite's names checked against the plugin registries, before anything is created.

:mod:`harness.config` reads a suite as plain data; this module is where its names
meet the plugins: method names and configs, detector archs, backbones (and their
``trainable_layers`` range), necks and the archs they serve, presets and weight
files, corruption names, search spaces. Every error names the file and the field.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from harness.config import (WEIGHT_FIELDS, DetectorSpec, MethodSpec, ScheduleSpec, Suite, detector_for, read_suite,
                            schedule_for)
from harness.core import ConfigError
from harness.data import expand_conditions
from harness.modeling import BACKBONES, DETECTORS, NECKS, backbone_body, check_preset, resolve_weights
from harness.plugin import METHODS


def load_suite(path: str | Path, *, check_paths: bool = True) -> Suite:
    """Read a suite file and check it against the registries: the suite every command runs.

    Raises :class:`ConfigError` naming the file and field of the first problem.
    """
    path = Path(path)
    return check_suite(read_suite(path, check_paths=check_paths), path, check_paths=check_paths)


def _where(overrides: dict, i: int, key: str) -> str:
    """The field a detector setting came from: the method's override, else the suite's detector."""
    return f"methods[{i}].detector.{key}" if key in overrides else f"detector.{key}"


def check_loader_workers(suite: Suite, m: MethodSpec, i: int, path: Path) -> None:
    """Loader processes are the training worker's CPUs: more than it was given would oversubscribe
    the node (Ray schedules by ``resources.cpus_per_worker``)."""
    workers = schedule_for(suite, m).loader_workers
    cpus = suite.resources.cpus_per_worker
    if workers is not None and workers > cpus:
        field = f"methods[{i}].schedule.loader_workers" if "loader_workers" in m.schedule \
            else "schedule.loader_workers"
        raise ConfigError(f"{workers} loader workers but each training worker has {cpus:g} CPUs "
                          f"(resources.cpus_per_worker); at most {int(cpus)}", file=path, field=field)


def check_suite(suite: Suite, path: Path, *, check_paths: bool = True) -> Suite:
    """Every plugin name of ``suite`` resolved; returns it with ``search.space: default`` expanded."""
    for k, item in enumerate(suite.conditions):
        if not (isinstance(item, dict) and "format" in item):
            try:
                expand_conditions([item], field=f"conditions[{k}]")
            except ConfigError as err:
                raise ConfigError(err.message, file=path, field=err.field) from None
    methods = list(suite.methods)
    for i, m in enumerate(methods):
        check_loader_workers(suite, m, i, path)
        method = METHODS.get(m.name, file=path, field=f"methods[{i}].name")
        method_config = method.validate_config(m.config, file=str(path), prefix=("methods", i, "config"))
        plugin = method(method_config)
        for stage in plugin.active_stages:  # the detector each stage trains (a method may set the neck)
            stage_det = plugin.stage_detector(stage, detector_for(suite, m))
            arch = stage_det.arch or method.arch
            check_detector(stage_det, arch, path, m.detector, i)
            check_neck(stage_det, method, path, m.detector, i)
            check_pretrained(stage_det, arch, path, m.detector, i, check_paths)
        if m.search and m.search.space == "default":
            if not method.default_search:
                raise ConfigError(f"method '{m.name}' declares no default search space; give one",
                                  file=path, field=f"methods[{i}].search.space")
            m = methods[i] = m.model_copy(
                update={"search": m.search.model_copy(update={"space": dict(method.default_search)})})
        if m.search:
            for key, dist in m.search.space.items():
                field = f"methods[{i}].search.space.{key}"
                method.check_search_key(key, file=str(path), field=field)
                check_distribution(dist, _field_checker(suite, m, method, key), file=str(path), field=field)
    return suite.model_copy(update={"methods": methods})


def check_detector(det: DetectorSpec, arch: str, path: Path, overrides: dict, i: int) -> None:
    """The arch and the backbone are registered; ``trainable_layers`` is within the backbone's stages."""
    DETECTORS.get(arch, file=str(path), field=_where(overrides, i, "arch"))
    info = BACKBONES.get(det.backbone, file=str(path), field=_where(overrides, i, "backbone"))
    if det.trainable_layers is not None and det.trainable_layers > info.max_trainable_layers:
        raise ConfigError(f"trainable_layers of a {det.backbone} backbone is 0..{info.max_trainable_layers}, "
                          f"got {det.trainable_layers}", file=path, field=_where(overrides, i, "trainable_layers"))


def check_pretrained(det: DetectorSpec, arch: str, path: Path, overrides: dict, i: int, check_files: bool) -> None:
    """A preset exists for the arch and backbone; weight files exist and fit the backbone (key by key)."""
    where = {k: _where(overrides, i, k) for k in ("preset", *WEIGHT_FIELDS)}
    if det.preset:
        try:
            check_preset(det, arch)
        except ConfigError as err:
            raise ConfigError(err.message, file=path, field=where["preset"]) from None
    if not check_files:
        return
    for key in WEIGHT_FIELDS:
        ref = getattr(det, key)
        if not ref:
            continue
        try:
            if key == "backbone_weights":
                backbone_body(det)  # builds the classifier and loads the file into it: every key checked
            else:
                resolve_weights(ref, field=where[key])
        except ConfigError as err:
            raise ConfigError(err.message, file=err.file or path, field=where[key]) from None


def check_neck(det: DetectorSpec, method, path: Path, overrides: dict, i: int) -> None:
    """The detector's neck exists, serves the arch the method trains, and its config is valid."""
    arch = det.arch or method.arch
    field = _where(overrides, i, "neck")
    neck = NECKS.get(det.neck, file=str(path), field=field)
    if arch not in neck.archs:
        raise ConfigError(f"neck '{det.neck}' cannot serve the {arch} detector of method '{method.name}' "
                          f"(it serves: {', '.join(neck.archs)})", file=path, field=field)
    prefix = ("methods", i, "detector", "neck_config") if "neck_config" in overrides else ("detector", "neck_config")
    neck.validate_config(det.neck_config, file=str(path), prefix=prefix)


def check_distribution(dist: dict, accepts, *, file: str, field: str) -> None:
    """A search distribution's form (bounds, kinds) and every value it can sample against its field.

    ``accepts(value)`` raises ``ValueError`` when the field cannot take ``value``; the
    bounds of a range and every ``choice`` are tried, so nothing invalid reaches Tune.
    """
    if len(dist) != 1:
        raise ConfigError(f"one distribution per key (uniform, loguniform, randint or choice), got {sorted(dist)}",
                          file=file, field=field)
    (kind, args), = dist.items()
    where = f"{field}.{kind}"
    if kind == "choice":
        if not args:
            raise ConfigError("needs at least one value", file=file, field=where)
        values = args
    else:
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"needs two numbers [low, high], got {args!r}", file=file, field=where)
        lo, hi = args
        if not lo < hi:
            raise ConfigError(f"low must be below high, got [{lo}, {hi}]", file=file, field=where)
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"a log-uniform range needs low > 0, got {lo}", file=file, field=where)
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"randint takes integers [low, high), got {args!r}", file=file, field=where)
        values = [lo, hi - 1] if kind == "randint" else [lo, hi]
    for k, v in enumerate(values):
        try:
            accepts(v)
        except ValidationError as err:
            msg = err.errors()[0]["msg"]
        except ConfigError as err:
            msg = err.message
        except ValueError as err:
            msg = str(err).splitlines()[0]
        else:
            continue
        shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
        raise ConfigError(f"value {shown} is not valid for the field: {msg}", file=file, field=f"{where}[{k}]")


def _field_checker(suite: Suite, m: MethodSpec, method, key: str):
    """``accepts(value)`` for a search key: the method's config or the schedule with ``key = value``."""
    group, _, name = key.rpartition(".")

    def accepts(value) -> None:
        if group == "schedule":
            ScheduleSpec.model_validate({**schedule_for(suite, m).model_dump(), name: value})
        else:
            method.validate_config({**m.config, name: value})
    return accepts


