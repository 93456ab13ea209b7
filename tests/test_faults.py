"""What a run survives, on a real multi-node Ray (ray.cluster_utils.Cluster on loopback):
a node removed mid-training (Ray Train, and a Tune trial), an actor killed mid-embedding
and mid-assignment, and the `distgan` driver killed with SIGKILL mid-stage and run again.

Every stage runs as the real `distgan` command, a driver process joined to the cluster
through RAY_ADDRESS (as `ray job submit` runs it), so a test that fails kills its driver
and Ray frees what that job held. One cluster serves the whole module: a 1-CPU head and
3-CPU worker nodes, each holding exactly one 2-CPU training worker (1 CPU left for Ray
Data and Tune's trial drivers). Tests that remove a node add a fresh one, so the next test
finds the same shape. DISTGAN_FAULT=slow@S (distgan/faults.py)
stretches each step or unit so the kill lands mid-stage; each test also checks that it
did (some work done, not all), so none of them can pass by finishing before the fault."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distgan.faults import FAULT_ENV
from procs import finish

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

RUN = {  # the smallest run that crosses checkpoints: a report and a checkpoint every 2 steps
    "data.batch_size": 16, "model.width": 8, "model.z_dim": 16, "train.steps": 12, "train.log_every": 2,
    "train.checkpoint_every": 2, "train.num_samples": 16, "train.threads_per_worker": 1,
    "train.num_workers": 2, "train.cpus_per_worker": 2, "train.max_failures": 2,
}
LONG = {**RUN, "train.steps": 16}  # room for two faults in one run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's shared instance; `ray_running` restarts it for later modules
    # The dashboard serves Ray's state API (the tests find actors' pids there); every port it
    # binds is chosen here, away from the session Ray's defaults.
    head = {"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(), "metrics_export_port": _free_port(),
            "runtime_env_agent_port": _free_port()}
    # A lost node is declared dead after 2 missed 1 s health checks (Ray's default: 5 of 3 s).
    head["_system_config"] = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(2):
            c.add_node(num_cpus=3)
        ray.init(address=c.address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _wait_for(predicate, what: str, timeout: float = 180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _alive_actors(class_name: str) -> list:
    """Live actors whose class name starts with `class_name`, from Ray's state API (Ray Data's
    pool actors are named after their operator: "MapWorker(MapBatches(ShardEmbedder))")."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
            if a["class_name"].startswith(class_name)]


def _replace_node_of(cluster, class_name: str, spare: str | None = None) -> str:
    """Lose a worker node that hosts an actor of `class_name` (and none of `spare`), as a spot
    node is lost: its raylet and every process on it (the workers the raylet started) killed at
    once, then a fresh node of the same size added. Returns the lost node's id."""
    import psutil
    from ray._private import ray_constants

    actors = _wait_for(lambda: _alive_actors(class_name), f"a live {class_name}")
    victims = {a["node_id"] for a in actors} - {a["node_id"] for a in (_alive_actors(spare) if spare else [])}
    node = next(n for n in cluster.worker_nodes if n.node_id in victims)
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    workers = raylet.children(recursive=True)  # started by that raylet: they die with the node
    cluster.remove_node(node, allow_graceful=False)
    for p in workers:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # already gone with the raylet
            continue
    cluster.add_node(num_cpus=3)
    return node.node_id


def _checkpointed(run_dir: Path, step: int) -> bool:
    """Ray Train has recorded this checkpoint (its folder alone may still be uncommitted)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    return snap.is_file() and f"checkpoint_{step:07d}" in snap.read_text()


def _steps(metrics_file: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_file.read_text().splitlines()]


def _resumed_at(run: Path) -> list[int]:
    """The steps attempts restarted from, read while rank 0 may be writing the file."""
    f = run / "metrics.jsonl"
    lines = f.read_text().splitlines(keepends=True) if f.exists() else []
    return [json.loads(x)["resumed_at"] for x in lines if x.endswith("\n") and "resumed_at" in x]


def _check_resumed_run(rows: list[dict], steps: int) -> None:
    assert [r["step"] for r in rows] == list(range(2, steps + 1, 2))  # every report once, in order
    assert any(r.get("resumed_at", 0) >= 2 for r in rows), f"no attempt restarted from a checkpoint: {rows}"


# ---------------------------------------------------------------- node loss


def test_training_survives_a_lost_node_then_a_killed_driver(cluster, fake_dir, tmp_path):
    """One run, two failures (each would cost a training start of its own): a worker's node
    is lost after the first checkpoint and Ray Train restores the run on a fresh node; after
    the restored attempt has checkpointed, the driver gets SIGKILL and the same command is
    run again. It finishes from the last checkpoint with every step reported once."""
    run = tmp_path / "twice"
    argv = ["train", "--data", str(fake_dir), "--storage", str(tmp_path), "--name", "twice", *_sets(LONG)]
    proc = _distgan(cluster, argv, "slow@0.4")
    try:
        _wait_for(lambda: _checkpointed(run, 2) or proc.poll() is not None, "the first checkpoint")
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        _replace_node_of(cluster, "RayTrainWorker")
        resumed = _wait_for(lambda: _resumed_at(run), "the restored attempt's first report")[0]
        _wait_for(lambda: _checkpointed(run, resumed + 4) or proc.poll() is not None, "a checkpoint after the restore")
        assert proc.poll() is None, "training finished before the driver could be killed"
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    assert not (run / f"checkpoint_{LONG['train.steps']:07d}").exists()
    out = _rerun(cluster, argv)
    assert f"checkpoint_{LONG['train.steps']:07d}" in out
    rows = _steps(run / "metrics.jsonl")
    _check_resumed_run(rows, LONG["train.steps"])
    assert len([r for r in rows if "resumed_at" in r]) == 2  # restored after the node loss, and by the rerun


def test_tune_trial_finishes_after_losing_a_workers_node(cluster, fake_dir, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("loss.name: {grid: [hinge]}\n")
    argv = ["tune", "--data", str(fake_dir), "--space", str(space), "--scheduler", "fifo", "--trials", "1",
            "--storage", str(tmp_path), "--name", "sweep", *_sets(RUN)]
    runs = tmp_path / "sweep" / "runs"
    proc = _distgan(cluster, argv, "slow@0.4")
    # The node of one of the trial's training workers, not the one of the trial's own driver (a
    # Tune function actor, "ImplicitFunc"): losing that errors the trial (README, Reliability).
    log = _during(proc, lambda: [r for r in runs.glob("*") if _checkpointed(r, 2)], "the trial's first checkpoint",
                  lambda: _replace_node_of(cluster, "RayTrainWorker", spare="ImplicitFunc"))
    assert "1 trials, 0 errored" in log, log[-3000:]
    (trial_run,) = [p for p in runs.iterdir() if p.is_dir()]
    _check_resumed_run(_steps(trial_run / "metrics.jsonl"), 12)


# ---------------------------------------------------------------- actor loss


def _kill_one(class_name: str) -> int:
    actor = _wait_for(lambda: _alive_actors(class_name), f"a live {class_name}")[0]
    os.kill(actor["pid"], signal.SIGKILL)
    return actor["pid"]


def _embedding_reference(checkpoint, data) -> dict[int, np.ndarray]:
    """In-process embeddings of every image (no Ray): what every output must hold."""
    from distgan.data import COLUMNS, decode_images, shard_paths
    from distgan.config import ClusterConfig
    from distgan.embed import embed_images, load_embedder

    D, state = load_embedder(checkpoint, data)
    ref = {}
    for f in shard_paths(data):
        t = pq.read_table(f.path, columns=list(COLUMNS), filesystem=f.fs)
        m = state["config"]["model"]
        cl = ClusterConfig()  # the CLI's defaults: what `distgan embed` without flags computes
        emb = embed_images(D, decode_images(t["image"].to_pylist(), m["resolution"], m["channels"]), cl.features, cl.readout)
        ref.update(zip(t["id"].to_pylist(), emb))
    return ref


def _check_embeddings(out: Path, ref: dict) -> None:
    from distgan.embed import load_projection

    t = pq.read_table([str(f) for f in sorted(out.glob("emb-*.parquet"))], columns=["id", "embedding"])
    ids = t["id"].to_numpy()
    assert sorted(ids) == sorted(ref)  # every id exactly once
    got = np.stack(t["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    want = np.stack([ref[i] for i in ids])
    basis = load_projection(out)  # every shard, before and after the failure, in the one saved basis
    assert basis is not None and got.shape == (len(ids), basis.shape[1])
    np.testing.assert_allclose(got, want @ basis, rtol=2e-3, atol=2e-3)  # float16 storage
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def _kill_an_actor_during(cluster, argv: list[str], folder: Path, pattern: str, what: str) -> None:
    """Run `distgan argv`; once the first output file matching `pattern` is in `folder`, SIGKILL
    one Ray Data pool actor (pid from the state API); the stage must still succeed."""
    killed = {}

    def kill():
        killed["pid"] = _kill_one("MapWorker(MapBatches(")
        killed["done"] = len(list(folder.glob(pattern)))

    _during(_distgan(cluster, argv, "slow@1.5"), lambda: list(folder.glob(pattern)), what, kill)
    assert killed["done"] < 4, "every unit was done before the kill: the test proved nothing"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # the actor process really died


def test_embedding_completes_after_an_actor_is_killed(cluster, fake_dir, untrained_checkpoint, tmp_path):
    out = tmp_path / "emb"
    argv = ["embed", "--checkpoint", str(untrained_checkpoint), "--data", str(fake_dir), "--out", str(out),
            "--actors", "2"]
    _kill_an_actor_during(cluster, argv, out, "emb-*.parquet", "the first embedded shard")
    m = json.loads((out / "embeddings.json").read_text())
    assert m["count"] == 400 and len(m["shards"]) == 4 and m["reused_shards"] == 0
    _check_embeddings(out, _embedding_reference(untrained_checkpoint, fake_dir))


def _check_assignments(out: Path, fake_dir: Path) -> None:
    """Every id once, in the cluster the saved centroids give it (searched here, in process)."""
    from distgan import cluster as K

    feats = K.pixel_features(fake_dir)
    ids, x = [], []
    for i, _, _, xb in feats.batches():
        ids.append(i)
        x.append(xb)
    ids, x = np.concatenate(ids), np.concatenate(x)
    with np.load(out / "preprocess.npz") as z:
        pre = K.Preprocess(str(z["method"]))
    c, _ = K.search(K.centroid_index(np.load(out / "centroids.npy"), spherical=False), pre(x))
    got = pq.read_table(out / "assignments").to_pandas().sort_values("id")
    order = np.argsort(ids)
    assert got["id"].tolist() == ids[order].tolist()  # every id exactly once
    assert (got["cluster"].to_numpy() == c[order]).all()
    assert sorted(p.name for p in (out / "assignments").iterdir()) == [f"part-{i:05d}.parquet" for i in range(4)]


def test_assignment_completes_after_an_actor_is_killed(cluster, fake_dir, tmp_path):
    out = tmp_path / "c"
    argv = ["cluster", "--pixels", str(fake_dir), "--k", "5", "--preprocess", "l2", "--out", str(out), "--actors", "2"]
    _kill_an_actor_during(cluster, argv, out / ".assignments.tmp", "part-*.parquet", "the first assignment file")
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 400 and not m["resumed"]
    _check_assignments(out, fake_dir)


# ---------------------------------------------------------------- the driver killed


def _distgan(cluster, argv: list[str], fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([str(BIN / "distgan"), *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _sets(overrides: dict) -> list[str]:
    return [f"--set={k}={v}" for k, v in overrides.items()]


def _during(proc: subprocess.Popen, predicate, what: str, fault) -> str:
    """Wait for `predicate` while `proc` runs, inject `fault`, and let the stage finish;
    returns its output. The driver is killed if anything here fails."""
    try:
        got = _wait_for(lambda: predicate() or (proc.poll() is not None and "exited"), what)
        assert got != "exited", f"distgan exited before the fault:\n{proc.stdout.read()[-3000:]}"
        fault()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return finish(proc)


def _kill_when(proc: subprocess.Popen, predicate, what: str):
    try:
        got = _wait_for(lambda: predicate() or (proc.poll() is not None and "exited"), what)
        assert got != "exited", f"distgan exited before the kill:\n{proc.stdout.read()[-3000:]}"
        return got
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()


def _rerun(cluster, argv: list[str]) -> str:
    p = _distgan(cluster, argv)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    return out


def test_embedding_resumes_after_the_driver_is_killed(cluster, fake_dir, untrained_checkpoint, tmp_path):
    out = tmp_path / "emb"
    argv = ["embed", "--checkpoint", str(untrained_checkpoint), "--data", str(fake_dir), "--out", str(out),
            "--actors", "1"]
    _kill_when(_distgan(cluster, argv, "slow@1.5"), lambda: list(out.glob("emb-*.parquet")), "the first embedded shard")
    done = len(list(out.glob("emb-*.parquet")))
    assert 1 <= done < 4 and not (out / "embeddings.json").exists()
    log = _rerun(cluster, argv)
    assert f"({done} already done)" in log
    m = json.loads((out / "embeddings.json").read_text())
    assert m["reused_shards"] == done and m["count"] == 400
    _check_embeddings(out, _embedding_reference(untrained_checkpoint, fake_dir))


def test_clustering_resumes_after_the_driver_is_killed(cluster, fake_dir, tmp_path):
    out = tmp_path / "c"
    argv = ["cluster", "--pixels", str(fake_dir), "--k", "5", "--preprocess", "l2", "--out", str(out), "--actors", "1"]
    _kill_when(_distgan(cluster, argv, "slow@1.5"), lambda: list((out / ".assignments.tmp").glob("part-*.parquet")),
               "the first assignment file")
    done = len(list((out / ".assignments.tmp").glob("part-*.parquet")))
    assert 1 <= done < 4 and not (out / "assignments").exists()
    centroids = np.load(out / "centroids.npy")
    log = _rerun(cluster, argv)
    assert "reusing the centroids" in log and f"{done} already done" in log
    assert np.array_equal(np.load(out / "centroids.npy"), centroids)  # the same clusters: the same centroids
    assert json.loads((out / "metrics.json").read_text())["resumed"] is True
    _check_assignments(out, fake_dir)
