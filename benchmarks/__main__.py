"""Run every benchmark and collect the tables into benchmarks/RESULTS.md.

    python -m benchmarks            # full runs (the quality benchmark trains for a while)
    python -m benchmarks --quick    # small sizes: checks that everything runs
"""
from __future__ import annotations

import argparse
import time

from . import embed, kmeans, quality, train_throughput
from .common import RESULTS, machine, machine_line

BENCHMARKS = {"train_throughput": train_throughput, "kmeans": kmeans, "embed": embed, "quality": quality}
TABLES = ["train_throughput", "kmeans", "kmeans_scaling", "embed", "quality"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run just these")
    args = p.parse_args(argv)
    flags = ["--quick"] if args.quick else []
    for name in args.only or BENCHMARKS:
        t = time.perf_counter()
        print(f"== {name}")
        BENCHMARKS[name].main(flags)
        print(f"== {name} took {time.perf_counter() - t:.0f} s")
    parts = [f"# distgan benchmarks\n\nMachine: {machine_line(machine())}\n"]
    parts += [(RESULTS / f"{t}.md").read_text() for t in TABLES if (RESULTS / f"{t}.md").is_file()]
    (RESULTS.parent / "RESULTS.md").write_text("\n".join(parts))
    print(f"-> {RESULTS.parent / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
