"""Linear probe on embeddings and the classic baselines on raw pixels (scikit-learn)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import UserError
from .features import Batch, Features, collect, pixel_features

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
