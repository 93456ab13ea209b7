"""faiss vs scikit-learn k-means on the same 70,000 x 256 embeddings, k = 10 and
100, same iterations and initial centroids, timed in a fresh process that has not
imported torch (the state distgan's fit task runs in: a new worker process); and
faiss's nearest-centroid assignment at k = 10, 100 and 1000 as a fraction of the
float32 GEMM peak measured in the same process; and faiss's two flat-search paths (BLAS
blocks, the direct SIMD loop) forced one at a time over k, where distgan's distance_path
switches. Scale is in benchmarks/scale.py.

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


def faiss_kmeans(x, k, init, setting: bool):
    """faiss.Kmeans from `init`, with faiss's own distance-path setting or distgan's
    (`distance_path`: the direct loop below 16 centroids). (seconds, objective, iterations)."""
    import contextlib

    import faiss

    from distgan.cluster import distance_path

    km = faiss.Kmeans(x.shape[1], k, niter=NITER, seed=0, max_points_per_centroid=len(x), min_points_per_centroid=1)
    km.cp.check_input_data_for_NaNs = False
    with distance_path(k) if setting else contextlib.nullcontext():
        t = time.perf_counter()
        km.train(x, init_centroids=init)  # the same initial centroids as scikit-learn
        secs = time.perf_counter() - t
    d, _ = km.index.search(x, 1)
    return secs, float(d.sum()), len(km.iteration_stats)


def distgan_kmeans(x, k):
    from distgan.cluster import kmeans

    t = time.perf_counter()
    kmeans(x, k, niter=NITER, seed=0, gpu=False)  # what the fit task calls: its own random start
    return time.perf_counter() - t


def sklearn_kmeans(x, k, init):
    from sklearn.cluster import KMeans

    km = KMeans(k, init=init, n_init=1, max_iter=NITER, tol=0.0, algorithm="lloyd", random_state=0)
    t = time.perf_counter()
    km.fit(x)
    return time.perf_counter() - t, float(km.inertia_), int(km.n_iter_)


PATH_KS = (8, 10, 12, 14, 16, 20, 32, 100)


def distance_paths(x: np.ndarray, reps: int) -> list[dict]:
    """faiss's two flat-search paths, each forced, for a range of k and two batch sizes: where
    the direct loop stops beating BLAS is where distance_path switches (DIRECT_BELOW_K)."""
    import faiss

    from distgan.cluster import centroid_index
    from distgan.cluster.fit import FAISS_DIRECT

    rows, old = [], faiss.cvar.distance_compute_blas_threshold
    try:
        for n in (8192, len(x)):
            for k in PATH_KS:
                index = centroid_index(x[np.random.default_rng(2).choice(len(x), k, replace=False)], spherical=False)
                ms = {}
                for name, threshold in (("direct", FAISS_DIRECT), ("BLAS", 0)):
                    faiss.cvar.distance_compute_blas_threshold = threshold
                    index.search(x[:1024], 1)  # warm-up
                    ms[name] = 1e3 * min(timed(index.search, x[:n], 1)[1] for _ in range(max(reps, 5)))
                rows.append({"rows": n, "k": k, "direct ms": ms["direct"], "BLAS ms": ms["BLAS"],
                             "BLAS / direct time": ms["BLAS"] / ms["direct"]})
    finally:
        faiss.cvar.distance_compute_blas_threshold = old
    return rows


def fresh_process_timings(path: str, reps: int) -> dict:
    """Runs in a spawned child (no torch imported): k-means timings (best and spread over
    `reps`), assignment throughput and the GEMM peak, all in one process state."""
    from distgan.cluster import centroid_index, search

    x = np.load(path)
    peak = matmul_peak_gflops()
    out = {"peak": peak, "kmeans": [], "assign": [], "paths": distance_paths(x, reps)}
    for k in (10, 100):
        init = x[np.random.default_rng(0).choice(len(x), k, replace=False)]
        f, t, s, g = [], [], [], []
        for _ in range(reps):  # interleaved, so drift in the machine's speed hits every column alike
            f_s, f_obj, f_it = faiss_kmeans(x, k, init.copy(), setting=False)
            t_s, t_obj, t_it = faiss_kmeans(x, k, init.copy(), setting=True)
            s_s, s_obj, s_it = sklearn_kmeans(x, k, init.copy())
            f.append(f_s), t.append(t_s), s.append(s_s), g.append(distgan_kmeans(x, k))
        out["kmeans"].append({"k": k, "faiss": f, "tuned": t, "sklearn": s, "distgan": g, "objective ratio": t_obj / s_obj,
                              "iterations": (f_it, t_it, s_it)})
    for k in (10, 100, 1000):
        index = centroid_index(x[np.random.default_rng(1).choice(len(x), k, replace=False)], spherical=False)
        search(index, x[:4096])  # warm-up
        best = min(timed(search, index, x)[1] for _ in range(reps))  # distgan's search (its distance path)
        plain = min(timed(index.search, x, 1)[1] for _ in range(reps))  # faiss's own setting
        out["assign"].append({"k": k, "points/s": len(x) / best, "faiss default points/s": len(x) / plain,
                              "GFLOP/s": 2 * len(x) * k * x.shape[1] / best / 1e9})
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
        f_it, t_it, s_it = km["iterations"]
        flops = 2.0 * len(x) * k * x.shape[1]  # the distance GEMM of one iteration
        f_s, t_s, s_s = min(km["faiss"]), min(km["tuned"]), min(km["sklearn"])
        rows.append({
            "points": len(x), "dim": x.shape[1], "k": k, "iterations faiss / sklearn": f"{t_it} / {s_it}",
            "faiss default s (best)": f_s, "faiss distgan s (best)": t_s, "faiss distgan s (max)": max(km["tuned"]),
            "sklearn s (best)": s_s, "sklearn s (max)": max(km["sklearn"]),
            "sklearn / faiss default time": s_s / f_s, "sklearn / faiss distgan time": s_s / t_s,
            "distgan kmeans() s (best)": min(km["distgan"]), "faiss / sklearn objective": km["objective ratio"],
            "faiss distgan % of GEMM peak": 100 * flops * t_it / t_s / 1e9 / peak,
            "sklearn % of GEMM peak": 100 * flops * s_it / s_s / 1e9 / peak,
        })
    notes = (f"Features: {desc}. Timed in a spawned process that never imported torch, best and worst of {reps}. "
             f"faiss and scikit-learn start from the same k random points and run at most {NITER} Lloyd iterations "
             "(sklearn tol=0; both stop early once the assignment no longer changes, so the iterations each ran "
             "are shown and the GEMM share counts them). 'faiss default' is faiss with its own settings, 'faiss "
             "distgan' with distgan's distance path (the direct loop below 16 centroids, `distance_path`); "
             "'distgan kmeans()' is the function the fit task calls (its own random start). "
             f"float32 GEMM peak measured in the same process: {peak:.0f} GFLOP/s (numpy, 2048^3). Objective = sum "
             "of squared distances to the nearest centroid; < 1 means faiss found the tighter clustering.")
    write_results("kmeans", rows, list(rows[0]), "python -m benchmarks.kmeans", notes, quick=args.quick)
    arows = [{"points": len(x), "dim": x.shape[1], **a, "% of GEMM peak": 100 * a["GFLOP/s"] / peak} for a in r["assign"]]
    write_results("kmeans_assign", arows, list(arows[0]), "python -m benchmarks.kmeans",
                  "distgan's `search` (faiss IndexFlatL2, k=1, with distgan's distance path) of every point against k "
                  "centroids, beside faiss's own setting; one process, faiss's OpenMP threads = the cores; best of "
                  f"{reps}. GEMM peak as above. At k = 10 the distance GEMM is too thin to be compute-bound: "
                  "distgan takes faiss's direct loop there.", quick=args.quick)
    write_results("kmeans_paths", r["paths"], list(r["paths"][0]), "python -m benchmarks.kmeans",
                  "faiss IndexFlatL2 search (k=1) of the first ROWS points against k centroids with each of faiss's "
                  "two paths forced (distance_compute_blas_threshold out of reach = the direct SIMD loop; 0 = BLAS "
                  f"blocks), best of {max(reps, 5)}, one process. distgan takes the direct loop below "
                  "DIRECT_BELOW_K = 16 centroids (distance_path).", quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
