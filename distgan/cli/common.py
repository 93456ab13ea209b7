"""Helpers shared by the `distgan` commands: config from flags, smoke-test inputs,
and the tables they print."""
from __future__ import annotations

from .. import config as C
from ..config import UserError

SMOKE = {"model.width": 8, "train.steps": 10, "train.log_every": 5, "train.checkpoint_every": 5,
         "data.batch_size": 32, "cluster.pca_dim": 16}


def at_least(flag: str, value: int | None, lo: int = 1) -> None:
    """A count flag the user gave (None: not given) must be >= lo; checked before Ray starts."""
    if value is not None and value < lo:
        raise UserError(f"{flag} must be >= {lo}, got {value}")


def load_config(args) -> C.Config:
    """The config from --config, --set and the flags that stand for keys. A flag given as 0
    is applied (and refused by validation), never mistaken for "not given"."""
    overrides = C.parse_overrides(args.set or [])
    if getattr(args, "data", None):
        overrides["data.path"] = args.data
    if getattr(args, "workers", None) is not None:
        overrides["train.num_workers"] = args.workers
    if getattr(args, "gpu", False):
        overrides["train.use_gpu"] = True
    if getattr(args, "steps", None) is not None:
        overrides["train.steps"] = args.steps
    return C.load(args.config, overrides)


def smoke_inputs(args, where, checkpoint: bool = True) -> None:
    """--smoke-test: a generated dataset and an untrained checkpoint, so a job runs end to end in
    seconds. Written under `where`, in the job's own storage (a URI on a cluster), so workers on
    any node read them."""
    from ..data import prepare
    from ..train import resolve_data, save_untrained_checkpoint

    if not (args.data or getattr(args, "pixels", None) or getattr(args, "embeddings", None)):
        if not (where / "data" / "dataset.json").is_file():  # a rerun of the same job reuses them
            prepare("fake", where / "data", fake_count=300, progress=False, overwrite=True)
        args.data = (where / "data").uri
    if checkpoint and not (args.checkpoint or args.pixels or args.embeddings):
        cfg = resolve_data(C.load(None, {"data.path": args.data, "model.width": 8}))
        args.checkpoint = save_untrained_checkpoint(cfg, where / "checkpoint_0000000")


def print_info(path) -> None:
    from ..data import read_manifest, shard_paths

    m = read_manifest(path)
    shards = shard_paths(path)
    rows = [
        ("name", m["name"]), ("source", m["source"]), ("images", m["count"]),
        ("resolution", f"{m['resolution']}x{m['resolution']}x{m['channels']}"),
        ("splits", ", ".join(f"{k} {v}" for k, v in m["split_counts"].items())),
        ("classes", len(m["class_names"]) or "none (unlabelled)"),
        ("shards", f"{len(shards)} ({sum(f.size() for f in shards) / 2**20:.1f} MiB)"),
        ("skipped files", len(m.get("skipped", []))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if m["class_counts"]:
        print("  per class:")
        for name, n in m["class_counts"].items():
            print(f"    {name:<14} {n}")


def print_criteria(rows: list[dict], key: str, chosen, what: str) -> None:
    """Label-free criteria, one line per k or per checkpoint (`key` names the column), the
    chosen row marked; NMI beside them when the data had labels (shown, never used to choose)."""
    nmi = any("nmi" in r for r in rows)
    width = max(len(key), *(len(str(r[key])) for r in rows))
    print(f"{key:>{width}}  stability  silhouette  davies_bouldin" + ("     nmi" if nmi else ""))
    for r in rows:
        line = f"{str(r[key]):>{width}}  {r['stability']:9.3f}  {r['silhouette']:10.3f}  {r['davies_bouldin']:14.3f}"
        if nmi:
            line += f"  {r.get('nmi', float('nan')):6.3f}"
        print(line + (f"  <- {what}" if r[key] == chosen else ""))


def print_sweep(s: dict) -> None:
    """The k sweep's criteria, one line per k, the suggested one marked."""
    print_criteria(s["table"], "k", s["suggested_k"], "suggested")
    print(f"suggested k = {s['suggested_k']} (best {s['criterion']})")


def print_cluster_metrics(m: dict) -> None:
    print(f"k={m['k']} n={m['n']} inertia={m['inertia']:.4g} sizes min/max {min(m['sizes'])}/{max(m['sizes'])}"
          f" ({m['empty_clusters']} empty)")
    if "acc" in m:
        print(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  purity {m['purity']:.4f}")
    else:
        print(f"no label metrics: {m['labels']}")
