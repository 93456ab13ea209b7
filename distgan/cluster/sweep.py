"""`distgan cluster --k 5,10,20` (or 4:40:4): one fit task clusters the sample at every k
(preprocessing and UMAP fitted once), scores each with the label-free criteria (criteria.py),
suggests the k whose chosen criterion is best, and assigns every point for that k (or for
every k). Writes OUT/k_sweep.json (the table, the criterion, suggested_k), k_sweep.csv and
k_sweep.png beside the suggested k's usual outputs (or OUT/k<K>/ per k with all_k)."""
from __future__ import annotations

import io
import time

from ..storage import loc
from .criteria import CRITERIA, best, check_criterion
from .features import Features

SWEEP_FILES = ("k_sweep.json", "k_sweep.csv", "k_sweep.png")


def plot_sweep(rows: list[dict], criterion: str, suggested: int) -> bytes:
    """One panel per criterion against k; the suggested k marked. PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, axes = plt.subplots(1, len(CRITERIA), figsize=(4 * len(CRITERIA), 3))
    for ax, name in zip(axes, CRITERIA):
        ax.plot(ks, [r[name] for r in rows], "o-")
        ax.axvline(suggested, color="tab:red", ls="--", lw=1)
        ax.set_xlabel("k")
        ax.set_title(f"{name} ({'higher' if CRITERIA[name] == 'max' else 'lower'} is better)"
                     + (" *" if name == criterion else ""), fontsize=9)
    fig.suptitle(f"label-free criteria per k; suggested k = {suggested} (by {criterion})", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def sweep_k(features: Features, out: str, ks: list[int], criterion: str = "stability", all_k: bool = False,
            preprocess: str = "pca", pca_dim: int = 64, niter: int = 20, nredo: int = 0, spherical: bool = False,
            sample: int = 0, seed: int = 0, manifold: str = "none", manifold_dim: int = 10, method: str = "kmeans", gpus: int = 0,
            keep: tuple[str, ...] = (), **assign_kw) -> dict:
    """Cluster the sample at every k in ks, suggest one, assign every point for it (all_k: for
    each). Returns the sweep summary (what k_sweep.json holds)."""
    import pandas as pd

    from .distributed import check_request, fit_remote, fitted
    from .stage import run_clustering

    from ..storage import check_access

    check_criterion(criterion)
    out = loc(out)
    check_access(out, write=True)
    size = check_request(features.count, ks, sample, gpus, manifold=manifold, manifold_dim=manifold_dim,
                         preprocess=preprocess, method=method, spherical=spherical)
    t0 = time.perf_counter()
    from .fit import CLUSTERERS

    print(f"{CLUSTERERS[method]}: k in {ks} on {size} of {features.count} points, "
          f"{f'{gpus} GPU(s)' if gpus else 'CPU'}{', after UMAP' if manifold == 'umap' else ''}; {features.description}")
    fits, pre, info = fit_remote(features, ks, preprocess, pca_dim, niter, nredo, spherical, size, seed, gpus,
                                 manifold, manifold_dim, method)
    rows = [{"k": k, **fits[k]["criteria"]} for k in ks]
    suggested = best(rows, criterion)["k"]
    summary = {"criterion": criterion, "suggested_k": suggested, "ks": ks, "table": rows,
               "trained_on": info["trained_on"], "seconds_fit": round(time.perf_counter() - t0, 3)}
    kw = dict(preprocess=preprocess, pca_dim=pca_dim, niter=niter, nredo=nredo, spherical=spherical, sample=sample,
              seed=seed, manifold=manifold, manifold_dim=manifold_dim, method=method, gpus=gpus,
              **assign_kw)
    for k in ks if all_k else [suggested]:
        m = run_clustering(features, (out / f"k{k}").uri if all_k else out.uri, k, fitted=fitted(fits, pre, info, k),
                           keep=(*keep, *SWEEP_FILES, *(f"k{v}" for v in ks)), **kw)
        if k == suggested:
            summary["suggested_metrics"] = {key: m[key] for key in ("acc", "nmi", "ari") if key in m}
    # written last: a folder with k_sweep.json holds a finished sweep
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    (out / "k_sweep.csv").write_text(buf.getvalue())
    (out / "k_sweep.png").write_bytes(plot_sweep(rows, criterion, suggested))
    (out / "k_sweep.json").write_json(summary)
    return summary
