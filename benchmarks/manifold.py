"""What `--manifold umap` costs: UMAP's fit on its sample (20,000 points), and the per-point
placement every assignment actor runs (a faiss search among the fitted points + a weighted
mean), against the nearest-centroid search the actors run anyway (k = 1000), on the same
synthetic 64-d L2-normalised points (what `--preprocess pca` hands on), in one process.

    python -m benchmarks.manifold [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from .common import write_results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.manifold")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    import faiss

    from distgan.cluster import centroid_index, kmeans, search
    from distgan.cluster.fit import Preprocess
    from distgan.cluster.manifold import MANIFOLD_SAMPLE, fit_umap

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    n, d, k = (50_000 if args.quick else 1_000_000), 64, 1000
    centres = rng.normal(size=(100, d)).astype(np.float32)
    x = centres[rng.integers(0, 100, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = []
    t = time.perf_counter()
    fit_umap(x[:2000], 10, 0)  # numba compiles UMAP's kernels once per process: not part of the fit
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    anchors, coords = fit_umap(x, 10, 0)
    fit_s = time.perf_counter() - t
    pre = Preprocess("none", anchors=anchors, coords=coords)
    block = 65_536
    t = time.perf_counter()
    placed = np.concatenate([pre(x[i : i + block]) for i in range(0, n, block)])
    place_s = time.perf_counter() - t
    index = centroid_index(np.asarray(kmeans(x[:200_000], k, niter=5).centroids), spherical=False)
    t = time.perf_counter()
    for i in range(0, n, block):
        search(index, x[i : i + block])
    search_s = time.perf_counter() - t
    cent10 = centroid_index(np.asarray(kmeans(placed[:200_000], 10, niter=20).centroids), spherical=False)
    t = time.perf_counter()
    for i in range(0, n, block):
        search(cent10, placed[i : i + block])
    search10_s = time.perf_counter() - t
    rows.append({"step": f"UMAP fit on {min(n, MANIFOLD_SAMPLE)} points (after {compile_s:.0f} s of one-off numba compilation)",
                 "seconds": fit_s, "points/s": float("nan")})
    rows.append({"step": f"placement of {n} points (15-NN among {len(anchors)} fitted points)", "seconds": place_s,
                 "points/s": n / place_s})
    rows.append({"step": f"nearest centroid, k = {k}, 64-d (what assignment does anyway)", "seconds": search_s,
                 "points/s": n / search_s})
    rows.append({"step": "nearest centroid, k = 10, on the 10-d UMAP coordinates", "seconds": search10_s,
                 "points/s": n / search10_s})
    notes = (f"Placement / k = {k} search time: {place_s / search_s:.2f}x. One process, 2 faiss threads; in "
             "`distgan cluster` the placement runs inside each assignment actor, so it scales with the actors.")
    write_results("manifold", rows, ["step", "seconds", "points/s"], "python -m benchmarks.manifold", notes,
                  quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
