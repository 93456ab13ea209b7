"""The clustering stage: fit, assign every point, write the outputs, montage."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import UserError
from ..data import decode_images, read_manifest, save_grid, shard_paths
from .features import Features
from .metrics import metrics_from_contingency

SPEC = ".cluster-spec.json"  # what a (possibly interrupted) output folder is computed from
OUTPUTS = ("assignments", ".assignments.tmp", "assignments.parquet", "centroids.npy", "preprocess.npz",
           ".fit.json", "metrics.json", "montage.png")


def run_clustering(
    features: Features, out: str | Path, k: int, preprocess: str = "pca-whiten", pca_dim: int = 64,
    niter: int = 20, nredo: int = 1, spherical: bool = False, sample: int = 0, seed: int = 0,
    data: str | Path | None = None, montage_per_cluster: int = 8, overwrite: bool = False, progress: bool = True,
    gpus: int = 0, actors: int = 0, keep: tuple[str, ...] = (),
) -> dict:
    """Fit on a sample in a Ray task, assign every point with Ray Data actors, write
    OUT/assignments/ (Parquet files), centroids.npy, preprocess.npz, metrics.json and
    montage.png. Needs Ray (a local one, or the cluster the job runs on).

    The same call on a folder it was interrupted in resumes: the centroids are reused once
    preprocess.npz exists (written last by the fit) and assignment files already written
    are kept. `overwrite` starts over; `keep` names entries of `out` that are not outputs
    (`cluster --checkpoint` embeds into OUT/embeddings)."""
    from .distributed import assign_all, check_gpus, check_request, fit_remote
    from .fit import Preprocess

    out = Path(out)
    size = check_request(features.count, k, sample, gpus)  # pca_dim is clamped to the dimension here
    check_gpus(gpus)
    # What this folder is computed from: the same command run again (after a crash) resumes.
    spec = {"features": features.description, "files": features.files, "count": features.count, "k": k,
            "preprocess": preprocess, "pca_dim": pca_dim, "niter": niter, "nredo": nredo, "spherical": spherical,
            "sample": sample, "seed": seed}
    resume = not overwrite and (out / SPEC).is_file() and json.loads((out / SPEC).read_text()) == spec
    if not resume:
        if out.exists() and set(p.name for p in out.iterdir()) - set(keep) and not overwrite:
            raise UserError(f"output directory {out} is not empty (and not an interrupted run of this command); "
                            "pass --overwrite to replace it")
        for old in (*OUTPUTS, SPEC):
            if (out / old).is_dir():
                shutil.rmtree(out / old)
            elif (out / old).exists():
                (out / old).unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / SPEC).write_text(json.dumps(spec, indent=2))
    t0 = time.perf_counter()
    if resume and (out / "preprocess.npz").is_file():  # written after centroids.npy: both are there
        centroids = np.load(out / "centroids.npy")
        with np.load(out / "preprocess.npz", allow_pickle=False) as z:
            pre = Preprocess(str(z["method"]), *(z[n] if n in z else None for n in ("mean", "proj")))
        fit = json.loads((out / ".fit.json").read_text())
        print(f"faiss k-means: reusing the centroids in {out} (an interrupted run of this command)")
    else:
        print(f"faiss k-means: k={k} on {size} of {features.count} points"
              f"{'' if sample else ' (the default --sample)'}, {f'{gpus} GPU(s)' if gpus else 'CPU'}; "
              f"{features.description}")
        centroids, pre, fit = fit_remote(features, k, preprocess, pca_dim, niter, nredo, spherical, size, seed, gpus)
        fit = {"trained_on": fit["trained_on"], "threads": fit["threads"], "seconds": time.perf_counter() - t0}
        (out / ".fit.json").write_text(json.dumps(fit))
        np.save(out / "centroids.npy", centroids)
        np.savez(out / ".preprocess.tmp.npz", method=pre.method, spherical=spherical,  # what the actors apply
                 **{name: v for name, v in (("mean", pre.mean), ("proj", pre.proj)) if v is not None})
        (out / ".preprocess.tmp.npz").replace(out / "preprocess.npz")  # last: marks the fit as complete
    t_fit = fit["seconds"]

    tmp = out / ".assignments.tmp"  # renamed when every file is written: never a partial folder that looks whole
    if resume and (out / "assignments").is_dir():  # killed after the rename: its files are all done
        (out / "assignments").rename(tmp)
    totals = assign_all(features, centroids, pre, spherical, str(tmp), gpus=gpus, actors=actors,
                        per_cluster=montage_per_cluster, progress=progress)
    if totals.bad:
        shutil.rmtree(tmp)
        raise UserError(f"embeddings contain non-finite values (NaN/Inf) in {totals.bad} rows; "
                        "re-embed from a checkpoint that trained without diverging")
    tmp.rename(out / "assignments")
    sizes = totals.sizes
    metrics = {
        "k": k, "n": totals.n, "inertia": totals.inertia, "sizes": sizes.tolist(),
        "empty_clusters": int((sizes == 0).sum()), "features": features.description,
        "preprocess": preprocess, "pca_dim": pca_dim if preprocess == "pca-whiten" else None,
        "niter": niter, "nredo": nredo, "spherical": spherical, "trained_on": fit["trained_on"],
        "device": f"{gpus} GPU(s)" if gpus else "CPU", "fit_threads": fit["threads"],
        "seconds_fit": round(t_fit, 3), "resumed": resume, "seconds_assign": round(totals.seconds_assign, 3),
        "seconds_metrics": round(totals.seconds_metrics, 3), "seconds_total": round(time.perf_counter() - t0, 3),
        **metrics_from_contingency(totals.cont),
        "contingency": totals.cont.tolist(),  # clusters x classes: the confusion matrix of the report
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
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


def montage(data: str | Path, chosen: np.ndarray, path: Path) -> None:
    """One row per cluster of `chosen` (k, per_cluster) ids, nearest the centroid first (-1:
    blank). Reads only those rows: a filter on id that pyarrow pushes down to the row groups."""
    import pyarrow as pa
    import pyarrow.dataset as pds

    m = read_manifest(data)
    per_cluster = chosen.shape[1]
    wanted = chosen[chosen >= 0]
    t = pds.dataset([str(f) for f in shard_paths(data)], format="parquet").to_table(
        columns=["id", "image"], filter=pds.field("id").isin(pa.array(wanted, pa.int64())))
    found: dict[int, bytes] = dict(zip(t["id"].to_pylist(), t["image"].to_pylist()))
    missing = [int(i) for i in wanted if int(i) not in found]
    if missing:
        raise UserError(f"embeddings and dataset {data} do not match: {len(missing)} ids (e.g. {missing[:3]}) "
                        "are not in the dataset; pass the --data the embeddings were made from")
    res, ch = m["resolution"], m["channels"]
    blank = bytes(res * res * ch)
    imgs = decode_images([found.get(int(i), blank) if i >= 0 else blank for i in chosen.ravel()], res, ch)
    save_grid(imgs, path, nrow=per_cluster)

