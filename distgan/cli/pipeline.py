"""`distgan pipeline`: prepare -> train -> embed -> cluster -> probe -> report,
with demo-sized defaults; and the shared `--smoke-test` inputs."""
from __future__ import annotations


from .. import config as C
from ..config import UserError
from ..storage import check_access, loc
from .common import SMOKE, at_least, print_info


# Demo-sized defaults per source: what differs from the Python defaults, like a YAML diff.
PIPELINE_DEFAULTS = {
    # The contrastive D (ContraD) with spectral norm and hinge, the grid4-max read-out, PCA to 32-d.
    # No UMAP here: on 1,797 points its k-means result swings by +-0.1 ACC with the seed (README).
    "digits": {"model.width": 32, "model.spectral_norm": True, "loss.name": "hinge", "objective.name": "contrastive",
               "train.steps": 1500, "train.log_every": 100, "train.checkpoint_every": 500,
               "data.split": "all", "cluster.features": "multi", "cluster.readout": "grid4-max", "cluster.pca_dim": 32},
}
def cmd_pipeline(args) -> None:
    """prepare -> train -> embed -> cluster (embeddings and raw pixels) -> probe -> report."""
    from ..cluster import embedding_features, pixel_features, probe_remote, probe_table, run_clustering
    from ..data import init_ray, prepare, read_manifest
    from ..embed import embed_dataset
    from ..report import write_report
    from ..train import run_training

    from ..cluster.criteria import check_criterion

    ks = C.parse_ks(args.k) if args.k else None
    at_least("--count", args.count)
    if args.count is not None and args.dataset != "fake":
        raise UserError(f"--count is for --dataset fake (the generated images), not '{args.dataset}'")
    check_criterion(args.select_k)
    out = loc(args.out)
    check_access(out, write=True)
    if out.iterdir() and not (args.overwrite or (out / "pipeline.json").exists()):
        raise UserError(f"output directory {out} is not empty and not a pipeline folder; pass --overwrite")
    overrides = dict(PIPELINE_DEFAULTS.get(args.dataset, {}))
    if args.smoke_test:
        overrides |= SMOKE
    overrides |= C.parse_overrides(args.set or [])
    overrides["data.path"] = (out / "data").uri
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.workers is not None:
        overrides["train.num_workers"] = args.workers
    cfg = C.load(args.config, overrides)  # validated before anything is written (or removed)
    if args.overwrite:
        out.rmtree()
    data = out / "data"
    if not (data / "dataset.json").is_file():
        print(f"[1/6] prepare {args.dataset}")
        prepare(args.dataset, data, data_root=args.data_root,
                fake_count=args.count or (600 if args.smoke_test else 1000))
    else:
        print(f"[1/6] prepare: reusing {data}")
    print_info(data)
    manifest = read_manifest(data)
    k = ks[0] if ks else max(2, len(manifest["class_names"]) or 10)
    init_ray()
    print(f"[2/6] train {cfg.model.arch}/{cfg.loss.name}, {cfg.train.steps} steps, {cfg.train.num_workers} worker(s)")
    trained = run_training(cfg, storage=(out / "runs").uri, name="gan")
    stored = f"stored at most {cfg.cluster.embed_dim}-d" if cfg.cluster.embed_dim else "stored whole"
    print(f"[3/6] embed every image with D (features={cfg.cluster.features}, readout={cfg.cluster.readout}, {stored})")
    emb = out / "embeddings"
    if (emb / ".embed-spec.json").exists() and (emb / ".embed-spec.json").read_json()["checkpoint"] != loc(trained.checkpoint).uri:
        emb.rmtree()  # training went further since: these embeddings are stale
    embed_dataset(trained.checkpoint, data, emb, features=cfg.cluster.features, readout=cfg.cluster.readout,
                  dim=cfg.cluster.embed_dim, progress=not args.smoke_test)
    print(f"[4/6] faiss k-means, k={ks if ks and len(ks) > 1 else k}: D embeddings, then raw pixels (the baseline)")
    cl = cfg.cluster
    kw = dict(preprocess=cl.preprocess, pca_dim=cl.pca_dim, niter=cl.niter, nredo=cl.nredo,
              spherical=cl.spherical, sample=cl.sample, seed=cl.seed, manifold=cl.manifold, manifold_dim=cl.manifold_dim,
              method=cl.method, overwrite=True, data=data, progress=False)
    if ks and len(ks) > 1:  # the embeddings choose k without labels; the pixels get the same k
        from ..cluster.sweep import sweep_k

        k = sweep_k(embedding_features(emb), (out / "clusters" / "embeddings").uri, ks, args.select_k, **kw)["suggested_k"]
        print(f"      suggested k = {k} (best {args.select_k} of k in {ks})")
        m_emb = (out / "clusters" / "embeddings" / "metrics.json").read_json()
    else:
        from ..cluster.sweep import SWEEP_FILES

        for name in SWEEP_FILES:  # an earlier run's sweep would be shown in the report as this one's
            (out / "clusters" / "embeddings" / name).unlink()
        m_emb = run_clustering(embedding_features(emb), out / "clusters" / "embeddings", k=k, **kw)
    kw["k"] = k
    # Pixels get the same steps (PCA, the manifold) so the comparison is fair.
    m_pix = run_clustering(pixel_features(data), out / "clusters" / "pixels", **kw)
    print("[5/6] linear probe on the embeddings, classic baselines on raw pixels")
    rows = []
    if len(manifest["class_names"]) and set(manifest["split_counts"]) >= {"train", "test"}:
        rows = probe_remote(embedding_features(emb), data)  # a Ray task, on bounded samples of each split
        (out / "probe" / "probe.json").write_json(rows)
        (out / "probe" / "probe.md").write_text(probe_table(rows))
    headline = {}
    for name, m in (("embeddings", m_emb), ("pixels", m_pix)):
        for key in ("acc", "nmi", "ari"):
            if key in m:
                headline[f"{key} ({name})"] = round(m[key], 4)
    if rows:
        headline["probe acc (embeddings)"] = round(rows[0]["accuracy"], 4)
        headline["logistic regression acc (pixels)"] = round(rows[1]["accuracy"], 4)
    (out / "pipeline.json").write_json({
        "dataset": args.dataset, "config": C.to_dict(cfg), "checkpoint": trained.checkpoint,
        "run_dir": trained.run_dir, "k": k, "headline": headline})
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
