"""The training loop without Ray: history, evaluation, resumable state, NaN handling."""
from __future__ import annotations

import pytest
import torch

from harness.config import DetectorSpec, ScheduleSpec
from harness.engine import NonFiniteLoss, StageJob, lr_factor, run_stage
from harness.method import Method
from methods.faster_rcnn import FasterRCNNBaseline

TINY = DetectorSpec(fpn_width=16, image_size=64)


def job(tiny_data, method=None, **schedule):
    s = ScheduleSpec(**{"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_iters": 2, **schedule})
    return StageJob(method=method or FasterRCNNBaseline(), stage="train", dataset=tiny_data, detector=TINY,
                    arch="faster_rcnn", schedule=s, seed=0)


def test_two_epochs_history_and_eval(tiny_data):
    calls = []
    state, model = run_stage(job(tiny_data), device=torch.device("cpu"),
                             on_epoch=lambda st, m, o: calls.append(st.epoch))
    assert calls == [1, 2] and state.epoch == 2
    assert [r["epoch"] for r in state.history] == [1, 2]
    rec = state.history[-1]
    assert {"train/loss", "train/loss_classifier", "val/AP", "val/AP50", "time/epoch_s"} <= set(rec)
    assert set(state.last_eval) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert set(state.cost) == {"cost/params_M", "cost/neck_params_M", "cost/gflops", "cost/neck_gflops"}


def test_resume_from_state_skips_done_epochs(tiny_data):
    state, model = run_stage(job(tiny_data, epochs=1), device=torch.device("cpu"))
    opt_state = {"model": model.state_dict(),
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}  # no scaler: fp32 runs
    seen = []
    state2, _ = run_stage(job(tiny_data, epochs=2), device=torch.device("cpu"), state=state,
                          model_state=opt_state, on_epoch=lambda st, m, o: seen.append(st.epoch))
    assert seen == [2] and len(state2.history) == 2


def test_lr_schedule_shapes():
    s = ScheduleSpec(lr_schedule="cosine", warmup_iters=10)
    assert lr_factor(0, 100, s) == pytest.approx(0.1)
    assert lr_factor(50, 100, s) == pytest.approx(0.5)
    step = ScheduleSpec(lr_schedule="step", warmup_iters=0)
    assert lr_factor(70, 100, step) == pytest.approx(0.1) and lr_factor(95, 100, step) == pytest.approx(0.01)


class ExplodingMethod(FasterRCNNBaseline):
    name = "exploding"

    def training_losses(self, stage, model, images, targets, ctx):
        terms = super().training_losses(stage, model, images, targets, ctx)
        terms["boom"] = torch.tensor(float("nan"))
        return terms


def test_nan_loss_raises_with_term_names(tiny_data):
    with pytest.raises(NonFiniteLoss, match="boom=nan"):
        run_stage(job(tiny_data, method=ExplodingMethod()), device=torch.device("cpu"))


def test_method_base_requires_build_model():
    with pytest.raises(NotImplementedError):
        Method().build_model("train", None)
