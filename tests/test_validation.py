"""Every bad flag or config value is one line on stderr, exit status 2, before Ray starts
and with nothing written. Ray's start is made impossible here (ray.init raises), so a
check that ran after it would fail these tests with that error instead of the one line."""
import pickle
from pathlib import Path

import pytest

from distgan.cli import main
from procs import finish


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _refused(capsys, argv, expect: str, out: Path) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("distgan: error:") and len(err.splitlines()) == 1, err
    assert expect in err, err
    assert not out.exists(), f"{out} was written"


TRAIN = ["--set", "model.width=8"]


@pytest.mark.parametrize("flags,expect", [
    (["--workers", "0"], "train.num_workers must be"),
    (["--steps", "0"], "train.steps must be"),
    (["--set", "data.batch_size=0"], "data.batch_size must be"),
    (["--set", "train.checkpoint_every=-1"], "train.checkpoint_every must be"),
    (["--set", "objective.name=contrastive", "--set", "loss.name=wgan-gp", "--set", "model.spectral_norm=true"],
     "does not take a gradient penalty"),
    (["--set", "objective.name=autoencoder", "--set", "loss.r1_gamma=1"], "does not take a gradient penalty"),
    (["--set", "objective.name=contrastive", "--set", "objective.augment=crop,color"],
     "colour augmentations need RGB data"),  # the fake dataset is grayscale
    (["--set", "objective.augment=crop,blur"], "objective.augment='blur' is not valid"),
    (["--set", "objective.name=simclr"], "objective.name='simclr' is not valid"),
    (["--set", "cluster.readout=grid4-median"], "unknown read-out 'grid4-median'"),
    (["--set", "cluster.method=gmm", "--set", "cluster.manifold=none"], "set cluster.manifold: umap"),
])
def test_train_counts(no_ray, capsys, fake_dir, tmp_path, flags, expect):
    out = tmp_path / "runs"
    _refused(capsys, ["train", "--data", str(fake_dir), "--storage", str(out), *TRAIN, *flags], expect, out)


def test_train_without_a_dataset_manifest(no_ray, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["train", "--data", str(tmp_path / "empty"), "--storage", str(tmp_path / "runs")],
             "dataset.json", tmp_path / "runs")


@pytest.mark.parametrize("flags,expect", [
    (["--trials", "0"], "tune.trials must be"),
    (["--workers-per-trial", "0"], "train.num_workers must be"),
    (["--steps", "0"], "train.steps must be"),
    (["--max-concurrent", "-1"], "--max-concurrent must be >= 0"),
])
def test_tune_counts(no_ray, capsys, fake_dir, tmp_path, flags, expect):
    out = tmp_path / "sweeps"
    _refused(capsys, ["tune", "--data", str(fake_dir), "--storage", str(out), *flags], expect, out)


@pytest.mark.parametrize("flags,expect", [
    (["--actors", "0"], "--actors must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--features", "everything"], "--features must be last or multi"),
    (["--readout", "grid8-max"], "read-out grid8-max asks for a 8x8 grid but a D block's map is 4x4"),
    (["--readout", "pyramid"], "unknown read-out 'pyramid'"),
    (["--readout", "proj"], "read-out proj reads a contrastive D's projection head and this D has none"),
    (["--readout", "grid4-max+proj"], "read-out grid4-max+proj reads a contrastive D's projection head"),
    (["--readout", "grid8-max+proj"], "read-out grid8-max+proj reads a contrastive D's projection head"),
    (["--dim", "-1"], "--dim must be >= 0"),
])
def test_embed_flags(no_ray, capsys, fake_dir, untrained_checkpoint, tmp_path, flags, expect):
    out = tmp_path / "emb"
    _refused(capsys, ["embed", "--checkpoint", str(untrained_checkpoint), "--data", str(fake_dir), "--out", str(out),
                      *flags], expect, out)


def test_embed_checkpoint_holding_a_pickle_payload_runs_nothing(no_ray, capsys, fake_dir, tmp_path):
    """Read with weights_only=True before Ray starts: the payload never runs."""
    marker = tmp_path / "pwned"
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state.pt").write_bytes(pickle.dumps({"D": _Payload(marker)}))
    out = tmp_path / "emb"
    code = main(["embed", "--checkpoint", str(tmp_path / "ck"), "--data", str(fake_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "checkpoint" in err, err
    assert not marker.exists() and not out.exists()


def test_embed_checkpoint_without_distgans_format_tag(no_ray, capsys, fake_dir, tmp_path):
    import torch

    (tmp_path / "ck").mkdir()
    torch.save({"D": {}, "G": {}, "step": 3}, tmp_path / "ck" / "state.pt")  # loads, but is not ours
    _refused(capsys, ["embed", "--checkpoint", str(tmp_path / "ck"), "--data", str(fake_dir),
                      "--out", str(tmp_path / "emb")], "not a distgan checkpoint", tmp_path / "emb")


@pytest.mark.parametrize("flags,expect", [
    (["--k", "1"], "--k values must be >= 2"),
    (["--k", "0"], "--k values must be >= 2"),
    (["--k", "1,5"], "--k values must be >= 2, got 1"),
    (["--k", "5:2"], "--k range '5:2' is empty"),
    (["--k", "a,b"], "--k must be a number, a list (5,10,20) or a range"),
    (["--k", "5,401"], "--k must be between 2 and the k-means sample (400 of 400 points), got 401"),
    (["--k", "4:8:2", "--select-k", "inertia"], "criterion must be one of stability, silhouette, davies_bouldin"),
    (["--k", "5", "--actors", "0"], "--actors must be >= 1"),
    (["--k", "5", "--niter", "0"], "--niter must be >= 1"),
    (["--k", "5", "--pca-dim", "100000"], "--pca-dim 100000 is larger than the features' dimension (1024)"),
    (["--k", "5", "--pca-dim", "0"], "--pca-dim must be >= 1"),
    (["--k", "5", "--sample", "401"], "--sample must be between 1 and the number of points (400)"),
    (["--k", "5", "--gpus", "-1"], "--gpus must be >= 0"),
    (["--k", "5", "--manifold", "tsne"], "--manifold must be none or umap"),
    (["--k", "5", "--manifold", "umap", "--manifold-dim", "0"], "--manifold-dim must be >= 1"),
    (["--k", "5", "--preprocess", "ica"], "--preprocess must be one of"),
    (["--k", "5", "--method", "em"], "--method must be one of kmeans, gmm, balanced, got 'em'"),
    (["--k", "5", "--method", "gmm"], "--method gmm fits full covariances, on a manifold map"),
    (["--k", "5", "--method", "gmm", "--manifold", "umap", "--manifold-dim", "65"], "of at most 64 dimensions"),
    (["--k", "5", "--method", "gmm", "--manifold", "umap", "--spherical"], "--spherical is a k-means option"),
    (["--k", "5", "--method", "balanced", "--spherical"], "--spherical is a k-means option, not one of --method balanced"),
])
def test_cluster_flags(no_ray, capsys, fake_dir, tmp_path, flags, expect):
    out = tmp_path / "c"
    _refused(capsys, ["cluster", "--pixels", str(fake_dir), "--out", str(out), *flags], expect, out)


def test_cluster_manifold_umap_is_looked_for_not_imported(no_ray, capsys, fake_dir, tmp_path, monkeypatch):
    """The driver only checks that umap-learn is installed (importing it costs 139 MiB and
    1.1 s of numba); a missing one is one line before Ray starts."""
    import importlib.util
    import sys

    from distgan.cluster.distributed import check_request

    monkeypatch.delitem(sys.modules, "umap", raising=False)
    assert check_request(400, 5, 0, manifold="umap") == 400
    assert "umap" not in sys.modules
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else real(name, *a))
    out = tmp_path / "c"
    _refused(capsys, ["cluster", "--pixels", str(fake_dir), "--out", str(out), "--k", "5", "--manifold", "umap"],
             "--manifold umap needs umap-learn: pip install umap-learn", out)


def test_cluster_with_checkpoint_checks_k_before_embedding(no_ray, capsys, fake_dir, untrained_checkpoint, tmp_path):
    out = tmp_path / "c"
    _refused(capsys, ["cluster", "--checkpoint", str(untrained_checkpoint), "--data", str(fake_dir), "--k", "401",
                      "--out", str(out)], "--k must be between 2", out)


@pytest.mark.parametrize("flags,expect", [
    (["--k", "1"], "--k values must be >= 2, got 1"),
    (["--steps", "0"], "train.steps must be"),
    (["--workers", "0"], "train.num_workers must be"),
    (["--count", "0"], "--count must be >= 1, got 0"),
    (["--dataset", "digits", "--count", "100"], "--count is for --dataset fake"),
])
def test_pipeline_flags(no_ray, capsys, tmp_path, flags, expect):
    out = tmp_path / "p"
    _refused(capsys, ["pipeline", "--dataset", "fake", "--out", str(out), *flags], expect, out)


def test_pipeline_overwrite_keeps_the_folder_when_the_config_is_bad(no_ray, capsys, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "pipeline.json").write_text("{}")
    assert main(["pipeline", "--dataset", "fake", "--out", str(out), "--overwrite", "--steps", "0"]) == 2
    assert (out / "pipeline.json").exists()  # refused before anything was removed


# ---------------------------------------------------------------- the console

NOISE = {  # Ray's notices that ask nothing of the user (what `--verbose` brings back)
    "token notice": "Token authentication is enabled for this Ray cluster",
    "start-up INFO": "Started a local Ray instance",
    "execution plan": "Execution plan of Dataset",
    "execution start": "Starting execution of Dataset",
    "progress-bar notice": "Progress bars disabled",
}


def _console(fake_dir, out: Path, *flags: str):
    """`distgan cluster` on raw pixels with its own local Ray, as a user runs it (RAY_AUTH_MODE
    unset); returns the running process (the two consoles run side by side to save time)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_DATA_LOG_LEVEL")}
    return subprocess.Popen([str(Path(sys.executable).parent / "distgan"), *flags, "cluster", "--pixels",
                             str(fake_dir), "--k", "3", "--preprocess", "l2", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_console_shows_distgans_lines_and_verbose_brings_rays_back(fake_dir, tmp_path):
    runs = _console(fake_dir, tmp_path / "q"), _console(fake_dir, tmp_path / "v", "--verbose")
    quiet, verbose = (finish(p) for p in runs)
    for line in ("faiss k-means: k=3", "assigning 400 points", "k=3 n=400", "outputs:"):
        assert line in quiet, quiet
    shown = [name for name, text in NOISE.items() if text in quiet]
    assert not shown, f"{shown} on the quiet console:\n{quiet}"
    assert "faiss k-means: k=3" in verbose
    missing = [name for name, text in NOISE.items() if text not in verbose]
    assert not missing, f"--verbose lost {missing}:\n{verbose}"
    # Ray Data's own progress bars are off in every process that runs Ray Data for distgan
    # (the k-means sample is drawn in a task): distgan prints its own
    assert "Running Dataset" not in quiet + verbose, quiet + verbose


def test_embed_select_refusals(no_ray, capsys, fake_dir, untrained_checkpoint, tmp_path):
    out = tmp_path / "emb"
    base = ["embed", "--data", str(fake_dir), "--out", str(out)]
    run = Path(untrained_checkpoint).parent
    _refused(capsys, [*base, "--checkpoint", str(run), "--select", "nmi"],
             "criterion must be one of stability, silhouette, davies_bouldin, got 'nmi'", out)
    _refused(capsys, [*base, "--checkpoint", str(untrained_checkpoint), "--select", "stability"],
             "give the run folder holding checkpoint_* folders, not one checkpoint", out)
    (tmp_path / "empty").mkdir()
    _refused(capsys, [*base, "--checkpoint", str(tmp_path / "empty"), "--select", "stability"],
             "no checkpoint_* folders with state.pt in", out)
    _refused(capsys, [*base, "--checkpoint", str(run), "--select", "stability", "--select-images", "4"],
             "--select-images must be >= 8, got 4", out)
