"""Embedding throughput: Ray Data `map_batches` over an actor pool vs a plain
PyTorch inference loop in one process, same D, same images, same total threads.

    python -m benchmarks.embed [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from distgan import config as C
from distgan.data import decode_images, init_ray, prepare, read_arrays
from distgan.embed import embed_dataset, embed_images, load_embedder
from distgan.train import resolve_data, save_untrained_checkpoint

from .common import DATASETS, write_results


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="distgan-embed-"))
    if (DATASETS / "MNIST" / "raw").is_dir() and not args.quick:
        prepare("mnist", tmp / "data", data_root=DATASETS, progress=False)
        what = "MNIST, all 70,000 images"
    else:
        prepare("fake", tmp / "data", fake_count=10000 if args.quick else 70000, progress=False)
        what = "generated images"
    rows = []
    init_ray()
    for width in (32, 64):
        cfg = resolve_data(C.load(None, {"data.path": str(tmp / "data"), "model.width": width}))
        ckpt = save_untrained_checkpoint(cfg, tmp / f"ckpt{width}")
        torch.set_num_threads(2)
        D, _ = load_embedder(ckpt, tmp / "data")
        images = decode_images(read_arrays(tmp / "data", columns=("image",))["image"], 32, 1)
        t = time.perf_counter()
        embed_images(D, images, "multi", "gap", batch_size=256)  # gap: the read-out the README's figures used
        plain = len(images) / (time.perf_counter() - t)
        row = {"D width": width, "images": len(images), "plain img/s": plain}
        for actors in (1, 2):
            t = time.perf_counter()
            embed_dataset(ckpt, tmp / "data", tmp / f"emb{width}-{actors}", batch_size=256, features="multi",
                          readout="gap", num_actors=actors, progress=False)
            ips = len(images) / (time.perf_counter() - t)
            row[f"Ray Data {actors} actor(s) img/s"] = ips
            row[f"{actors} actor(s) / plain"] = ips / plain
        rows.append(row)
    notes = (f"Data: {what} at 32x32, DCGAN D multi-layer features, batch 256. The plain loop holds the decoded "
             "images in memory and embeds them in one process with 2 threads; the Ray Data times are end to end "
             "(reading Parquet, actor start-up, writing Parquet) with the threads split between actors.")
    write_results("embed", rows, list(rows[0]), "python -m benchmarks.embed", notes, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
