"""Sizing trials from the cluster: refuse what can never be scheduled."""
from __future__ import annotations

import pytest

from harness.config import ResourcesSpec
from harness.core import ConfigError
from harness.sweep import check_fits

LAPTOP = [{"CPU": 2.0}]


def test_three_cpus_on_two_is_refused():
    with pytest.raises(ConfigError, match="PENDING forever") as exc:
        check_fits(ResourcesSpec(workers_per_trial=1, cpus_per_worker=3), LAPTOP)
    assert exc.value.field == "resources"


def test_whole_machine_worker_leaves_no_room_for_the_trial_driver():
    with pytest.raises(ConfigError):
        check_fits(ResourcesSpec(workers_per_trial=1, cpus_per_worker=2), LAPTOP)


def test_gpu_request_without_gpus_refused():
    with pytest.raises(ConfigError, match="GPU"):
        check_fits(ResourcesSpec(gpus_per_worker=1), LAPTOP)


def test_concurrency_from_cluster():
    assert check_fits(ResourcesSpec(cpus_per_worker=0.99), LAPTOP) == 2
    assert check_fits(ResourcesSpec(cpus_per_worker=1), LAPTOP) == 1
    assert check_fits(ResourcesSpec(cpus_per_worker=0.99, max_concurrent_trials=1), LAPTOP) == 1
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert check_fits(ResourcesSpec(workers_per_trial=2, cpus_per_worker=1, gpus_per_worker=1), nodes) == 1
    assert check_fits(ResourcesSpec(workers_per_trial=2, cpus_per_worker=1), nodes) == 3


def test_strict_spread_needs_a_node_per_worker():
    two = [{"CPU": 0.0}, {"CPU": 4.0}]
    with pytest.raises(ConfigError, match="STRICT_SPREAD") as exc:
        check_fits(ResourcesSpec(workers_per_trial=2, cpus_per_worker=1, placement_strategy="STRICT_SPREAD"), two)
    assert exc.value.field == "resources.placement_strategy"
    assert check_fits(ResourcesSpec(workers_per_trial=2, cpus_per_worker=1, placement_strategy="SPREAD"), two) == 1
