"""Shared fixtures: one local Ray for the whole session, small prepared datasets,
and the real datasets from ../shared/datasets when that folder is present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("DISTGAN_DATASETS", REPO.parent / "shared" / "datasets"))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # Ray workers inherit it; torch threads are set per worker

from distgan.data import local_ray_on_loopback  # noqa: E402

local_ray_on_loopback()  # every Ray the tests start (shared, multi-node, the job head) is on 127.0.0.1


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    if not (DATASETS / "MNIST" / "raw").is_dir():
        pytest.skip(f"real datasets not found at {DATASETS} (set DISTGAN_DATASETS to the folder holding MNIST/, FashionMNIST/)")
    return DATASETS


@pytest.fixture(scope="session")
def ray_local():
    """One Ray instance shared by the tests that need it (start-up costs seconds).
    6 logical CPUs on a 2-core machine: two training workers, Ray Data tasks, and two
    Tune trials at once fit (the tests are latency-bound, not compute-bound).
    address="local": always a fresh instance, never one a stale /tmp/ray cluster file names."""
    import ray

    if not ray.is_initialized():
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_running(ray_local):
    """Re-starts the shared local Ray if a test (the multi-node one) shut it down."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from distgan.data import prepare

    out = tmp_path_factory.mktemp("prepared") / "digits"
    prepare("digits", out, progress=False)
    return out


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory) -> Path:
    from distgan.data import prepare

    out = tmp_path_factory.mktemp("prepared") / "fake"
    prepare("fake", out, fake_count=400, shard_rows=100, progress=False)
    return out


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory, fake_dir) -> Path:
    """A distgan checkpoint of an untrained BatchNorm DCGAN for the fake dataset."""
    from distgan import config as C
    from distgan.train import resolve_data, save_untrained_checkpoint

    cfg = resolve_data(C.load(None, {"data.path": str(fake_dir), "model.width": 8}))
    return save_untrained_checkpoint(cfg, tmp_path_factory.mktemp("ckpt") / "checkpoint_0000000")
