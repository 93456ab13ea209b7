"""Clustering metrics from (clusters x classes) contingency tables, so that tables of
blocks assigned on different machines add up on the driver."""
from __future__ import annotations

import numpy as np

def contingency(clusters: np.ndarray, labels: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """(k, n_classes) int64 counts of (cluster, label) over the labelled points (label >= 0).
    Tables of disjoint blocks add up to the table of their union: what distributed
    assignment sums on the driver instead of gathering label arrays."""
    known = labels >= 0
    flat = clusters[known].astype(np.int64) * n_classes + labels[known].astype(np.int64)
    return np.bincount(flat, minlength=k * n_classes).reshape(k, n_classes)


def metrics_from_contingency(cont: np.ndarray) -> dict:
    """ACC (Hungarian on the table), NMI (arithmetic mean of entropies, scikit-learn's
    default), ARI and purity from a (clusters, classes) contingency table alone."""
    from scipy.optimize import linear_sum_assignment
    from scipy.special import comb
    from sklearn.metrics import mutual_info_score

    n = int(cont.sum())
    if n == 0:
        return {"labels": "none: acc, nmi, ari and purity need labels and were left out"}
    cont = cont[cont.sum(axis=1) > 0][:, cont.sum(axis=0) > 0]  # empty rows/columns change nothing
    rows, cols = linear_sum_assignment(-cont)
    a, b = cont.sum(axis=1), cont.sum(axis=0)  # cluster sizes, class sizes

    def entropy(p):
        p = p[p > 0] / n
        return float(-(p * np.log(p)).sum())

    h_c, h_l = entropy(a), entropy(b)
    if len(a) == len(b) == 1:
        nmi = 1.0  # one cluster, one class: scikit-learn's convention
    else:
        mi = float(mutual_info_score(None, None, contingency=cont))
        nmi = mi / max((h_c + h_l) / 2, np.finfo(np.float64).eps) if mi > 0 else 0.0
    pairs, pairs_a, pairs_b = comb(cont, 2).sum(), comb(a, 2).sum(), comb(b, 2).sum()
    expected = pairs_a * pairs_b / comb(n, 2) if n > 1 else 0.0
    top = (pairs_a + pairs_b) / 2
    ari = 1.0 if top == expected else float((pairs - expected) / (top - expected))
    return {"acc": float(cont[rows, cols].sum() / n), "nmi": float(nmi), "ari": ari,
            "purity": float(cont.max(axis=1).sum() / n), "labelled_points": n}


def _dense(values: np.ndarray) -> tuple[np.ndarray, int]:
    ids, inverse = np.unique(values, return_inverse=True)
    return inverse, len(ids)


def cluster_acc(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian), as accuracy."""
    return clustering_metrics(labels, clusters)["acc"]


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    return clustering_metrics(labels, clusters)["purity"]


def clustering_metrics(labels: np.ndarray, clusters: np.ndarray) -> dict:
    """Metrics of label and cluster arrays (any integer ids; labels < 0 are unknown)."""
    known = labels >= 0
    if not known.any():
        return metrics_from_contingency(np.zeros((1, 1), np.int64))
    lab, n_lab = _dense(labels[known])
    cl, n_cl = _dense(clusters[known])
    return metrics_from_contingency(contingency(cl, lab, n_cl, n_lab))

