"""The `distgan` command. Thin: parse flags, call the stage modules, print where
results landed. A user mistake is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config as C
from .config import UserError


def _load_config(args) -> C.Config:
    overrides = C.parse_overrides(args.set or [])
    if getattr(args, "data", None):
        overrides["data.path"] = args.data
    if getattr(args, "workers", None):
        overrides["train.num_workers"] = args.workers
    if getattr(args, "gpu", False):
        overrides["train.use_gpu"] = True
    if getattr(args, "steps", None):
        overrides["train.steps"] = args.steps
    return C.load(args.config, overrides)


# ---------------------------------------------------------------- commands


def cmd_prepare(args) -> None:
    from .data import prepare

    manifest = prepare(
        args.source, args.out, data_root=args.data_root, split=args.split, resolution=args.resolution,
        shard_rows=args.shard_rows, download=args.download, overwrite=args.overwrite,
        fake_count=args.count, seed=args.seed,
    )
    print(f"prepared {manifest['count']} images -> {args.out}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable files (listed in dataset.json)")
    print_info(args.out)


def print_info(path) -> None:
    from .data import read_manifest, shard_paths

    m = read_manifest(path)
    shards = shard_paths(path)
    rows = [
        ("name", m["name"]), ("source", m["source"]), ("images", m["count"]),
        ("resolution", f"{m['resolution']}x{m['resolution']}x{m['channels']}"),
        ("splits", ", ".join(f"{k} {v}" for k, v in m["split_counts"].items())),
        ("classes", len(m["class_names"]) or "none (unlabelled)"),
        ("shards", f"{len(shards)} ({sum(f.stat().st_size for f in shards) / 2**20:.1f} MiB)"),
        ("skipped files", len(m.get("skipped", []))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if m["class_counts"]:
        print("  per class:")
        for name, n in m["class_counts"].items():
            print(f"    {name:<14} {n}")


def cmd_info(args) -> None:
    print_info(args.dir)


def cmd_train(args) -> None:
    from .data import init_ray
    from .train import run_training

    cfg = _load_config(args)
    init_ray()
    res = run_training(cfg, storage=args.storage, name=args.name)
    print(f"run directory: {res.run_dir}")
    print(f"final checkpoint: {res.checkpoint}")


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


def build_parser() -> argparse.ArgumentParser:
    from .data import SOURCES

    p = argparse.ArgumentParser(prog="distgan", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
