"""The UMAP step's settings against clustering quality, on one trained D: how many points
UMAP is fitted on, its n_neighbors, the PCA width before it and the map's width, each
scored like a quality row (grid4-max read-out, PCA, UMAP, faiss k-means keeping the best of
50 restarts, 3 seeds with UMAP refitted per seed). The first spec is the shipped setting.

    python -m benchmarks.umap_grid --checkpoint CKPT --dataset fashion-mnist \\
        [--grid 20000x15x64x10,70000x15x64x10,...]

CKPT: e.g. a checkpoint `python -m benchmarks.quality --only contrastive` trained (its runs/
folder under the temporary directory it prints). Quality only; the step's cost is in
benchmarks/manifold.py.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import DATASETS, write_results

# sample x n_neighbors x PCA dims x UMAP dims; the first is distgan's setting
GRID = "20000x15x64x10,70000x15x64x10,10000x15x64x10,20000x30x64x10,20000x50x64x10,40000x30x64x10," \
       "20000x30x32x10,20000x30x128x10,20000x30x64x5"
SEEDS = (0, 1, 2)


def parse_grid(text: str) -> list[tuple[int, int, int, int]]:
    specs = []
    for spec in text.split(","):
        parts = spec.strip().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--grid: '{spec}' is not SAMPLExNEIGHBOURSxPCAxDIM (positive integers)")
        specs.append(tuple(int(p) for p in parts))
    return specs


def score(x: np.ndarray, y: np.ndarray, sample: int, neighbours: int, pca_dim: int, dim: int, seed: int) -> dict:
    """What fit_sample does with cluster.manifold umap, with the four settings given."""
    from distgan.cluster import clustering_metrics, fit_preprocess, kmeans, search
    from distgan.cluster.fit import MANIFOLD_NREDO
    from distgan.cluster.manifold import fit_umap

    pre = fit_preprocess(x, "pca", pca_dim, seed=seed)
    pre.anchors, pre.coords = fit_umap(pre(x), dim, seed, sample=sample, neighbours=neighbours)
    z = pre(x)  # (N, dim): every point placed by its nearest fitted points
    km = kmeans(z, 10, niter=50, nredo=MANIFOLD_NREDO, seed=seed)
    return clustering_metrics(y, search(km.index, z)[0])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.umap_grid")
    p.add_argument("--checkpoint", help="a trained distgan checkpoint (required for a run)")
    p.add_argument("--dataset", default="fashion-mnist", choices=("mnist", "fashion-mnist", "cifar10"))
    p.add_argument("--grid", default=GRID, help="comma list of SAMPLExNEIGHBOURSxPCAxDIM")
    p.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks --quick`: does nothing here")
    args = p.parse_args(argv)
    specs = parse_grid(args.grid)
    if args.quick or not args.checkpoint:
        print("umap_grid: needs --checkpoint (a trained D); nothing run")
        return []
    import torch

    from distgan.data import decode_images, prepare, read_arrays
    from distgan.embed import embed_images, load_embedder

    torch.set_num_threads(2)
    data = Path(tempfile.mkdtemp(prefix="distgan-umap-grid-")) / args.dataset
    prepare(args.dataset, data, data_root=DATASETS, progress=False)
    a = read_arrays(data)
    D, state = load_embedder(args.checkpoint, data)
    m = state["config"]["model"]
    x = embed_images(D, decode_images(a["image"], m["resolution"], m["channels"]), "multi", "grid4-max", batch_size=256)
    y = a["label"].astype(np.int64)
    rows = []
    for sample, neighbours, pca_dim, dim in specs:
        t = time.perf_counter()
        runs = [score(x, y, sample, neighbours, pca_dim, dim, s) for s in SEEDS]
        row = {"dataset": args.dataset, "steps": int(state["step"]), "UMAP fitted on": min(sample, len(x)),
               "n_neighbors": neighbours, "PCA dims": pca_dim, "UMAP dims": dim}
        for key in ("acc", "nmi", "ari"):
            v = np.array([r[key] for r in runs])
            row[key] = f"{v.mean():.3f} ± {v.std():.3f}"
        row["seconds per seed"] = (time.perf_counter() - t) / len(SEEDS)
        rows.append(row)
        print(row, flush=True)
    write_results("umap_grid", rows, list(rows[0]), "python -m benchmarks.umap_grid --checkpoint CKPT --dataset "
                  f"{args.dataset}",
                  f"One D ({state['step']} steps, {Path(args.checkpoint).name}); grid4-max read-out, PCA fitted on 20k "
                  "points, UMAP (min_dist 0) fitted on the given number of points and every point placed by its 15 "
                  "nearest fitted points, faiss k-means (k = 10, 50 iterations, best of 50 restarts); mean ± std over "
                  f"seeds {SEEDS} (PCA sample, UMAP and k-means all reseeded). First row: distgan's setting.")
    return rows


if __name__ == "__main__":
    main()
