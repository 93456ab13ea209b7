"""Every `distgan` command but `pipeline`: functions of the parsed argparse
namespace that call the stage modules and print where results landed."""
from __future__ import annotations


from .. import config as C
from ..config import ClusterConfig, UserError
from ..storage import check_access, loc
from .common import (SMOKE, at_least, load_config, print_cluster_metrics, print_criteria, print_info, print_sweep,
                     smoke_inputs)

CLUSTER = ClusterConfig()  # defaults shared with the parser, the pipeline and the job configs


# ---------------------------------------------------------------- commands


def cmd_prepare(args) -> None:
    from ..data import prepare

    manifest = prepare(
        args.source, args.out, data_root=args.data_root, split=args.split, resolution=args.resolution,
        shard_rows=args.shard_rows, download=args.download, overwrite=args.overwrite,
        fake_count=args.count, seed=args.seed,
    )
    print(f"prepared {manifest['count']} images -> {args.out}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable files (listed in dataset.json)")
    print_info(args.out)


def cmd_info(args) -> None:
    print_info(args.dir)


def cmd_train(args) -> None:
    from ..data import init_ray
    from ..train import run_training

    if args.smoke_test:
        smoke_inputs(args, loc(args.storage) / args.name / "smoke-inputs", checkpoint=False)
        args.set = [f"{k}={v}" for k, v in SMOKE.items()] + (args.set or [])
    from ..train import resolve_data

    cfg = resolve_data(load_config(args))  # validated, and the dataset's manifest read: before Ray starts
    check_access(loc(args.storage), write=True)
    init_ray()
    from ..evaluate import make_evaluator

    res = run_training(cfg, storage=args.storage, name=args.name, evaluator=make_evaluator if cfg.eval.every else None)
    print(f"run directory: {res.run_dir}")
    print(f"final checkpoint: {res.checkpoint}")


def cmd_embed(args) -> None:
    from ..embed import embed_dataset

    at_least("--actors", args.actors)
    selection = None
    if args.select:
        from ..cluster.criteria import check_criterion
        from ..evaluate import select_checkpoint

        check_criterion(args.select)
        at_least("--select-images", args.select_images, 8)
        selection = select_checkpoint(args.checkpoint, args.data, args.select, args.features, args.readout,
                                      images=args.select_images)
        print_criteria([{**r, "checkpoint": loc(r["checkpoint"]).name} for r in selection["table"]], "checkpoint",
                       loc(selection["checkpoint"]).name, "selected")
        print(f"selected {loc(selection['checkpoint']).name} (step {selection['step']}): {args.select} "
              f"{selection['value']:.4f}, the {'highest' if selection['direction'] == 'max' else 'lowest'} of "
              f"{len(selection['table'])} checkpoints (k={selection['k']}, {selection['images']} images of {args.data})")
        args.checkpoint = selection["checkpoint"]
    # embed_dataset checks the flags, the checkpoint (weights_only, distgan's format tag) and
    # the dataset before it starts Ray.
    m = embed_dataset(args.checkpoint, args.data, args.out, batch_size=args.batch_size, dtype=args.dtype,
                      features=args.features, readout=args.readout, dim=args.dim, num_actors=args.actors,
                      overwrite=args.overwrite, amp=args.amp, selection=selection)
    stored = f"{m['dim']}-d {m['dtype']}" + (f" (read-out {m['readout_dim']}-d, projected)" if m["projection"] else "")
    print(f"embedded {m['count']} images ({stored}, features={m['features']}, readout={m['readout']}) -> {args.out}")


def _cluster_features(args):
    from ..cluster import embedding_features, pixel_features

    given = [x for x in (args.embeddings, args.pixels, args.checkpoint) if x]
    if len(given) != 1:
        raise UserError("give exactly one of --embeddings DIR, --pixels DIR, or --checkpoint CKPT with --data DIR")
    if args.pixels:
        return pixel_features(args.pixels)
    if args.embeddings:
        return embedding_features(args.embeddings)
    if not args.data:
        raise UserError("--checkpoint needs --data DIR: the prepared dataset to embed")
    from ..cluster import check_request
    from ..data import read_manifest
    from ..embed import embed_dataset

    check_request(read_manifest(args.data)["count"], args.ks, args.sample, args.gpus, manifold=args.manifold,
                  manifold_dim=args.manifold_dim, preprocess=args.preprocess, method=args.method,
                  spherical=args.spherical)  # before embedding
    emb = loc(args.out) / "embeddings"
    embed_dataset(args.checkpoint, args.data, emb, batch_size=args.batch_size, dtype=args.dtype,
                  features=args.features, readout=args.readout, dim=args.dim, overwrite=args.overwrite, amp=args.amp)
    return embedding_features(emb)


def cmd_cluster(args) -> None:
    from ..cluster import check_request, run_clustering
    from ..cluster.criteria import check_criterion
    from ..data import init_ray

    if args.smoke_test:
        smoke_inputs(args, loc(args.out) / "smoke-inputs")
    for flag in ("--actors", "--niter", "--pca-dim"):
        at_least(flag, getattr(args, flag[2:].replace("-", "_")))
    at_least("--nredo", args.nredo, 0)
    args.ks = C.parse_ks(args.k)
    check_criterion(args.select_k)
    feats = _cluster_features(args)
    # before Ray starts; a --pca-dim the user gave must fit (the default, 64, is clamped to the dimension)
    check_request(feats.count, args.ks, args.sample, args.gpus, args.pca_dim or 0, feats.dim, args.manifold, args.manifold_dim,
                  args.preprocess, args.method, args.spherical)
    check_access(loc(args.out), write=True)
    init_ray()
    kw = dict(preprocess=args.preprocess, pca_dim=args.pca_dim or CLUSTER.pca_dim, niter=args.niter, nredo=args.nredo,
              spherical=args.spherical, sample=args.sample, seed=args.seed, manifold=args.manifold,
              manifold_dim=args.manifold_dim, method=args.method, data=args.data or args.pixels, overwrite=args.overwrite, gpus=args.gpus,
              actors=args.actors or 0, keep=("embeddings", "smoke-inputs") if args.checkpoint else ("smoke-inputs",))
    if len(args.ks) > 1:
        from ..cluster.sweep import sweep_k

        s = sweep_k(feats, args.out, args.ks, args.select_k, args.all_k, **kw)
        print_sweep(s)
        print(f"outputs: {args.out}/k_sweep.json, k_sweep.csv, k_sweep.png and "
              + ("k<K>/ for each k" if args.all_k else f"the outputs of k={s['suggested_k']}:"))
        if args.all_k:
            return
        m = (loc(args.out) / "metrics.json").read_json()
    else:
        m = run_clustering(feats, args.out, args.ks[0], **kw)
    print_cluster_metrics(m)
    print(f"outputs: {args.out}/assignments/ (Parquet shards), centroids.npy, preprocess.npz, metrics.json"
          + (", montage.png" if (loc(args.out) / "montage.png").exists() else ""))


def cmd_probe(args) -> None:
    from ..cluster import embedding_features, probe_remote, probe_table
    from ..data import init_ray

    feats = embedding_features(args.embeddings)
    data = (args.data or feats.data) if args.baselines else None
    if args.baselines and not data:
        raise UserError("--baselines needs the prepared dataset: pass --data DIR")
    for flag, value in (("--max-train", args.max_train), ("--max-test", args.max_test)):
        if value < 0:
            raise UserError(f"{flag} must be >= 0 (0: all), got {value}")
    out = loc(args.out) if args.out else loc(args.embeddings) / "probe"
    check_access(out, write=True)
    init_ray()
    rows = probe_remote(feats, data, max_train=args.max_train, max_test=args.max_test)
    (out / "probe.json").write_json(rows)
    table = probe_table(rows)
    (out / "probe.md").write_text(table)
    print(table, end="")
    print(f"-> {out}/probe.json, probe.md")


def cmd_report(args) -> None:
    from ..report import write_report

    print(f"report: {write_report(args.dir)}")


def cmd_evaluator_train(args) -> None:
    from ..evaluate import train_classifier

    r = train_classifier(args.data, args.out, epochs=args.epochs)
    acc = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "n/a (no test split)"
    print(f"domain classifier -> {r['path']} (test accuracy {acc}); use it with --set eval.classifier={r['path']}")


def cmd_tune(args) -> None:
    from ..data import init_ray
    from ..tune import load_space, run_tune

    if args.smoke_test:
        smoke_inputs(args, loc(args.storage) / args.name / "smoke-inputs", checkpoint=False)
        args.set = [f"{k}={v}" for k, v in SMOKE.items()] + (args.set or [])
        args.trials = 2 if args.trials is None else args.trials
    overrides = C.parse_overrides(args.set or [])
    for key, value in (("data.path", args.data), ("train.steps", args.steps), ("train.num_workers", args.workers_per_trial),
                       ("tune.trials", args.trials)):
        if value is not None:
            overrides[key] = value
    if args.gpus_per_worker:
        overrides["train.use_gpu"] = True
    at_least("--gpus-per-worker", args.gpus_per_worker, 0)
    at_least("--max-concurrent", args.max_concurrent, 0)
    from ..train import resolve_data

    cfg = resolve_data(C.load(args.config, overrides))  # validated, the dataset's manifest read
    space = load_space(args.space, cfg)  # before Ray: a space that can sample an invalid combination is refused
    check_access(loc(args.storage), write=True)
    init_ray()
    summary = run_tune(cfg, space, trials=cfg.tune.trials, scheduler=args.scheduler or cfg.tune.scheduler,
                       metric=args.metric or cfg.tune.metric, mode=args.mode or cfg.tune.mode,
                       max_concurrent=args.max_concurrent or cfg.tune.max_concurrent, storage=args.storage, name=args.name)
    exp = loc(args.storage) / args.name
    print((exp / "results.md").read_text(), end="")
    print(f"{summary['trials']} trials, {summary['errored']} errored")
    if "best_trial" in summary:
        print(f"best: {summary['best_trial']} {summary['metric']}={summary['best_objective']:.4g} "
              f"checkpoint {summary['best_checkpoint'] or '(none)'}")
        print(f"train it further: distgan train --config {exp / 'best.yaml'} --data {cfg.data.path}")
    print(f"outputs: {exp}/results.csv, results.md, best.yaml, best.json, objective.png")
