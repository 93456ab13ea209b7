"""Clustering and probe quality on MNIST and Fashion-MNIST (all 70,000 images each):
k-means (k = 10) on raw pixels, on the embeddings of the same D at random
initialisation (the control), and on D embeddings after a training run of the
length given below; for each --features and --preprocess choice; plus
linear-probe accuracy. Training must beat its own control to claim anything.

    python -m benchmarks.quality [--quick] [--steps N]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from distgan import config as C
from distgan.cluster import array_features, linear_probe, pixel_features, run_clustering
from distgan.data import decode_images, init_ray, prepare, read_arrays
from distgan.embed import embed_images, load_embedder
from distgan.train import resolve_data, run_training, save_untrained_checkpoint

from .common import DATASETS, write_results

ANCHORS = """Anchors (not measured here): faiss k-means on raw pixels of all 70,000 images (k = 10, 50 iterations,
mean of 3 seeds): MNIST ACC 0.53, NMI 0.48, ARI 0.35; Fashion-MNIST ACC 0.49, NMI 0.52, ARI 0.35.
ClusterGAN (mean of 10 runs, its README): MNIST ACC 0.91, NMI 0.85, ARI 0.83; Fashion-MNIST ACC 0.61, NMI 0.62, ARI 0.46."""


def kmeans_rows(feats, out: Path, seeds, **kw) -> dict:
    ms = [run_clustering(feats, out, 10, seed=s, overwrite=True, progress=False, **kw) for s in seeds]
    return {k: float(np.mean([m[k] for m in ms])) for k in ("acc", "nmi", "ari")}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="MNIST only, short training, one seed")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--width", type=int, default=32)
    args = p.parse_args(argv)
    if not (DATASETS / "MNIST" / "raw").is_dir():
        print(f"datasets not found at {DATASETS}; set DISTGAN_DATASETS")
        return []
    steps = 300 if args.quick else args.steps
    seeds = [0] if args.quick else [0, 1, 2]
    sources = ["mnist"] if args.quick else ["mnist", "fashion-mnist"]
    tmp = Path(tempfile.mkdtemp(prefix="distgan-quality-"))
    init_ray()
    torch.set_num_threads(2)
    rows = []
    for source in sources:
        data = tmp / source
        prepare(source, data, data_root=DATASETS, progress=False)
        a = read_arrays(data)
        images = decode_images(a["image"], 32, 1)
        r = kmeans_rows(pixel_features(data), tmp / "c", seeds, preprocess="none", niter=50)
        rows.append({"dataset": source, "features": "raw pixels", "D": "-", "preprocess": "none", **r, "probe acc": None})
        base = C.load(None, {"data.path": str(data), "model.width": args.width, "data.split": "all",
                             "train.steps": steps, "train.log_every": 100, "train.checkpoint_every": steps})
        cfg = resolve_data(base)
        ctrl = save_untrained_checkpoint(cfg, tmp / f"{source}-control")
        trained = run_training(cfg, storage=str(tmp / "runs"), name=source).checkpoint
        for label, ckpt in (("random init (control)", ctrl), (f"trained {steps} steps", trained)):
            D, _ = load_embedder(ckpt, data)
            for feat in ("last", "multi"):
                x = embed_images(D, images, feat)
                feats = array_features(a["id"], a["label"], a["split"], x, f"D {feat}")
                probe = linear_probe(feats, max_train=20000)["accuracy"]
                for pre in ("l2", "pca-whiten"):
                    r = kmeans_rows(feats, tmp / "c", seeds, preprocess=pre, niter=50)
                    rows.append({"dataset": source, "features": f"D {feat} ({x.shape[1]}-d)", "D": label,
                                 "preprocess": pre, **r, "probe acc": probe})
    for r in rows:
        if r["probe acc"] is None:
            r["probe acc"] = "-"
    notes = (f"k-means: faiss, k = 10, 50 iterations, mean of {len(seeds)} seed(s); pca-whiten keeps 64 dimensions. "
             f"Training: DCGAN width {args.width}, ns loss, batch 64, 1 worker, {steps} steps on all 70k images. "
             "Probe: logistic regression on 20,000 train-split images, accuracy on the 10,000 test images.\n\n" + ANCHORS)
    cmd = "python -m benchmarks.quality" + ("" if args.quick else f" --steps {steps}")
    write_results("quality", rows, ["dataset", "features", "D", "preprocess", "acc", "nmi", "ari", "probe acc"], cmd, notes,
                  quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
