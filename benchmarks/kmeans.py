"""faiss vs scikit-learn k-means on the same 70,000 x 256 embeddings, k = 10 and
100, same iterations and initial centroids; achieved fraction of this machine's
float32 matmul peak; and how faiss time grows from 70k to 1M points (train on a
sample, assign all in streamed batches).

    python -m benchmarks.kmeans [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from .common import DATASETS, timed, write_results

NITER = 20


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(timed(np.matmul, a, a)[1] for _ in range(reps))
    return 2 * n**3 / best / 1e9


def embeddings_70k(quick: bool) -> tuple[np.ndarray, str]:
    """Real features when the datasets are here: MNIST (all 70k) through an untrained
    DCGAN D's multi-layer features, PCA-whitened to 256-d. Otherwise Gaussian blobs."""
    n = 20000 if quick else 70000
    if (DATASETS / "MNIST" / "raw").is_dir():
        import tempfile
        from pathlib import Path

        import torch

        from distgan import config as C
        from distgan.cluster import fit_preprocess
        from distgan.data import decode_images, prepare, read_arrays
        from distgan.embed import embed_images, recalibrate_batchnorm
        from distgan.models import build_discriminator

        torch.set_num_threads(2)
        tmp = Path(tempfile.mkdtemp(prefix="distgan-km-"))
        prepare("mnist", tmp / "m", data_root=DATASETS, progress=False)
        imgs = decode_images(read_arrays(tmp / "m", columns=("image",))["image"][:n], 32, 1)
        torch.manual_seed(0)
        D = build_discriminator(C.load(None, {"model.width": 96}).model)  # multi: 7 * 96 = 672-d
        recalibrate_batchnorm(D, imgs[:4096])
        x = embed_images(D, imgs, "multi")
        pre = fit_preprocess(x, "pca-whiten", 256)
        return pre(x), f"MNIST ({n}) untrained DCGAN D multi-layer features, PCA-whitened to 256-d"
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (100, 256)).astype(np.float32)
    x = centers[rng.integers(0, 100, n)] + rng.normal(0, 0.5, (n, 256)).astype(np.float32)
    return x, f"synthetic: {n} points around 100 Gaussian centres, 256-d (datasets folder absent)"


def faiss_kmeans(x, k, init):
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=NITER, seed=0, max_points_per_centroid=len(x), min_points_per_centroid=1)
    t = time.perf_counter()
    km.train(x, init_centroids=init)
    secs = time.perf_counter() - t
    d, _ = km.index.search(x, 1)
    return secs, float(d.sum())


def sklearn_kmeans(x, k, init):
    from sklearn.cluster import KMeans

    km = KMeans(k, init=init, n_init=1, max_iter=NITER, tol=0.0, algorithm="lloyd", random_state=0)
    t = time.perf_counter()
    km.fit(x)
    return time.perf_counter() - t, float(km.inertia_)


def scaling(x70: np.ndarray, sizes: list[int], k: int = 100, sample: int = 70000, batch: int = 100_000) -> list[dict]:
    """Points made by re-sampling the 70k set with small noise; train on `sample`, assign all in batches."""
    import faiss

    rng = np.random.default_rng(1)
    rows = []
    for n in sizes:
        km = faiss.Kmeans(x70.shape[1], k, niter=NITER, seed=0, max_points_per_centroid=sample, min_points_per_centroid=1)
        t = time.perf_counter()
        km.train(x70[rng.choice(len(x70), min(sample, len(x70)), replace=False)])
        train = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(0, n, batch):  # streamed: one batch of points exists at a time
            b = min(batch, n - i)
            pts = x70[rng.integers(0, len(x70), b)] + rng.normal(0, 0.01, (b, x70.shape[1])).astype(np.float32)
            km.index.search(pts, 1)
        assign = time.perf_counter() - t
        rows.append({"points": n, "k": k, "train s (70k sample)": train, "assign s (streamed)": assign,
                     "assign points/s": n / assign})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    x, desc = embeddings_70k(args.quick)
    x = np.ascontiguousarray(x, dtype=np.float32)
    peak = matmul_peak_gflops()
    rows = []
    for k in (10, 100):
        init = x[np.random.default_rng(0).choice(len(x), k, replace=False)]
        f_s, f_obj = faiss_kmeans(x, k, init.copy())
        s_s, s_obj = sklearn_kmeans(x, k, init.copy())
        flops = 2.0 * len(x) * k * x.shape[1] * NITER  # the distance GEMM, per iteration
        rows.append({
            "points": len(x), "dim": x.shape[1], "k": k, "iterations": NITER,
            "faiss s": f_s, "sklearn s": s_s, "sklearn / faiss time": s_s / f_s,
            "faiss / sklearn objective": f_obj / s_obj,
            "faiss % of matmul peak": 100 * flops / f_s / 1e9 / peak,
            "sklearn % of matmul peak": 100 * flops / s_s / 1e9 / peak,
        })
    notes = (f"Features: {desc}. Both start from the same k random points and run exactly {NITER} Lloyd iterations "
             f"(sklearn tol=0). float32 matmul peak measured in the same run: {peak:.0f} GFLOP/s (numpy, 2048^3). "
             "Objective = sum of squared distances to the nearest centroid; < 1 means faiss found the tighter clustering.")
    write_results("kmeans", rows, list(rows[0]), "python -m benchmarks.kmeans", notes, quick=args.quick)
    sizes = [70_000, 250_000] if args.quick else [70_000, 250_000, 1_000_000]
    srows = scaling(x, sizes)
    write_results("kmeans_scaling", srows, list(srows[0]), "python -m benchmarks.kmeans",
                  "faiss trains on a 70k sample, then assigns every point in batches of 100k (only one batch in memory).",
                  quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
