"""`distgan cluster` at 1M, 4M and 10M points: synthetic 256-d float16 embeddings (a
Gaussian mixture of 1,000 components in 10 labelled classes) in Parquet shards, run
through the real CLI in a child process (its own local Ray), k = 1000 and k = 10.
Wall time of fit, assign (+ write) and metrics; the driver's peak RSS (its VmHWM)
and the largest Ray worker's peak RSS (polled from /proc); points/s with 1 and 2
assignment actors; and one run on a 2-node `ray.cluster_utils.Cluster`.

    python -m benchmarks.scale [--quick] [--sizes 1000000 4000000 10000000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import write_results

DIM, COMPONENTS, CLASSES, SHARD = 256, 1000, 10, 500_000


def mixture_block(rng, centres: np.ndarray, start: int, m: int):
    """m rows (ids from `start`) of the mixture around `centres` (COMPONENTS, DIM), as a
    pyarrow table in distgan's embedding layout (the table `distgan embed` writes)."""
    from distgan.embed import _table

    comp = rng.integers(0, COMPONENTS, m)
    x = (centres[comp] + rng.normal(0, 0.35, (m, DIM)).astype(np.float32)).astype(np.float16)
    return _table(np.arange(start, start + m), (comp // (COMPONENTS // CLASSES)).astype(np.int32),
                  np.array(["train"] * m, object), x)


def mixture_centres(rng) -> np.ndarray:
    return rng.normal(0, 1, (COMPONENTS, DIM)).astype(np.float32)


def generate(n: int, out: Path, seed: int = 0) -> Path:
    """Embeddings in distgan's embedding layout, written shard by shard (memory: one shard)."""
    import pyarrow.parquet as pq

    from distgan.embed import PARQUET_OPTIONS

    if (out / "embeddings.json").is_file() and json.loads((out / "embeddings.json").read_text()).get("layout") == 3:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = mixture_centres(rng)  # same mixture at every size
    shards = []
    for i, start in enumerate(range(0, n, SHARD)):
        t = mixture_block(rng, centres, start, min(SHARD, n - start))
        name = f"emb-{i:05d}.parquet"
        pq.write_table(t, out / name, row_group_size=65536, **PARQUET_OPTIONS)  # as `distgan embed` writes
        shards.append(name)
    (out / "embeddings.json").write_text(json.dumps({
        "count": n, "dim": DIM, "dtype": "float16", "arch": "synthetic", "features": "gaussian-mixture", "step": 0,
        "shards": shards, "data": None, "layout": 3}))  # 3: vectors declared non-nullable
    return out


class WorkerPeak:
    """Largest VmHWM (peak resident set) among Ray worker processes ("ray::..."), polled."""

    def __init__(self):
        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                except OSError:  # the process ended between listing and reading
                    continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_cli(emb: Path, out: Path, k: int, actors: int = 2, env: dict | None = None) -> dict:
    """One `distgan cluster` in a child process; its metrics plus driver and worker peak RSS."""
    # The CLI's own main, then its own peak RSS: VmHWM of this process image. (Not ru_maxrss:
    # Linux carries the forking parent's peak across exec into it.)
    code = ("import sys; from distgan.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('DRIVER_PEAK_KIB', hwm); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "cluster", "--embeddings", str(emb), "--k", str(k), "--out", str(out),
           "--preprocess", "none", "--actors", str(actors), "--overwrite"]
    t = time.perf_counter()
    with WorkerPeak() as workers:
        proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    driver_kib = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("DRIVER_PEAK_KIB")))
    m = json.loads((out / "metrics.json").read_text())
    return {"points": m["n"], "k": k, "actors": actors, "fit s": m["seconds_fit"], "criteria s": m.get("seconds_criteria"), "assign s": m["seconds_assign"],
            "metrics s": m["seconds_metrics"], "stage s": m["seconds_total"], "command s": wall,
            "assign points/s": m["n"] / m["seconds_assign"], "trained on": m["trained_on"],
            "driver peak MiB": driver_kib / 1024,
            "worker peak MiB": workers.peak_kib / 1024, "nmi": m.get("nmi")}


def two_node(emb: Path, out: Path, k: int) -> dict:
    """The same command against a head + 1 worker node (ray.cluster_utils.Cluster, loopback)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        row = run_cli(emb, out, k, actors=2, env={"RAY_ADDRESS": cluster.address})
    finally:
        cluster.shutdown()
    return {**row, "cluster": "2 nodes x 2 CPUs"}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--root", default=os.environ.get("DISTGAN_SCALE_DIR", tempfile.gettempdir()),
                   help="where the synthetic embeddings are kept between runs")
    args = p.parse_args(argv)
    sizes = args.sizes or ([200_000, 400_000] if args.quick else [1_000_000, 4_000_000, 10_000_000])
    root = Path(args.root) / "distgan-scale"
    rows = []
    for n in sizes:
        t = time.perf_counter()
        emb = generate(n, root / f"emb-{n}")
        print(f"{n} points ready in {time.perf_counter() - t:.0f} s", flush=True)
        for k in (1000, 10):
            rows.append({**run_cli(emb, root / f"out-{n}-{k}", k), "cluster": "local"})
            print(rows[-1], flush=True)
    mid = sizes[len(sizes) // 2]
    rows.append({**run_cli(root / f"emb-{mid}", root / f"out-{mid}-1a", 1000, actors=1), "cluster": "local"})
    rows.append(two_node(root / f"emb-{sizes[0]}", root / f"out-{sizes[0]}-2n", 1000))
    cols = ["cluster", "points", "k", "actors", "trained on", "fit s", "criteria s", "assign s", "metrics s", "stage s", "command s",
            "assign points/s", "driver peak MiB", "worker peak MiB", "nmi"]
    notes = (f"Synthetic embeddings: {DIM}-d float16, a mixture of {COMPONENTS} Gaussian components (sd 0.35 around "
             f"N(0,1) centres), labels = component // {COMPONENTS // CLASSES} ({CLASSES} classes), shards of {SHARD} rows. "
             "`distgan cluster --preprocess none` in a child process with its own local Ray (4 logical CPUs on this "
             "2-core machine); fit = sampling + k-means + the label-free criteria (criteria s, part of fit s) in the Ray task, "
             "assign = Ray Data actors each reading its units and writing one Parquet file per unit, metrics = the "
             "per-unit summaries the actors return, summed on the driver. Driver peak = the CLI process's VmHWM; worker peak = "
             "the largest VmHWM among ray:: processes, polled every 0.5 s.")
    write_results("scale", rows, cols, "python -m benchmarks.scale", notes, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
