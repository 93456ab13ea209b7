"""Ray Train runs on a local Ray: 2-worker DDP with a BatchNorm D, resume,
fault tolerance, divergence (runs across raylets, and lost nodes: test_faults.py). Each run takes ~20-60 s."""
import json
from pathlib import Path

import pytest
import torch

from distgan import config as C
from distgan.cli import main
from distgan.storage import loc
from distgan.train import FAULT_ENV, TrainingDiverged, load_state, run_training

pytestmark = pytest.mark.slow


BASE = {  # a tiny run: 6 G steps, a report and a checkpoint every 2
    "data.batch_size": 16, "model.width": 8, "model.z_dim": 16, "train.steps": 6, "train.log_every": 2,
    "train.checkpoint_every": 2, "train.num_samples": 16, "train.threads_per_worker": 1,
}


def _cfg(data, **extra):
    return C.load(None, {**BASE, "data.path": str(data), **extra})


def _metrics(run_dir):
    return [json.loads(line) for line in (loc(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["gan", "contrastive"])
def test_two_workers_batchnorm_d_stay_in_sync(ray_running, fake_dir, tmp_path, objective):
    """DDP replicas identical after training; under ContraD that includes its three heads."""
    cfg = _cfg(fake_dir, **{"train.num_workers": 2, "model.spectral_norm": False,  # dcgan D with BatchNorm
                            "objective.name": objective})
    res = run_training(cfg, storage=str(tmp_path), name="ddp")
    assert res.step == 6
    ranks = sorted(res.workers, key=lambda w: w["rank"])
    assert [w["rank"] for w in ranks] == [0, 1]
    assert ranks[0]["G"] == ranks[1]["G"] and ranks[0]["D"] == ranks[1]["D"]  # DDP replicas identical
    state = load_state(res.checkpoint)
    assert state["step"] == 6 and state["config"]["train"]["num_workers"] == 2
    if objective == "contrastive":
        assert {"proj.0.weight", "proj_fake.0.weight", "dis.0.weight"} <= set(state["D"])
    rows = _metrics(res.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in ("epoch", "loss/d", "loss/g", "d/real", "d/fake", "grad_norm/d", "grad_norm/g", "img_per_s", "data_wait_frac"):
        assert key in rows[-1]
    assert (Path(res.run_dir) / "samples" / "step_0000006.png").is_file()
    assert (Path(res.checkpoint) / "samples.png").is_file()
    assert list((Path(res.run_dir) / "tensorboard").glob("events.*"))


def test_rerun_resumes_at_saved_step_with_optimizer_state(ray_running, digits_dir, tmp_path):
    cfg = _cfg(digits_dir, **{"train.steps": 4, "train.keep_checkpoints": 2})
    first = run_training(cfg, storage=str(tmp_path), name="r")
    w4 = load_state(first.checkpoint)["D"]
    # A second run of the same config under another name repeats the first exactly: one read
    # block (the digits are one shard), a seeded local shuffle, seeded z and augmentations.
    twin = load_state(run_training(cfg, storage=str(tmp_path), name="twin").checkpoint)
    assert all(torch.equal(twin["D"][k], w4[k]) for k in w4)
    again = run_training(cfg, storage=str(tmp_path), name="r")  # same command: nothing left to do
    assert again.step == 4 and again.checkpoint == first.checkpoint
    longer = run_training(C.apply_overrides(cfg, {"train.steps": 8}), storage=str(tmp_path), name="r")
    assert longer.step == 8
    assert [r["step"] for r in _metrics(longer.run_dir)] == [2, 4, 6, 8]  # continued, no step twice
    state = load_state(longer.checkpoint)
    # Adam's own step counter proves its state came back: 8 D steps, not the 4 a fresh start would give
    assert int(next(iter(state["opt_d"]["state"].values()))["step"]) == 8
    assert not torch.equal(state["D"]["head.weight"], w4["head.weight"])
    kept = sorted(p.name for p in Path(longer.run_dir).glob("checkpoint_0*"))
    assert kept == ["checkpoint_0000006", "checkpoint_0000008"]  # keep_checkpoints=2


def test_worker_crash_resumes_from_checkpoint_in_s3(ray_running, bucket, fake_dir, tmp_path, monkeypatch):
    """2 workers, run storage in the bucket: rank 1 crashes once, the run restarts from the
    checkpoint Ray Train wrote to S3, and rank 0's metrics, event files and samples are there too."""
    monkeypatch.setenv(FAULT_ENV, "crash@3")  # rank 1 raises once after step 3
    cfg = _cfg(fake_dir, **{"train.num_workers": 2, "train.max_failures": 1})
    res = run_training(cfg, storage=f"{bucket}/train-runs", name="crash")
    assert res.step == 6 and res.run_dir == f"{bucket}/train-runs/crash"
    run = loc(res.run_dir)
    assert (run / ".fault_injected").exists()  # the fault did fire
    steps = [r["step"] for r in _metrics(res.run_dir)]
    assert steps == [2, 4, 6]  # the attempt restarted from checkpoint 2; no duplicate lines
    assert [r.get("resumed_at") for r in _metrics(res.run_dir)] == [None, 2, None]
    assert res.checkpoint == f"{bucket}/train-runs/crash/checkpoint_0000006" and load_state(res.checkpoint)["step"] == 6
    assert [p.name for p in (run / "samples").iterdir()] == [f"step_{s:07d}.png" for s in (2, 4, 6)]
    assert (run / "tensorboard").glob("events.out.tfevents.*")


def test_nan_stops_with_clear_error_and_no_bad_checkpoint(ray_running, fake_dir, tmp_path, monkeypatch):
    """Through the CLI (--debug re-raises what it would print as its one error line)."""
    monkeypatch.setenv(FAULT_ENV, "nan@3")
    sets = [f"--set={k}={v}" for k, v in BASE.items()]
    with pytest.raises(TrainingDiverged) as e:
        main(["--debug", "train", "--data", str(fake_dir), "--storage", str(tmp_path), "--name", "nan", *sets])
    msg = str(e.value)
    assert "diverged" in msg and "step 3" in msg and "checkpoint_0000002" in msg and "\n" not in msg
    ckpts = sorted((tmp_path / "nan").glob("checkpoint_0*"))
    assert [p.name for p in ckpts] == ["checkpoint_0000002"]
    assert all(torch.isfinite(t).all() for t in load_state(ckpts[0])["D"].values() if t.is_floating_point())


def test_minutes_budget_stops_at_the_next_report_with_a_checkpoint(ray_running, fake_dir, tmp_path):
    cfg = _cfg(fake_dir, **{"train.steps": 10_000, "train.checkpoint_every": 10_000, "train.minutes": 1e-4})
    res = run_training(cfg, storage=str(tmp_path), name="budget")
    assert res.step == 2  # the first report after 6 ms of training
    assert load_state(res.checkpoint)["step"] == 2 and res.checkpoint.endswith("checkpoint_0000002")
