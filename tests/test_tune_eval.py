"""Offline quality metrics and Ray Tune sweeps (fake data, a few steps per trial)."""
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distgan import config as C
from distgan.cli import main
from distgan.config import UserError
from distgan.storage import loc
from distgan.evaluate import Evaluator, frechet_distance, kernel_inception_distance, load_classifier, train_classifier
from distgan.train import resolve_data
from distgan.tune import check_resources, load_space


def _reference_fd(a, b):
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def test_frechet_distance_matches_reference_and_behaves():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8))
    b = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8)) * 0.3 + 0.5
    assert frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6
    shifts = [frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts) and shifts[0] > 0
    assert shifts[1] == pytest.approx(8 * 1.0**2, rel=1e-6)  # a pure mean shift adds ||delta||^2


def test_kid_near_zero_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    same = kernel_inception_distance(a, b, subset_size=400)
    far = kernel_inception_distance(a, b + 1.0, subset_size=400)
    assert abs(same) < 0.05 and far > 10 * abs(same) + 0.1


def test_domain_classifier_and_in_training_evaluator(fake_dir, tmp_path):
    r = train_classifier(fake_dir, tmp_path / "clf.pt", epochs=10, batch_size=32, progress=False)
    assert r["test_acc"] > 0.5  # ten procedural shapes are easy
    clf = load_classifier(tmp_path / "clf.pt")  # weights_only load
    assert clf.meta["n_classes"] == 10
    cfg = C.load(None, {"data.path": str(fake_dir), "model.width": 8, "eval.every": 5, "eval.num_images": 80,
                        "eval.classifier": str(tmp_path / "clf.pt")})
    from distgan.train import build_nets, resolve_data

    cfg = resolve_data(cfg)
    nets = build_nets(cfg, "cpu")

    def moved(*_a, **_k):  # .cpu()/.to()/.cuda() all go through _apply
        raise AssertionError("the evaluator moved the training G_ema (on a GPU run the next EMA update would fail)")

    nets.G_ema._apply = moved
    out = Evaluator(cfg)(nets.G_ema, nets.D, step=5)
    assert {"eval/fid", "eval/kid", "eval/nmi", "eval/probe_acc"} <= set(out)
    assert out["eval/fid"] > 0 and 0 <= out["eval/nmi"] <= 1 and 0 <= out["eval/probe_acc"] <= 1
    assert {"eval/stability", "eval/silhouette", "eval/davies_bouldin"} <= set(out)
    assert np.isfinite([out["eval/stability"], out["eval/silhouette"], out["eval/davies_bouldin"]]).all()


@pytest.fixture(scope="module")
def unlabelled_dir(tmp_path_factory) -> Path:
    """A folder of 160 images (32 x 32, the DCGAN's smallest) without class folders (labels
    null): bright and dark squares."""
    from PIL import Image

    from distgan.data import prepare

    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for i in range(160):
        img = rng.integers(0, 40, (32, 32), dtype=np.uint8)
        x, y = rng.integers(0, 16, 2)
        img[y : y + 16, x : x + 16] = 220 if i % 2 else 110
        Image.fromarray(img).save(root / f"{i:03d}.png")
    out = root / "prepared"
    m = prepare("folder", out, data_root=root, resolution=32, progress=False)
    assert m["unlabelled"] == 160
    return out


def test_evaluator_on_unlabelled_images_reports_the_label_free_criteria_only(unlabelled_dir):
    from distgan.train import build_nets, resolve_data

    cfg = resolve_data(C.load(None, {"data.path": str(unlabelled_dir), "model.width": 8, "eval.every": 5,
                                     "eval.num_images": 80, "cluster.k": 4}))
    nets = build_nets(cfg, "cpu")
    out = Evaluator(cfg)(nets.G_ema, nets.D, step=5)
    assert {"eval/stability", "eval/silhouette", "eval/davies_bouldin"} <= set(out)
    assert not {"eval/nmi", "eval/probe_acc", "eval/fid"} & set(out)
    assert np.isfinite(out["eval/stability"]) and -1 <= out["eval/silhouette"] <= 1


def test_label_metric_on_an_unlabelled_dataset_names_the_label_free_ones(ray_running, unlabelled_dir, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("loss.name: {choice: [ns, hinge]}\n")
    code = main(["tune", "--space", str(space), "--data", str(unlabelled_dir), "--metric", "eval/nmi",
                 "--set", "eval.every=5", "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--metric eval/nmi needs labels" in err and "eval/stability" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "tune").exists()


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A weights file in the layout of the standard FID Inception (random values: the real file
    is a user's own, and nothing may be downloaded here). It checks the wiring, not FID values."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                                   reason="torch-fidelity is not installed (pip install -e .[test])")
    import torch

    cls = fidelity.FeatureExtractorInceptionV3
    mp = pytest.MonkeyPatch()
    mp.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})  # never the network
    mp.setattr(cls, "load_state_dict", lambda self, sd, *a, **k: None)  # keep the random init
    try:
        net = cls("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_standard_fid_path_reads_a_local_inception_file(fake_dir, inception_weights):
    from distgan.evaluate import InceptionFeatures, _features
    from distgan.train import build_nets, resolve_data

    ext = InceptionFeatures(inception_weights)
    imgs = np.random.default_rng(0).uniform(-1, 1, size=(3, 1, 32, 32)).astype(np.float32)
    import torch

    f = _features(ext, torch.from_numpy(imgs))
    assert f.shape == (3, 2048) and np.isfinite(f).all()  # grey 32x32 -> RGB 299x299 -> pool3
    cfg = resolve_data(C.load(None, {"data.path": str(fake_dir), "model.width": 8, "eval.every": 5,
                                     "eval.num_images": 24, "eval.inception_weights": str(inception_weights)}))
    nets = build_nets(cfg, "cpu")
    out = Evaluator(cfg)(nets.G_ema, nets.D, step=5)
    assert np.isfinite(out["eval/fid"]) and out["eval/fid"] > 0 and np.isfinite(out["eval/kid"])
    with pytest.raises(UserError, match="Inception weights not found"):
        InceptionFeatures(inception_weights.parent / "missing.pth")


@pytest.mark.parametrize("text,match", [
    ("optim.lr: {uniform: [0.1, 0.2]}", "not a config key; close: optim.lr_g, optim.lr_d"),
    ("optim.lr_d: {uniform: [0.2, 0.1]}", "low < high"),
    ("optim.lr_d: {loguniform: [0.0, 0.1]}", "low > 0"),
    ("model.arch: {choice: [dcgan, vit]}", "dcgan, resnet"),
    ("optim.lr_d: {normal: [0, 1]}", "exactly one of choice"),
    ("objective.name: {choice: [gan, contrastive]}\nloss.name: {choice: [hinge, wgan-gp]}\n"
     "model.spectral_norm: {choice: [true]}", "loss.name=wgan-gp, objective.name=contrastive, which is not valid"),
    ("objective.name: {choice: [gan, byol]}", "objective.name='byol' is not valid"),
])
def test_bad_space_files(tmp_path, text, match):
    f = tmp_path / "space.yaml"
    f.write_text(text + "\n")
    with pytest.raises(UserError, match=match):
        load_space(f)


def test_an_objective_sweep_over_a_config_that_reads_the_contrastive_head_is_refused_up_front(tmp_path):
    """The shipped MNIST / Fashion-MNIST configs embed through the contrastive head
    (grid4-max+proj): sweeping the objective there would fail every non-contrastive trial."""
    f = tmp_path / "space.yaml"
    f.write_text("objective.name: {grid: [gan, contrastive]}\n")
    base = C.load(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "dcgan_fashion.yaml")
    with pytest.raises(UserError, match=r"can sample objective.name=gan, which is not valid: cluster.readout "
                                        r"grid4-max\+proj reads the contrastive D's projection head.*e.g. grid4-max"):
        load_space(f, base)
    assert set(load_space(f, C.apply_overrides(base, {"cluster.readout": "grid4-max"}))) == {"objective.name"}


def test_default_space_loads():
    space = load_space(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "space_default.yaml")
    assert {"model.arch", "loss.name", "model.spectral_norm", "optim.lr_g", "optim.lr_d", "optim.n_critic",
            "optim.ema_decay", "optim.diffaugment"} <= set(space)


def test_too_many_resources_per_trial():
    cfg = C.load(None, {"train.num_workers": 8})
    with pytest.raises(UserError, match="one trial needs 8 worker"):
        check_resources(cfg, {"CPU": 4})
    with pytest.raises(UserError, match="GPU"):
        check_resources(C.load(None, {"train.use_gpu": True}), {"CPU": 4})
    assert check_resources(C.load(None, {}), {"CPU": 6}) == 2


TUNE_FLAGS = ["--set", "model.width=8", "--set", "data.batch_size=32", "--set", "train.log_every=5",
              "--set", "train.checkpoint_every=5", "--steps", "10"]


@pytest.mark.slow
def test_sweep_two_archs_by_two_losses_on_unlabelled_images(ray_running, unlabelled_dir, tmp_path):
    """The grid of 2 architectures x 2 losses on a folder without labels, optimising a
    label-free criterion of D's embeddings (what a user of an unlabelled set has)."""
    space = tmp_path / "space.yaml"
    space.write_text("model.arch: {grid: [dcgan, resnet]}\nloss.name: {grid: [ns, hinge]}\n")
    code = main(["tune", "--space", str(space), "--data", str(unlabelled_dir), "--trials", "1", "--scheduler", "fifo",
                 "--metric", "eval/stability", "--mode", "max", "--storage", str(tmp_path), "--name", "sweep",
                 "--set", "eval.every=5", "--set", "eval.num_images=64", "--set", "cluster.k=4", *TUNE_FLAGS])
    assert code == 0
    exp = tmp_path / "sweep"
    df = pd.read_csv(exp / "results.csv")
    assert len(df) == 4 and set(df["status"]) == {"TERMINATED"} and (df["steps"] == 10).all()
    assert {(a, l) for a, l in zip(df["model.arch"], df["loss.name"])} == {
        ("dcgan", "ns"), ("dcgan", "hinge"), ("resnet", "ns"), ("resnet", "hinge")}
    assert np.isfinite(df["eval/stability"]).all() and "eval/nmi" not in df
    assert (exp / "results.md").read_text().count("TERMINATED") == 4 and (exp / "objective.png").is_file()
    best = json.loads((exp / "best.json").read_text())
    assert best["best_objective"] == df["eval/stability"].max() and Path(best["best_checkpoint"]).is_dir()
    # best.yaml is a full config that `distgan train --config` takes as is: the loader train runs first
    # (validated, the dataset's manifest read) gives the best trial's config, data path included
    win = df.loc[df["eval/stability"].idxmax()]
    cfg = resolve_data(C.load(exp / "best.yaml"))
    assert (cfg.model.arch, cfg.loss.name, cfg.train.steps) == (win["model.arch"], win["loss.name"], 10)
    assert Path(cfg.data.path) == unlabelled_dir and cfg.model.width == 8


@pytest.mark.slow
def test_diverging_trial_errors_and_interrupted_sweep_resumes(ray_running, fake_dir, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr_d: {grid: [2.0e-4, 1.0e+30]}\n")  # 1e30 blows D up: NaN within steps
    argv = ["tune", "--space", str(space), "--data", str(fake_dir), "--trials", "1", "--scheduler", "fifo",
            "--max-concurrent", "1", "--storage", str(tmp_path), "--name", "resume", *TUNE_FLAGS]
    proc = subprocess.Popen([sys.executable, "-m", "distgan.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    runs = tmp_path / "resume" / "runs"
    deadline = time.time() + 300
    while not list(runs.glob("*/checkpoint_0000010")) and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    proc.wait(timeout=120)
    first = {p.name for p in runs.iterdir()}
    code = main(argv)  # the same command again
    assert code == 0
    df = pd.read_csv(tmp_path / "resume" / "results.csv")
    assert len(df) == 2
    assert set(df["trial"]) >= first  # the same trials, carried on; not a new experiment
    errored = df[df["status"] == "ERROR"]
    assert list(errored["optim.lr_d"]) == [1e30] and "diverged" in errored["error"].iloc[0]
    assert (df[df["status"] == "TERMINATED"]["steps"] == 10).all()


def test_metric_no_trial_reports(ray_running, fake_dir, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("loss.name: {choice: [ns, hinge]}\n")
    code = main(["tune", "--space", str(space), "--data", str(fake_dir), "--metric", "eval/fid", "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no trial reports metric 'eval/fid'" in err and "loss/g" in err
    assert not (tmp_path / "tune").exists()  # refused before any trial started


@pytest.mark.slow
def test_pbt_exploit_hands_the_better_trials_weights_to_the_worse(ray_running, bucket, fake_dir, tmp_path):
    """Two concurrent PBT trials; the one whose D cannot learn (lr_d 1e-8: loss/d stays at 2 ln 2)
    is always the lower quantile, so at a perturbation it must restart from the other's checkpoint.
    The sweep lives in the bucket: the checkpoint passes between trials through S3, not a driver's disk."""
    storage = loc(f"{bucket}/sweeps")
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr_d: {grid: [1.0e-8, 2.0e-3]}\noptim.lr_g: {loguniform: [1.0e-4, 4.0e-4]}\n")
    code = main(["tune", "--space", str(space), "--data", str(fake_dir), "--trials", "1", "--scheduler", "pbt",
                 "--metric", "loss/d", "--mode", "min", "--max-concurrent", "2", "--storage", storage.uri,
                 "--name", "pbt", *TUNE_FLAGS])  # 2 segments of 5 steps: PBT ranks the pair at 5 and at 10
    assert code == 0
    exp = storage / "pbt"
    df = pd.read_csv(io.BytesIO((exp / "results.csv").read_bytes()), dtype={"restored from": str})
    assert len(df) == 2 and set(df["status"]) == {"TERMINATED"} and (df["steps"] == 10).all()
    exploited = df[df["restored from"].notna()]
    assert len(exploited) >= 1, "no trial was restored from another's checkpoint"
    row = exploited.iloc[0]
    donor = df[df["trial"] == row["restored from"]].iloc[0]
    assert row["trial"] != donor["trial"]
    # exploit copies the donor's config too: the lr_d = 1e-8 trial ends with 2e-3 ...
    assert set(df["optim.lr_d"]) == {2e-3}
    assert row["optim.lr_g"] != donor["optim.lr_g"]  # ... and explore perturbs the mutable key
    assert "restored from" in (exp / "results.md").read_text()
    # Synchronous PBT ranks the pair at step 10 too: the lower one takes the upper's final weights with nothing
    # left to train, and its row shows the weights it ends with -- the donor's checkpoint and objective.
    same = df.merge(df, on="checkpoint", suffixes=("", "_donor")).query("trial != trial_donor")
    assert len(same) == 2, df  # one pair, seen from both sides
    taker = same[[f"/runs/{t}" not in c for t, c in zip(same["trial"], same["checkpoint"])]]  # not its own run's
    assert len(taker) == 1 and (taker["restored from"] == taker["trial_donor"]).all()
    assert taker["loss/d"].iloc[0] == taker["loss/d_donor"].iloc[0]
    # the continuation is a fresh run named after the exploited trial, started from the donor's checkpoint
    assert any(p.name.startswith(row["trial"] + "-") for p in (exp / "runs").iterdir())
    assert all(c.startswith(exp.uri + "/runs/") for c in df["checkpoint"])
    assert {p.name for p in exp.iterdir()} >= {"results.csv", "results.md", "best.yaml", "best.json", "objective.png"}
