"""Preprocessing (none | l2 | pca-whiten), faiss k-means and nearest-centroid search.
Numpy in, numpy out."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import UserError

@dataclass
class Preprocess:
    """x -> ((x - mean) @ proj) then optional L2 normalisation. proj is (E, d)."""

    method: str
    mean: np.ndarray | None = None
    proj: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        if self.proj is not None:
            x = (x - self.mean) @ self.proj
        if self.method in ("l2", "pca-whiten"):
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)


def fit_preprocess(x: np.ndarray, method: str, pca_dim: int = 64, sample: int = 20000, seed: int = 0) -> Preprocess:
    """`pca-whiten` follows DeepCluster: PCA with eigen power -0.5, then L2. PCA is fit
    on a sample of at most 20k points: the covariance (E x E) from 20k rows matched a
    fit on all points, at a fraction of the cost."""
    if method not in ("none", "l2", "pca-whiten"):
        raise UserError(f"--preprocess must be none, l2 or pca-whiten, got '{method}'")
    if method != "pca-whiten":
        return Preprocess(method)
    rng = np.random.default_rng(seed)
    s = x[rng.choice(len(x), min(sample, len(x)), replace=False)].astype(np.float64)
    mean = s.mean(axis=0)
    cov = np.cov(s - mean, rowvar=False)  # (E, E)
    evals, evecs = np.linalg.eigh(cov)  # ascending
    d = min(pca_dim, x.shape[1], len(s) - 1)
    top = np.argsort(evals)[::-1][:d]
    proj = evecs[:, top] / np.sqrt(np.maximum(evals[top], 1e-8))  # whiten: eigen power -0.5
    return Preprocess(method, mean.astype(np.float32), proj.astype(np.float32))


# ---------------------------------------------------------------- k-means


def require_faiss() -> None:
    """faiss comes from one of two extras (they install the same `faiss` module, so never both):
    `cpu` (faiss-cpu) or `gpu` (faiss-gpu-cu12)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise UserError("faiss is not installed: pip install 'distgan[cpu]' (or 'distgan[gpu]' on CUDA nodes)") from None


def faiss_devices() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def kmeans(x: np.ndarray, k: int, niter: int = 20, nredo: int = 1, spherical: bool = False, seed: int = 0,
           gpu: bool | None = None, verbose: bool = False):
    """faiss.Kmeans on every GPU faiss sees (or CPU), trained on all rows of x.
    Returns the trained Kmeans (centroids (k, d), index for search)."""
    import faiss

    n, d = x.shape
    if k < 2 or k > n:
        raise UserError(f"k must be between 2 and the number of points ({n}), got {k}")
    ngpu = faiss_devices()
    use_gpu = ngpu > 0 if gpu is None else gpu
    km = faiss.Kmeans(
        d, k, niter=niter, nredo=nredo, spherical=spherical, seed=seed, gpu=use_gpu, verbose=verbose,
        max_points_per_centroid=(n + k - 1) // k + 1,  # train on every point given; sampling is the caller's choice
        min_points_per_centroid=1,
    )
    km.cp.check_input_data_for_NaNs = False  # callers check finiteness while they read (collect); a second pass costs ~10%
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km


def assign(km, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row of x with a trained faiss.Kmeans; see `search`."""
    return search(km.index, x)


def centroid_index(centroids: np.ndarray, spherical: bool, gpu: bool = False):
    """A flat faiss index over (k, d) centroids: inner product for spherical k-means (as
    faiss.Kmeans builds it), squared L2 otherwise; on every GPU faiss sees with `gpu`."""
    import faiss

    k, d = centroids.shape
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return faiss.index_cpu_to_all_gpus(index) if gpu else index


def search(index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (cluster (B,) int64, distance (B,) float32), smaller = nearer.
    The squared L2 distance; under spherical k-means the index is inner-product (it returns
    similarities, larger = nearer), so the distance is the squared L2 distance between the
    L2-normalised row and its unit centroid, 2 - 2 cos."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    dist, idx = index.search(x, 1)
    d = dist[:, 0]
    if index.metric_type == faiss.METRIC_INNER_PRODUCT:
        cos = d / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        d = np.maximum(2.0 - 2.0 * cos, 0.0).astype(np.float32)
    return idx[:, 0], d

