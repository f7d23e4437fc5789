"""The real-scale recipe through the real stack, at micro size: a torchvision preset from a local
backbone file, trainable_layers 3, multi-scale keep-ratio sizes, grouped batches, a multistep
schedule and bf16 autocast; then ``detbench eval`` of a finished trial's detector."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet50

from harness.results import ResultStore
from harness.app import run_suite
from runkit import hang_guard

#: The module's recipe run is set up once (82 s idle here) by whichever test comes first.
pytestmark = pytest.mark.timeout(hang_guard(82 + 20))

PRESET_SUITE = """
name: recipe
smoke: true
datasets:
  - {{name: pair, format: synthetic, synthetic: {{train_images: 2, val_images: 2, image_size: 64, max_objects: 2}}}}
methods:
  - name: faster_rcnn
    label: preset
    detector: {{preset: torchvision_v1, backbone: resnet50, backbone_weights: {weights}, trainable_layers: 3,
                min_size: [56, 64], max_size: 96}}
seeds: [0]
# bf16 on a CPU without bf16 units is emulated (~10x fp32 for the RoI head's 12544x1024 matmul):
# 2 images, 1 step per epoch, one evaluation
schedule: {{epochs: 2, batch_size: 2, warmup_iters: 1, lr: 0.02, amp: true, aspect_ratio_group_factor: 3,
            lr_schedule: multistep, lr_steps: [1], warmup_factor: 0.001, lr_reference_batch: 16, eval_every: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99}}
data_cache: {cache}
"""

PLAIN_SUITE = """
name: plain
smoke: true
datasets:
  - {{name: shapes, format: synthetic, synthetic: {{train_images: 48, val_images: 12, image_size: 64, max_objects: 2}}}}
detector: {{fpn_width: 16, image_size: 64}}
methods:
  - {{name: faster_rcnn, label: plain}}
seeds: [0]
schedule: {{epochs: 6, batch_size: 8, warmup_iters: 2, lr: 0.02, eval_every: 6}}
conditions: [clean, {{corruption: gaussian_noise, severity: 2}}]
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99}}
data_cache: {cache}
"""


def _final(df, label: str) -> dict[tuple[str, str], float]:
    rows = df[(df["variant"] == label) & df["epoch"].isna() & (df["status"] == "ok")
              & ~df["metric"].str.startswith("cost/")]
    return {(c, m): v for c, m, v in zip(rows["condition"], rows["metric"], rows["value"])}


def _detector_file(run_dir: Path, trial_id: str) -> Path:
    files = sorted((run_dir / "train").glob(f"{trial_id}/checkpoint_*/detector.pt"))
    assert files, f"no detector.pt for trial {trial_id}"
    return files[-1]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    weights = tmp / "resnet50-random.pth"  # a torchvision ResNet-50 state dict, random weights
    torch.save(resnet50().state_dict(), weights)
    suite = tmp / "recipe.yaml"
    suite.write_text(PRESET_SUITE.format(weights=weights, cache=tmp / "cache"))
    board = Path(run_suite(suite, out_dir=tmp / "runs", name="recipe", progress=False))
    return board.parent, weights


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("plain")
    suite = tmp / "plain.yaml"
    suite.write_text(PLAIN_SUITE.format(cache=tmp / "cache"))
    board = Path(run_suite(suite, out_dir=tmp / "runs", name="plain", progress=False))
    return suite, board.parent


def test_preset_recipe_trains_with_frozen_stages_unchanged(recipe_run):
    run_dir, weights = recipe_run
    df = ResultStore(run_dir).read()
    preset = df[df["variant"] == "preset"]
    assert (preset["status"] == "ok").all(), preset[preset["status"] != "ok"]["reason"].tolist()
    assert preset["detector"].iloc[0] == "faster_rcnn/resnet50/torchvision_v1/56-64x96px/frozen_bn"
    assert {("clean", "AP"), ("clean", "AP50")} <= set(_final(df, "preset"))
    lr = preset[(preset["metric"] == "lr")].sort_values("epoch")["value"].tolist()
    base = 0.02 * 2 / 16  # linear scaling rule: lr 0.02 given for a total batch of 16, run at 2
    assert lr == pytest.approx([base * 0.001, base * 0.1])  # warm-up from 0.001; multistep x0.1 after epoch 1
    trial = preset["trial_id"].iloc[0]
    trained = torch.load(_detector_file(run_dir, trial), weights_only=True)
    start = torch.load(weights, weights_only=True)
    body = {k[len("backbone.body."):]: v for k, v in trained.items() if k.startswith("backbone.body.")}
    frozen = [k for k in body if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert frozen and all(torch.equal(body[k], start[k]) for k in frozen)  # stages 0-1 frozen
    bn_stats = [k for k in body if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(body[k], start[k]) for k in bn_stats)  # frozen BN everywhere
    moved = {k.split(".")[0] for k in body if k.endswith("weight") and "bn" not in k and "downsample.1" not in k
             and not torch.equal(body[k], start[k])}
    assert moved == {"layer2", "layer3", "layer4"}  # exactly torchvision's trainable_layers=3 stages


def test_eval_of_a_finished_trials_detector_reproduces_its_rows(plain_run, tmp_path):
    suite, run_dir = plain_run
    df = ResultStore(run_dir).read()
    trained = _final(df, "plain")
    trial = df[df["variant"] == "plain"]["trial_id"].iloc[0]
    board = run_suite(suite, out_dir=tmp_path, name="eval", progress=False,
                      checkpoint=str(_detector_file(run_dir, trial)), method="plain")
    evaluated = ResultStore(Path(board).parent).read()
    assert set(evaluated["cell"]) == {"plain/shapes/checkpoint"}
    got = _final(evaluated, "plain")
    assert set(got) == set(trained) and ("gaussian_noise", "AP") in got
    same = {k for k in got if got[k] == trained[k] or (math.isnan(got[k]) and math.isnan(trained[k]))}
    assert same == set(got), {k: (got[k], trained[k]) for k in set(got) - same}  # exactly, every condition
    assert trained[("clean", "AP50")] > 0
