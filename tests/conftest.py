"""Shared fixtures: tiny synthetic data, suite files, one Ray session per test module that needs it."""
from __future__ import annotations

import os
from pathlib import Path

#: The same CPU kernels on every machine, set before torch loads (and inherited by the detbench
#: drivers and Ray workers the tests start): ATen's vectorised kernels, oneDNN and MKL each pick
#: the widest instruction set the CPU has, so an AVX-512 machine computes other floats than an
#: AVX2 one -- enough to move the golden micro suite's AP by 0.02-0.03 and to give bf16 autocast
#: non-finite gradients at random on AVX512-BF16 CPUs. Pinned to AVX2, every x86-64 CI machine
#: reproduces the committed numbers (docs/ci.md).
CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
for _name, _value in CPU_KERNELS.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A tiny synthetic dataset in real COCO format: train and val splits."""
    from harness.data import write_synthetic_coco
    root = tmp_path_factory.mktemp("tiny")
    tr = write_synthetic_coco(root / "train", n_images=12, seed=0, image_size=64, max_objects=2)
    va = write_synthetic_coco(root / "val", n_images=6, seed=1, image_size=64, max_objects=2)
    return {"name": "tiny", "train_annotations": str(tr), "train_images": str(tr.parent),
            "val_annotations": str(va), "val_images": str(va.parent)}


def write_suite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ray_local():
    """An embedded 2-CPU Ray cluster shared by a test module (starting one costs ~10 s)."""
    import ray

    from harness.sweep import init_ray
    init_ray(None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: on a shared 2-core machine two spinning threads make
    CPU forwards (bf16 ones above all) several times slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 API server for the whole session (moto, its own process); the process's
    environment gets its test credentials and ``DETBENCH_STORAGE_ENDPOINT_URL``."""
    from s3kit import TEST_ENV, moto_server
    with moto_server() as url:
        saved = {k: os.environ.get(k) for k in [*TEST_ENV, "DETBENCH_STORAGE_ENDPOINT_URL"]}
        os.environ.update({**TEST_ENV, "DETBENCH_STORAGE_ENDPOINT_URL": url})
        try:
            yield url
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def s3_uri(s3_endpoint) -> str:
    """``s3://<new bucket>/runs`` on the session's S3 server."""
    from s3kit import make_bucket
    return f"s3://{make_bucket(s3_endpoint)}/runs"


#: Modules that start Ray clusters or kill detbench drivers: the slow tier.
SLOW_MODULES = {"test_e2e", "test_faults", "test_cluster", "test_recipe", "test_s3_run"}
#: The scenario tests of the slow tier (killed drivers and workers, a multi-node cluster, the reference
#: recipe, a run on S3): minutes each, so ``make test`` leaves them to ``make test-extended`` (CI runs both).
EXTENDED_MODULES = {"test_faults", "test_cluster", "test_recipe", "test_s3_run"}


def pytest_collection_modifyitems(items):
    """``slow``: every test that starts Ray (``ray_local``, or a module of :data:`SLOW_MODULES`);
    ``extended``: those of :data:`EXTENDED_MODULES`. ``make test`` runs all but ``extended`` (one
    real sweep end to end included); ``make test-extended`` those; ``make test-fast`` no ``slow``."""
    for item in items:
        module = item.module.__name__.split(".")[-1]
        if "ray_local" in getattr(item, "fixturenames", ()) or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if module in EXTENDED_MODULES:
            item.add_marker(pytest.mark.extended)
