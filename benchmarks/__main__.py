"""Run every benchmark and collect the tables into benchmarks/RESULTS.md.

    python -m benchmarks            # full runs (the quality benchmark trains for a while)
    python -m benchmarks --quick    # small sizes: checks that everything runs (results/quick/, never the tables)
    python -m benchmarks --collect  # only rebuild RESULTS.md from the results already written
"""
from __future__ import annotations

import argparse
import time

import torch

from . import balanced, embed, eval_cost, gpu, kmeans, manifold, projection, quality, read_path, scale, selection, train_throughput, umap_grid
from .common import machine, machine_line, results_dir

BENCHMARKS = {"train_throughput": train_throughput, "kmeans": kmeans, "balanced": balanced, "embed": embed, "eval_cost": eval_cost,
              "quality": quality, "projection": projection, "selection": selection, "scale": scale, "read_path": read_path, "manifold": manifold, "umap_grid": umap_grid, "gpu": gpu}
# The GPU benchmark runs by default where there is a GPU; `--only gpu` asks for it anywhere.
DEFAULT = [name for name in BENCHMARKS if name != "gpu" or torch.cuda.is_available()]
TABLES = ["train_throughput", "kmeans", "kmeans_assign", "kmeans_paths", "balanced", "scale", "read_path", "manifold", "embed", "embed_dim0", "embed_gap", "embed_write", "eval_cost", "quality", "projection", "umap_grid", "selection", "gpu"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run just these")
    p.add_argument("--collect", action="store_true", help="run nothing; rebuild RESULTS.md from existing results")
    args = p.parse_args(argv)
    flags = ["--quick"] if args.quick else []
    for name in [] if args.collect else args.only or DEFAULT:
        t = time.perf_counter()
        print(f"== {name}")
        BENCHMARKS[name].main(flags)
        print(f"== {name} took {time.perf_counter() - t:.0f} s")
    out = results_dir(args.quick)
    parts = [f"# distgan benchmarks{' (quick)' if args.quick else ''}\n\nMachine: {machine_line(machine())}\n"]
    parts += [(out / f"{t}.md").read_text() for t in TABLES if (out / f"{t}.md").is_file()]
    # full runs: benchmarks/RESULTS.md (committed); quick runs: benchmarks/results/quick/RESULTS.md
    target = out / "RESULTS.md" if args.quick else out.parent / "RESULTS.md"
    target.write_text("\n".join(parts))
    print(f"-> {target}")


if __name__ == "__main__":
    main()
