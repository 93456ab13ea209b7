"""Embedding quality on MNIST, Fashion-MNIST (all 70,000 images each) and the CIFAR-10 copy:
clustering (k = 10) and linear-probe accuracy of raw pixels, of a random-init D (the control),
and of Ds trained for a wall-clock budget with each objective, each through the chosen read-out
and the old global-average one, with and without the UMAP step, and on the UMAP map with k-means,
a Gaussian mixture (cluster.method gmm) or k-means held to equal cluster sizes (balanced).

One row (a dataset x a model) per call; rows accumulate in benchmarks/results/quality.json and
the table is rebuilt from all of them, so it can be filled over several sittings:

    python -m benchmarks.quality --dataset fashion-mnist --only pixels
    python -m benchmarks.quality --dataset fashion-mnist --only contrastive --minutes 10
    python -m benchmarks.quality --dataset fashion-mnist --only contrastive --minutes 30 --seed 1
    python -m benchmarks.quality --dataset fashion-mnist --only contrastive --checkpoint CKPT --method gmm
    python -m benchmarks.quality --dataset fashion-mnist --only contrastive --checkpoint CKPT --readout proj

Training runs through `distgan train`'s own loop (Ray Train, 1 worker) from the shipped config
of the dataset (jobs/configs), with objective.name set and train.minutes as the budget; steps
reached and wall time are reported. Clustering runs the functions `distgan cluster` runs
(fit_preprocess, fit_umap, faiss k-means or the mixture) in this process, on every point, for 3
seeds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import DATASETS, REPO, machine, machine_line, markdown_table, results_dir

ANCHORS = """Anchors (published, not measured here; ACC / NMI / ARI on all 70,000 images unless noted):
autoencoder + k-means: Fashion 0.606 / 0.637 / 0.474, MNIST 0.879 / 0.807 / 0.783; DEC: Fashion 0.618 / 0.651 / 0.494,
MNIST 0.912 / 0.869 / 0.856 (XifengGuo/DEC-keras, results/exp1); ClusterGAN (500k G steps, test split): Fashion
0.61 / 0.62 / 0.46, MNIST 0.91 / 0.85 / 0.83; N2D (autoencoder + UMAP + GMM): Fashion 0.672 / 0.684."""

CONFIGS = {"mnist": "dcgan_mnist.yaml", "fashion-mnist": "dcgan_fashion.yaml", "cifar10": "resnet_cifar10.yaml"}
MODELS = ("pixels", "random", "gan", "contrastive", "rotation", "autoencoder")
# read-out -> the preprocessing it is scored with; READOUTS, the default rows: the grid and the one
# distgan used before. `--readout proj` / `grid4-max+proj` score a contrastive D's projection head
# (alone, or beside the grid: the shipped MNIST / Fashion-MNIST read-out).
PREPROCESS = {"grid4-max": "pca", "gap": "pca-whiten", "proj": "pca", "grid4-max+proj": "pca"}
READOUTS = tuple((r, PREPROCESS[r]) for r in ("grid4-max", "gap"))
# (manifold, cluster.method): k-means on the features, k-means on the UMAP map, a mixture on it,
# equal-size k-means on it
VARIANTS = (("none", "kmeans"), ("umap", "kmeans"), ("umap", "gmm"), ("umap", "balanced"))
SEEDS = (0, 1, 2)
COLUMNS = ["dataset", "model", "train", "read-out", "manifold", "method", "acc", "nmi", "ari", "probe acc"]


def cluster_scores(x: np.ndarray, y: np.ndarray, preprocess: str, manifold: str, seed: int, pca_dim: int = 64,
                   method: str = "kmeans") -> dict:
    """What `distgan cluster`'s fit computes (fit_sample), in this process and on every point:
    preprocessing and UMAP fitted on a sample, faiss k-means (k = 10, restarts as the CLI's
    default: 50 on the UMAP map, else 1) or the Gaussian mixture, then every point's cluster
    against its label."""
    from distgan.cluster import clustering_metrics, fit_sample, search

    _, km, z = fit_sample(x, 10, preprocess, min(pca_dim, x.shape[1]), niter=50, seed=seed, manifold=manifold,
                          method=method)
    c, _ = search(km.index, z)
    return clustering_metrics(y, c)


def evaluate(x: np.ndarray, a: dict, preprocess: str, manifold: str, method: str = "kmeans") -> dict:
    from distgan.cluster import array_features, linear_probe

    runs = [cluster_scores(x, a["label"], preprocess, manifold, s, method=method) for s in SEEDS]
    out = {}
    for key in ("acc", "nmi", "ari"):
        v = np.array([r[key] for r in runs])
        out[key], out[f"{key}_std"] = float(v.mean()), float(v.std())
    feats = array_features(a["id"], a["label"], a["split"], x, "x")
    out["probe acc"] = float(linear_probe(feats, max_train=20000)["accuracy"])
    return out


def train(dataset: str, data: Path, model: str, minutes: float, seed: int, tmp: Path,
          sets: list[str] = ()) -> tuple[str, dict]:
    """A checkpoint of `model` (random: step 0) and what training reached."""
    from distgan import config as C
    from distgan.train import resolve_data, run_training, save_untrained_checkpoint

    over = {"data.path": str(data), "train.seed": seed, "train.steps": 10**7, "train.minutes": float(minutes),
            "train.checkpoint_every": 10**7, "train.log_every": 50, "train.max_failures": 0}
    if model != "random":
        over["objective.name"] = model
    over |= C.parse_overrides(list(sets))
    cfg = resolve_data(C.load(REPO / "jobs" / "configs" / CONFIGS[dataset], over))
    if model == "random":
        return save_untrained_checkpoint(cfg, tmp / "control"), {"steps": 0, "minutes": 0.0}
    t = time.perf_counter()
    r = run_training(cfg, storage=str(tmp / "runs"), name=model)
    return r.checkpoint, {"steps": r.step, "minutes": round((time.perf_counter() - t) / 60, 1)}


RECIPE = ("model", "loss", "objective", "optim")  # what a row trained with, beside data.batch_size


def recipe(cfg: dict) -> str:
    """A short digest of the training recipe in a checkpoint's config: two rows whose --set
    flags read the same but whose shipped config differed (a default changed between sittings)
    stay two rows."""
    r = {k: cfg[k] for k in RECIPE} | {"batch_size": cfg["data"]["batch_size"]}
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:8]


def run_row(dataset: str, model: str, minutes: float, seed: int, sets: list[str] = (),
            checkpoint: str | None = None, methods: tuple[str, ...] = ("kmeans", "gmm"),
            readouts: tuple[tuple[str, str], ...] = READOUTS) -> list[dict]:
    from distgan.data import decode_images, init_ray, prepare, read_arrays, read_manifest
    from distgan.embed import embed_images, load_embedder

    tmp = Path(tempfile.mkdtemp(prefix="distgan-quality-"))
    data = tmp / dataset
    prepare(dataset, data, data_root=DATASETS, progress=False)
    a = read_arrays(data)
    a["label"] = a["label"].astype(np.int64)
    rows = []
    base = {"dataset": dataset, "model": model, "seed": seed}
    variants = [v for v in VARIANTS if v[1] in methods]
    if model == "pixels":
        m = read_manifest(data)
        x = decode_images(a["image"], m["resolution"], m["channels"]).reshape(len(a["id"]), -1).astype(np.float32) / 255
        for manifold, method in variants:
            rows.append({**base, "train": "-", "read-out": f"{x.shape[1]} pixels", "preprocess": "pca",
                         "manifold": manifold, "method": method, **evaluate(x, a, "pca", manifold, method)})
            print(rows[-1], flush=True)
        return rows
    if checkpoint:  # scored again (e.g. after a clustering change): the checkpoint a row trained
        ckpt, reached = checkpoint, {}
    else:
        init_ray()
        ckpt, reached = train(dataset, data, model, minutes, seed, tmp, sets)
    D, state = load_embedder(ckpt, data)
    reached["steps"] = int(state["step"])
    m = state["config"]["model"]
    images = decode_images(a["image"], m["resolution"], m["channels"])
    label = "random init" if model == "random" else f"{minutes:g} min, {reached['steps']} steps, seed {seed}"
    label += "".join(f", {s}" for s in sets)
    if model != "random":
        base["recipe"] = recipe(state["config"])
        label += f", recipe {base['recipe']}"
    for readout, preprocess in readouts:
        x = embed_images(D, images, "multi", readout, batch_size=256)
        for manifold, method in variants:
            rows.append({**base, "train": label, "steps": reached["steps"], "minutes": minutes, "wall minutes": reached.get("minutes"),
                         "read-out": f"{readout} ({x.shape[1]}-d), {preprocess}", "preprocess": preprocess,
                         "manifold": manifold, "method": method, **evaluate(x, a, preprocess, manifold, method)})
            print(rows[-1], flush=True)
    return rows


def _key(r: dict) -> tuple:
    return (r["dataset"], r["model"], r.get("minutes", 0), r.get("seed", 0), r.get("sets", ""), r.get("recipe", ""),
            r["read-out"].split(" ")[0], r["manifold"], r.get("method", "kmeans"))


def write_table(rows: list[dict], command: str) -> str:
    out = results_dir(False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    order = {m: i for i, m in enumerate(MODELS)}
    rows = sorted(rows, key=lambda r: (r["dataset"], order.get(r["model"], 9), r.get("minutes", 0), r.get("seed", 0),
                                       r["read-out"], r["manifold"], r.get("method", "kmeans")))
    shown = [{"method": "kmeans", **r, **{k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k in ("acc", "nmi", "ari")}} for r in rows]
    machines = sorted({r["machine"] for r in rows})
    md = ("### quality\n\nMachine(s): " + "; ".join(machines) + f"  \nCommand: `{command}` (one row per call)\n\n"
          + markdown_table(shown, COLUMNS)
          + "\nACC / NMI / ARI: mean ± std over k-means seeds 0, 1, 2 (faiss, k = 10, 50 iterations, every point); "
            "PCA to 64-d fitted on 20k points; UMAP to 10-d fitted on 20k points, every point placed by its 15 "
            "nearest sample points (UMAP refitted with each seed, so the spread includes it), k-means on the UMAP map "
            "keeps the lowest objective of 50 restarts (the CLI's default there); gmm: scikit-learn's full-covariance "
            "Gaussian mixture on the UMAP map (k-means++ starts, best of 3, fitted on 20k points), each point in its "
            "most probable component; balanced: the k-means on the UMAP map, then held to equal cluster sizes "
            "(cluster.method balanced). Probe: logistic regression on 20,000 train-split images, accuracy on the test "
            "split.\n\n" + ANCHORS + "\n")
    (out / "quality.md").write_text(md)
    return md


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality")
    p.add_argument("--dataset", choices=list(CONFIGS), default="fashion-mnist")
    p.add_argument("--only", choices=MODELS, help="the model of this row (default: pixels)")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget in wall-clock minutes")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override of the row's training")
    p.add_argument("--checkpoint", help="score this checkpoint (trained by an earlier call with the same flags) instead of training")
    p.add_argument("--method", choices=("kmeans", "gmm", "balanced"), action="append",
                   help="score only these clusterings (default: kmeans and gmm; gmm and balanced run on the UMAP map only)")
    p.add_argument("--readout", choices=list(PREPROCESS), action="append",
                   help="score only these read-outs (default: grid4-max and gap; proj: a contrastive D's projection head)")
    p.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks --quick`: does nothing here")
    args = p.parse_args(argv)
    if args.quick:
        print("quality: no quick mode (each row trains for minutes); run rows with --only")
        return []
    if not (DATASETS / "MNIST" / "raw").is_dir():
        print(f"datasets not found at {DATASETS}; set DISTGAN_DATASETS")
        return []
    import torch

    torch.set_num_threads(2)
    model = args.only or "pixels"
    readouts = tuple((r, PREPROCESS[r]) for r in args.readout) if args.readout else READOUTS
    new = run_row(args.dataset, model, args.minutes, args.seed, args.set, args.checkpoint,
                  tuple(args.method or ("kmeans", "gmm")), readouts)
    m = machine_line(machine())
    for r in new:
        r["machine"], r["sets"] = m, " ".join(args.set)
    path = results_dir(False) / "quality.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    old = [r for r in old if "model" in r]  # rows of this benchmark's earlier layout (before objectives) are dropped
    keys = {_key(r) for r in new}
    rows = [r for r in old if _key(r) not in keys] + new
    print(write_table(rows, "python -m benchmarks.quality --dataset D --only MODEL [--minutes M] [--seed S]"))
    return new


if __name__ == "__main__":
    main()
