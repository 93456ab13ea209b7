"""The UMAP step's settings against clustering quality, on one trained D: how many points
UMAP is fitted on, its n_neighbors, the PCA width before it and the map's width, and the
read-out before them, each scored like a quality row (read-out, PCA, UMAP, faiss k-means
keeping the best of 50 restarts, 3 seeds with UMAP refitted per seed). The first grid point
and read-out are the shipped setting.

    python -m benchmarks.umap_grid --checkpoint CKPT --dataset fashion-mnist \\
        [--grid 20000x15x64x10,70000x15x64x10,...] [--readouts multi:grid4-max,multi:grid2-max,...]

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
    """What `distgan cluster`'s fit does with --manifold umap (fit_sample: PCA, UMAP, k-means
    with the manifold's 50 restarts), with the four settings given, scored on every point."""
    from distgan.cluster import clustering_metrics, fit_sample, search

    _, km, z = fit_sample(x, 10, "pca", pca_dim, niter=50, seed=seed, manifold="umap", manifold_dim=dim,
                          umap_options={"sample": sample, "neighbours": neighbours})
    return clustering_metrics(y, search(km.index, z)[0])


def _key(r: dict) -> tuple:
    return tuple(r.get(c) for c in ("dataset", "steps", "read-out", "UMAP fitted on", "n_neighbors", "PCA dims", "UMAP dims"))


def merged(new: list[dict]) -> list[dict]:
    """Earlier rows of benchmarks/results/umap_grid.json plus `new` (which replace equal keys)."""
    import json

    from .common import results_dir

    path = results_dir(False) / "umap_grid.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    for r in old:  # rows from before the read-out column: the default read-out at width 32
        r.setdefault("read-out", "multi grid4-max (3584-d)")
    keys = {_key(r) for r in new}
    return [{c: r[c] for c in new[0]} for r in old if _key(r) not in keys] + new


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.umap_grid")
    p.add_argument("--checkpoint", help="a trained distgan checkpoint (required for a run)")
    p.add_argument("--dataset", default="fashion-mnist", choices=("mnist", "fashion-mnist", "cifar10"))
    p.add_argument("--grid", default=GRID, help="comma list of SAMPLExNEIGHBOURSxPCAxDIM")
    p.add_argument("--readouts", default="multi:grid4-max",
                   help="comma list of FEATURES:READOUT (features multi|last, read-out gap|gridG-max|gridG-avg); "
                        "each is scored at every grid point")
    p.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks --quick`: does nothing here")
    args = p.parse_args(argv)
    specs = parse_grid(args.grid)
    readouts = [tuple(r.strip().split(":", 1)) for r in args.readouts.split(",")]
    if any(len(r) != 2 for r in readouts):
        raise SystemExit(f"--readouts: '{args.readouts}' is not a comma list of FEATURES:READOUT")
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
    images = decode_images(a["image"], m["resolution"], m["channels"])
    y = a["label"].astype(np.int64)
    rows = []
    for features, readout in readouts:
        x = embed_images(D, images, features, readout, batch_size=256)
        for sample, neighbours, pca_dim, dim in specs:
            t = time.perf_counter()
            runs = [score(x, y, sample, neighbours, pca_dim, dim, s) for s in SEEDS]
            row = {"dataset": args.dataset, "steps": int(state["step"]), "read-out": f"{features} {readout} ({x.shape[1]}-d)",
                   "UMAP fitted on": min(sample, len(x)), "n_neighbors": neighbours, "PCA dims": pca_dim, "UMAP dims": dim}
            for key in ("acc", "nmi", "ari"):
                v = np.array([r[key] for r in runs])
                row[key] = f"{v.mean():.3f} ± {v.std():.3f}"
            row["seconds per seed"] = (time.perf_counter() - t) / len(SEEDS)
            rows.append(row)
            print(row, flush=True)
    rows = merged(rows)  # rows of earlier calls (another read-out, another D) stay in the table
    write_results("umap_grid", rows, list(rows[0]), "python -m benchmarks.umap_grid --checkpoint CKPT --dataset "
                  f"{args.dataset}",
                  f"One D ({state['step']} steps, {Path(args.checkpoint).name}); the read-out given, PCA fitted on 20k "
                  "points, UMAP (min_dist 0) fitted on the given number of points and every point placed by its 15 "
                  "nearest fitted points, faiss k-means (k = 10, 50 iterations, best of 50 restarts); mean ± std over "
                  f"seeds {SEEDS} (PCA sample, UMAP and k-means all reseeded). distgan's setting: multi grid4-max, "
                  "20000 x 15 x 64 x 10.")
    return rows


if __name__ == "__main__":
    main()
