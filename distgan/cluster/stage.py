"""The clustering stage: fit, assign every point, write the outputs, montage."""
from __future__ import annotations

import io
import time

import numpy as np

from ..config import UserError
from ..data import decode_images, read_images_by_id, read_manifest, save_grid
from ..storage import Loc, check_access, loc
from .features import Features
from .manifold import MANIFOLD_SAMPLE
from .metrics import metrics_from_contingency

SPEC = ".cluster-spec.json"  # what a (possibly interrupted) output folder is computed from
OUTPUTS = ("assignments", ".assignments.tmp", "assignments.parquet", "centroids.npy", "preprocess.npz",
           ".fit.json", "metrics.json", "montage.png")


def run_clustering(
    features: Features, out: str, k: int, preprocess: str = "pca-whiten", pca_dim: int = 64,
    niter: int = 20, nredo: int = 0, spherical: bool = False, sample: int = 0, seed: int = 0,
    manifold: str = "none", manifold_dim: int = 10, method: str = "kmeans", data: str | None = None, montage_per_cluster: int = 8, overwrite: bool = False, progress: bool = True,
    gpus: int = 0, actors: int = 0, keep: tuple[str, ...] = (), fitted: tuple | None = None,
) -> dict:
    """Fit on a sample in a Ray task, assign every point with Ray Data actors, write
    OUT/assignments/ (Parquet files), centroids.npy, preprocess.npz, metrics.json and
    montage.png. Needs Ray (a local one, or the cluster the job runs on).

    The same call on a folder it was interrupted in resumes: the centroids are reused once
    preprocess.npz exists (written last by the fit) and assignment files already written
    are kept. `overwrite` starts over; `keep` names entries of `out` that are not outputs
    (`cluster --checkpoint` embeds into OUT/embeddings). `fitted` = (centroids, pre, summary) of
    a fit already made (a k sweep's) skips the fit."""
    from .distributed import assign_all, check_gpus, check_request, fit_remote
    from .distributed import fitted as fitted_k
    from .fit import CLUSTERERS, Preprocess, load_clusterer, restarts

    nredo = restarts(nredo, manifold)
    out = loc(out)
    check_access(out, write=True)
    size = check_request(features.count, k, sample, gpus, manifold=manifold, manifold_dim=manifold_dim,
                         preprocess=preprocess, method=method, spherical=spherical)  # pca_dim is clamped later
    check_gpus(gpus)
    if not gpus:  # a cluster scaled to zero: one CPU node first (the fit task and the actors size from it)
        from ..capacity import wait_for

        wait_for([{"CPU": 1}], "clustering")
    # What this folder is computed from: the same command run again (after a crash) resumes.
    spec = {"features": features.description, "files": features.files, "count": features.count, "k": k,
            "preprocess": preprocess, "pca_dim": pca_dim, "niter": niter, "nredo": nredo, "spherical": spherical,
            "sample": sample, "seed": seed, "manifold": manifold, "manifold_dim": manifold_dim}
    if method != "kmeans":  # (a k-means folder written before the option existed still resumes)
        spec["method"] = method
    resume = not overwrite and (out / SPEC).is_file() and (out / SPEC).read_json() == spec
    if not resume:
        if set(p.name for p in out.iterdir()) - set(keep) and not overwrite:
            raise UserError(f"output directory {out} is not empty (and not an interrupted run of this command); "
                            "pass --overwrite to replace it")
        (out / "metrics.json").unlink()  # first: a folder without it is never mistaken for a finished run
        for old in (*OUTPUTS, SPEC):
            (out / old).rmtree()
            (out / old).unlink()
        out.mkdir()
        (out / SPEC).write_json(spec)
    t0 = time.perf_counter()
    if resume and (out / "preprocess.npz").is_file():  # written after centroids.npy: both are there
        centroids = (out / "centroids.npy").read_npy()
        with np.load(io.BytesIO((out / "preprocess.npz").read_bytes()), allow_pickle=False) as z:
            pre = Preprocess.from_arrays(z)
            model = load_clusterer(centroids, z)
        fit = (out / ".fit.json").read_json()
        print(f"{CLUSTERERS[method]}: reusing the centroids in {out} (an interrupted run of this command)")
    else:
        if fitted is None:
            print(f"{CLUSTERERS[method]}: k={k} on {size} of {features.count} points"
                  f"{'' if sample else ' (the default --sample)'}, {f'{gpus} GPU(s)' if gpus else 'CPU'}"
                  f"{f', after UMAP to {manifold_dim}-d (fitted on {min(size, MANIFOLD_SAMPLE)} points)' if manifold == 'umap' else ''}; "
                  f"{features.description}")
            fits, pre, fit = fit_remote(features, [k], preprocess, pca_dim, niter, nredo, spherical, size, seed, gpus,
                                        manifold, manifold_dim, method)
            c, pre, fit = fitted_k(fits, pre, fit, k)
            fitted = c, pre, fit | {"seconds": time.perf_counter() - t0}
        centroids, pre, fit = fitted
        model = fit.get("model")
        fit = {"trained_on": fit["trained_on"], "threads": fit["threads"], "seconds": fit["seconds"],
               "criteria": fit["criteria"], "criteria_seconds": fit.get("criteria_seconds")}
        (out / ".fit.json").write_json(fit)
        (out / "centroids.npy").write_npy(centroids)
        buf = io.BytesIO()
        np.savez(buf, method=pre.method, spherical=spherical, **pre.arrays(),  # what the actors apply
                 **(model.arrays() if model is not None else {}))
        (out / "preprocess.npz").write_bytes(buf.getvalue())  # last, and atomic: marks the fit as complete
    t_fit = fit["seconds"]

    # On a local disk the files go to .assignments.tmp, renamed when all are in. An object store
    # cannot rename a folder (it would copy every object): they are written in place. Either way
    # metrics.json, written last, is what marks the output complete.
    tmp = out / ".assignments.tmp" if out.is_local else out / "assignments"
    if resume and out.is_local and (out / "assignments").is_dir():  # killed after the rename: its files are all done
        (out / "assignments").move(tmp)
    totals = assign_all(features, centroids, pre, spherical, tmp.uri, gpus=gpus, actors=actors,
                        per_cluster=montage_per_cluster, progress=progress, model=model)
    if totals.bad:
        tmp.rmtree()
        raise UserError(f"embeddings contain non-finite values (NaN/Inf) in {totals.bad} rows; "
                        "re-embed from a checkpoint that trained without diverging")
    if tmp != out / "assignments":
        tmp.move(out / "assignments")
    sizes = totals.sizes
    metrics = {
        "k": k, "n": totals.n, "inertia": totals.inertia, "sizes": sizes.tolist(),
        "empty_clusters": int((sizes == 0).sum()), "features": features.description,
        "preprocess": preprocess, "pca_dim": pca_dim if preprocess.startswith("pca") else None,
        "manifold": manifold, "manifold_dim": manifold_dim if manifold != "none" else None, "method": method,
        "niter": niter, "nredo": nredo, "spherical": spherical, "trained_on": fit["trained_on"],
        "device": f"{gpus} GPU(s)" if gpus else "CPU", "fit_threads": fit["threads"],
        "seconds_fit": round(t_fit, 3), "resumed": resume,
        "seconds_criteria": fit.get("criteria_seconds"),  # part of seconds_fit
        "seconds_assign": round(totals.seconds_assign, 3),
        "seconds_metrics": round(totals.seconds_metrics, 3), "seconds_total": round(time.perf_counter() - t0, 3),
        "criteria": fit.get("criteria"),  # label-free (criteria.py), on the k-means sample
        **metrics_from_contingency(totals.cont),
        "contingency": totals.cont.tolist(),  # clusters x classes: the confusion matrix of the report
    }
    (out / "metrics.json").write_json(metrics)
    data = data or features.data
    if data:
        montage(data, totals.top_ids, out / "montage.png")
    return metrics


def montage_ids(ids: np.ndarray, clusters: np.ndarray, dists: np.ndarray, k: int, per_cluster: int) -> np.ndarray:
    """(k, per_cluster) ids: each cluster's points nearest its centroid first, -1 where it has fewer."""
    order = np.lexsort((dists, clusters))  # by cluster, then distance
    starts = np.searchsorted(clusters[order], np.arange(k))
    ends = np.searchsorted(clusters[order], np.arange(k), side="right")
    chosen = np.full((k, per_cluster), -1, np.int64)
    for c in range(k):
        take = ids[order[starts[c] : min(ends[c], starts[c] + per_cluster)]]
        chosen[c, : len(take)] = take
    return chosen


def montage(data, chosen: np.ndarray, path: Loc) -> None:
    """One row per cluster of `chosen` (k, per_cluster) ids, nearest the centroid first (-1:
    blank). Reads only the row groups holding those rows (`read_images_by_id`)."""
    m = read_manifest(data)
    per_cluster = chosen.shape[1]
    wanted = chosen[chosen >= 0]
    found = read_images_by_id(data, wanted)
    missing = [int(i) for i in wanted if int(i) not in found]
    if missing:
        raise UserError(f"embeddings and dataset {data} do not match: {len(missing)} ids (e.g. {missing[:3]}) "
                        "are not in the dataset; pass the --data the embeddings were made from")
    res, ch = m["resolution"], m["channels"]
    blank = bytes(res * res * ch)
    imgs = decode_images([found.get(int(i), blank) if i >= 0 else blank for i in chosen.ravel()], res, ch)
    save_grid(imgs, path, nrow=per_cluster)

