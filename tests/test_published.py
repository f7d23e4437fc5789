"""suites/published.csv: the packaged reference numbers, checked against their sources, and the loader's errors."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml
from torchvision.models import detection
from torchvision.models._api import WeightsEnum

from harness.core import ConfigError
from harness.report.published import COLUMNS, DEFAULT, PublishedRef, published_for
from harness.report import load_published

ROOT = Path(__file__).resolve().parent.parent
HEADER = ",".join(COLUMNS)
GOOD_ROW = "a_key,focal,coco,RetinaNet R50-FPN,26 ep,AP,36.4,\"Some paper, Table 1\""


@pytest.fixture(scope="module")
def refs() -> dict[str, PublishedRef]:
    return load_published()


def _detection_weights() -> list[tuple[str, str]]:
    """(enum name, member name) of every detection weights enum the installed torchvision has."""
    out = []
    for name, obj in sorted(vars(detection).items()):
        if inspect.isclass(obj) and issubclass(obj, WeightsEnum) and obj is not WeightsEnum:
            out += [(name, m.name) for m in obj]
    return out


WEIGHTS = _detection_weights()
TV_SOURCE = re.compile(r"torchvision weights (\w+)\.(\w+): meta\['_metrics'\]\['COCO-val2017'\]\['box_map'\]")


# ---- the packaged file ----

def test_default_path_is_the_packaged_file():
    assert DEFAULT == ROOT / "suites" / "published.csv"
    assert DEFAULT.is_file()


def test_packaged_file_loads(refs):
    assert len(refs) >= 30
    assert all(isinstance(r, PublishedRef) for r in refs.values())
    assert all(k == r.key for k, r in refs.items())


def test_keys_unique_and_every_row_has_a_source():
    import csv
    with DEFAULT.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    assert all(r["source"].strip() for r in rows)
    assert all(r["key"].strip() and r["metric"].strip() for r in rows)


def test_docs_and_sources_never_point_outside_the_repository(refs):
    for r in refs.values():
        assert "shared/" not in r.source and "SPEC" not in r.source, r.key
    doc = (ROOT / "docs" / "published.md").read_text(encoding="utf-8")
    assert "../shared" not in doc and "SPEC.md" not in doc


def test_suites_published_keys_resolve(refs):
    """Every ``published: KEY`` in a packaged suite names a row (none may dangle)."""
    for suite in sorted((ROOT / "suites").rglob("*.yaml")):
        for m in (yaml.safe_load(suite.read_text()) or {}).get("methods", []) or []:
            if m.get("published"):
                assert m["published"] in refs, (suite, m["published"])


# ---- torchvision rows equal the installed torchvision's metadata ----

def test_torchvision_has_the_detection_enums():
    names = {n for n, _ in WEIGHTS}
    assert {"FasterRCNN_ResNet50_FPN_Weights", "RetinaNet_ResNet50_FPN_Weights"} <= names
    assert len(WEIGHTS) >= 13


@pytest.mark.parametrize("enum,member", WEIGHTS, ids=[f"{e}.{m}" for e, m in WEIGHTS])
def test_torchvision_row_equals_weights_metadata(refs, enum, member):
    box_map = getattr(detection, enum)[member].meta["_metrics"]["COCO-val2017"]["box_map"]
    rows = [r for r in refs.values() if (m := TV_SOURCE.search(r.source)) and m.groups() == (enum, member)]
    assert len(rows) == 1, f"{enum}.{member}: {len(rows)} rows cite it"
    r = rows[0]
    assert r.key.startswith("tv_") and r.metric == "AP"
    assert r.value == pytest.approx(box_map, abs=1e-9)


def test_every_torchvision_row_cites_an_installed_enum(refs):
    tv = [r for r in refs.values() if r.key.startswith("tv_")]
    assert len(tv) == len(WEIGHTS)
    for r in tv:
        m = TV_SOURCE.search(r.source)
        assert m, r.key
        assert m.groups() in WEIGHTS, r.key


# ---- numbers as stated by the method specifications (literal values) ----

STATED = [
    ("tv_retinanet_r50_fpn_v1", "AP", 36.4), ("tv_retinanet_r50_fpn_v2", "AP", 41.5),
    ("tv_fasterrcnn_r50_fpn_v1", "AP", 37.0), ("tv_fasterrcnn_r50_fpn_v2", "AP", 46.7),
    ("umop_atss_r50_1.5x", "AP", 40.4), ("umop_atss_r50_1.5x_testdev", "AP", 40.5),
    ("defeat_frcnn_r50_student", "AP", 37.4), ("defeat_frcnn_r101_to_r50", "AP", 40.9),
    ("defeat_retinanet_r50_student", "AP", 36.5), ("defeat_retinanet_r101_to_r50", "AP", 39.7),
    ("soco_maskrcnn_r50_fpn_scratch", "AP", 31.0), ("soco_maskrcnn_r50_fpn_supervised", "AP", 38.9),
    ("soco_maskrcnn_r50_fpn_100ep", "AP", 42.3), ("soco_maskrcnn_r50_fpn_400ep", "AP", 43.0),
    ("soco_star_maskrcnn_r50_fpn_400ep", "AP", 43.2),
    ("cfpt_retinanet_r18", "AP_maxdets100", 20.0), ("cfpt_retinanet_r50", "AP_maxdets100", 22.4),
    ("cfpt_retinanet_r101", "AP_maxdets100", 22.6),
    ("cococ_frcnn_r50_fpn_p", "P", 36.3), ("cococ_frcnn_r50_fpn_mpc", "mPC", 18.2),
    ("cococ_frcnn_r50_fpn_rpc", "rPC", 50.2),
    ("cococ_retinanet_r50_fpn_p", "P", 35.6), ("cococ_retinanet_r50_fpn_mpc", "mPC", 17.8),
    ("cococ_retinanet_r50_fpn_rpc", "rPC", 50.1),
    ("fctl_kitti_rel_gain_min", "rel_AP_gain_min", 3.8), ("fctl_kitti_rel_gain_max", "rel_AP_gain_max", 8.1),
    ("fctl_kitti_gap_to_ideal", "AP_gap_to_ideal_max", 1.3),
]


@pytest.mark.parametrize("key,metric,value", STATED, ids=[k for k, _, _ in STATED])
def test_stated_reference_numbers(refs, key, metric, value):
    r = refs[key]
    assert (r.metric, r.value) == (metric, value)


def test_rows_are_stated_or_torchvision(refs):
    """No row beyond the stated numbers and torchvision's: adding one means adding it here too."""
    assert set(refs) == {k for k, _, _ in STATED} | {r.key for r in refs.values() if r.key.startswith("tv_")}


def test_methods_use_detbench_names_where_they_exist(refs):
    assert refs["tv_retinanet_r50_fpn_v1"].method == "retinanet_r50_fpn_v1"  # suites/reproduce label
    assert refs["tv_fasterrcnn_r50_fpn_v1"].method == "faster_rcnn_r50_fpn_v1"
    assert refs["umop_atss_r50_1.5x"].method == "umop"
    assert refs["cfpt_retinanet_r18"].method == "cfpt"
    assert {refs[k].method for k in ("cococ_frcnn_r50_fpn_p", "cococ_retinanet_r50_fpn_p")} == {"faster_rcnn", "focal"}
    assert refs["cococ_frcnn_r50_fpn_p"].dataset == "coco_c"


# ---- lookup ----

def test_published_for(refs):
    r = published_for("tv_retinanet_r50_fpn_v1", refs, "AP")
    assert r is not None and r.value == 36.4
    assert published_for("tv_retinanet_r50_fpn_v1", refs, "AP50") is None  # another metric column
    assert published_for("cococ_frcnn_r50_fpn_mpc", refs).metric == "mPC"
    assert published_for("tv_retinanet_r50_fpn_v1").value == 36.4  # default: the packaged file


def test_published_for_unknown_key_names_the_field_and_the_closest_key(refs):
    with pytest.raises(ConfigError) as e:
        published_for("tv_retinanet_r50_fpn_v3", refs)
    assert e.value.field == "published"
    assert "tv_retinanet_r50_fpn_v" in str(e.value) and "did you mean" in str(e.value)


# ---- bad input: ConfigError naming the file, the row and the field ----

def _write(tmp_path: Path, text: str, name: str = "refs.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_small_valid_file(tmp_path):
    p = _write(tmp_path, f"{HEADER}\n{GOOD_ROW}\n\nb,umop,coco,ATSS R50,,AP,40.4,UMOP README\n")
    refs = load_published(p)
    assert list(refs) == ["a_key", "b"]
    assert refs["a_key"].source == "Some paper, Table 1" and refs["b"].schedule == ""
    assert refs["b"].value == 40.4


BAD = [
    # (id, file text, field, row text expected in the message)
    ("missing_column", "key,method,dataset,detector,schedule,metric,value\n" + "a,b,c,d,e,AP,1\n",
     "source", "header"),
    ("extra_column", HEADER + ",notes\n" + GOOD_ROW + ",x\n", "notes", "header"),
    ("empty_source", f"{HEADER}\n{GOOD_ROW}\nb,focal,coco,R,,AP,36.4,\n", "source", "row 2 (line 3)"),
    ("blank_source", f"{HEADER}\nb,focal,coco,R,,AP,36.4,   \n", "source", "row 1 (line 2)"),
    ("non_numeric", f"{HEADER}\n{GOOD_ROW}\nb,focal,coco,R,,AP,36.4%,src\n", "value", "row 2 (line 3)"),
    ("nan", f"{HEADER}\nb,focal,coco,R,,AP,nan,src\n", "value", "row 1 (line 2)"),
    ("inf", f"{HEADER}\n{GOOD_ROW}\n\nb,focal,coco,R,,AP,-inf,src\n", "value", "row 2 (line 4)"),
    ("empty_value", f"{HEADER}\nb,focal,coco,R,,AP,,src\n", "value", "row 1 (line 2)"),
    ("duplicate_key", f"{HEADER}\n{GOOD_ROW}\nb,x,coco,R,,AP,1,src\n{GOOD_ROW}\n", "key", "row 3 (line 4)"),
    ("empty_key", f"{HEADER}\n{GOOD_ROW}\n,focal,coco,R,,AP,1,src\n", "key", "row 2 (line 3)"),
    ("key_with_space", f"{HEADER}\nmy key,focal,coco,R,,AP,1,src\n", "key", "row 1 (line 2)"),
    ("empty_metric", f"{HEADER}\nb,focal,coco,R,,,1,src\n", "metric", "row 1 (line 2)"),
]


@pytest.mark.parametrize("text,field,where", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_file_row_and_field(tmp_path, text, field, where):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_published(p)
    msg = str(e.value)
    assert str(p) in msg
    assert where in msg
    assert f"field '{field}'" in msg
    assert e.value.file == str(p) and e.value.field == field


def test_duplicate_key_names_the_first_row(tmp_path):
    p = _write(tmp_path, f"{HEADER}\n{GOOD_ROW}\n{GOOD_ROW}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'a_key' \(first in row 1\)"):
        load_published(p)


@pytest.mark.parametrize("text,where", [
    (f"{HEADER}\n{GOOD_ROW},extra\n", "row 1 (line 2)"),      # too many cells (an unquoted comma)
    (f"{HEADER}\na,b,c\n", "row 1 (line 2)"),                # too few
    ("", "line 1"),                                          # empty file
    ("method,key,dataset,detector,schedule,metric,value,source\n", "header"),  # out of order
])
def test_malformed_rows_and_headers(tmp_path, text, where):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_published(p)
    assert str(p) in str(e.value) and where in str(e.value)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as e:
        load_published(tmp_path / "nope.csv")
    assert "nope.csv" in str(e.value)
    p = tmp_path / "latin1.csv"
    p.write_bytes((HEADER + "\na,b,c,Ré,,AP,1,src\n").encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_published(p)


def test_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(("\ufeff" + HEADER + "\n" + GOOD_ROW + "\n").encode("utf-8"))
    assert list(load_published(p)) == ["a_key"]
