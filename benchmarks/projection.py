"""What storing embeddings projected (`distgan embed --dim`) costs in quality: one trained
checkpoint, every image of the dataset through the default read-out, scored whole and after
projections of several widths fitted on samples of several sizes, with the clustering and probe
of benchmarks/quality.py (3 k-means seeds, with and without the UMAP step).

    python -m benchmarks.projection --checkpoint CKPT --dataset fashion-mnist

The projection is the one `distgan embed` fits (fit_projection on the read-outs of images drawn
by sample_rows, as embed draws its 2,048 calibration images); the stored float16 is applied to
every variant.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import DATASETS, write_results

# (dim, images the basis is fitted on, manifolds scored); dim 0: the whole read-out; 2,048 images
# with the default dim is what `distgan embed` does (its BatchNorm calibration sample)
PLAN = ((0, 0, ("none", "umap")), (256, 2048, ("none", "umap")), (256, 8192, ("none",)), (128, 2048, ("none",)),
        (512, 2048, ("none",)))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.projection")
    p.add_argument("--checkpoint", help="a checkpoint trained on --dataset (e.g. by benchmarks.quality)")
    p.add_argument("--dataset", default="fashion-mnist", choices=("mnist", "fashion-mnist", "cifar10"))
    p.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks --quick`: does nothing here")
    args = p.parse_args(argv)
    if args.quick or not args.checkpoint:
        print("projection: needs --checkpoint CKPT (a trained D); no quick mode")
        return []
    if not (DATASETS / "MNIST" / "raw").is_dir():
        print(f"datasets not found at {DATASETS}; set DISTGAN_DATASETS")
        return []
    import torch

    from distgan.data import decode_images, prepare, read_arrays, sample_rows
    from distgan.embed import embed_images, fit_projection, load_embedder
    from distgan.models import DEFAULT_READOUT

    from .quality import evaluate

    torch.set_num_threads(2)
    data = Path(tempfile.mkdtemp(prefix="distgan-projection-")) / args.dataset
    prepare(args.dataset, data, data_root=DATASETS, progress=False)
    a = read_arrays(data)
    a["label"] = a["label"].astype(np.int64)
    D, state = load_embedder(args.checkpoint, data)
    m = state["config"]["model"]
    x = embed_images(D, decode_images(a["image"], m["resolution"], m["channels"]), "multi", DEFAULT_READOUT,
                     batch_size=256)  # (N, E) the whole read-out
    rows = []
    for dim, n_fit, manifolds in PLAN:
        fit_s = 0.0
        z = x
        if dim:
            images, _ = sample_rows(data, n_fit)
            t = time.perf_counter()
            basis = fit_projection(embed_images(D, images, "multi", DEFAULT_READOUT, batch_size=256), dim)
            fit_s = time.perf_counter() - t
            z = x @ basis
        z = z.astype(np.float16).astype(np.float32)  # as stored
        for manifold in manifolds:
            r = evaluate(z, a, "pca", manifold)
            rows.append({"dataset": args.dataset, "step": int(state["step"]), "read-out": f"{DEFAULT_READOUT} ({x.shape[1]}-d)",
                         "stored": f"{z.shape[1]}-d" + (f", basis from {n_fit} images" if dim else " (whole)"),
                         "fit s": round(fit_s, 2), "manifold": manifold,
                         **{k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k in ("acc", "nmi", "ari")},
                         "probe acc": round(r["probe acc"], 3)})
            print(rows[-1], flush=True)
    write_results("projection", rows, list(rows[0]), "python -m benchmarks.projection --checkpoint CKPT "
                  f"--dataset {args.dataset}",
                  "One checkpoint, every image. ACC / NMI / ARI: mean ± std over k-means seeds 0, 1, 2 on PCA to 64-d "
                  "then L2 (and UMAP to 10-d, 50 restarts, with manifold umap), as benchmarks/quality.py; probe: "
                  "logistic regression on 20,000 train-split images. 'fit s': embedding the sample's read-outs and "
                  "the randomized SVD.")
    return rows


if __name__ == "__main__":
    main()
