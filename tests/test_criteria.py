"""Label-free criteria (cluster/criteria.py), the k sweep of `distgan cluster` and `--k` parsing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import davies_bouldin_score, silhouette_score

import distgan.cluster as K
from distgan.cluster.criteria import best, criteria, stability
from distgan.cluster.sweep import sweep_k
from distgan.config import UserError, parse_ks


def _blobs(k: int, n_per: int = 150, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, (k, d))
    x = np.concatenate([c + rng.normal(0, 0.5, (n_per, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


@pytest.mark.parametrize("k", [4, 8])
def test_stability_is_one_on_separated_blobs_and_falls_on_noise(k):
    x, _ = _blobs(k, seed=k)
    assert stability(x, k) > 0.99  # every half finds the same blobs
    noise = np.random.default_rng(k).uniform(size=(len(x), 8)).astype(np.float32)
    assert stability(noise, k) < 0.5  # halves cut a uniform cube differently (measured ~0.18)
    assert stability(x, 2 * k) < 0.9  # too many clusters: the blobs are split differently per half


def test_stability_refuses_too_few_points_and_criteria_reports_nan():
    x, _ = _blobs(4, n_per=3)
    with pytest.raises(UserError, match="stability needs at least 40 points for k=10"):
        stability(x, 10)
    c = K.search(K.kmeans(x, 10, niter=5).index, x)[0]
    assert np.isnan(criteria(x, c, 10)["stability"])


def test_silhouette_and_davies_bouldin_are_scikit_learns_on_the_drawn_sample(monkeypatch):
    import distgan.cluster.criteria as crit

    # silhouette's distances in chunks of 1 MiB (~130 of the 1,000 rows each), not one block
    monkeypatch.setattr(crit, "SILHOUETTE_MEMORY_MIB", 1)
    x, _ = _blobs(5, n_per=200, seed=3)
    c = K.search(K.kmeans(x, 5, niter=20, nredo=5).index, x)[0]
    got = criteria(x, c, 5, seed=7, sample=400)
    take = np.sort(np.random.default_rng(7).choice(len(x), 400, replace=False))  # the documented draw
    assert got["silhouette"] == pytest.approx(silhouette_score(x[take], c[take]), rel=1e-6)
    assert got["davies_bouldin"] == pytest.approx(davies_bouldin_score(x[take], c[take]), rel=1e-6)
    whole = criteria(x, c, 5, sample=len(x))
    assert whole["silhouette"] == pytest.approx(silhouette_score(x, c), rel=1e-6)


def test_best_follows_each_criterions_direction_and_skips_nan():
    rows = [{"k": 3, "stability": 0.5, "davies_bouldin": 0.9}, {"k": 5, "stability": float("nan"), "davies_bouldin": 0.4},
            {"k": 7, "stability": 0.8, "davies_bouldin": 1.2}]
    assert best(rows, "stability")["k"] == 7 and best(rows, "davies_bouldin")["k"] == 5
    with pytest.raises(UserError, match="no clustering has a finite stability"):
        best([{"k": 2, "stability": float("nan")}], "stability")


@pytest.mark.parametrize("spec,ks", [("10", [10]), ("20,5,10,5", [5, 10, 20]), ("4:12:4", [4, 8, 12]), ("3:5", [3, 4, 5]),
                                     (7, [7])])
def test_parse_ks(spec, ks):
    assert parse_ks(spec) == ks


@pytest.mark.parametrize("spec,msg", [("1", ">= 2"), ("2,x", "must be a number"), ("4:40:0", "must be a number"),
                                      ("9:3", "is empty"), ("1:2:3:4", "must be a number")])
def test_parse_ks_refuses(spec, msg):
    with pytest.raises(UserError, match=msg):
        parse_ks(spec)


@pytest.mark.parametrize("true_k", [4, 8])
def test_k_sweep_suggests_the_true_k_and_writes_its_outputs(ray_running, tmp_path, true_k):
    x, y = _blobs(true_k, seed=true_k)
    feats = K.array_features(np.arange(len(x)), y, np.array(["train"] * len(x)), x, "blobs", batch_rows=97)
    out = tmp_path / "sweep"
    ks = [2, 3, 4, 6, 8, 12] if true_k == 4 else [4, 6, 8, 12]
    s = sweep_k(feats, str(out), ks, "stability", all_k=true_k == 8, preprocess="none", nredo=10, actors=1,
                progress=False)
    assert s["suggested_k"] == true_k, s["table"]
    assert json.loads((out / "k_sweep.json").read_text())["suggested_k"] == true_k
    table = pd.read_csv(out / "k_sweep.csv")
    assert list(table["k"]) == ks and {"stability", "silhouette", "davies_bouldin"} <= set(table)
    assert (out / "k_sweep.png").read_bytes()[:4] == b"\x89PNG"
    where = out / f"k{true_k}" if true_k == 8 else out  # all_k: one folder per k
    m = json.loads((where / "metrics.json").read_text())
    assert m["k"] == true_k and m["acc"] > 0.99 and m["criteria"]["stability"] > 0.99
    assert 0 < m["seconds_criteria"] < m["seconds_fit"]  # timed inside the fit task, which also ran k-means
    assert m["seconds_assign"] > 0
    assert len(pd.read_parquet(where / "assignments")) == len(x)
    if true_k == 8:
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["k12", "k4", "k6", "k8"]


# ---------------------------------------------------------------- embed --select


def _run_of(root, checkpoint, steps, seeds=None):
    """A run folder holding checkpoint_<step> folders made from one checkpoint's state; with
    seeds, each D re-initialised from its own seed (so their embeddings differ)."""
    import torch

    from distgan import config as C
    from distgan.models import build_discriminator

    state = torch.load(Path(checkpoint) / "state.pt", weights_only=True)
    run = root / "run"
    for i, s in enumerate(steps):
        d = run / f"checkpoint_{s:07d}"
        d.mkdir(parents=True)
        st = {**state, "step": s}
        if seeds is not None:
            torch.manual_seed(seeds[i])
            full = C.from_dict(state["config"])
            st["D"] = build_discriminator(full.model, full.objective.name).state_dict()
        torch.save(st, d / "state.pt")
    return run


@pytest.mark.parametrize("criterion,scores,pick", [
    ("stability", {0: 0.5, 5: 0.9, 10: 0.7}, 5),        # higher is better: not the latest
    ("davies_bouldin", {0: 1.2, 5: 0.8, 10: 0.9}, 5),   # lower is better
    ("davies_bouldin", {0: 0.3, 5: 0.8, 10: 0.9}, 0),
    ("silhouette", {0: 0.2, 5: 0.4, 10: 0.4}, 10),      # a tie goes to the later checkpoint
])
def test_select_checkpoint_follows_the_criterions_direction(monkeypatch, fake_dir, untrained_checkpoint, tmp_path,
                                                            criterion, scores, pick):
    import distgan.evaluate as E
    import distgan.models as M

    run = _run_of(tmp_path, untrained_checkpoint, sorted(scores))
    loaded = []
    real_load = M.load_state
    monkeypatch.setattr(M, "load_state", lambda p: loaded.append(real_load(p)) or loaded[-1])
    # the score of the checkpoint just loaded; every criterion gets it, NaN-free
    monkeypatch.setattr(E, "embedding_criteria", lambda emb, k, cl, labels=None: {
        name: scores[loaded[-1]["step"]] for name in ("stability", "silhouette", "davies_bouldin")})
    sel = E.select_checkpoint(str(run), str(fake_dir), criterion, "multi", "grid4-max", images=64, progress=False)
    assert sel["step"] == pick and sel["checkpoint"].endswith(f"checkpoint_{pick:07d}")
    assert [r["step"] for r in sel["table"]] == sorted(scores) and sel["value"] == scores[pick]


def test_embed_select_embeds_with_the_chosen_checkpoint_and_records_why(ray_running, capsys, fake_dir,
                                                                        untrained_checkpoint, tmp_path):
    from distgan.cli import main

    run = _run_of(tmp_path, untrained_checkpoint, [0, 5, 10], seeds=[0, 1, 2])
    out = tmp_path / "emb"
    code = main(["embed", "--checkpoint", str(run), "--data", str(fake_dir), "--out", str(out),
                 "--select", "silhouette", "--select-images", "200"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    m = json.loads((out / "embeddings.json").read_text())
    sel = m["selection"]
    assert len(sel["table"]) == 3 and sel["criterion"] == "silhouette" and sel["images"] == 200
    values = [r["silhouette"] for r in sel["table"]]
    assert len(set(values)) == 3  # three different Ds, three different scores
    chosen = sel["table"][int(np.argmax(values))]
    assert m["checkpoint"] == chosen["checkpoint"] and m["step"] == chosen["step"]  # embedded with it
    assert f"selected checkpoint_{chosen['step']:07d} (step {chosen['step']}): silhouette" in printed
    assert "the highest of 3 checkpoints" in printed
