"""Linear probe on embeddings and the classic baselines on raw pixels (scikit-learn), on a
bounded sample of each split by default (`MAX_TRAIN`, `MAX_TEST`: what scikit-learn fits
in minutes and in memory), run in a Ray task by `probe_remote` so the driver holds none
of it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import UserError
from .features import Features, pixel_features

MAX_TRAIN, MAX_TEST = 50_000, 10_000


def sample_splits(features: Features, max_train: int = MAX_TRAIN, max_test: int = MAX_TEST, seed: int = 0):
    """Labelled train and test points, each split a uniform sample of at most max_* rows
    (0: all), streamed: every row draws a random key and each split keeps the rows with the
    smallest keys. Rows are buffered and cut back to the cap only when the buffer passes twice
    the cap, so each row is copied O(1) times (cutting on every batch copied the whole
    (cap, dim) sample once per batch: 1,000 times over on 10M pixels). Memory holds at most
    2 x cap rows per split and one batch. Returns (xtr, ytr, xte, yte, seen), seen = labelled
    points of each split before sampling."""
    rng = np.random.default_rng(seed)
    caps = {"train": max_train, "test": max_test}
    held: dict[str, list] = {name: [] for name in caps}  # [(x (b, dim), labels (b,), keys (b,)), ...]
    seen = {name: 0 for name in caps}
    for _, labels, splits, x in features.batches():
        keys = rng.random(len(labels))
        for name, cap in caps.items():
            sel = (labels >= 0) & (splits == name)
            seen[name] += int(sel.sum())
            if sel.any():
                held[name].append((x[sel], labels[sel], keys[sel]))
            if cap and sum(len(k) for _, _, k in held[name]) > 2 * cap:
                held[name] = [_smallest_keys(held[name], cap)]
    out = []
    for name, cap in caps.items():
        if not held[name]:
            raise UserError("the probe needs labelled images in both the train and the test split")
        x, y, _ = _smallest_keys(held[name], cap)
        if not np.isfinite(x).all():
            raise UserError("features contain non-finite values (NaN/Inf); re-embed from a finite checkpoint")
        out += [x, y]
    return (*out, seen)


def _smallest_keys(parts: list, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of `parts` with the cap smallest keys (all of them when cap is 0)."""
    x, y, k = (np.concatenate(p) for p in zip(*parts))
    if cap and len(k) > cap:
        top = np.argpartition(k, cap - 1)[:cap]
        x, y, k = x[top], y[top], k[top]
    return x, y, k


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


def linear_probe(features: Features, max_train: int = MAX_TRAIN, seed: int = 0, max_test: int = MAX_TEST) -> dict:
    """Logistic regression on (a sample of) the train split's features, accuracy on (a sample of) the test split."""
    xtr, ytr, xte, yte, seen = sample_splits(features, max_train, max_test, seed)
    return {"method": "logistic regression", "features": features.description, "train": len(ytr), "test": len(yte),
            "train_of": seen["train"], "test_of": seen["test"], **_fit_score(_logreg(), xtr, ytr, xte, yte)}


def pixel_baselines(data: str | Path, max_train: int = MAX_TRAIN, seed: int = 0, max_test: int = MAX_TEST) -> list[dict]:
    """The classic methods on raw pixels of the same (sampled) train/test split."""
    feats = pixel_features(data)
    xtr, ytr, xte, yte, seen = sample_splits(feats, max_train, max_test, seed)
    return [{"method": name, "features": feats.description, "train": len(ytr), "test": len(yte),
             "train_of": seen["train"], "test_of": seen["test"], **_fit_score(make(), xtr, ytr, xte, yte)}
            for name, make in BASELINES.items()]


def _probe_task(features: Features | None, data: str | None, max_train: int, max_test: int, seed: int) -> list[dict]:
    from ..data import actor_threads

    import threadpoolctl

    with threadpoolctl.threadpool_limits(actor_threads()):  # BLAS/OpenMP threads = the task's CPUs
        rows = [linear_probe(features, max_train, seed, max_test)] if features is not None else []
        return rows + (pixel_baselines(data, max_train, seed, max_test) if data else [])


def probe_remote(features: Features | None, data: str | Path | None = None, max_train: int = MAX_TRAIN,
                 max_test: int = MAX_TEST, seed: int = 0) -> list[dict]:
    """The probe (on `features`) and the pixel baselines (on `data`) in one Ray task with all
    of one node's CPUs, so the driver holds neither the sample nor the models."""
    import ray

    from ..data import largest_node

    task = ray.remote(max_calls=1)(_probe_task).options(num_cpus=max(1, int(largest_node("CPU"))))
    return ray.get(task.remote(features, str(data) if data else None, max_train, max_test, seed))


def probe_table(rows: list[dict]) -> str:
    lines = ["| features | method | train | test | accuracy | seconds |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['features']} | {r['method']} | {r['train']} | {r['test']} | {r['accuracy']:.4f} | {r['seconds']} |")
    sampled = [r for r in rows if r.get("train_of", r["train"]) > r["train"] or r.get("test_of", r["test"]) > r["test"]]
    if sampled:
        r = sampled[0]
        lines.append(f"\nOn a uniform sample: {r['train']} of {r['train_of']} train and {r['test']} of {r['test_of']} "
                     "test images (--max-train / --max-test; 0 = all).")
    return "\n".join(lines) + "\n"
