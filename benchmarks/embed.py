"""Embedding throughput: Ray Data `map_batches` over an actor pool vs a plain
PyTorch inference loop in one process, same D, same images, same total threads,
at two dataset sizes (so the fixed start-up cost and the per-image rate can be told
apart) and three batch sizes.

    python -m benchmarks.embed [--quick] [--readout gap] [--dim 0]

`--readout` or `--dim` other than the default writes its own table (embed_gap, embed_dim0, ...):
the stored vectors' width is most of what the write costs (embed --write-only). The plain loop
projects like the actors do (the basis fitted beforehand, untimed; the Ray path's time includes
its fit).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distgan import config as C
from distgan.config import parse_readout
from distgan.data import decode_images, init_ray, prepare, read_arrays
from distgan.embed import CALIBRATION_SAMPLE, embed_dataset, embed_images, fit_projection, load_embedder
from distgan.models import DEFAULT_DIM, DEFAULT_READOUT
from distgan.train import resolve_data, save_untrained_checkpoint

from .common import DATASETS, write_results

REPEAT = 4  # the larger dataset: every shard written REPEAT times (new ids)


def replicate(data: Path, out: Path, times: int) -> Path:
    """`data` with every shard copied `times` times, ids offset so they stay unique."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    man = json.loads((data / "dataset.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for r in range(times):
        for name in man["shards"]:
            t = pq.read_table(data / name)
            t = t.set_column(t.schema.get_field_index("id"), "id", pc.add(t["id"], pa.scalar(r * man["count"], t["id"].type)))
            shards.append(f"r{r}-{name}")
            pq.write_table(t, out / shards[-1])
    man |= {"count": man["count"] * times, "shards": shards,
            "split_counts": {s: n * times for s, n in man["split_counts"].items()},
            "class_counts": {c: n * times for c, n in man["class_counts"].items()}}
    (out / "dataset.json").write_text(json.dumps(man))
    return out


def plain_rate(D, images: np.ndarray, readout: str, batch: int, dim: int, chunk: int = 10000) -> float:
    """img/s of the in-memory loop; embeddings are dropped chunk by chunk, as an actor drops
    each shard's once written (a 280k x 3584 float32 result would be 4 GB). Read-outs wider
    than `dim` are projected as `distgan embed` stores them (basis fitted before the clock)."""
    basis = None
    if dim:
        sample = embed_images(D, images[:CALIBRATION_SAMPLE], "multi", readout, batch_size=batch)  # as many as embed fits on
        basis = fit_projection(sample, dim) if sample.shape[1] > dim else None
    t = time.perf_counter()
    for i in range(0, len(images), chunk):
        embed_images(D, images[i : i + chunk], "multi", readout, batch_size=batch, project=basis)
    return len(images) / (time.perf_counter() - t)


def _binary_table(ids, labels, splits, emb: np.ndarray):
    """The layout distgan does not use, for comparison: each vector as one fixed-size binary
    value (Parquet writes it without per-element repetition/definition levels, but pandas and
    Ray Data then read bytes, not arrays)."""
    import pyarrow as pa

    from distgan.embed import _table

    t = _table(ids, labels, splits, emb[:, :1])
    n, e = emb.shape
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(e * emb.itemsize), n, [None, pa.py_buffer(emb.tobytes())])
    return t.set_column(t.schema.get_field_index("embedding"), "embedding", col)


LAYOUTS = {"fixed_size_list<float16> (distgan)": None, "fixed_size_binary (comparison)": _binary_table}


def write_cost(dim: int, rows: int = 10000, repeat: int = 3, layout: str = "fixed_size_list<float16> (distgan)") -> dict:
    """Seconds (best of `repeat`) for what an actor does with one shard's result besides
    embedding it: float32 -> float16, the Arrow table, the Parquet file written (one thread)."""
    from distgan.embed import PARQUET_OPTIONS, _table
    from distgan.storage import loc, write_parquet

    make = LAYOUTS[layout] or _table
    emb = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    ids, labels, splits = np.arange(rows), np.zeros(rows, np.int64), np.array(["train"] * rows, object)
    best = {}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeat):
            t0 = time.perf_counter()
            table = make(ids, labels, splits, emb.astype(np.float16))
            t1 = time.perf_counter()
            write_parquet(table, loc(f"{d}/shard.parquet"), **PARQUET_OPTIONS)  # as ShardEmbedder
            t2 = time.perf_counter()
            for key, v in (("convert s", t1 - t0), ("write s", t2 - t1), ("total s", t2 - t0)):
                best[key] = min(best.get(key, v), v)
    return {"layout": layout, "dim": dim, "rows": rows, **best, "rows/s": rows / best["total s"]}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write-only", action="store_true",
                   help="only the cost of writing one shard's embeddings at the default read-out's widths")
    p.add_argument("--readout", default=DEFAULT_READOUT, help=f"read-out to embed with (default {DEFAULT_READOUT})")
    p.add_argument("--dim", type=int, default=DEFAULT_DIM,
                   help=f"embed --dim: wider read-outs stored projected to this (default {DEFAULT_DIM}; 0: whole)")
    args = p.parse_args(argv)
    parse_readout(args.readout)
    if args.write_only:
        # gap width 32; grid4-max width 32 and 64
        rows = [write_cost(dim, layout=layout) for layout in LAYOUTS for dim in (224, 3584, 7168)]
        write_results("embed_write", rows, list(rows[0]), "python -m benchmarks.embed --write-only",
                      "One shard of 10,000 embeddings: float32 -> float16 and the Arrow table (convert), the "
                      "Parquet file serialised and written (write); best of 3, one thread. fixed_size_binary: the same "
                      "vectors as one binary value each, which distgan does not write (readers would get bytes).")
        return rows
    tmp = Path(tempfile.mkdtemp(prefix="distgan-embed-"))
    if (DATASETS / "MNIST" / "raw").is_dir() and not args.quick:
        prepare("mnist", tmp / "data", data_root=DATASETS, progress=False)
        what = "MNIST (70,000 images) and MNIST written 4 times (280,000)"
    else:
        prepare("fake", tmp / "data", fake_count=2000 if args.quick else 70000, progress=False)
        what = "generated images"
    big = replicate(tmp / "data", tmp / "data4", REPEAT)
    readout = args.readout
    torch.set_num_threads(2)
    init_ray()
    rows = []
    # (data, width, batch): both sizes at both widths, then the batch sizes at one of them
    plan = [(d, w, 256) for d in (tmp / "data", big) for w in (32, 64)] + [(tmp / "data", 64, b) for b in (64, 1024)]
    for data, width, batch in plan:
        cfg = resolve_data(C.load(None, {"data.path": str(data), "model.width": width}))
        ckpt = tmp / f"ckpt{width}"
        if not ckpt.exists():
            save_untrained_checkpoint(cfg, ckpt)
        D, _ = load_embedder(ckpt, data)
        images = decode_images(read_arrays(data, columns=("image",))["image"], 32, 1)
        plain = plain_rate(D, images, readout, batch, args.dim)
        row = {"D width": width, "images": len(images), "batch": batch, "plain img/s": plain}
        for actors in (1, 2):
            out = tmp / f"emb-{data.name}-{width}-{batch}-{actors}"
            t = time.perf_counter()
            m = embed_dataset(ckpt, data, out, batch_size=batch, features="multi", readout=readout, dim=args.dim,
                              num_actors=actors, progress=False)
            row["stored dim"] = m["dim"]
            seconds = time.perf_counter() - t
            row[f"{actors} actor(s) s"] = seconds
            row[f"{actors} actor(s) / plain"] = len(images) / seconds / plain
            shutil.rmtree(out)
        rows.append(row)
        print(row, flush=True)
    # The Ray path's time = fixed + n / rate: two sizes at the same width and batch give both.
    for width in (32, 64):
        small, large = (next(r for r in rows if r["D width"] == width and r["batch"] == 256 and r["images"] == n)
                        for n in sorted({r["images"] for r in rows}))
        per_image = (large["1 actor(s) s"] - small["1 actor(s) s"]) / (large["images"] - small["images"])
        for r in (small, large):
            r["1 actor fixed s"] = small["1 actor(s) s"] - small["images"] * per_image
            r["1 actor steady / plain"] = 1 / per_image / r["plain img/s"]
    cols = ["D width", "images", "batch", "stored dim", "plain img/s", "1 actor(s) s", "1 actor(s) / plain", "2 actor(s) s",
            "2 actor(s) / plain", "1 actor fixed s", "1 actor steady / plain"]
    notes = (f"Data: {what} at 32x32; DCGAN D, multi-layer features through the "
             f"{'default ' if readout == DEFAULT_READOUT else ''}read-out {readout}, "
             + (f"projected to {args.dim} dimensions where wider (embed --dim {args.dim}), " if args.dim else "stored whole (--dim 0), ")
             + "written as float16. The plain loop holds the decoded images in memory and embeds them in one process "
             "with 2 threads (results dropped per 10,000 images). The Ray Data times are end to end: loading the "
             "checkpoint and re-estimating BatchNorm on the driver, actor start-up, each actor reading, decoding, "
             "embedding and writing its shards. 'fixed s' and 'steady / plain' split the 1-actor time at batch 256 "
             "into a constant and a per-image rate from the two dataset sizes (time = fixed + n / rate).")
    name = "embed" + ("" if readout == DEFAULT_READOUT else f"_{readout.replace('-', '_')}") \
        + ("" if args.dim == DEFAULT_DIM else f"_dim{args.dim}")
    flags = ("" if readout == DEFAULT_READOUT else f" --readout {readout}") + ("" if args.dim == DEFAULT_DIM else f" --dim {args.dim}")
    write_results(name, rows, cols, "python -m benchmarks.embed" + flags, notes, quick=args.quick)
    shutil.rmtree(tmp)
    return rows


if __name__ == "__main__":
    main()
