"""A manifold step before k-means (cluster.manifold = umap), as N2D does it (McConville et
al., 2020: autoencoder features -> UMAP -> clustering): UMAP is fitted on a sample of at most
MANIFOLD_SAMPLE points, and every point is then placed by its nearest sample points (faiss),
at the distance-weighted mean of their UMAP coordinates, the way UMAP's own `transform`
initialises new points. That placement is one faiss search per block inside the assignment
actors, so it streams at the actors' speed and needs nothing but two arrays (saved in
preprocess.npz, no pickled model)."""
from __future__ import annotations

import numpy as np

MANIFOLD_SAMPLE = 20_000  # UMAP's fit is superlinear; 20k points gave N2D-level quality (README)
NEIGHBOURS = 15  # UMAP's n_neighbors, and the sample points that place a new point


def fit_umap(x: np.ndarray, dim: int, seed: int = 0, sample: int = MANIFOLD_SAMPLE,
             neighbours: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """(anchors (S, d), coords (S, dim)): a sample of x and its UMAP embedding. min_dist 0 packs
    clusters tightly (UMAP's advice for clustering)."""
    import umap

    rng = np.random.default_rng(seed)
    anchors = np.ascontiguousarray(x[np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))], np.float32)
    reducer = umap.UMAP(n_components=dim, n_neighbors=neighbours, min_dist=0.0, random_state=seed, n_jobs=1)
    coords = reducer.fit_transform(anchors).astype(np.float32)
    return anchors, coords


def place(index, coords: np.ndarray, x: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """(B, d) -> (B, m): each row at the weighted mean of its k nearest anchors' coordinates;
    weights exp(-(d_j - d_1) / sigma) with sigma the row's mean neighbour distance spread, so a
    point that is an anchor (d_1 = 0) lands next to where UMAP put it."""
    dist, idx = index.search(np.ascontiguousarray(x, np.float32), min(k, index.ntotal))  # squared L2, (B, k)
    dist = np.sqrt(np.maximum(dist, 0))
    rel = dist - dist[:, :1]
    sigma = np.maximum(rel.mean(axis=1, keepdims=True), 1e-6)
    w = np.exp(-rel / sigma)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("bk,bkm->bm", w, coords[idx]).astype(np.float32)
