"""Quality metrics that work offline, inside a Tune trial.

- Frechet distance and KID between real and generated images in a feature
  space: by default a small domain classifier trained once per labelled dataset
  (`distgan evaluator train`), the idea of Ray's PBT DCGAN example scoring MNIST
  samples with an MNIST classifier. With a local Inception weights file
  (`eval.inception_weights`) and torch-fidelity installed, the standard FID
  feature extractor is used instead. Nothing is ever downloaded.
- `eval/stability`, `eval/silhouette`, `eval/davies_bouldin`: label-free criteria of the
  k-means clustering of D's embeddings of a held-out subset (cluster/criteria.py), what
  selects a model on an unlabelled dataset; with labels also `eval/nmi` and `eval/probe_acc`
  (a logistic-regression probe). No generator involved.

Training calls `Evaluator.__call__(G_ema, D, step)` on rank 0 every `eval.every`
steps; train.py only knows it as an optional factory passed in by the CLI or the
Tune driver, so imports still flow one way. The k-means and probe come from
cluster.py, which is numpy-only and imports nothing above data.
"""
from __future__ import annotations

import copy
import time
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .storage import loc
from .config import Config, UserError
from .models import recalibrate_batchnorm, unwrap

CLASSIFIER_FORMAT = "distgan-evaluator-v1"


# ---------------------------------------------------------------- distances


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for features (N, F) and (M, F)."""
    from scipy import linalg

    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as pytorch-fid does
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 10, subset_size: int = 500,
                              seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged over subsets."""
    rng = np.random.default_rng(seed)
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals))


# ---------------------------------------------------------------- domain classifier


class DomainClassifier(nn.Module):
    """Small CNN: (N, C, R, R) in [-1, 1] -> 128-d features -> class logits."""

    def __init__(self, channels: int, resolution: int, n_classes: int):
        super().__init__()
        self.meta = {"channels": channels, "resolution": resolution, "n_classes": n_classes}
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, 128)
        )
        self.head = nn.Linear(128, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(data: str | Path, out: str | Path, epochs: int = 3, batch_size: int = 128, seed: int = 0,
                     progress: bool = True) -> dict:
    """Train the domain classifier on the train split, report test accuracy, save weights only."""
    from tqdm import tqdm

    from .data import read_arrays, read_manifest, to_float, decode_images

    m = read_manifest(data)
    n_classes = len(m["class_names"])
    if n_classes < 2:
        raise UserError(f"{data} has no class labels: the domain classifier needs a labelled dataset")
    arrays = {s: read_arrays(data, split=s) for s in ("train", "test")}
    if len(arrays["train"]["id"]) == 0:
        raise UserError(f"{data} has no train split")
    torch.manual_seed(seed)
    clf = DomainClassifier(m["channels"], m["resolution"], n_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    x_all = decode_images(arrays["train"]["image"], m["resolution"], m["channels"])
    y_all = torch.from_numpy(arrays["train"]["label"].astype(np.int64))
    known = y_all >= 0
    x_all, y_all = x_all[known.numpy()], y_all[known]
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        clf.train()
        order = rng.permutation(len(y_all))
        for i in tqdm(range(0, len(order), batch_size), desc=f"classifier epoch {epoch + 1}/{epochs}", disable=not progress):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(clf(to_float(x_all[idx])), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = None
    if len(arrays["test"]["id"]):
        acc = classifier_accuracy(clf, decode_images(arrays["test"]["image"], m["resolution"], m["channels"]),
                                  arrays["test"]["label"])
    state = {"format": CLASSIFIER_FORMAT, "state": clf.state_dict(), **clf.meta, "test_acc": acc,
             "dataset": loc(data).uri}
    buf = io.BytesIO()
    torch.save(state, buf)
    loc(out).write_bytes(buf.getvalue())
    return {"test_acc": acc, "path": loc(out).uri}


def classifier_accuracy(clf, images_u8: np.ndarray, labels: np.ndarray) -> float:
    from .data import to_float

    clf.eval()
    with torch.no_grad():
        pred = torch.cat([clf(to_float(images_u8[i : i + 512])).argmax(1) for i in range(0, len(images_u8), 512)])
    keep = labels >= 0
    return float((pred.numpy()[keep] == labels[keep]).mean())


def _local_copy(path) -> str:
    """A local path to a weights file that may live in object storage (torch-fidelity opens
    a path itself): a remote file is fetched once per process into a temporary folder."""
    import hashlib
    import tempfile

    p = loc(path)
    if not p.is_file():
        raise UserError(f"Inception weights not found: {p}")
    if p.is_local:
        return p.path
    # named by the URI's digest (Python's hash() differs per process): fetched once per machine
    dst = Path(tempfile.gettempdir()) / f"distgan-weights-{hashlib.sha1(p.uri.encode()).hexdigest()[:12]}-{p.name}"
    if not dst.is_file():
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(p.read_bytes())
        tmp.replace(dst)
    return str(dst)


def load_classifier(path: str | Path) -> DomainClassifier:
    p = loc(path)
    if not p.is_file():
        raise UserError(f"evaluator weights not found: {p} (make them with `distgan evaluator train`)")
    try:
        state = torch.load(io.BytesIO(p.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{p} cannot be loaded as evaluator weights: {type(e).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{p} is not a distgan evaluator file")
    clf = DomainClassifier(state["channels"], state["resolution"], state["n_classes"])
    clf.load_state_dict(state["state"])
    return clf.eval()


class InceptionFeatures(nn.Module):
    """The standard FID feature extractor (2048-d pool3) from a local weights file,
    through torch-fidelity (what torchmetrics' `feature_extractor_weights_path` uses)."""

    def __init__(self, weights: str | Path):
        super().__init__()
        weights = _local_copy(weights)
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise UserError("--inception-weights needs torch-fidelity (pip install torch-fidelity); "
                            "or use the domain classifier (eval.classifier)") from None
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the extractor wants uint8 RGB
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        return self.net(u8)[0]


def _features(extractor, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """(N, C, H, W) on any device -> (N, F) float32 numpy, computed on the extractor's device."""
    device = next(extractor.parameters()).device
    with torch.no_grad():
        return torch.cat([extractor.features(images[i : i + batch].to(device)).float().cpu()
                          for i in range(0, len(images), batch)]).numpy()


# ---------------------------------------------------------------- during training


class Evaluator:
    """Callable run on rank 0 every `eval.every` steps: {"eval/fid", "eval/kid"} (with a feature
    extractor), the label-free {"eval/stability", "eval/silhouette", "eval/davies_bouldin"}
    (cluster/criteria.py) and, when the held-out images have labels, {"eval/nmi", "eval/probe_acc"}.

    Built once per worker: real held-out images are read at construction and
    featurised at the first call, on the training device (rank 0's GPU on a
    cluster: generation, features, the D copy and its BatchNorm re-estimation all
    run there, while the other ranks wait at their next collective). Each call
    costs one generation pass, one feature pass, one D pass and one small k-means
    on the CPU; `eval.num_images` bounds all of it."""

    def __init__(self, cfg: Config):
        from .data import decode_images, read_arrays, read_manifest

        e, m = cfg.eval, read_manifest(cfg.data.path)
        split = "test" if m["split_counts"].get("test") else "train"
        a = read_arrays(cfg.data.path, split=split)
        rng = np.random.default_rng(0)
        take = rng.permutation(len(a["id"]))[: e.num_images]
        self.real_u8 = decode_images(a["image"][take], m["resolution"], m["channels"])  # (n, H, W, C) uint8
        self.labels = a["label"][take]
        self.z_dim, self.n = cfg.model.z_dim, len(take)
        self.k = len(m["class_names"]) if len(m["class_names"]) >= 2 else cfg.cluster.k  # unlabelled: cluster.k
        self.cluster = cfg.cluster  # the read-out and preprocessing `distgan cluster` would use
        self.extractor = None
        if e.inception_weights:
            self.extractor = InceptionFeatures(e.inception_weights).eval()
        elif e.classifier:
            self.extractor = load_classifier(e.classifier)
        self.real_feats = None  # featurised at the first call, on the training device
        self.device = None

    def _to(self, device: torch.device) -> torch.Tensor:
        """The held-out images (n, C, H, W) on `device`; extractor and real features moved/made once."""
        from .data import to_device

        real = to_device(self.real_u8, device)
        if self.device != device:
            self.device = device
            if self.extractor is not None:
                self.extractor.to(device)
                self.real_feats = _features(self.extractor, real)
        return real

    def __call__(self, G_ema: nn.Module, D: nn.Module, step: int) -> dict:
        cl = self.cluster
        t = time.perf_counter()
        out: dict[str, float] = {}
        # G_ema stays where training keeps it (a GPU on a cluster): moving it would break the
        # next EMA update. Everything else comes to it.
        dev = next(G_ema.parameters()).device
        real = self._to(dev)
        if self.extractor is not None:
            # The noise comes from a CPU generator so every device sees the same z.
            g = torch.Generator().manual_seed(step)
            with torch.no_grad():
                z = torch.randn(self.n, self.z_dim, generator=g)  # (n, z_dim)
                fake = torch.cat([G_ema(z[i : i + 256].to(dev)).float() for i in range(0, self.n, 256)])
            fake_feats = _features(self.extractor, fake)
            out["eval/fid"] = frechet_distance(self.real_feats, fake_feats)
            out["eval/kid"] = kernel_inception_distance(self.real_feats, fake_feats, subset_size=min(500, self.n))
        if self.n >= 4 * self.k:  # enough held-out points to halve for the stability criterion
            emb = embed_held_out(D, self.real_u8, cl.features, cl.readout, real)  # (n, E)
            known = self.labels >= 0
            scores = embedding_criteria(emb, self.k, cl, self.labels if known.sum() >= 2 * self.k else None)
            out |= {f"eval/{name}": v for name, v in scores.items()}
            if "nmi" in scores:
                out["eval/probe_acc"] = _holdout_probe(emb[known], self.labels[known])
        out["eval/seconds"] = time.perf_counter() - t
        return out



# ---------------------------------------------------------------- label-free scoring of a D


def embed_held_out(D: nn.Module, images_u8: np.ndarray, features: str, readout: str,
                   real: torch.Tensor | None = None) -> np.ndarray:
    """D's embeddings (n, E) float32 of held-out images (n, H, W, C) uint8: a copy of D on its
    own device, BatchNorm re-estimated on these images, eval mode. `real`: the same images
    already on that device as (n, C, H, W) floats, when the caller has them."""
    from .data import to_device

    d = recalibrate_batchnorm(copy.deepcopy(unwrap(D)), images_u8)
    if real is None:
        real = to_device(images_u8, next(d.parameters()).device)
    with torch.no_grad():
        return torch.cat([d.embed(real[i : i + 256], features, readout).float().cpu()
                          for i in range(0, len(real), 256)]).numpy()


def embedding_criteria(emb: np.ndarray, k: int, cl, labels: np.ndarray | None = None) -> dict:
    """What `distgan cluster` would fit on these embeddings (emb (n, E); the config's cluster
    section `cl`: preprocessing, the manifold step, restarts), scored by every label-free
    criterion; with labels (n,) (-1 unknown) also the NMI of the clustering."""
    from .cluster import clustering_metrics, fit_sample, search
    from .cluster.criteria import criteria

    _, km, z = fit_sample(emb, k, cl.preprocess, min(cl.pca_dim, emb.shape[1]), cl.niter, cl.nredo,
                          cl.spherical, seed=0, manifold=cl.manifold, manifold_dim=cl.manifold_dim, method=cl.method)
    c, _ = search(km.index, z)
    out = criteria(z, c, k, spherical=cl.spherical)
    if labels is not None:
        known = labels >= 0
        out["nmi"] = clustering_metrics(labels[known], c[known])["nmi"]
    return out


def select_checkpoint(run_dir: str, data: str, criterion: str, features: str, readout: str,
                      images: int = 2000, k: int | None = None, progress: bool = True) -> dict:
    """Score every checkpoint_* of a run folder by a label-free criterion on `images` images of
    `data` (embedded by that checkpoint's D with this read-out, clustered as its config's
    cluster section says, k = the dataset's classes or cluster.k) and pick the best. Returns
    {"checkpoint", "step", "criterion", "value", "k", "images", "table": [per checkpoint]}."""
    from tqdm import tqdm

    from . import config as C
    from .cluster.criteria import CRITERIA, best, check_criterion
    from .data import read_manifest, sample_rows
    from .models import STATE_FILE, check_data_fits, discriminator_from_checkpoint, embedding_dim, load_state
    from .storage import check_access

    check_criterion(criterion)
    run = loc(run_dir)
    check_access(run)
    if (run / STATE_FILE).exists():
        raise UserError(f"--select scores the checkpoints of a run: give the run folder holding checkpoint_* "
                        f"folders, not one checkpoint ({run})")
    ckpts = sorted((c for c in run.glob("checkpoint_*") if (c / STATE_FILE).is_file()), key=lambda c: c.name) if run.is_dir() else []
    if not ckpts:
        raise UserError(f"no checkpoint_* folders with {STATE_FILE} in {run}: --select needs a run folder of `distgan train`")
    manifest = read_manifest(data)
    classes = len(manifest["class_names"])
    x_u8, labels = sample_rows(data, images, seed=1)  # seed 1: not the calibration sample of `embed`
    table = []
    for ck in tqdm(ckpts, desc=f"scoring checkpoints ({criterion})", disable=not progress):
        state = load_state(ck)
        D, mcfg = discriminator_from_checkpoint(state)
        check_data_fits(manifest, mcfg, data)
        embedding_dim(D, features, readout, mcfg.resolution, mcfg.channels)  # a grid too large: UserError
        cl = C.from_dict(state["config"]).cluster
        kk = k or (classes if classes >= 2 else cl.k)
        if len(x_u8) < 4 * kk:
            raise UserError(f"--select needs at least {4 * kk} images for k={kk}; {data} gave {len(x_u8)}")
        scores = embedding_criteria(embed_held_out(D, x_u8, features, readout), kk, cl,
                                    labels if (labels >= 0).sum() >= 2 * kk else None)
        table.append({"checkpoint": ck.uri, "step": int(state["step"]), "k": kk, **scores})
    # ties go to the later checkpoint: max() keeps the first of equals, so look from the end
    pick = best(table[::-1], criterion)
    return {"checkpoint": pick["checkpoint"], "step": pick["step"], "criterion": criterion,
            "direction": CRITERIA[criterion], "value": pick[criterion], "k": pick["k"], "images": len(x_u8),
            "features": features, "readout": readout, "table": table}


def _holdout_probe(x: np.ndarray, y: np.ndarray) -> float:
    """Logistic regression on half the subset, accuracy on the other half."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    half = len(y) // 2
    sc = StandardScaler().fit(x[:half])
    clf = LogisticRegression(max_iter=300).fit(sc.transform(x[:half]), y[:half])
    return float((clf.predict(sc.transform(x[half:])) == y[half:]).mean())


def make_evaluator(cfg: Config) -> Evaluator | None:
    """None when evaluation is off (eval.every = 0)."""
    return Evaluator(cfg) if cfg.eval.every > 0 else None
