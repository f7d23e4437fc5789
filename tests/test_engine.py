"""The training loop without Ray: history, evaluation, resumable state, NaN handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.config import DetectorSpec, ScheduleSpec
from harness.data import PreparedDataset
from harness.engine import NonFiniteLoss, StageJob, lr_factor, run_stage
from harness.plugin import Method
from methods.faster_rcnn import FasterRCNNBaseline

TINY = DetectorSpec(fpn_width=16, image_size=64)


def job(tiny_data, method=None, **schedule):
    s = ScheduleSpec(**{"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_iters": 2, **schedule})
    return StageJob(method=method or FasterRCNNBaseline(), stage="train", dataset=PreparedDataset(**tiny_data), detector=TINY,
                    arch="faster_rcnn", schedule=s, seed=0)


def test_two_epochs_history_and_eval(tiny_data):
    calls = []
    state, model = run_stage(job(tiny_data), device=torch.device("cpu"),
                             on_epoch=lambda st, m, o: calls.append(st.epoch))
    assert calls == [1, 2] and state.epoch == 2
    assert [r["epoch"] for r in state.history] == [1, 2]
    rec = state.history[-1]
    assert {"train/loss", "train/loss_classifier", "val/AP", "val/AP50", "time/epoch_s", "time/step_s"} <= set(rec)
    assert 0 < rec["time/step_s"] < rec["time/epoch_s"]  # the median of the epoch's several steps
    assert set(state.last_eval) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert set(state.cost) == {"cost/params_M", "cost/neck_params_M", "cost/gflops", "cost/neck_gflops",
                               "cost/latency_ms", "cost/peak_mem_mb", "cost/train_images_per_s"}
    assert state.cost["cost/latency_ms"] > 0 and state.cost["cost/peak_mem_mb"] > 10
    assert state.cost["cost/train_images_per_s"] > 0


def test_final_detections_are_kept_and_give_the_rows_ap(tiny_data, tmp_path):
    """The kept detections re-evaluate to exactly the recorded AP (the bootstrap's premise)."""
    from harness.data import load_split
    from harness.evaluate import evaluate_coco
    from harness.evaluate import read_detections
    from harness.storage import open_storage
    storage = open_storage(tmp_path / "detections")
    j = job(tiny_data, epochs=1)
    j.detections = storage
    state, _ = run_stage(j, device=torch.device("cpu"))
    assert storage.list("") == ["clean.parquet"]  # only the final evaluation, clean only here
    dets = read_detections(storage, "clean.parquet")
    assert dets, "a trained detector on the tiny set detects something"
    gt = load_split(j.dataset, "val", check_images=False).gt_for_eval()
    np.testing.assert_equal(evaluate_coco(gt, dets), state.last_eval)  # NaN where there is no GT size


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


def test_bf16_autocast_on_cpu_trains_and_checkpoints_the_scaler(tiny_data):
    """schedule.amp on CPU: bf16 autocast, finite losses close to fp32's first step; the resumable
    state carries the (disabled on CPU) scaler, which a resumed stage loads."""
    saved = []
    state, _ = run_stage(job(tiny_data, epochs=1, amp=True), device=torch.device("cpu"),
                         on_epoch=lambda st, m, resumable: saved.append(resumable()))
    fp32, _ = run_stage(job(tiny_data, epochs=1), device=torch.device("cpu"))
    amp_loss, ref_loss = state.history[0]["train/loss"], fp32.history[0]["train/loss"]
    assert torch.isfinite(torch.tensor(amp_loss)) and abs(amp_loss - ref_loss) < 0.1 * ref_loss
    assert set(saved[0]) == {"model", "optimizer", "scaler"}
    resumed, _ = run_stage(job(tiny_data, epochs=2, amp=True), device=torch.device("cpu"), state=state,
                           model_state=saved[0])
    assert resumed.epoch == 2


def test_finiteness_is_looked_at_every_few_steps_not_every_step(tiny_data, monkeypatch):
    """The loop's only host syncs: one finiteness look per FINITE_CHECK_EVERY steps (and at the end)."""
    import harness.engine.stage as engine
    looks = []
    original = engine.FiniteWatch.check
    monkeypatch.setattr(engine.FiniteWatch, "check", lambda self, *a: (looks.append(1), original(self, *a)))
    monkeypatch.setattr(engine, "FINITE_CHECK_EVERY", 2)
    run_stage(job(tiny_data, epochs=1, batch_size=2), device=torch.device("cpu"))  # 6 steps
    assert len(looks) == 3


class HeavyTermMethod(FasterRCNNBaseline):
    """Adds a large extra term; with ``loss_weights: {heavy: 0}`` it must not change training."""
    name = "heavy"

    def training_losses(self, stage, model, images, targets, ctx):
        terms = super().training_losses(stage, model, images, targets, ctx)
        terms["heavy"] = 1e3 * sum(p.square().sum() for p in model.parameters() if p.requires_grad)
        return terms


def test_loss_weights_scale_terms_and_still_log_them(tiny_data, monkeypatch):
    plain, _ = run_stage(job(tiny_data, epochs=1), device=torch.device("cpu"))
    off, _ = run_stage(job(tiny_data, HeavyTermMethod(), epochs=1, loss_weights={"heavy": 0.0}),
                       device=torch.device("cpu"))
    on, _ = run_stage(job(tiny_data, HeavyTermMethod(), epochs=1), device=torch.device("cpu"))
    assert off.history[0]["train/heavy"] > 0                      # logged as computed
    assert off.history[0]["train/loss_classifier"] == plain.history[0]["train/loss_classifier"]
    nan_safe = lambda d: {k: "nan" if v != v else v for k, v in d.items()}  # noqa: E731  (NaN != NaN)
    assert nan_safe(off.last_eval) == nan_safe(plain.last_eval)   # weight 0: exactly the plain run
    assert on.history[0]["train/loss_classifier"] != plain.history[0]["train/loss_classifier"]
    import harness.engine.stage as engine
    said = []
    monkeypatch.setattr(engine.log, "warning", lambda msg, *a: said.append(msg % a))
    run_stage(job(tiny_data, epochs=1, loss_weights={"clasifier": 0.0}), device=torch.device("cpu"), max_steps=1)
    assert len(said) == 1 and "clasifier not a loss term of stage 'train'" in said[0] and "loss_classifier" in said[0]
