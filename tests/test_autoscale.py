"""A cluster that scales from zero, for real: Ray's autoscaler with its `fake_multinode`
provider (it starts each "node" as raylet processes on this machine). The head has CPU 0
and the `driver` resource, as cluster.yaml's head; the one worker type starts at 0 nodes.
`distgan train`, `tune` and `embed` run as drivers joined to it (token auth, as
`ray job submit` runs them), with data and outputs in the loopback S3 bucket: each asks
the autoscaler for what it needs and finishes; a GPU no node type has is one line after
the wait. The head is started by this module and stopped by its pid (with every process
it and its autoscaler started), pass or fail."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distgan.storage import loc
from procs import stop_head
from s3server import free_ports

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
RUN = ["--set=data.batch_size=16", "--set=model.width=8", "--set=model.z_dim=16", "--set=train.log_every=5",
       "--set=train.checkpoint_every=5", "--set=train.num_samples=16", "--set=train.threads_per_worker=1"]


def _config(gcs: str) -> dict:
    """The autoscaling config: cluster.yaml's shape (CPU-0 head with `driver`, workers from 0)
    on the fake provider; the launcher's keys it does not use are empty."""
    empty = {k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                             "setup_commands", "head_setup_commands", "worker_setup_commands",
                             "head_start_ray_commands", "worker_start_ray_commands")}
    return {
        "cluster_name": "distgan-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        # node ids stand in for IPs (every fake node is 127.0.0.1); no SSH updater, no config hash checks
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0, "driver": 4}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 4}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "file_mounts": {}, "file_mounts_sync_continuously": False, **empty,
    }


def _tree(pid: int) -> list:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory, bucket):
    import psutil

    root = tmp_path_factory.mktemp("autoscale")
    port, *extra = free_ports(6)
    (root / "autoscale.yaml").write_text(yaml.safe_dump(_config(f"127.0.0.1:{port}")))
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--autoscaling-config={root / 'autoscale.yaml'}",
         f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0", '--resources={"driver": 4}',
         "--include-dashboard=false", "--disable-usage-stats", *(f"--{n}={p}" for n, p in zip(names, extra))],
        env=env, stdout=open(root / "head.out", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    client = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    for k in ("RAY_FAKE_CLUSTER", "AUTOSCALER_UPDATE_INTERVAL_S"):
        client.pop(k)
    try:
        deadline = time.time() + 120
        while _resources(client, quiet=True) is None:
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"the autoscaling head did not come up: {(root / 'head.out').read_text()[-2000:]}")
            time.sleep(1)
        yield client, seen, head.pid
    finally:
        # Every process the head and its autoscaler started (the fake nodes' raylets and their
        # workers are the autoscaler's children), gathered before the head goes.
        for p in _tree(head.pid):
            seen[p.pid] = p
        stop_head(head)
        for p in seen.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:  # it stopped with the head
                continue


RESOURCES = "import ray, json; ray.init(); print('RES', json.dumps(ray.cluster_resources()), len(ray.nodes()))"


def _resources(env: dict, quiet: bool = False):
    r = subprocess.run([sys.executable, "-c", RESOURCES], env=env, capture_output=True, text=True, timeout=120)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RES ")), None)
    if line is None:
        if quiet:
            return None
        raise AssertionError(r.stderr[-2000:])
    import json

    res, _nodes = line[4:].rsplit(" ", 1)
    return json.loads(res)


def _distgan(env, argv, timeout=float(os.environ.get("AUTOSCALE_CMD_TIMEOUT", 420))):
    r = subprocess.run([str(BIN / "distgan"), *argv], env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def test_train_tune_embed_scale_a_cluster_up_from_zero(autoscaling, bucket):
    env, seen, head = autoscaling
    from distgan.data import prepare

    data = f"{bucket}/autoscale/data"
    prepare("fake", data, fake_count=200, progress=False)
    assert _resources(env).get("CPU", 0) == 0  # zero worker nodes: nothing can train yet

    code, out = _distgan(env, ["train", "--data", data, "--storage", f"{bucket}/autoscale/runs", "--name", "gan",
                               "--workers", "2", "--steps", "10", *RUN])
    assert code == 0, out[-3000:]
    assert "waiting for the autoscaler: training needs" in out
    assert _resources(env)["CPU"] >= 3  # a worker node joined
    for p in _tree(head):  # the nodes the autoscaler started, to stop them at the end
        seen[p.pid] = p
    ckpt = loc(f"{bucket}/autoscale/runs/gan/checkpoint_0000010")
    assert (ckpt / "state.pt").is_file()

    space = loc(f"{bucket}/autoscale/space.yaml")
    space.write_text("optim.lr_d: {grid: [2.0e-4]}\n")
    code, out = _distgan(env, ["tune", "--data", data, "--space", space.uri, "--storage", f"{bucket}/autoscale/sweeps",
                               "--name", "grid", "--trials", "1", "--workers-per-trial", "1", "--steps", "5",
                               "--scheduler", "fifo", *RUN])
    assert code == 0, out[-3000:]
    assert "1 trials, 0 errored" in out
    assert (loc(f"{bucket}/autoscale/sweeps/grid") / "results.csv").is_file()

    code, out = _distgan(env, ["embed", "--checkpoint", ckpt.uri, "--data", data, "--out", f"{bucket}/autoscale/emb"])
    assert code == 0, out[-3000:]
    assert loc(f"{bucket}/autoscale/emb/embeddings.json").read_json()["count"] == 200
    for p in _tree(head):
        seen[p.pid] = p


def test_a_local_ray_has_no_autoscaler(ray_running):
    """Every head runs the autoscaler's monitor; without a cluster config it cannot add nodes,
    and a request that does not fit must fail at once, not wait."""
    from distgan.capacity import has_autoscaler

    assert not has_autoscaler()


def test_a_resource_no_node_type_has_is_one_line_after_the_wait(autoscaling, bucket):
    env, seen, _ = autoscaling
    code, out = _distgan({**env, "DISTGAN_SCALE_TIMEOUT": "8"},
                         ["train", "--data", f"{bucket}/autoscale/data", "--storage", f"{bucket}/autoscale/runs",
                          "--name", "gpu", "--gpu", "--steps", "5", *RUN])
    err = [l for l in out.splitlines() if l.startswith("distgan: error:")]
    assert code == 2 and len(err) == 1, out[-3000:]
    assert "GPU" in err[0] and "8 s" in err[0], err[0]
    assert not loc(f"{bucket}/autoscale/runs/gpu").exists()
