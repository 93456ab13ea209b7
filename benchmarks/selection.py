"""Does a label-free criterion choose models and k the way labels would? (README, Choosing
without labels.)

For one dataset (MNIST or Fashion-MNIST, all 70,000 images prepared), short trainings of each
objective and loss (random init, plain GAN with hinge and with the non-saturating loss,
contrastive, rotation, autoencoder; `--minutes` each, through `distgan train`'s loop), each
read out two ways (grid4-max, gap): 12 configurations. For each:

- the label-free criteria as `distgan embed --select` computes them (evaluate.select's
  embed_held_out + embedding_criteria: BatchNorm re-estimated and the cluster section of the
  shipped config -- PCA, UMAP, k-means restarts -- on `--images` images, k = 10, no labels);
- the true NMI: the same recipe fitted on the 10,000 test-split images, against their labels.

Printed per dataset: the Spearman rank correlation between each criterion (sign turned for
Davies-Bouldin, where lower is better) and the true NMI over the configurations (the issue's
target: >= 0.7), the configuration each criterion would choose and its true NMI; then
`distgan cluster --k LIST`'s sweep (sweep_k, the CLI's code) on the test-split embeddings of
the configuration the default criterion chose: the k each criterion suggests (the true 10
should be within 5..20).

    python -m benchmarks.selection --dataset mnist --minutes 2
    python -m benchmarks.selection --dataset fashion-mnist --minutes 2

Rows accumulate per dataset in benchmarks/results/selection.json (a dataset's call replaces
that dataset's rows). `--workdir DIR` keeps the trainings there and a second call with the same
DIR re-scores them instead of training again.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import DATASETS, machine, machine_line, markdown_table, results_dir
from .quality import train

# (name, objective for quality.train, config overrides): short trainings, one per objective/loss
TRAININGS = (
    ("random", "random", []),
    ("gan hinge", "gan", []),
    ("gan ns", "gan", ["loss.name=ns"]),
    ("contrastive", "contrastive", []),
    ("rotation", "rotation", []),
    ("autoencoder", "autoencoder", []),
)
READOUTS = ("grid4-max", "gap")
KS = [4, 6, 8, 10, 12, 15, 20, 25, 30, 40]  # what a user who does not know k might sweep
DEFAULT_CRITERION = "stability"
COLUMNS = ["dataset", "config", "steps", "stability", "silhouette", "davies_bouldin", "true nmi"]


def _score(D, cl, x_sel: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, readout: str) -> tuple[dict, np.ndarray]:
    """Label-free criteria on the selection sample (no labels) and the true NMI on the test split."""
    from distgan.cluster import clustering_metrics, fit_sample, search
    from distgan.evaluate import embed_held_out, embedding_criteria

    crit = embedding_criteria(embed_held_out(D, x_sel, "multi", readout), 10, cl)
    emb = embed_held_out(D, x_test, "multi", readout)  # (10000, E)
    _, km, z = fit_sample(emb, 10, cl.preprocess, min(cl.pca_dim, emb.shape[1]), cl.niter, cl.nredo, cl.spherical,
                          seed=0, manifold=cl.manifold, manifold_dim=cl.manifold_dim)
    crit["true nmi"] = clustering_metrics(y_test, search(km.index, z)[0])["nmi"]
    return crit, emb


def run_dataset(dataset: str, minutes: float, images: int, workdir: Path) -> dict:
    from scipy.stats import spearmanr

    from distgan import config as C
    from distgan.cluster import array_features
    from distgan.cluster.criteria import CRITERIA, best
    from distgan.cluster.sweep import sweep_k
    from distgan.data import decode_images, init_ray, prepare, read_arrays, read_manifest, sample_rows
    from distgan.embed import load_embedder

    data = workdir / dataset
    if not (data / "dataset.json").is_file():
        prepare(dataset, data, data_root=DATASETS, progress=False)
    m = read_manifest(data)
    test = read_arrays(data, split="test")
    x_test = decode_images(test["image"], m["resolution"], m["channels"])
    y_test = test["label"].astype(np.int64)
    x_sel, _ = sample_rows(data, images, seed=1)  # the labels are not looked at
    init_ray()
    rows, embs = [], {}
    for name, model, sets in TRAININGS:
        where = workdir / name.replace(" ", "-")
        done = sorted(where.glob("runs/*/checkpoint_*")) or sorted(where.glob("control"))
        if done:
            ckpt = str(done[-1])
        else:
            t = time.perf_counter()
            ckpt, _ = train(dataset, data, model, minutes, 0, where, sets)
            print(f"{name}: trained in {(time.perf_counter() - t) / 60:.1f} min -> {ckpt}", flush=True)
        D, state = load_embedder(ckpt, data)
        cl = C.from_dict(state["config"]).cluster
        for readout in READOUTS:
            t = time.perf_counter()
            scores, emb = _score(D, cl, x_sel, x_test, y_test, readout)
            label = f"{name}, {readout}"
            embs[label] = emb
            rows.append({"dataset": dataset, "config": label, "steps": int(state["step"]), "minutes": minutes,
                         **scores, "seconds": round(time.perf_counter() - t, 1)})
            print(rows[-1], flush=True)
    summary = {"dataset": dataset, "images": images, "configs": len(rows), "spearman": {}, "chosen": {}}
    for crit, direction in CRITERIA.items():
        sign = 1 if direction == "max" else -1
        rho = spearmanr([sign * r[crit] for r in rows], [r["true nmi"] for r in rows]).statistic
        pick = best(rows, crit)
        summary["spearman"][crit] = float(rho)
        summary["chosen"][crit] = {"config": pick["config"], "true nmi": pick["true nmi"]}
    summary["best true nmi"] = max(rows, key=lambda r: r["true nmi"])["config"]
    # k without labels: the CLI's sweep on the configuration the default criterion chose
    chosen = summary["chosen"][DEFAULT_CRITERION]["config"]
    x = embs[chosen]
    feats = array_features(test["id"], test["label"], test["split"], x, f"{chosen} embeddings")
    cl = C.from_dict(state["config"]).cluster
    s = sweep_k(feats, str(workdir / f"sweep-{dataset}"), KS, DEFAULT_CRITERION, preprocess=cl.preprocess,
                pca_dim=min(cl.pca_dim, x.shape[1]), niter=cl.niter, nredo=cl.nredo, manifold=cl.manifold,
                manifold_dim=cl.manifold_dim, overwrite=True, progress=False)
    summary["k sweep"] = {"config": chosen, "ks": KS, "table": s["table"],
                          "suggested": {c: best(s["table"], c)["k"] for c in CRITERIA}}
    return {"rows": rows, "summary": summary}


def _spearman(rows: list[dict], criterion: str) -> float:
    from scipy.stats import spearmanr

    from distgan.cluster.criteria import CRITERIA

    sign = 1 if CRITERIA[criterion] == "max" else -1
    return float(spearmanr([sign * r[criterion] for r in rows], [r["true nmi"] for r in rows]).statistic)


def spearman_interval(rows: list[dict], criterion: str, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5-95% interval of the Spearman correlation over bootstrap resamples of the configurations:
    how much the figure depends on which configurations were in the sweep."""
    from scipy.stats import spearmanr

    from distgan.cluster.criteria import CRITERIA

    sign = 1 if CRITERIA[criterion] == "max" else -1
    c = np.array([sign * r[criterion] for r in rows])
    t = np.array([r["true nmi"] for r in rows])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(rows), len(rows))
        if len(np.unique(c[i])) > 2 and len(np.unique(t[i])) > 2:
            vals.append(spearmanr(c[i], t[i]).statistic)
    return float(np.percentile(vals, 5)), float(np.percentile(vals, 95))


def write_table(results: dict, command: str) -> str:
    out = results_dir(False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps(results, indent=2))
    md = [f"### selection\n\nMachine(s): {'; '.join(sorted({r['machine'] for r in results.values()}))}  \n"
          f"Command: `{command}`\n"]
    for dataset, r in sorted(results.items()):
        s = r["summary"]
        md.append(f"\n**{dataset}** ({s['configs']} configurations, {r['rows'][0]['minutes']:g}-minute trainings; "
                  f"criteria on {s['images']} images without labels, true NMI on the 10,000 test images)\n\n")
        md.append(markdown_table([{**x, "true nmi": x["true nmi"]} for x in r["rows"]], COLUMNS))
        md.append("\n| criterion | Spearman vs true NMI | 5-95% (bootstrap of configurations) | within grid4-max rows "
                  "| chooses | its true NMI | k suggested |\n|---|---|---|---|---|---|---|\n")
        for c, rho in s["spearman"].items():
            ch = s["chosen"][c]
            lo, hi = spearman_interval(r["rows"], c)
            grid = [x for x in r["rows"] if x["config"].endswith("grid4-max")]
            md.append(f"| {c} | {rho:.2f} | {lo:.2f} to {hi:.2f} | {_spearman(grid, c):.2f} | {ch['config']} | {ch['true nmi']:.3f} "
                      f"| {s['k sweep']['suggested'][c]} |\n")
        md.append(f"\nBest true NMI: {s['best true nmi']}. k sweep over {s['k sweep']['ks']} on the test-split "
                  f"embeddings of {s['k sweep']['config']} (the {DEFAULT_CRITERION} choice).\n")
    md.append("\nk sweep (criteria per k on the chosen configuration's test-split embeddings):\n\n")
    for dataset, r in sorted(results.items()):
        md.append(f"\n{dataset}:\n\n" + markdown_table(r["summary"]["k sweep"]["table"],
                                                       ["k", "stability", "silhouette", "davies_bouldin"]))
    text = "".join(md)
    (out / "selection.md").write_text(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.selection")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="fashion-mnist")
    p.add_argument("--minutes", type=float, default=2.0, help="training budget of each configuration")
    p.add_argument("--images", type=int, default=5000, help="images the label-free criteria look at")
    p.add_argument("--workdir", help="keep trainings here; a second call with it re-scores them")
    p.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks --quick`: does nothing here")
    args = p.parse_args(argv)
    if args.quick:
        print("selection: no quick mode (each configuration trains for minutes)")
        return {}
    if not (DATASETS / "MNIST" / "raw").is_dir():
        print(f"datasets not found at {DATASETS}; set DISTGAN_DATASETS")
        return {}
    import torch

    torch.set_num_threads(2)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="distgan-selection-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_line(machine())}; work in {workdir}", flush=True)
    new = run_dataset(args.dataset, args.minutes, args.images, workdir)
    new["machine"] = machine_line(machine())
    path = results_dir(False) / "selection.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.dataset] = new
    print(write_table(results, "python -m benchmarks.selection --dataset D --minutes 2"))
    return new


if __name__ == "__main__":
    main()
