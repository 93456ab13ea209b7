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

    if args.smoke_test:
        _smoke_inputs(args, checkpoint=False)
        args.set = [f"{k}={v}" for k, v in SMOKE.items()] + (args.set or [])
    cfg = _load_config(args)
    init_ray()
    from .evaluate import make_evaluator

    res = run_training(cfg, storage=args.storage, name=args.name, evaluator=make_evaluator if cfg.eval.every else None)
    print(f"run directory: {res.run_dir}")
    print(f"final checkpoint: {res.checkpoint}")


def cmd_embed(args) -> None:
    from .data import init_ray
    from .embed import embed_dataset

    init_ray()
    m = embed_dataset(args.checkpoint, args.data, args.out, batch_size=args.batch_size, dtype=args.dtype,
                      features=args.features, num_actors=args.actors, overwrite=args.overwrite)
    print(f"embedded {m['count']} images ({m['dim']}-d {m['dtype']}, features={m['features']}) -> {args.out}")


def _cluster_features(args):
    from .cluster import embedding_features, pixel_features

    given = [x for x in (args.embeddings, args.pixels, args.checkpoint) if x]
    if len(given) != 1:
        raise UserError("give exactly one of --embeddings DIR, --pixels DIR, or --checkpoint CKPT with --data DIR")
    if args.pixels:
        return pixel_features(args.pixels)
    if args.embeddings:
        return embedding_features(args.embeddings)
    if not args.data:
        raise UserError("--checkpoint needs --data DIR: the prepared dataset to embed")
    from .data import init_ray
    from .embed import embed_dataset

    init_ray()
    emb = Path(args.out) / "embeddings"
    embed_dataset(args.checkpoint, args.data, emb, batch_size=args.batch_size, dtype=args.dtype,
                  features=args.features, overwrite=args.overwrite)
    return embedding_features(emb)


def cmd_cluster(args) -> None:
    from .cluster import run_clustering

    if args.smoke_test:
        _smoke_inputs(args)
    feats = _cluster_features(args)
    m = run_clustering(feats, args.out, args.k, preprocess=args.preprocess, pca_dim=args.pca_dim, niter=args.niter,
                       nredo=args.nredo, spherical=args.spherical, sample=args.sample, seed=args.seed,
                       data=args.data or args.pixels, overwrite=args.overwrite or bool(args.checkpoint))
    print_cluster_metrics(m)
    print(f"outputs: {args.out}/assignments.parquet, centroids.npy, metrics.json"
          + (", montage.png" if (Path(args.out) / "montage.png").exists() else ""))


def print_cluster_metrics(m: dict) -> None:
    print(f"k={m['k']} n={m['n']} inertia={m['inertia']:.4g} sizes min/max {min(m['sizes'])}/{max(m['sizes'])}"
          f" ({m['empty_clusters']} empty)")
    if "acc" in m:
        print(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  purity {m['purity']:.4f}")
    else:
        print(f"no label metrics: {m['labels']}")


def cmd_probe(args) -> None:
    from .cluster import embedding_features, linear_probe, pixel_baselines, probe_table

    feats = embedding_features(args.embeddings)
    rows = [linear_probe(feats, max_train=args.max_train)]
    if args.baselines:
        data = args.data or feats.data
        if not data:
            raise UserError("--baselines needs the prepared dataset: pass --data DIR")
        rows += pixel_baselines(data, max_train=args.max_train)
    out = Path(args.out or Path(args.embeddings) / "probe")
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(rows, indent=2))
    table = probe_table(rows)
    (out / "probe.md").write_text(table)
    print(table, end="")
    print(f"-> {out}/probe.json, probe.md")


# Demo-sized defaults per source: what differs from the Python defaults, like a YAML diff.
PIPELINE_DEFAULTS = {
    "digits": {"model.width": 32, "train.steps": 1500, "train.log_every": 100, "train.checkpoint_every": 500,
               "data.split": "all", "cluster.features": "multi", "cluster.pca_dim": 32},
}
SMOKE = {"model.width": 8, "train.steps": 10, "train.log_every": 5, "train.checkpoint_every": 5,
         "data.batch_size": 32, "cluster.pca_dim": 16}


def cmd_pipeline(args) -> None:
    """prepare -> train -> embed -> cluster (embeddings and raw pixels) -> probe -> report."""
    from .cluster import embedding_features, linear_probe, pixel_baselines, pixel_features, probe_table, run_clustering
    from .data import init_ray, prepare, read_manifest
    from .embed import embed_dataset
    from .report import write_report
    from .train import run_training

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.overwrite or (out / "pipeline.json").exists()):
        raise UserError(f"output directory {out} is not empty and not a pipeline folder; pass --overwrite")
    if args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    overrides = dict(PIPELINE_DEFAULTS.get(args.dataset, {}))
    if args.smoke_test:
        overrides |= SMOKE
    overrides |= C.parse_overrides(args.set or [])
    overrides["data.path"] = str(out / "data")
    if args.steps:
        overrides["train.steps"] = args.steps
    if args.workers:
        overrides["train.num_workers"] = args.workers
    cfg = C.load(args.config, overrides)
    data = out / "data"
    if not (data / "dataset.json").is_file():
        print(f"[1/6] prepare {args.dataset}")
        prepare(args.dataset, data, data_root=args.data_root, fake_count=600 if args.smoke_test else 1000)
    else:
        print(f"[1/6] prepare: reusing {data}")
    print_info(data)
    manifest = read_manifest(data)
    k = args.k or max(2, len(manifest["class_names"]) or 10)
    init_ray()
    print(f"[2/6] train {cfg.model.arch}/{cfg.loss.name}, {cfg.train.steps} steps, {cfg.train.num_workers} worker(s)")
    trained = run_training(cfg, storage=str(out / "runs"), name="gan")
    print(f"[3/6] embed every image with D (features={cfg.cluster.features})")
    emb = out / "embeddings"
    import shutil

    if (emb / ".embed-spec.json").exists() and json.loads((emb / ".embed-spec.json").read_text())["checkpoint"] != str(Path(trained.checkpoint).resolve()):
        shutil.rmtree(emb)  # training went further since: these embeddings are stale
    embed_dataset(trained.checkpoint, data, emb, features=cfg.cluster.features, progress=not args.smoke_test)
    print(f"[4/6] faiss k-means, k={k}: D embeddings, then raw pixels (the baseline)")
    cl = cfg.cluster
    kw = dict(k=k, preprocess=cl.preprocess, pca_dim=cl.pca_dim, niter=cl.niter, nredo=cl.nredo,
              spherical=cl.spherical, sample=cl.sample, seed=cl.seed, overwrite=True, data=data, progress=False)
    m_emb = run_clustering(embedding_features(emb), out / "clusters" / "embeddings", **kw)
    m_pix = run_clustering(pixel_features(data), out / "clusters" / "pixels", **{**kw, "preprocess": "none"})
    print("[5/6] linear probe on the embeddings, classic baselines on raw pixels")
    rows = []
    if len(manifest["class_names"]) and set(manifest["split_counts"]) >= {"train", "test"}:
        rows = [linear_probe(embedding_features(emb))] + pixel_baselines(data)
        (out / "probe").mkdir(exist_ok=True)
        (out / "probe" / "probe.json").write_text(json.dumps(rows, indent=2))
        (out / "probe" / "probe.md").write_text(probe_table(rows))
    headline = {}
    for name, m in (("embeddings", m_emb), ("pixels", m_pix)):
        for key in ("acc", "nmi", "ari"):
            if key in m:
                headline[f"{key} ({name})"] = round(m[key], 4)
    if rows:
        headline["probe acc (embeddings)"] = round(rows[0]["accuracy"], 4)
        headline["logistic regression acc (pixels)"] = round(rows[1]["accuracy"], 4)
    (out / "pipeline.json").write_text(json.dumps({
        "dataset": args.dataset, "config": C.to_dict(cfg), "checkpoint": trained.checkpoint,
        "run_dir": trained.run_dir, "k": k, "headline": headline}, indent=2))
    print("[6/6] report")
    report = write_report(out)
    print()
    print(f"{'':<22}{'ACC':>8}{'NMI':>8}{'ARI':>8}")
    for name, m in (("D embeddings", m_emb), ("raw pixels", m_pix)):
        if "acc" in m:
            print(f"{name:<22}{m['acc']:>8.4f}{m['nmi']:>8.4f}{m['ari']:>8.4f}")
    if rows:
        print(f"linear probe accuracy: D embeddings {rows[0]['accuracy']:.4f}, raw pixels {rows[1]['accuracy']:.4f}"
              f" (best classic baseline: {max(rows[1:], key=lambda r: r['accuracy'])['method']} "
              f"{max(r['accuracy'] for r in rows[1:]):.4f})")
    print(f"report: {report}")


def cmd_evaluator_train(args) -> None:
    from .evaluate import train_classifier

    r = train_classifier(args.data, args.out, epochs=args.epochs)
    acc = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "n/a (no test split)"
    print(f"domain classifier -> {r['path']} (test accuracy {acc}); use it with --set eval.classifier={r['path']}")


def cmd_tune(args) -> None:
    from .data import init_ray
    from .tune import load_space, run_tune

    if args.smoke_test:
        _smoke_inputs(args, checkpoint=False)
        args.set = [f"{k}={v}" for k, v in SMOKE.items()] + (args.set or [])
        args.trials = args.trials or 2
    overrides = C.parse_overrides(args.set or [])
    for key, value in (("data.path", args.data), ("train.steps", args.steps), ("train.num_workers", args.workers_per_trial)):
        if value:
            overrides[key] = value
    if args.gpus_per_worker:
        overrides["train.use_gpu"] = True
    cfg = C.load(args.config, overrides)
    space = load_space(args.space)
    init_ray()
    summary = run_tune(cfg, space, trials=args.trials or cfg.tune.trials, scheduler=args.scheduler or cfg.tune.scheduler,
                       metric=args.metric or cfg.tune.metric, mode=args.mode or cfg.tune.mode,
                       max_concurrent=args.max_concurrent or cfg.tune.max_concurrent, storage=args.storage, name=args.name)
    exp = Path(args.storage) / args.name
    print((exp / "results.md").read_text(), end="")
    print(f"{summary['trials']} trials, {summary['errored']} errored")
    if "best_trial" in summary:
        print(f"best: {summary['best_trial']} {summary['metric']}={summary['best_objective']:.4g} "
              f"checkpoint {summary['best_checkpoint'] or '(none)'}")
        print(f"train it further: distgan train --config {exp / 'best.yaml'} --data {cfg.data.path}")
    print(f"outputs: {exp}/results.csv, results.md, best.yaml, best.json, objective.png")


def cmd_report(args) -> None:
    from .report import write_report

    print(f"report: {write_report(args.dir)}")


def _smoke_inputs(args, checkpoint: bool = True) -> None:
    """--smoke-test: a generated dataset and an untrained checkpoint, so a job runs end to end in seconds."""
    import tempfile

    import torch

    from . import config as C
    from .data import prepare
    from .train import build_nets, resolve_data, state_dict

    tmp = Path(tempfile.mkdtemp(prefix="distgan-smoke-"))
    if not (args.data or getattr(args, "pixels", None) or getattr(args, "embeddings", None)):
        prepare("fake", tmp / "data", fake_count=300, progress=False)
        args.data = str(tmp / "data")
    if checkpoint and not (args.checkpoint or args.pixels or args.embeddings):
        cfg = resolve_data(C.load(None, {"data.path": args.data, "model.width": 8}))
        ckpt = tmp / "checkpoint_0000000"
        ckpt.mkdir()
        torch.save(state_dict(build_nets(cfg, "cpu"), cfg, 0, 0), ckpt / "state.pt")
        args.checkpoint = str(ckpt)


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

    s = sub.add_parser("embed", help="discriminator embeddings of every image (Ray Data actor pool)")
    s.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest checkpoint)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    add_embed_flags(s)
    s.add_argument("--actors", type=int, help="actor pool size (default: one per GPU, else 2)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("cluster", help="FAISS k-means over embeddings or raw pixels")
    s.add_argument("--embeddings", help="output of `distgan embed`")
    s.add_argument("--pixels", help="prepared dataset: cluster its raw pixels (the baseline)")
    s.add_argument("--checkpoint", help="embed --data with this checkpoint first, then cluster")
    s.add_argument("--data", help="prepared dataset: images for montage.png (and the input with --checkpoint)")
    s.add_argument("--k", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--preprocess", default="pca-whiten", help="none | l2 | pca-whiten")
    s.add_argument("--pca-dim", type=int, default=64)
    s.add_argument("--niter", type=int, default=20)
    s.add_argument("--nredo", type=int, default=1)
    s.add_argument("--spherical", action="store_true")
    s.add_argument("--sample", type=int, default=0, help="train k-means on N sampled points (0: all)")
    s.add_argument("--seed", type=int, default=0)
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
    s.add_argument("--k", type=int, help="clusters (default: number of classes)")
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
    s.add_argument("--max-train", type=int, default=0, help="subsample the train split (0: all)")
    s.set_defaults(fn=cmd_probe)
    return p


def add_embed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", default="float16", help="float16 | float32")
    p.add_argument("--features", default="last", help="last | multi (pooled features of every D block)")


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
