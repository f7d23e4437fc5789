"""Live progress of a sweep in the terminal: a trial bar plus one line per epoch.

Ray's own console output is switched off (``verbose=0``, ``log_to_driver=False``)
so that this is all a user sees; Ray's logs stay in its session folder, whose
path is recorded in the run manifest.
"""
from __future__ import annotations

import math

from ray.tune import Callback
from tqdm.auto import tqdm


def _cell(trial) -> str:
    cell = trial.config.get("cell", {})  # the Tune config: plain JSON (harness.sweep.space.trial_config)
    from harness.sweep.space import sampled_params
    hp = sampled_params(trial.config)
    extra = " " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in hp.items()) if hp else ""
    return cell.get("cell_id", trial.trial_id) + extra


class SweepProgress(Callback):
    """A tqdm bar of finished trials (postfix: running / failed) and per-epoch metric lines.

    Tune pickles its callbacks into the experiment state that ``Tuner.restore`` reads
    back; a terminal display belongs to one driver process, so it is not part of that
    state: the pickled form is a silent display (a resumed driver attaches its own).
    A live tqdm bar does not survive unpickling (its stream wrapper recurses).
    """

    def __init__(self, total: int, enabled: bool = True):
        self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled, dynamic_ncols=True)
        self.running, self.failed, self.enabled = 0, 0, enabled

    def __getstate__(self) -> dict:
        return {"total": self.bar.total}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("total", 0), enabled=False)

    def _postfix(self) -> None:
        self.bar.set_postfix(running=self.running, failed=self.failed)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running += 1
        self._postfix()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.enabled or "train/loss" not in result or "status" in result:
            return  # only the per-epoch reports, not the trial's closing summary
        ap = result.get("AP50", math.nan)
        self.bar.write(f"  {_cell(trial)}  {result.get('stage', '')} epoch {result['epoch']}"
                       f"/{trial.config['cell']['schedule']['epochs']}  loss {result['train/loss']:.3f}"
                       f"  AP50 {ap:.3f}  ({result.get('time/epoch_s', 0):.1f}s)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running -= 1
        if trial.last_result.get("status") == "failed":
            self.failed += 1
        self.bar.update(1)
        self._postfix()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running -= 1
        self.failed += 1
        self.bar.update(1)
        self._postfix()

    def close(self) -> None:
        self.bar.close()
