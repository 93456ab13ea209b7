"""k-means off the driver. A Ray task (sized by --gpus, else CPUs) fits the preprocessing
and faiss k-means on a sample; Ray Data actors that hold the centroids assign every point,
each writing one Parquet file per read unit (named by the unit, so a rerun after a crash
knows which are done; Ray Data's own writer names files by write task); one summary per
unit (a k x classes contingency table, cluster sizes, inertia, each cluster's nearest
points) is summed on the driver. The driver holds centroids and summaries only: its memory is
flat in the number of points."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from ..config import UserError
from ..data import actor_cpus, actor_threads, largest_node, ray_data_console
from ..faults import slow_down
from ..storage import loc, write_parquet
from .features import Features, block_labels, block_x, read_unit, read_units
from .fit import OWN_INDEX, Preprocess, centroid_index, fit_clusters, fit_sample, restarts, search  # noqa: F401
from .metrics import contingency

def default_sample(count: int, k: int) -> int:
    """k-means sample when --sample is not given: every point up to 100k, else 256 per
    centroid (faiss's own max_points_per_centroid) but at least 100k."""
    return min(count, max(100_000, 256 * k))


def set_faiss_threads() -> int:
    """faiss's OpenMP threads = the CPUs Ray assigned to this task or actor (the processes
    inherit OMP_NUM_THREADS=1 from Ray otherwise, or every actor takes every core)."""
    import faiss

    n = actor_threads()
    faiss.omp_set_num_threads(n)
    return n


def sample_dataset(features: Features, sample: int, seed: int):
    """The k-means sample as a materialized Ray Data dataset: Ray Data's read tasks draw it
    in parallel across the cluster (rows kept by a hash of their id, 10% and 20 rows over the size asked,
    trimmed in the fit task), so neither the driver nor one task reads every point."""
    ds = features.dataset()
    if sample < features.count:
        ds = ds.map_batches(_keep_by_id_hash, fn_kwargs={"fraction": min(1.0, (1.1 * sample + 20) / features.count),
                                                         "seed": seed}, batch_size=None, batch_format="pyarrow")
    return ds.materialize()


def _keep_by_id_hash(table, fraction: float, seed: int):
    """The rows whose (id, seed) hash falls below `fraction`: a sample that depends on the ids
    alone, not on which task read them (Ray Data's seeded random_sample keys its generator by
    task index; with it, same-seed runs on 10M points still clustered differently after the
    blocks were put in id order)."""
    if fraction >= 1.0:
        return table
    with np.errstate(over="ignore"):  # splitmix64: uint64 arithmetic wraps by design
        z = table.column("id").to_numpy().astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return table.filter(z < np.uint64(fraction * 2.0**64))


def _collect_sample(ds, kind: str, dim: int, sample: int, seed: int) -> np.ndarray:
    """(sample, dim) float32 from the materialized sample, in id order; non-finite rows refused.
    Ray Data returns the sample's blocks in the order its tasks finish, so the rows are put in
    id order before the seeded trim: the same seed gives the same sample, run after run."""
    blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    ids = np.concatenate([b.column("id").to_numpy() for b in blocks]) if blocks else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")  # position in id order -> row of the blocks, concatenated
    if len(ids) > sample:
        order = order[np.sort(np.random.default_rng(seed).choice(len(ids), sample, replace=False))]
    dest = np.full(len(ids), -1, np.int64)
    dest[order] = np.arange(len(order))  # row of the blocks -> row of x (-1: trimmed)
    # Each block converted and scattered into place, then dropped: memory is the float16 blocks,
    # x and one float32 block (a concatenation, its id-order copy and the trim held 3 x's).
    x = np.empty((len(order), dim), np.float32)
    start = 0
    while blocks:
        b = blocks.pop(0)
        to = dest[start : start + b.num_rows]
        kept = to >= 0
        x[to[kept]] = block_x(b, kind, dim)[kept]
        start += b.num_rows
    finite = np.isfinite(x)
    if not finite.all():
        raise UserError(f"embeddings contain {int((~finite).sum())} non-finite values (NaN/Inf) in "
                        f"{int((~finite.all(axis=1)).sum())} rows of the k-means sample; "
                        "re-embed from a checkpoint that trained without diverging")
    return x


def _draw_sample(features: Features, sample: int, seed: int) -> np.ndarray:
    """The Ray task that draws the k-means sample, (sample, dim) float32. Ray Data runs from here,
    not from the driver, because a task's small results live in the heap of the process that
    submitted it: at 10M points each read task keeps ~110 rows (56 KB of 256-d float16, under
    Ray's 100 KiB inline limit), so the 1,000 blocks sat in the driver (+~90 MiB) and were copied
    again into the fit task's argument (a 59 MB pickle). Here they die with this worker (max_calls=1)."""
    ray_data_console()  # as the driver's (init_ray): no Ray Data bars, quiet when it is
    return _collect_sample(sample_dataset(features, sample, seed), features.kind, features.dim, sample, seed)


def _fit(x: np.ndarray, ks: tuple[int, ...], preprocess: str, pca_dim: int, niter: int, nredo: int,
         spherical: bool, seed: int, gpus: int, manifold: str = "none", manifold_dim: int = 10,
         method: str = "kmeans") -> dict:
    """The Ray task: the sample x (n, dim) -> preprocessing (-> UMAP on a sample) -> faiss k-means
    (or a Gaussian mixture) for each k in ks, each with its label-free criteria (criteria.py) on
    the sample. Returns plain arrays (and per k the clusterer, with method gmm or balanced: arrays too)."""
    from .criteria import CRITERIA_SAMPLE, criteria

    threads = set_faiss_threads()
    t = time.perf_counter()
    gpu = gpus if gpus else False
    pre, km, z = fit_sample(x, ks[0], preprocess, pca_dim, niter, nredo, spherical, seed, gpu, manifold, manifold_dim,
                            method)
    fits = {}
    for k in ks:  # the preprocessing (and UMAP) does not depend on k: fitted once
        if k != ks[0]:
            km = fit_clusters(z, k, method, niter, restarts(nredo, manifold), spherical, seed, gpu)
        c, _ = search(km.index, z)
        t_crit = time.perf_counter()
        # at least 10 points per cluster in the criteria's sample (k = 1000: 10,000 points)
        crit = criteria(z, c, k, seed, max(CRITERIA_SAMPLE, 10 * k), spherical)
        fits[k] = {"centroids": np.asarray(km.centroids, np.float32), "criteria": crit,
                   "model": km if isinstance(km, OWN_INDEX) else None,
                   "criteria_seconds": time.perf_counter() - t_crit}
    return {"fits": fits, "pre": pre, "trained_on": len(x), "seconds": time.perf_counter() - t, "threads": threads,
            "node": os.uname().nodename}


def fit_remote(features: Features, ks: list[int], preprocess: str, pca_dim: int, niter: int, nredo: int, spherical: bool,
               sample: int, seed: int, gpus: int = 0, manifold: str = "none",
               manifold_dim: int = 10, method: str = "kmeans") -> tuple[dict, Preprocess, dict]:
    """Draw the sample in one Ray task (`_draw_sample`: Ray Data's reads spread over the
    cluster), then run `_fit` on it in a fresh worker process (max_calls=1: no OpenMP state left
    by torch in a reused worker) with all of one node's CPUs, or `gpus` GPUs of one node. The
    sample goes from one to the other through the object store; the driver holds its ref only.
    Returns ({k: {"centroids", "criteria"}}, pre, the task's summary)."""
    import ray

    # num_cpus=0: it only coordinates (its read tasks ask for CPUs), so it never waits for a CPU
    # that its own reads need; it runs before the fit task takes the node's CPUs.
    # without `batches`: the in-process reader's closure holds resolved filesystems (credentials
    # stay on each node: the task resolves the URIs itself) or, for in-memory features, the arrays
    x = ray.remote(max_calls=1)(_draw_sample).options(num_cpus=0).remote(replace(features, batches=None), sample, seed)
    ray.wait([x], fetch_local=False)
    task = ray.remote(max_calls=1)(_fit).options(num_cpus=max(1, int(largest_node("CPU"))), num_gpus=gpus)
    r = ray.get(task.remote(x, tuple(ks), preprocess, pca_dim, niter, nredo, spherical, seed, gpus, manifold,
                            manifold_dim, method))
    return r.pop("fits"), r.pop("pre"), r


def fitted(fits: dict, pre: Preprocess, info: dict, k: int) -> tuple[np.ndarray, Preprocess, dict]:
    """What `run_clustering(fitted=...)` takes for one k of `fit_remote`'s result: its centroids,
    the shared preprocessing, and the task's summary with that k's criteria and their cost (and
    its clusterer, with method gmm or balanced)."""
    return fits[k]["centroids"], pre, info | {"criteria": fits[k]["criteria"], "model": fits[k]["model"],
                                              "criteria_seconds": round(fits[k]["criteria_seconds"], 3)}


class Assigner:
    """Ray Data actor: holds the preprocessing and a faiss index over the centroids, built
    once (or the clusterer whose centroids they are: a Gaussian mixture, equal-size k-means). Each call takes read units
    (`read_units`); per unit it writes the assignments
    (id, cluster, distance, label) as one Parquet file under a temporary name, renamed when
    whole, and returns that unit's summary row. A unit a previous run completed (`done`) is
    only read back and summarized, so a rerun after a crash redoes only the missing files."""

    def __init__(self, centroids: np.ndarray, pre: Preprocess, spherical: bool, kind: str, dim: int, gpu: bool,
                 columns: list[str], per_cluster: int, tables: list | None = None, model=None):
        self.threads = set_faiss_threads()
        self.index = model if model is not None else centroid_index(centroids, spherical, gpu)
        self.pre, self.kind, self.dim, self.k = pre, kind, dim, len(centroids)
        self.columns, self.per_cluster, self.tables = columns, per_cluster, tables or []

    def assign(self, table):
        """A block of features -> its (id, cluster, distance, label) table."""
        import pyarrow as pa

        x = block_x(table, self.kind, self.dim)  # (B, dim) float32
        c, d = search(self.index, self.pre(x))
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():  # counted by `summarize`; the driver refuses the output with one line
            c, d = np.where(bad, -1, c), np.where(bad, np.float32(0), d)
        return pa.table({"id": table.column("id").cast(pa.int64()), "cluster": pa.array(c.astype(np.int32)),
                         "distance": pa.array(d), "label": table.column("label").cast(pa.int32())})

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        for file, first, last, dst, done in zip(*(batch[c].to_pylist() for c in ("file", "first", "last", "dst", "done"))):
            dst = loc(dst)  # resolved on this node
            if done:
                out = pq.read_table(dst.path, filesystem=dst.fs)
            else:
                slow_down()
                table = read_unit(file, first, last, self.columns) if file else self.tables[first]
                out = self.assign(table)
                write_parquet(out, dst)  # atomic publish: a file is whole or absent
            rows.append(summarize(out, self.k, self.per_cluster))
        return pa.concat_tables(rows)


def summarize(table, k: int, per_cluster: int):
    """One row per block: contingency (k x classes in this block), sizes, inertia and each
    cluster's `per_cluster` nearest (id, distance), all as raw bytes."""
    import pyarrow as pa

    c = table.column("cluster").to_numpy()
    bad = c < 0  # rows with non-finite features (Assigner)
    keep = ~bad
    c, d = c[keep], table.column("distance").to_numpy()[keep]
    ids, lab = table.column("id").to_numpy()[keep], block_labels(table)[keep]
    n_classes = int(lab.max()) + 1 if (lab >= 0).any() else 1
    order = np.lexsort((d, c))  # by cluster, then distance
    starts = np.searchsorted(c[order], np.arange(k))
    top_ids = np.full((k, per_cluster), -1, np.int64)
    top_d = np.full((k, per_cluster), np.inf, np.float32)
    for j, (lo, hi) in enumerate(zip(starts, np.append(starts[1:], len(c)))):
        take = order[lo : min(hi, lo + per_cluster)]
        top_ids[j, : len(take)], top_d[j, : len(take)] = ids[take], d[take]
    return pa.table({
        "n": [len(c) + int(bad.sum())], "bad": [int(bad.sum())], "n_classes": [n_classes],
        "cont": [contingency(c, lab, k, n_classes).tobytes()], "sizes": [np.bincount(c, minlength=k).tobytes()],
        "inertia": [float(d.astype(np.float64).sum())], "top_ids": [top_ids.tobytes()], "top_d": [top_d.tobytes()],
    })


class Totals:
    """Summaries merged on the driver: O(k x classes + k x per_cluster) memory."""

    def __init__(self, k: int, per_cluster: int):
        self.k, self.m = k, per_cluster
        self.n, self.bad, self.inertia = 0, 0, 0.0
        self.seconds_assign = self.seconds_metrics = 0.0
        self.cont = np.zeros((k, 1), np.int64)
        self.sizes = np.zeros(k, np.int64)
        self.top_ids = np.full((k, per_cluster), -1, np.int64)
        self.top_d = np.full((k, per_cluster), np.inf, np.float32)

    def add(self, row: dict) -> None:
        k, m = self.k, self.m
        cont = np.frombuffer(row["cont"], np.int64).reshape(k, row["n_classes"])
        if cont.shape[1] > self.cont.shape[1]:
            self.cont = np.pad(self.cont, ((0, 0), (0, cont.shape[1] - self.cont.shape[1])))
        self.cont[:, : cont.shape[1]] += cont
        self.sizes += np.frombuffer(row["sizes"], np.int64)
        self.n += int(row["n"])
        self.bad += int(row["bad"])
        self.inertia += float(row["inertia"])
        ids = np.concatenate([self.top_ids, np.frombuffer(row["top_ids"], np.int64).reshape(k, m)], axis=1)
        d = np.concatenate([self.top_d, np.frombuffer(row["top_d"], np.float32).reshape(k, m)], axis=1)
        keep = np.argsort(d, axis=1, kind="stable")[:, :m]
        self.top_ids, self.top_d = np.take_along_axis(ids, keep, 1), np.take_along_axis(d, keep, 1)


def assign_all(features: Features, centroids: np.ndarray, pre: Preprocess, spherical: bool, out_dir: str,
               actors: int = 0, gpus: int = 0, per_cluster: int = 8, progress: bool = True,
               model=None) -> Totals:
    """Assign every point with an actor pool: one Parquet file per read unit in `out_dir`
    (`part-NNNNN.parquet`, in unit order), and the per-unit summaries summed here. Files
    already in `out_dir` (a run that was killed) are kept and only summarized."""
    import ray
    import ray.data
    from tqdm import tqdm

    k = len(centroids)
    out = loc(out_dir)
    out.mkdir()
    for stale in out.glob(".*.tmp-*"):  # a killed run's unfinished local files (an object store has none)
        stale.unlink()
    units = read_units(features.files) if features.files else [
        {"file": "", "first": i, "last": i} for i in range(len(features.tables))]
    present = {c.name for c in out.iterdir()}
    items = [{**u, "dst": (out / f"part-{i:05d}.parquet").uri, "done": f"part-{i:05d}.parquet" in present}
             for i, u in enumerate(units)]
    todo = sum(not it["done"] for it in items)
    n_actors = actors or (max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 2)
    if not actors:  # never more actors than units to assign (a second one would only wait)
        n_actors = max(1, min(n_actors, todo))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        Assigner, fn_constructor_kwargs={
            "centroids": centroids, "pre": pre, "spherical": spherical, "kind": features.kind, "dim": features.dim,
            "gpu": bool(gpus), "columns": features.columns, "per_cluster": per_cluster, "tables": features.tables,
            "model": model},
        batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_gpus=1 if gpus else 0, num_cpus=1 if gpus else actor_cpus(n_actors),
    )
    print(f"assigning {features.count} points ({todo} of {len(items)} files to write"
          f"{f', {len(items) - todo} already done' if todo < len(items) else ''}) with {n_actors} "
          f"{'GPU' if gpus else 'CPU'} actor(s)")
    totals = Totals(k, per_cluster)
    t = time.perf_counter()
    with tqdm(total=features.count, unit="pt", desc="assign", disable=not progress) as bar:
        for row in ds.iter_rows():
            t_add = time.perf_counter()
            totals.add(row)
            totals.seconds_metrics += time.perf_counter() - t_add
            bar.update(int(row["n"]))
    totals.seconds_assign = time.perf_counter() - t - totals.seconds_metrics
    if totals.n != features.count:
        raise RuntimeError(f"assignment wrote {totals.n} rows for {features.count} points")
    return totals


def check_request(count: int, k: int | list[int], sample: int, gpus: int = 0, pca_dim: int = 0, dim: int | None = None,
                  manifold: str = "none", manifold_dim: int = 10, preprocess: str = "none", method: str = "kmeans",
                  spherical: bool = False) -> int:
    """The checks that need no Ray, before anything starts; returns the sample size to train on.
    pca_dim (0: no PCA) must fit the features' dim when that is known."""
    from .fit import require_faiss

    require_faiss()
    from .fit import METHODS

    if preprocess not in METHODS:
        raise UserError(f"--preprocess must be one of {', '.join(METHODS)}, got '{preprocess}'")
    if manifold not in ("none", "umap"):
        raise UserError(f"--manifold must be none or umap, got '{manifold}'")
    from ..config import CLUSTER_METHODS
    from .fit import MIXTURE_MAX_DIM

    if method not in CLUSTER_METHODS:
        raise UserError(f"--method must be one of {', '.join(CLUSTER_METHODS)}, got '{method}'")
    if method == "gmm" and (manifold != "umap" or manifold_dim > MIXTURE_MAX_DIM):
        raise UserError(f"--method gmm fits full covariances, on a manifold map of at most {MIXTURE_MAX_DIM} "
                        "dimensions: add --manifold umap (--manifold-dim 10 by default)")
    if method != "kmeans" and spherical:
        raise UserError(f"--spherical is a k-means option, not one of --method {method}")
    if manifold == "umap":
        import importlib.util

        # found, not imported: importing umap (numba, llvmlite) costs the driver 139 MiB and 1.1 s,
        # and only the fit task runs it (the actors place points with faiss)
        if importlib.util.find_spec("umap") is None:
            raise UserError("--manifold umap needs umap-learn: pip install umap-learn")
        if manifold_dim < 1:
            raise UserError(f"--manifold-dim must be >= 1, got {manifold_dim}")
    if sample < 0 or sample > count:
        raise UserError(f"--sample must be between 1 and the number of points ({count}), got {sample}")
    ks = [k] if isinstance(k, int) else list(k)
    size = sample or default_sample(count, max(ks))
    bad = [v for v in ks if v < 2 or v > size]
    if bad:
        raise UserError(f"--k must be between 2 and the k-means sample ({size} of {count} points), got {bad[0]}")
    if gpus < 0:
        raise UserError(f"--gpus must be >= 0, got {gpus}")
    if dim is not None and pca_dim > dim:
        raise UserError(f"--pca-dim {pca_dim} is larger than the features' dimension ({dim}); "
                        f"choose at most {dim}, or --preprocess l2")
    return size


def check_gpus(gpus: int) -> None:
    """--gpus against the cluster (one question to Ray): faiss trains on the GPUs of one node."""
    most = int(largest_node("GPU")) if gpus else 0
    if gpus > most:
        from ..capacity import has_autoscaler, wait_for

        if has_autoscaler():  # a GPU pool scaled to zero: ask for one node with that many
            wait_for([{"GPU": gpus}], f"k-means on {gpus} GPU(s)")
            most = int(largest_node("GPU"))
    if gpus > most:
        raise UserError(f"--gpus {gpus}: no node of this cluster has {gpus} GPUs (the most on one node: {most})")
