"""faiss vs scikit-learn k-means on the same 70,000 x 256 embeddings, k = 10 and
100, same iterations and initial centroids, timed in a fresh process that has not
imported torch (the state distgan's fit task runs in: a new worker process); and
faiss's nearest-centroid assignment at k = 10, 100 and 1000 as a fraction of the
float32 GEMM peak measured in the same process. Scale is in benchmarks/scale.py.

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
        x = embed_images(D, imgs, "multi", "gap")  # the 672-d global-average read-out these figures were taken with
        pre = fit_preprocess(x, "pca-whiten", 256)
        return pre(x), f"MNIST ({n}) untrained DCGAN D multi-layer features, PCA-whitened to 256-d"
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (100, 256)).astype(np.float32)
    x = centers[rng.integers(0, 100, n)] + rng.normal(0, 0.5, (n, 256)).astype(np.float32)
    return x, f"synthetic: {n} points around 100 Gaussian centres, 256-d (datasets folder absent)"


def faiss_kmeans(x, k, init):
    from distgan.cluster import kmeans

    t = time.perf_counter()
    km = kmeans(x, k, niter=NITER, seed=0, gpu=False)  # distgan's settings (every point, no NaN pass)
    secs_distgan = time.perf_counter() - t
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=NITER, seed=0, max_points_per_centroid=len(x), min_points_per_centroid=1)
    km.cp.check_input_data_for_NaNs = False
    t = time.perf_counter()
    km.train(x, init_centroids=init)  # the same initial centroids as scikit-learn
    secs = time.perf_counter() - t
    d, _ = km.index.search(x, 1)
    return secs, float(d.sum()), secs_distgan


def sklearn_kmeans(x, k, init):
    from sklearn.cluster import KMeans

    km = KMeans(k, init=init, n_init=1, max_iter=NITER, tol=0.0, algorithm="lloyd", random_state=0)
    t = time.perf_counter()
    km.fit(x)
    return time.perf_counter() - t, float(km.inertia_)


def fresh_process_timings(path: str, reps: int) -> dict:
    """Runs in a spawned child (no torch imported): k-means timings (best and spread over
    `reps`), assignment throughput and the GEMM peak, all in one process state."""
    from distgan.cluster import centroid_index, search

    x = np.load(path)
    peak = matmul_peak_gflops()
    out = {"peak": peak, "kmeans": [], "assign": []}
    for k in (10, 100):
        init = x[np.random.default_rng(0).choice(len(x), k, replace=False)]
        f, s, g = [], [], []
        for _ in range(reps):
            f_s, f_obj, g_s = faiss_kmeans(x, k, init.copy())
            s_s, s_obj = sklearn_kmeans(x, k, init.copy())
            f.append(f_s), s.append(s_s), g.append(g_s)
        out["kmeans"].append({"k": k, "faiss": f, "sklearn": s, "distgan": g, "objective ratio": f_obj / s_obj})
    for k in (10, 100, 1000):
        index = centroid_index(x[np.random.default_rng(1).choice(len(x), k, replace=False)], spherical=False)
        search(index, x[:4096])  # warm-up
        best = min(timed(search, index, x)[1] for _ in range(reps))
        out["assign"].append({"k": k, "points/s": len(x) / best, "GFLOP/s": 2 * len(x) * k * x.shape[1] / best / 1e9})
    return out


def main(argv=None):
    import multiprocessing as mp
    import tempfile

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    x, desc = embeddings_70k(args.quick)
    path = tempfile.mktemp(suffix=".npy")
    np.save(path, np.ascontiguousarray(x, dtype=np.float32))
    reps = 2 if args.quick else 3
    with mp.get_context("spawn").Pool(1) as pool:  # a fresh interpreter: torch never imported there
        r = pool.apply(fresh_process_timings, (path, reps))
    peak, rows = r["peak"], []
    for km in r["kmeans"]:
        k = km["k"]
        flops = 2.0 * len(x) * k * x.shape[1] * NITER  # the distance GEMM, per iteration
        f_s, s_s = min(km["faiss"]), min(km["sklearn"])
        rows.append({
            "points": len(x), "dim": x.shape[1], "k": k, "iterations": NITER,
            "faiss s (best)": f_s, "faiss s (max)": max(km["faiss"]), "sklearn s (best)": s_s,
            "sklearn s (max)": max(km["sklearn"]), "sklearn / faiss time": s_s / f_s,
            "distgan kmeans() s (best)": min(km["distgan"]), "faiss / sklearn objective": km["objective ratio"],
            "faiss % of GEMM peak": 100 * flops / f_s / 1e9 / peak, "sklearn % of GEMM peak": 100 * flops / s_s / 1e9 / peak,
        })
    notes = (f"Features: {desc}. Timed in a spawned process that never imported torch, best and worst of {reps}. "
             f"faiss and scikit-learn start from the same k random points and run exactly {NITER} Lloyd iterations "
             f"(sklearn tol=0); 'distgan kmeans()' is the function the fit task calls (faiss's own initialisation). "
             f"float32 GEMM peak measured in the same process: {peak:.0f} GFLOP/s (numpy, 2048^3). Objective = sum "
             "of squared distances to the nearest centroid; < 1 means faiss found the tighter clustering.")
    write_results("kmeans", rows, list(rows[0]), "python -m benchmarks.kmeans", notes, quick=args.quick)
    arows = [{"points": len(x), "dim": x.shape[1], **a, "% of GEMM peak": 100 * a["GFLOP/s"] / peak} for a in r["assign"]]
    write_results("kmeans_assign", arows, list(arows[0]), "python -m benchmarks.kmeans",
                  "faiss IndexFlatL2 search (k=1) of every point against k centroids, one process, faiss's OpenMP "
                  f"threads = the cores; best of {reps}. GEMM peak as above. At k = 10 the distance GEMM is too "
                  "thin to be compute-bound.", quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
