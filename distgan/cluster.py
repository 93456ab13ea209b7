"""FAISS k-means over embeddings (or raw pixels), streamed assignment, clustering
metrics, and the linear probe. Numpy in, numpy out; no Ray, no training code.

Feature sources yield batches of (ids (B,), labels (B,) int with -1 unknown,
splits (B,), x (B, E) float32), so assignment never holds the whole set.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import UserError
from .data import decode_images, read_manifest, save_grid, shard_paths

Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------- feature sources


@dataclass
class Features:
    """A re-iterable stream of feature batches plus what is known up front."""

    batches: Callable[[], Iterator[Batch]]
    count: int
    dim: int
    description: str
    data: str | None  # prepared dataset the ids refer to, when known


def embedding_features(path: str | Path, batch_rows: int = 65536) -> Features:
    import pyarrow.parquet as pq

    path = Path(path)
    mf = path / "embeddings.json"
    if not mf.is_file():
        raise UserError(f"{path} has no embeddings.json: not a `distgan embed` output (or the run did not finish)")
    manifest = json.loads(mf.read_text())
    files = [path / s for s in manifest["shards"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path} is missing embedding shards {missing[:3]}; rerun `distgan embed` to redo them")

    def batches():
        for f in files:
            try:
                pf = pq.ParquetFile(f)
                for rb in pf.iter_batches(batch_size=batch_rows, columns=["id", "label", "split", "embedding"]):
                    emb = rb.column("embedding")
                    x = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rb), -1)
                    yield (rb.column("id").to_numpy(), rb.column("label").fill_null(-1).to_numpy(),
                           rb.column("split").to_numpy(zero_copy_only=False), x)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read embeddings shard {f}: {e}") from None

    desc = f"D embeddings ({manifest['arch']}, features={manifest['features']}, step {manifest['step']})"
    return Features(batches, manifest["count"], manifest["dim"], desc, manifest.get("data"))


def pixel_features(data: str | Path, batch_rows: int = 8192) -> Features:
    """Raw pixels of a prepared dataset scaled to [0, 1]: the baseline."""
    import pyarrow.parquet as pq

    m = read_manifest(data)
    files = shard_paths(data)
    res, ch = m["resolution"], m["channels"]

    def batches():
        for f in files:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["id", "image", "label", "split"]):
                imgs = decode_images(rb.column("image").to_pylist(), res, ch)
                yield (rb.column("id").to_numpy(), rb.column("label").fill_null(-1).to_numpy(),
                       rb.column("split").to_numpy(zero_copy_only=False),
                       imgs.reshape(len(imgs), -1).astype(np.float32) / 255.0)

    return Features(batches, m["count"], res * res * ch, f"raw pixels ({res}x{res}x{ch})", str(Path(data).resolve()))


def array_features(ids, labels, splits, x: np.ndarray, description: str, batch_rows: int = 65536) -> Features:
    """In-memory arrays as a feature stream (notebooks, benchmarks, tests)."""
    def batches():
        for i in range(0, len(x), batch_rows):
            s = slice(i, i + batch_rows)
            yield ids[s], labels[s], splits[s], x[s]

    return Features(batches, len(x), x.shape[1], description, None)


def collect(features: Features, limit: int | None = None, seed: int = 0) -> Batch:
    """All points (or a uniform sample of `limit`) in memory, NaN/Inf refused."""
    rng = np.random.default_rng(seed)
    keep = None
    if limit and limit < features.count:
        keep = np.zeros(features.count, bool)
        keep[rng.choice(features.count, limit, replace=False)] = True
    parts, offset, bad, bad_rows = [], 0, 0, 0
    for ids, labels, splits, x in features.batches():
        finite = np.isfinite(x)
        if not finite.all():
            bad += int((~finite).sum())
            bad_rows += int((~finite.all(axis=1)).sum())
        sel = slice(None) if keep is None else keep[offset : offset + len(ids)]
        parts.append((ids[sel], labels[sel], splits[sel], x[sel]))
        offset += len(ids)
    if bad:
        raise UserError(f"embeddings contain {bad} non-finite values (NaN/Inf) in {bad_rows} rows; "
                        "re-embed from a checkpoint that trained without diverging")
    if not parts:
        raise UserError("no points to cluster")
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


# ---------------------------------------------------------------- preprocessing


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
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km


def assign(km, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (cluster (B,) int64, squared distance (B,) float32)."""
    dist, idx = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0], dist[:, 0]


# ---------------------------------------------------------------- metrics


def cluster_acc(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian), as accuracy."""
    from scipy.optimize import linear_sum_assignment

    lab_ids, lab = np.unique(labels, return_inverse=True)
    cl_ids, cl = np.unique(clusters, return_inverse=True)
    cont = np.zeros((len(cl_ids), len(lab_ids)), np.int64)
    np.add.at(cont, (cl, lab), 1)
    rows, cols = linear_sum_assignment(-cont)
    return float(cont[rows, cols].sum() / len(labels))


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    _, lab = np.unique(labels, return_inverse=True)
    _, cl = np.unique(clusters, return_inverse=True)
    cont = np.zeros((cl.max() + 1, lab.max() + 1), np.int64)
    np.add.at(cont, (cl, lab), 1)
    return float(cont.max(axis=1).sum() / len(labels))


def clustering_metrics(labels: np.ndarray, clusters: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    known = labels >= 0
    if not known.any():
        return {"labels": "none: acc, nmi, ari and purity need labels and were left out"}
    l, c = labels[known], clusters[known]
    return {
        "acc": cluster_acc(l, c), "nmi": float(normalized_mutual_info_score(l, c)),
        "ari": float(adjusted_rand_score(l, c)), "purity": purity(l, c), "labelled_points": int(known.sum()),
    }


# ---------------------------------------------------------------- the stage


def run_clustering(
    features: Features, out: str | Path, k: int, preprocess: str = "pca-whiten", pca_dim: int = 64,
    niter: int = 20, nredo: int = 1, spherical: bool = False, sample: int = 0, seed: int = 0,
    data: str | Path | None = None, montage_per_cluster: int = 8, overwrite: bool = False, progress: bool = True,
) -> dict:
    """Fit, assign every point in streamed batches, write the clustering outputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out = Path(out)
    if k < 2 or k > features.count:
        raise UserError(f"--k must be between 2 and the number of points ({features.count}), got {k}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _, _, _, x_train = collect(features, limit=sample or None, seed=seed)
    pre = fit_preprocess(x_train, preprocess, pca_dim, seed=seed)
    x_train = pre(x_train)
    ngpu = faiss_devices()
    print(f"faiss k-means: k={k} on {len(x_train)} of {features.count} points, d={x_train.shape[1]}, "
          f"{f'{ngpu} GPU(s)' if ngpu else 'CPU'}; {features.description}")
    km = kmeans(x_train, k, niter, nredo, spherical, seed)
    del x_train
    t_fit = time.perf_counter() - t0

    # Stream every point through the preprocessing and the index; keep per point only
    # (cluster, distance, label) for the metrics and the montage.
    tmp = out / ".assignments.parquet.tmp"
    schema = pa.schema([("id", pa.int64()), ("cluster", pa.int32()), ("distance", pa.float32()), ("label", pa.int32())])
    clusters, dists, labels, ids_all = [], [], [], []
    inertia = 0.0
    with pq.ParquetWriter(tmp, schema) as w, tqdm(total=features.count, unit="pt", desc="assign", disable=not progress) as bar:
        for ids, lab, _, x in features.batches():
            if not np.isfinite(x).all():
                raise UserError("embeddings contain non-finite values (NaN/Inf); re-embed from a finite checkpoint")
            c, d = assign(km, pre(x))
            w.write_table(pa.table({"id": ids, "cluster": c.astype(np.int32), "distance": d,
                                    "label": pa.array(lab, pa.int32(), mask=lab < 0)}, schema=schema))
            clusters.append(c.astype(np.int32)); dists.append(d); labels.append(lab.astype(np.int32)); ids_all.append(ids)
            inertia += float(d.astype(np.float64).sum())
            bar.update(len(ids))
    tmp.rename(out / "assignments.parquet")
    clusters, dists, labels, ids_all = (np.concatenate(a) for a in (clusters, dists, labels, ids_all))
    np.save(out / "centroids.npy", km.centroids)
    sizes = np.bincount(clusters, minlength=k)
    metrics = {
        "k": k, "n": int(len(clusters)), "inertia": inertia, "sizes": sizes.tolist(),
        "empty_clusters": int((sizes == 0).sum()), "features": features.description,
        "preprocess": preprocess, "pca_dim": pca_dim if preprocess == "pca-whiten" else None,
        "niter": niter, "nredo": nredo, "spherical": spherical, "trained_on": int(min(sample or features.count, features.count)),
        "device": f"{ngpu} GPU(s)" if ngpu else "CPU", "seconds_fit": round(t_fit, 3),
        "seconds_total": round(time.perf_counter() - t0, 3),
        **clustering_metrics(labels, clusters),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    data = data or features.data
    if data:
        montage(data, ids_all, clusters, dists, k, out / "montage.png", montage_per_cluster)
    return metrics


def montage(data: str | Path, ids: np.ndarray, clusters: np.ndarray, dists: np.ndarray, k: int,
            path: Path, per_cluster: int = 8) -> None:
    """One row per cluster: its `per_cluster` images nearest the centroid (blank where a cluster is smaller)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    m = read_manifest(data)
    order = np.lexsort((dists, clusters))  # by cluster, then distance
    starts = np.searchsorted(clusters[order], np.arange(k))
    ends = np.searchsorted(clusters[order], np.arange(k), side="right")
    chosen = np.full((k, per_cluster), -1, np.int64)
    for c in range(k):
        take = ids[order[starts[c] : min(ends[c], starts[c] + per_cluster)]]
        chosen[c, : len(take)] = take
    wanted = chosen[chosen >= 0]
    found: dict[int, bytes] = {}
    for f in shard_paths(data):
        t = pq.read_table(f, columns=["id", "image"])
        t = t.filter(pc.is_in(t["id"], value_set=pa.array(wanted)))
        found.update(zip(t["id"].to_pylist(), t["image"].to_pylist()))
    missing = [int(i) for i in wanted if int(i) not in found]
    if missing:
        raise UserError(f"embeddings and dataset {data} do not match: {len(missing)} ids (e.g. {missing[:3]}) "
                        "are not in the dataset; pass the --data the embeddings were made from")
    res, ch = m["resolution"], m["channels"]
    blank = bytes(res * res * ch)
    imgs = decode_images([found.get(int(i), blank) if i >= 0 else blank for i in chosen.ravel()], res, ch)
    save_grid(imgs, path, nrow=per_cluster)


# ---------------------------------------------------------------- linear probe and baselines


def _split_xy(points: Batch):
    ids, labels, splits, x = points
    known = labels >= 0
    tr, te = known & (splits == "train"), known & (splits == "test")
    if not tr.any() or not te.any():
        raise UserError("the probe needs labelled images in both the train and the test split")
    return x[tr], labels[tr], x[te], labels[te]


def _fit_score(model, xtr, ytr, xte, yte) -> dict:
    t = time.perf_counter()
    model.fit(xtr, ytr)
    fit = time.perf_counter() - t
    acc = float((model.predict(xte) == yte).mean())
    return {"accuracy": acc, "seconds": round(time.perf_counter() - t, 2), "seconds_fit": round(fit, 2)}


def _logreg():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def _linear_svm():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return make_pipeline(StandardScaler(), LinearSVC(C=0.01, dual=False, max_iter=2000))


def _random_forest():
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=100, n_jobs=-1, random_state=0)


def _knn():
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(5, n_jobs=-1)


BASELINES: dict[str, Callable] = {
    "logistic regression": _logreg, "linear SVM": _linear_svm, "random forest": _random_forest, "k-NN (k=5)": _knn,
}


def linear_probe(features: Features, max_train: int = 0, seed: int = 0) -> dict:
    """Logistic regression on the train split's features, accuracy on the test split."""
    xtr, ytr, xte, yte = _split_xy(collect(features))
    xtr, ytr = _subsample(xtr, ytr, max_train, seed)
    return {"method": "logistic regression", "features": features.description, "train": len(ytr), "test": len(yte),
            **_fit_score(_logreg(), xtr, ytr, xte, yte)}


def _subsample(x, y, n, seed):
    if n and n < len(y):
        keep = np.random.default_rng(seed).choice(len(y), n, replace=False)
        return x[keep], y[keep]
    return x, y


def pixel_baselines(data: str | Path, max_train: int = 0, seed: int = 0) -> list[dict]:
    """The classic methods on raw pixels of the same train/test split."""
    feats = pixel_features(data)
    xtr, ytr, xte, yte = _split_xy(collect(feats))
    xtr, ytr = _subsample(xtr, ytr, max_train, seed)
    return [{"method": name, "features": feats.description, "train": len(ytr), "test": len(yte),
             **_fit_score(make(), xtr, ytr, xte, yte)} for name, make in BASELINES.items()]


def probe_table(rows: list[dict]) -> str:
    lines = ["| features | method | train | test | accuracy | seconds |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['features']} | {r['method']} | {r['train']} | {r['test']} | {r['accuracy']:.4f} | {r['seconds']} |")
    return "\n".join(lines) + "\n"
