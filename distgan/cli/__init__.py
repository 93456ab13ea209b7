"""The `distgan` command. Thin: parse flags, call the stage modules, print where
results landed. A user mistake is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ClusterConfig, UserError

CLUSTER = ClusterConfig()  # the CLI's clustering defaults are the config's (pipeline and jobs use the same)

from .commands import (cmd_cluster, cmd_embed, cmd_evaluator_train, cmd_info, cmd_prepare, cmd_probe, cmd_report,
                       cmd_train, cmd_tune)
from .common import print_cluster_metrics  # noqa: F401  (re-exported)
from .pipeline import PIPELINE_DEFAULTS, cmd_pipeline  # noqa: F401  (PIPELINE_DEFAULTS re-exported)


# ---------------------------------------------------------------- parser


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of overrides of the defaults")
    p.add_argument("--data", help="prepared dataset folder")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. optim.lr_d=1e-4 (repeatable)")
    p.add_argument("--workers", type=int, help="Ray Train workers (train.num_workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu)")
    p.add_argument("--storage", default="runs", help="Ray storage path (local folder or s3://...)")
    p.add_argument("--name", default="distgan", help="run name; the same storage + name resumes")
    p.add_argument("--steps", type=int, help="G steps (train.steps)")
    p.add_argument("--smoke-test", action="store_true", help="tiny model, a few steps, generated data unless --data")


def build_parser() -> argparse.ArgumentParser:
    from ..data import SOURCES

    p = argparse.ArgumentParser(prog="distgan", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own INFO lines too (start-up, Ray Data execution plans, the token notice)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="image source -> Parquet shards + dataset.json")
    s.add_argument("source", help=f"one of: {', '.join(SOURCES)}")
    s.add_argument("--out", required=True)
    s.add_argument("--data-root", help="folder in torchvision's layout (mnist, fashion-mnist, cifar10) or of images (folder)")
    s.add_argument("--split", default="all", help="train | test | all")
    s.add_argument("--resolution", type=int, default=32)
    s.add_argument("--shard-rows", type=int, default=10000)
    s.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--count", type=int, default=1000, help="images for the fake source")
    s.add_argument("--seed", type=int, default=0, help="seed of the fake source")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("info", help="print a prepared dataset's manifest")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("train", help="train a GAN data-parallel on Ray Train")
    add_train_flags(s)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("embed", help="discriminator embeddings of every image (Ray Data actor pool)")
    s.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest checkpoint)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    add_embed_flags(s)
    s.add_argument("--actors", type=int, help="actor pool size (default: one per GPU, else 2)")
    s.add_argument("--select", metavar="CRITERION",
                   help="--checkpoint is a run folder: embed with its checkpoint that scores best by this label-free "
                        "criterion (stability | silhouette | davies_bouldin) on --select-images images of --data")
    s.add_argument("--select-images", type=int, default=2000, help="images scored per checkpoint by --select")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("cluster", help="FAISS k-means over embeddings or raw pixels")
    s.add_argument("--embeddings", help="output of `distgan embed`")
    s.add_argument("--pixels", help="prepared dataset: cluster its raw pixels (the baseline)")
    s.add_argument("--checkpoint", help="embed --data with this checkpoint first, then cluster")
    s.add_argument("--data", help="prepared dataset: images for montage.png (and the input with --checkpoint)")
    s.add_argument("--k", required=True,
                   help="clusters: a number, or several to choose from without labels: 5,10,20 or 4:40:4 (stop included)")
    s.add_argument("--select-k", default="stability", metavar="CRITERION",
                   help="with several --k: the label-free criterion that suggests one: stability | silhouette | davies_bouldin")
    s.add_argument("--all-k", action="store_true", help="with several --k: write every k's outputs (OUT/k<K>/), not only the suggested one")
    s.add_argument("--out", required=True)
    s.add_argument("--preprocess", default=CLUSTER.preprocess,
                   help=f"none | l2 | pca (PCA, then L2) | pca-whiten (PCA with whitening, then L2); default {CLUSTER.preprocess}")
    s.add_argument("--pca-dim", type=int, help=f"PCA dimensions (default: {CLUSTER.pca_dim}, or the features' dimension if smaller)")
    s.add_argument("--manifold", default=CLUSTER.manifold,
                   help="none | umap: UMAP fitted on a sample, every point placed by its nearest sample points, then k-means")
    s.add_argument("--manifold-dim", type=int, default=CLUSTER.manifold_dim, help="UMAP output dimensions")
    s.add_argument("--method", default=CLUSTER.method,
                   help="kmeans | gmm (a full-covariance Gaussian mixture, on the --manifold umap map) | balanced "
                        "(k-means held to equal cluster sizes: for classes of about equal size); "
                        f"default {CLUSTER.method}")
    s.add_argument("--niter", type=int, default=20)
    s.add_argument("--nredo", type=int, default=CLUSTER.nredo,
                   help="k-means restarts, the lowest objective kept (default: 50 with --manifold, else 1)")
    s.add_argument("--spherical", action="store_true")
    s.add_argument("--sample", type=int, default=0,
                   help="train k-means on N sampled points (default: all up to 100k, else max(100k, 256 per centroid))")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--gpus", type=int, default=0, help="faiss on N GPUs of one node (and GPU assignment actors)")
    s.add_argument("--actors", type=int, help="assignment actors (default: 2 on CPUs, one per GPU)")
    add_embed_flags(s)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--smoke-test", action="store_true", help="generated data and an untrained D, in seconds")
    s.set_defaults(fn=cmd_cluster)

    s = sub.add_parser("pipeline", help="prepare -> train -> embed -> cluster -> probe -> report")
    s.add_argument("--dataset", default="digits", help=f"source: {', '.join(SOURCES)}")
    s.add_argument("--data-root", help="where mnist / fashion-mnist / cifar10 / folder images live")
    s.add_argument("--out", required=True)
    s.add_argument("--config", help="YAML overrides of the defaults")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--steps", type=int)
    s.add_argument("--workers", type=int)
    s.add_argument("--count", type=int, help="images for --dataset fake (default 1000; generated a chunk at a time)")
    s.add_argument("--k", help="clusters (default: number of classes); several (5,10,20 or 4:40:4): the embeddings "
                                "are clustered at each, the suggested k is kept and the pixels get it too")
    s.add_argument("--select-k", default="stability", metavar="CRITERION",
                   help="with several --k: stability | silhouette | davies_bouldin")
    s.add_argument("--overwrite", action="store_true", help="start from scratch (otherwise a rerun resumes)")
    s.add_argument("--smoke-test", action="store_true", help="tiny model, a few steps: checks the whole path")
    s.set_defaults(fn=cmd_pipeline)

    s = sub.add_parser("tune", help="Ray Tune sweep over architectures, losses and optimiser settings")
    s.add_argument("--config", help="base YAML (overrides of the defaults)")
    s.add_argument("--space", default=str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "space_default.yaml"),
                   help="space YAML: dotted key -> {choice|uniform|loguniform|randint|grid: ...}")
    s.add_argument("--data", help="prepared dataset folder")
    s.add_argument("--trials", type=int, help="samples of the space (tune.trials)")
    s.add_argument("--scheduler", help="asha | pbt | fifo")
    s.add_argument("--metric", help="objective, e.g. loss/g or eval/nmi")
    s.add_argument("--mode", help="min | max")
    s.add_argument("--workers-per-trial", type=int)
    s.add_argument("--gpus-per-worker", type=int, default=0, help="1: one GPU per worker")
    s.add_argument("--max-concurrent", type=int, default=0, help="0: as many as the cluster fits")
    s.add_argument("--steps", type=int)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="applied to every trial")
    s.add_argument("--storage", default="runs")
    s.add_argument("--name", default="tune", help="experiment name; the same storage + name resumes")
    s.add_argument("--smoke-test", action="store_true")
    s.set_defaults(fn=cmd_tune)

    s = sub.add_parser("evaluator", help="the offline FID/KID feature space")
    ev = s.add_subparsers(dest="evaluator_command", required=True)
    s = ev.add_parser("train", help="train the domain classifier on a labelled prepared dataset")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True, help="weights file to write (weights only)")
    s.add_argument("--epochs", type=int, default=3)
    s.set_defaults(fn=cmd_evaluator_train)

    s = sub.add_parser("report", help="write report.html for a pipeline folder")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("probe", help="linear probe on embeddings (+ classic baselines on raw pixels)")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--baselines", action="store_true", help="add linear SVM, random forest and k-NN on raw pixels")
    s.add_argument("--data", help="prepared dataset for the baselines (default: the one embedded)")
    s.add_argument("--out", help="where probe.json and probe.md go (default: EMBEDDINGS/probe)")
    s.add_argument("--max-train", type=int, default=50_000, help="uniform sample of the train split (0: all)")
    s.add_argument("--max-test", type=int, default=10_000, help="uniform sample of the test split (0: all)")
    s.set_defaults(fn=cmd_probe)
    return p


def add_embed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", default="float16", help="float16 | float32")
    p.add_argument("--features", default=CLUSTER.features, help=f"last | multi (every D block); default {CLUSTER.features}")
    p.add_argument("--readout", default=CLUSTER.readout,
                   help=f"gap (global average) | gridG-max | gridG-avg (each block pooled to G x G, L2 per block) | "
                        f"proj (a contrastive D's projection head, L2) | gridG-max+proj (both); "
                        f"default {CLUSTER.readout}")
    p.add_argument("--dim", type=int, default=CLUSTER.embed_dim,
                   help=f"store read-outs wider than this projected to this many dimensions (the top singular "
                        f"directions of a sample's read-outs, saved as projection.npy); 0 stores them whole; "
                        f"default {CLUSTER.embed_dim}")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="inference precision on GPUs (auto: bf16 on Ampere+, fp16 before; CPUs always fp32)")


def main(argv: list[str] | None = None) -> int:
    from ..data import local_ray_on_loopback, set_console

    local_ray_on_loopback()  # before any stage imports ray
    parser = build_parser()
    args = parser.parse_args(argv)
    set_console(args.verbose)  # before any stage imports ray
    try:
        args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"distgan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distgan: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
