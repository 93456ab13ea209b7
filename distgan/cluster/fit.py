"""Preprocessing (none | l2 | pca | pca-whiten, then optionally a manifold), faiss k-means and nearest-centroid search.
Numpy in, numpy out."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..config import UserError

@dataclass
class Preprocess:
    """x (B, E) -> ((x - mean) @ proj) (B, d), L2-normalised for l2 / pca / pca-whiten, then
    optionally placed on a manifold (B, m) fitted on a sample (manifold.py: `anchors` (S, d)
    are sample points after the steps before, `coords` (S, m) their UMAP coordinates)."""

    method: str
    mean: np.ndarray | None = None
    proj: np.ndarray | None = None
    anchors: np.ndarray | None = None
    coords: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        if self.proj is not None:
            x = (x - self.mean) @ self.proj
        if self.method in NORMALISED:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.anchors is not None:
            from .manifold import place

            if getattr(self, "_index", None) is None:  # built once per process (an actor), never pickled
                import faiss

                self._index = faiss.IndexFlatL2(self.anchors.shape[1])
                self._index.add(self.anchors)
            x = place(self._index, self.coords, x)
        return x

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_index"}

    def arrays(self) -> dict:
        """What preprocess.npz holds (plain arrays, loaded with allow_pickle=False)."""
        return {k: v for k, v in (("mean", self.mean), ("proj", self.proj), ("anchors", self.anchors),
                                  ("coords", self.coords)) if v is not None}

    @classmethod
    def from_arrays(cls, z) -> "Preprocess":
        """The inverse of `arrays` (plus the method): a loaded preprocess.npz, or any mapping."""
        return cls(str(z["method"]), *(z[n] if n in z else None for n in ("mean", "proj", "anchors", "coords")))


METHODS = ("none", "l2", "pca", "pca-whiten")
NORMALISED = ("l2", "pca", "pca-whiten")


def fit_preprocess(x: np.ndarray, method: str, pca_dim: int = 64, sample: int = 20000, seed: int = 0) -> Preprocess:
    """`pca`: PCA to pca_dim, then L2. `pca-whiten` follows DeepCluster: PCA with eigen power
    -0.5, then L2 (whitening measured worse on the spatial read-outs: README, Embedding quality).
    Fitted by scikit-learn's PCA (covariance eigendecomposition for narrow features, randomized
    SVD for wide ones such as a 7,168-d grid read-out) on a sample of at most 20k points."""
    if method not in METHODS:
        raise UserError(f"--preprocess must be one of {', '.join(METHODS)}, got '{method}'")
    if not method.startswith("pca"):
        return Preprocess(method)
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    s = x[np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))].astype(np.float32)
    d = min(pca_dim, x.shape[1], len(s) - 1)
    pca = PCA(n_components=d, whiten=method == "pca-whiten", random_state=seed).fit(s)
    proj = pca.components_.T  # (E, d)
    if method == "pca-whiten":
        proj = proj / np.sqrt(np.maximum(pca.explained_variance_, 1e-8))  # eigen power -0.5
    return Preprocess(method, pca.mean_.astype(np.float32), np.ascontiguousarray(proj, np.float32))


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


MANIFOLD_NREDO = 50


def restarts(nredo: int, manifold: str) -> int:
    """k-means restarts, 0 = auto: 50 on a manifold map, else 1. On a UMAP map (10-d) the
    clusters are tight and far apart, and one random start often merges two of them and
    splits another (MNIST, 3 seeds: ACC 0.46-0.87 with 1 start, one seed still at 0.83 with
    10, 0.966 +- 0.001 keeping the lowest objective of 50; README). 50 restarts on 100k
    10-d points take ~14 s on 2 cores."""
    return nredo or (MANIFOLD_NREDO if manifold != "none" else 1)


DIRECT_BELOW_K = 16  # fewer centroids than this: faiss's direct distance loop, not its BLAS path
FAISS_DIRECT = 2**31 - 1  # a blas threshold no search reaches


@contextmanager
def distance_path(k: int):
    """faiss's CPU flat search has two paths: one GEMM (BLAS) per block, or a direct SIMD loop
    over the centroids per point. With few centroids the GEMM is too thin to pay: on 70,000 x
    256 the direct loop finds the nearest of 10 centroids in 9 ms against BLAS's 14 ms, and
    from 16 centroids up BLAS wins (100: 33 vs 92 ms; benchmarks/kmeans.py, kmeans_paths). faiss chooses by
    a process-wide threshold (distance_compute_blas_threshold), not by k, so k-means training
    and assignment set it for their k here and put it back."""
    import faiss

    old = faiss.cvar.distance_compute_blas_threshold
    if k < DIRECT_BELOW_K:
        faiss.cvar.distance_compute_blas_threshold = FAISS_DIRECT
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def kmeans(x: np.ndarray, k: int, niter: int = 20, nredo: int = 1, spherical: bool = False, seed: int = 0,
           gpu: bool | None = None, verbose: bool = False, plusplus: bool = False):
    """faiss.Kmeans on every GPU faiss sees (or CPU), trained on all rows of x.
    Returns the trained Kmeans (centroids (k, d), index for search). faiss starts from k random
    points; `plusplus` starts from scikit-learn's k-means++ seeding instead (one start, nredo
    ignored; O(n k d) more work, for small samples: the stability criterion's halves)."""
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
    x = np.ascontiguousarray(x, dtype=np.float32)
    init = None
    if plusplus:
        from sklearn.cluster import kmeans_plusplus

        km.cp.nredo = 1
        init = np.ascontiguousarray(kmeans_plusplus(x, k, random_state=seed)[0], dtype=np.float32)
    with distance_path(k):
        km.train(x, init_centroids=init)
    return km


# ---------------------------------------------------------------- Gaussian mixture

MIXTURE_SAMPLE = 20_000  # points the mixture's EM runs on (the UMAP fit's own sample size)
MIXTURE_MAX_DIM = 64  # full covariances: d^2 parameters per component


@dataclass
class Mixture:
    """A full-covariance Gaussian mixture over the space the centroids live in (cluster.method
    = gmm, as N2D clusters its UMAP map). means (k, d) are the centroids; prec_chol (k, d, d) the
    Cholesky factors of each component's precision (scikit-learn's precisions_cholesky_);
    log_weights (k,). Plain arrays: saved in preprocess.npz, nothing pickled. It is its own
    `index`: `search(mixture, x)` assigns like `search(faiss_index, x)`."""

    means: np.ndarray
    prec_chol: np.ndarray
    log_weights: np.ndarray

    @property
    def centroids(self) -> np.ndarray:
        return self.means

    @property
    def index(self) -> "Mixture":
        return self

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, d) -> (component of highest posterior (B,) int64, that component's squared
        Mahalanobis distance (B,) float32: 0 at its mean, what the montage orders by)."""
        x = np.asarray(x, np.float64)
        k, d = self.means.shape
        maha = np.empty((len(x), k))
        for j in range(k):  # (B, d) @ (d, d) per component: O(B k d^2), small for a manifold's d
            y = (x - self.means[j]) @ self.prec_chol[j]
            maha[:, j] = np.einsum("bd,bd->b", y, y)
        log_det = np.log(np.diagonal(self.prec_chol, axis1=1, axis2=2)).sum(axis=1)  # (k,) = -0.5 log|cov|
        joint = self.log_weights + log_det - 0.5 * (d * np.log(2 * np.pi) + maha)  # (B, k) log w_j + log N(x | j)
        c = joint.argmax(axis=1)
        return c.astype(np.int64), maha[np.arange(len(x)), c].astype(np.float32)

    def arrays(self) -> dict:
        return {"gmm_prec_chol": self.prec_chol, "gmm_log_weights": self.log_weights}


def gaussian_mixture(z: np.ndarray, k: int, seed: int = 0, n_init: int = 3) -> Mixture:
    """scikit-learn's GaussianMixture (full covariances, k-means++ starts, the best of n_init)
    on at most MIXTURE_SAMPLE points of z (N, d). reg_covar 1e-3: UMAP packs clusters tightly
    (min_dist 0), and the default 1e-6 lets a component collapse onto a few points."""
    from sklearn.mixture import GaussianMixture

    n, d = z.shape
    if k < 2 or k > n:
        raise UserError(f"k must be between 2 and the number of points ({n}), got {k}")
    rng = np.random.default_rng(seed)
    s = z[np.sort(rng.choice(n, min(MIXTURE_SAMPLE, n), replace=False))] if n > MIXTURE_SAMPLE else z
    gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-3, n_init=n_init, init_params="k-means++",
                         max_iter=200, random_state=seed).fit(s)
    return Mixture(gm.means_.astype(np.float32), gm.precisions_cholesky_.astype(np.float64),
                   np.log(gm.weights_).astype(np.float64))

# ---------------------------------------------------------------- equal-size clusters

BALANCE_CELLS = 50_000_000  # the (points x k) matrix the balancing holds: at most this many float32s (three copies at peak)
BALANCE_EPS = 0.05  # entropic regularisation, as a fraction of the median squared distance to a centroid
BALANCE_ITER = 30  # Lloyd iterations after the k-means start
BALANCE_SWEEPS = (100, 20)  # Sinkhorn sweeps at most: from zero potentials, then warm-started per Lloyd iteration
BALANCE_TOL = 1e-3  # ... stopping sooner once no column potential moves more than this (log units: shares within 0.1%)


@dataclass
class Balanced:
    """k-means held to equal cluster sizes (cluster.method balanced). centroids (k, d); offsets
    (k,) in squared-distance units: a point goes to argmin_j |x - c_j|^2 - offsets[j], the
    assignment the balancing converged to, so every point is placed as the fit placed its
    sample. Plain arrays (preprocess.npz); it is its own `index`, like Mixture."""

    centroids: np.ndarray
    offsets: np.ndarray
    iterations: int = 0  # Lloyd iterations the fit ran (not saved: what benchmarks/balanced.py reports)
    sweeps: int = 0  # Sinkhorn sweeps over all of them

    @property
    def index(self) -> "Balanced":
        return self

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, d) -> (cluster (B,) int64, squared L2 distance to its centroid (B,) float32).
        One faiss search: with c'_j = [c_j, sqrt(m - offsets[j])] (m = max offset) and x' = [x, 0],
        |x' - c'_j|^2 = |x - c_j|^2 - offsets[j] + m, whose argmin is the offset rule."""
        import faiss

        if getattr(self, "_index", None) is None:  # built once per process (an actor), never pickled
            shift = (self.offsets.max() - self.offsets).astype(np.float64)
            self._shift = shift.astype(np.float32)
            aug = np.hstack([self.centroids.astype(np.float64), np.sqrt(shift)[:, None]])
            self._index = faiss.IndexFlatL2(aug.shape[1])
            self._index.add(np.ascontiguousarray(aug, dtype=np.float32))
        x = np.ascontiguousarray(np.hstack([x, np.zeros((len(x), 1), x.dtype)]), dtype=np.float32)
        with distance_path(len(self.centroids)):
            dist, idx = self._index.search(x, 1)
        c = idx[:, 0]
        return c, np.maximum(dist[:, 0] - self._shift[c], 0).astype(np.float32)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_index", "_shift")}

    def arrays(self) -> dict:
        return {"balanced_offsets": self.offsets}


def _lse(a: np.ndarray, axis: int) -> np.ndarray:
    """log-sum-exp of a float32 (m, k) along axis, in place (a is overwritten): no temporaries
    of a's size (scipy's logsumexp makes several, in float64). Sums in float64."""
    mx = a.max(axis=axis, keepdims=True)
    a -= mx
    np.exp(a, out=a)
    return np.log(a.sum(axis=axis, dtype=np.float64)) + mx.squeeze(axis)


def sinkhorn_potentials(logits: np.ndarray, v: np.ndarray, sweeps: int = BALANCE_SWEEPS[0],
                        tol: float = BALANCE_TOL, threads: int = 1) -> tuple[np.ndarray, int]:
    """Column potentials v (k,) of the entropic transport of m points onto k equal shares:
    logits (m, k) float32 = -cost / eps; the plan is exp(logits + u[:, None] + v[None]) with every
    row summing to 1 and every column to m / k. Log-domain Sinkhorn sweeps from the given v
    (a warm start) until v moves less than tol, at most `sweeps`. Returns (v, sweeps run); a
    point's cluster is argmax_j logits[i, j] + v[j]. `threads` row blocks are swept at once
    (numpy releases the GIL): each block's rows, and its part of every column's sum."""
    from concurrent.futures import ThreadPoolExecutor

    from scipy.special import logsumexp

    m, k = logits.shape
    log_share = np.log(m / k)
    bounds = np.linspace(0, m, max(1, min(threads, m // 1024 or 1)) + 1).astype(int)
    blocks = [(logits[i:j], np.empty((j - i, k), np.float32)) for i, j in zip(bounds[:-1], bounds[1:])]
    v = np.asarray(v, np.float64)

    def sweep_block(block, v32):  # -> (k,) this block's log column sums after its rows are normalised
        lg, buf = block
        np.add(lg, v32[None], out=buf)
        u = -_lse(buf, axis=1)  # its rows sum to 1
        np.add(lg, u[:, None].astype(np.float32), out=buf)
        return _lse(buf, axis=0)

    with ThreadPoolExecutor(len(blocks)) as pool:
        for i in range(1, sweeps + 1):
            v32 = v.astype(np.float32)
            parts = np.stack(list(pool.map(sweep_block, blocks, [v32] * len(blocks))))  # (blocks, k)
            new = log_share - logsumexp(parts, axis=0)  # columns sum to m / k
            moved = np.abs(new - v).max()
            v = new
            if moved < tol:
                break
    return v, i


def balance_sample(n: int, k: int) -> int:
    """How many of n points the balancing of k clusters works on: all, up to BALANCE_CELLS / k."""
    return min(n, max(k, BALANCE_CELLS // k))


def balanced_kmeans(z: np.ndarray, k: int, niter: int = 20, nredo: int = 1, seed: int = 0,
                    gpu: int | bool = False) -> Balanced:
    """faiss k-means (niter, best of nredo), then Lloyd iterations whose assignment step is an
    entropic optimal transport of the points onto k equal shares (sinkhorn_potentials, as
    SeLa / SwAV balance their self-labels), on at most BALANCE_CELLS / k points of z (N, d).
    The transport's column potentials become the per-cluster offsets; a point's cluster is the
    argmax of its row of the plan, i.e. the offset rule of `Balanced.nearest`."""
    import faiss
    from scipy.sparse import csr_matrix

    n = len(z)
    start = kmeans(z, k, niter, nredo, seed=seed, gpu=gpu)
    m = balance_sample(n, k)
    s = z if m == n else z[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
    s = np.ascontiguousarray(s, dtype=np.float32)
    c = start.centroids.astype(np.float32)
    s2 = (s * s).sum(1)[:, None]

    def neg_cost(c):  # (m, k) float32: -squared distances
        d = s @ (-2 * c.T)  # (m, d) @ (d, k): one BLAS call
        d += s2
        d += (c * c).sum(1)[None]
        np.maximum(d, 0, out=d)
        return np.negative(d, out=d)

    logits = neg_cost(c)
    eps = BALANCE_EPS * float(np.median(-logits))
    logits /= eps
    threads = faiss.omp_get_max_threads()  # the CPUs this process was given (set_faiss_threads in a Ray task)
    v, a, sweeps = np.zeros(k), None, 0
    for it in range(BALANCE_ITER + 1):
        v, ran = sinkhorn_potentials(logits, v, BALANCE_SWEEPS[0] if it == 0 else BALANCE_SWEEPS[1], threads=threads)
        sweeps += ran
        new = np.argmax(logits + v[None].astype(np.float32), axis=1)
        if it == BALANCE_ITER or (a is not None and (new == a).all()):
            a = new
            break
        a = new
        # the new centroids: per-cluster means as one sparse product, (k, m) one-hot @ (m, d)
        counts = np.bincount(a, minlength=k)
        sums = csr_matrix((np.ones(m, np.float32), (a, np.arange(m))), shape=(k, m)) @ s
        filled = counts > 0  # an emptied cluster keeps its centroid
        c[filled] = sums[filled] / counts[filled, None]
        logits = neg_cost(c)
        logits /= eps
    return Balanced(c.astype(np.float32), (eps * v).astype(np.float32), it, sweeps)


CLUSTERERS = {"kmeans": "faiss k-means", "gmm": "Gaussian mixture",
              "balanced": "equal-size k-means"}  # cluster.method -> what the CLI prints


def fit_clusters(z: np.ndarray, k: int, method: str = "kmeans", niter: int = 20, nredo: int = 1, spherical: bool = False,
                 seed: int = 0, gpu: int | bool = False):
    """k clusters of the preprocessed sample z (N, d): faiss k-means, a Gaussian mixture, or
    k-means held to equal sizes. Each has `.centroids` (k, d) and `.index` for `search`."""
    if method == "gmm":
        return gaussian_mixture(z, k, seed)
    if method == "balanced":
        return balanced_kmeans(z, k, niter, nredo, seed, gpu)
    return kmeans(z, k, niter, nredo, spherical, seed, gpu=gpu)


OWN_INDEX = (Mixture, Balanced)  # clusterers that are their own index: saved as arrays beside the centroids


def load_clusterer(centroids: np.ndarray, arrays) -> Mixture | Balanced | None:
    """The clusterer preprocess.npz holds beside `centroids` (None: plain k-means)."""
    if "gmm_log_weights" in arrays:
        return Mixture(centroids, arrays["gmm_prec_chol"], arrays["gmm_log_weights"])
    if "balanced_offsets" in arrays:
        return Balanced(centroids, arrays["balanced_offsets"])
    return None


def fit_sample(x: np.ndarray, k: int, preprocess: str = "pca", pca_dim: int = 64, niter: int = 20, nredo: int = 0,
               spherical: bool = False, seed: int = 0, gpu: int | bool = False, manifold: str = "none",
               manifold_dim: int = 10, method: str = "kmeans",
               umap_options: dict | None = None) -> tuple[Preprocess, object, np.ndarray]:
    """What a clustering fit does with its sample x (N, E): preprocessing (-> UMAP on at most
    MANIFOLD_SAMPLE of its points), then faiss k-means on all of them (or a Gaussian mixture).
    Returns (pre, model, z): `pre` maps any (B, E) embeddings to the space the centroids live
    in, z = pre(x) (N, d); model is fit_clusters'. umap_options: fit_umap's sample / neighbours
    (benchmarks/umap_grid.py varies them; distgan itself uses the defaults)."""
    pre = fit_preprocess(x, preprocess, pca_dim, seed=seed)
    if manifold == "umap":
        from .manifold import fit_umap

        pre.anchors, pre.coords = fit_umap(pre(x), manifold_dim, seed, **(umap_options or {}))
    z = pre(x)
    return pre, fit_clusters(z, k, method, niter, restarts(nredo, manifold), spherical, seed, gpu), z


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
    L2-normalised row and its unit centroid, 2 - 2 cos. A Mixture (cluster.method gmm) gives
    the component of highest posterior and the squared Mahalanobis distance to it; Balanced its
    offset rule and the squared L2 distance."""
    import faiss

    if isinstance(index, OWN_INDEX):
        return index.nearest(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    with distance_path(index.ntotal):
        dist, idx = index.search(x, 1)
    d = dist[:, 0]
    if index.metric_type == faiss.METRIC_INNER_PRODUCT:
        cos = d / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        d = np.maximum(2.0 - 2.0 * cos, 0.0).astype(np.float32)
    return idx[:, 0], d

