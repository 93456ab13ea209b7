"""What `--method balanced` (equal-size k-means) costs over plain faiss k-means, on the
10-d maps it runs on after UMAP: points around k Gaussian centres of unequal spread, for
k = 10, 100 and 1000 on as many points as `distgan cluster` fits on by default
(`default_sample`: 100,000 up to k = 390, then 256 per centroid); the balancing itself works on
`balance_sample` of them (at most BALANCE_CELLS / k). Both from the same k-means start (balanced_kmeans runs that
k-means first); best of `reps`, with the spread.

    python -m benchmarks.balanced [--quick]
"""
from __future__ import annotations

import argparse

import numpy as np

from .common import timed, write_results

KS = (10, 100, 1000)
QUICK = [(10, 20_000), (100, 20_000)]


def points(k: int, n: int, seed: int = 0) -> np.ndarray:
    """(n, 10) float32: k centres, each cluster's spread drawn from 0.3-1.5 (unequal, as
    UMAP's clusters are), sizes uniform at random."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (k, 10))
    spread = rng.uniform(0.3, 1.5, k)
    label = rng.integers(0, k, n)
    return (centres[label] + rng.normal(size=(n, 10)) * spread[label, None]).astype(np.float32)


def main(argv=None):
    from distgan.cluster import default_sample
    from distgan.cluster import fit as F

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    reps = 1 if args.quick else args.reps
    rows = []
    for k, n in QUICK if args.quick else [(k, default_sample(10**9, k)) for k in KS]:
        z = points(k, n)
        km = [timed(F.kmeans, z, k, 20, 1, seed=0)[1] for _ in range(reps)]
        runs = [timed(F.balanced_kmeans, z, k, 20, 1, seed=0) for _ in range(reps)]
        b, bal = runs[0][0], [t for _, t in runs]
        sizes = np.bincount(F.search(b, z)[0], minlength=k)
        rows.append({"k": k, "points": n, "balanced on": F.balance_sample(n, k),
                     "k-means s": min(km), "balanced s": min(bal), "spread s": max(bal) - min(bal),
                     "balanced / k-means": min(bal) / min(km), "Lloyd iterations": b.iterations,
                     "Sinkhorn sweeps": b.sweeps, "sizes (min-max) / (n/k)": f"{sizes.min() * k / n:.3f}-{sizes.max() * k / n:.3f}"})
        print(rows[-1], flush=True)
    notes = ("balanced s includes its k-means start (20 iterations, the k-means s column). The balancing's matrix is "
             "(balanced on) x k float32, twice. Sizes: the smallest and largest cluster of all points under the "
             "fitted offsets, over the equal share.")
    write_results("balanced", rows, list(rows[0]), "python -m benchmarks.balanced", notes, quick=args.quick)


if __name__ == "__main__":
    main()
