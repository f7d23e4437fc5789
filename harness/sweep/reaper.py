"""Placement groups of Train runs whose controller died, removed by one watcher per sweep.

Why not Ray's own: Ray Train V2 starts a detached ``PlacementGroupCleaner`` actor for every
Train run -- a new process per trial (1-2 s of its start-up here, and once 110 s when the two
cores were busy) -- and stopping it at the end of the run waits for its watch thread, which
sleeps up to 1 s and then asks the state API (through the dashboard, 10 s time-out) whether
the controller lives: ~1 s of every trial's teardown here, up to its 12 s limit when the
dashboard answers slowly -- the 12.3 s teardowns measured on a 2-core AVX2 machine (#35).

What it guards is needed: a Train controller killed with its trial (an ASHA stop, a lost
node, a killed trial actor) leaves its placement group reserved for the rest of the job, and
later trials would wait PENDING. So detbench keeps the guarantee with :class:`PlacementGroupReaper`,
one actor per driver (started by :func:`start_reaper`, named after the job), which pings the
controllers it watches and removes the placement group of one that died. A controller that
ends normally removes its own placement group and tells the reaper to forget it, without
waiting for an answer.
"""
from __future__ import annotations

import logging
import threading
import time

import ray

log = logging.getLogger(__name__)

_NAME = "detbench-pg-reaper-{job}"
_NAMESPACE = "detbench"
PING_EVERY_S = 1.0   # how often the watched controllers are pinged
PING_ANSWER_S = 5.0  # a controller silent this long is busy, not dead: only a died actor's error counts


class PlacementGroupReaper:
    """Watches Train controllers (``controller id -> (actor handle, placement group)``)."""

    def __init__(self):
        self._watched: dict[str, tuple] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="detbench-pg-reaper", daemon=True).start()

    def watch(self, controller_id: str, controller, placement_group) -> None:
        """(Re)register a controller's current placement group (a restarted worker group has a new one)."""
        with self._lock:
            self._watched[controller_id] = (controller, placement_group)

    def forget(self, controller_id: str) -> None:
        with self._lock:
            self._watched.pop(controller_id, None)

    def watching(self) -> list[str]:
        with self._lock:
            return sorted(self._watched)

    def _loop(self) -> None:
        while True:
            time.sleep(PING_EVERY_S)
            with self._lock:
                watched = dict(self._watched)
            if not watched:
                continue
            pings = {cid: handle.__ray_ready__.remote() for cid, (handle, _) in watched.items()}
            ray.wait(list(pings.values()), num_returns=len(pings), timeout=PING_ANSWER_S)
            for cid, ref in pings.items():
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError:
                    self._reap(cid, watched[cid][1])
                except Exception:  # noqa: BLE001  not answered yet: busy, pinged again next round
                    continue

    def _reap(self, controller_id: str, placement_group) -> None:
        with self._lock:
            if self._watched.get(controller_id, (None, None))[1] is not placement_group:
                return  # forgotten or re-registered meanwhile
            self._watched.pop(controller_id)
        try:
            state = ray.util.placement_group_table(placement_group).get("state")
            if state not in (None, "REMOVED"):
                ray.util.remove_placement_group(placement_group)
                log.warning("Train controller %s died: removed its placement group %s", controller_id,
                            placement_group.id.hex())
        except Exception as e:  # noqa: BLE001  the reaper must outlive one failed removal
            log.warning("could not remove the placement group of dead Train controller %s: %s", controller_id, e)


def reaper_name() -> str:
    return _NAME.format(job=ray.get_runtime_context().get_job_id())


#: (this Ray session's node and job, the handle that created the reaper): the driver keeps the creating
#: handle, because a non-detached actor dies when its creator's handle goes (a handle found by name
#: does not keep it alive).
_STARTED: dict = {}


def start_reaper():
    """The driver's reaper (started once per job, on the driver's node, no CPU); its handle."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    node = ray.get_runtime_context().get_node_id()
    session = (node, reaper_name())
    if session in _STARTED:
        return _STARTED[session]
    actor = ray.remote(num_cpus=0, max_concurrency=8)(PlacementGroupReaper).options(
        name=reaper_name(), namespace=_NAMESPACE, get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote()
    ray.get(actor.watching.remote())  # started (a trial must find it)
    _STARTED.clear()  # handles of an earlier Ray session are dead anyway
    _STARTED[session] = actor
    return actor


def find_reaper():
    """This job's reaper, or None when the driver started none (Ray's own cleaner is used then)."""
    try:
        return ray.get_actor(reaper_name(), namespace=_NAMESPACE)
    except ValueError:
        return None


def train_trainer_class(reaper):
    """``TorchTrainer``, or with ``reaper``: a subclass whose runs are watched by it instead of a
    ``PlacementGroupCleaner`` each (Ray 2.60's ``_create_default_callbacks``; a test checks it)."""
    from ray.train.torch import TorchTrainer
    if reaper is None:
        return TorchTrainer, []
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class WatchedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return WatchedTorchTrainer, [_reaper_callback(reaper)]


def _reaper_callback(reaper):
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class ReaperCallback(ControllerCallback, WorkerGroupCallback):
        """In the Train controller: its placement group watched by the sweep's reaper."""

        def __init__(self, reaper):
            self.reaper = reaper

        def after_worker_group_start(self, worker_group) -> None:
            ctx = ray.get_runtime_context()
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            self.reaper.watch.remote(ctx.get_actor_id(), ctx.current_actor, group)

        async def before_controller_shutdown(self) -> None:
            self.reaper.forget.remote(ray.get_runtime_context().get_actor_id())

        def before_controller_abort(self) -> None:
            self.reaper.forget.remote(ray.get_runtime_context().get_actor_id())

    return ReaperCallback(reaper)
