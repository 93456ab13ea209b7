"""Label-free criteria of an embedding's cluster structure: what chooses a model, a checkpoint
and k when the images have no labels (README, Choosing without labels). Computed in the
space k-means runs in (after preprocessing and the manifold step), on a sample.

- `stability` (Ben-Hur, Elisseeff & Guyon, PSB 2002; Lange, Roth, Braun & Buhmann, Neural
  Computation 2004): k-means on two random halves of the sample, each with its own seed,
  labels the points the halves share; the adjusted Rand index between the two labelings of
  that overlap, averaged over `pairs` pairs. ARI is chance-corrected, so structureless data
  scores near 0 at every k, and clusters that are really there score near 1.
- `silhouette` (Rousseeuw 1987), scikit-learn's, on at most `sample` points.
- `davies_bouldin` (Davies & Bouldin 1979), scikit-learn's: lower is better.
Numpy in, floats out."""
from __future__ import annotations

import numpy as np

from ..config import UserError

# criterion -> the direction that is better ("max" | "min"); the eval metrics are eval/<name>
CRITERIA = {"stability": "max", "silhouette": "max", "davies_bouldin": "min"}
CRITERIA_SAMPLE = 5000  # points the criteria look at: silhouette is O(n^2), stability runs 2 * pairs k-means
# MiB of pairwise distances silhouette computes at once (scikit-learn's working_memory, 1024 by
# default): on 10,000 x 256 points (k = 1000) the whole 10k x 10k matrix at once lifted the fit
# task's peak by 484 MiB and took 1.99 s; in 64 MiB chunks +35 MiB and 1.19 s, same score.
SILHOUETTE_MEMORY_MIB = 64


def check_criterion(name: str) -> str:
    if name not in CRITERIA:
        raise UserError(f"criterion must be one of {', '.join(CRITERIA)}, got '{name}'")
    return name


def stability(x: np.ndarray, k: int, pairs: int = 5, seed: int = 0, niter: int = 20, spherical: bool = False) -> float:
    """Mean ARI of k-means labelings of two random halves of x (N, d), on their overlap (~N/4)."""
    from sklearn.metrics import adjusted_rand_score

    from .fit import kmeans, search

    n = len(x)
    half = n // 2
    if half < 2 * k:
        raise UserError(f"stability needs at least {4 * k} points for k={k}, got {n}")
    rng = np.random.default_rng(seed)
    scores = []
    for p in range(pairs):
        labels = []
        for side in range(2):
            idx = np.sort(rng.choice(n, half, replace=False))
            lab = np.full(n, -1, np.int64)
            # k-means++ seeding: faiss's random start merges well-separated clusters often enough
            # to make real structure look unstable (blobs at the true k: 0.44 random, 0.99 k-means++)
            km = kmeans(x[idx], k, niter=niter, spherical=spherical, seed=seed * 1000 + 2 * p + side, plusplus=True)
            lab[idx] = search(km.index, x[idx])[0]
            labels.append(lab)
        both = (labels[0] >= 0) & (labels[1] >= 0)
        scores.append(adjusted_rand_score(labels[0][both], labels[1][both]))
    return float(np.mean(scores))


def criteria(x: np.ndarray, clusters: np.ndarray, k: int, seed: int = 0, sample: int = CRITERIA_SAMPLE,
             spherical: bool = False) -> dict:
    """Every criterion of one clustering: x (N, d) the points in k-means space, clusters (N,)
    their assignment (k clusters). At most `sample` points (drawn with `seed`) are looked at."""
    from sklearn import config_context
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    if len(x) > sample:
        take = np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))
        x, clusters = x[take], clusters[take]
    # too few points to halve (fewer than 4 per cluster): no stability, not an error
    out = {"stability": stability(x, k, seed=seed, spherical=spherical) if len(x) >= 4 * k else float("nan")}
    if len(np.unique(clusters)) < 2:  # all in one cluster: silhouette and DB are undefined
        return out | {"silhouette": float("nan"), "davies_bouldin": float("nan")}
    metric = "cosine" if spherical else "euclidean"
    with config_context(working_memory=SILHOUETTE_MEMORY_MIB):
        silhouette = float(silhouette_score(x, clusters, metric=metric))
    return out | {"silhouette": silhouette, "davies_bouldin": float(davies_bouldin_score(x, clusters))}


def best(rows: list[dict], criterion: str) -> dict:
    """The row (one per k, or per model) whose `criterion` is best; NaN never wins."""
    ok = [r for r in rows if np.isfinite(r[criterion])]
    if not ok:
        raise UserError(f"no clustering has a finite {criterion}")
    sign = 1 if CRITERIA[criterion] == "max" else -1
    return max(ok, key=lambda r: sign * r[criterion])
