"""What storing and reading embeddings costs around k-means, assignment and the embedding
actors, for distgan's layout and the alternatives tried: 262,144 x 256 float16 vectors
(4 row groups of 65,536, benchmarks/scale.py's synthetic mixture) written and read back
with pyarrow, then turned into float32 the way `features.block_x` does. In one process,
interleaved: the vector column declared non-nullable (distgan: no Parquet definition level
per element), nullable (Arrow's default, what distgan wrote before), nullable and
uncompressed (tried); and float16 -> float32 by numpy's astype (distgan) and Arrow's cast
(tried). Best and median of `repeat`, Arrow on one thread (a one-CPU actor: Ray sets
OMP_NUM_THREADS=1, which Arrow's pool follows).

    python -m benchmarks.read_path [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import write_results

DIM, ROW_GROUP, CHUNK = 256, 65536, 8192
LAYOUTS = {  # name -> (vectors non-nullable, vector codec)
    "non-nullable, snappy (distgan)": (True, "snappy"),
    "nullable, snappy (before)": (False, "snappy"),
    "nullable, uncompressed (tried)": (False, "none"),
}


def layout_table(rows: int, nonnull: bool):
    """distgan's table (embed._table) of the scale benchmark's mixture, or the same with the
    vector column nullable (Arrow's default fixed-size list)."""
    import pyarrow as pa

    from .scale import mixture_block, mixture_centres

    rng = np.random.default_rng(0)
    t = mixture_block(rng, mixture_centres(rng), 0, rows)
    if nonnull:
        return t
    flat = t.column("embedding").combine_chunks().flatten()
    return t.set_column(t.schema.get_field_index("embedding"), "embedding", pa.FixedSizeListArray.from_arrays(flat, DIM))


def options(codec: str) -> dict:
    from distgan.embed import PARQUET_OPTIONS

    return {**PARQUET_OPTIONS, "compression": {"id": "snappy", "label": "snappy", "split": "snappy", "embedding": codec}}


def numpy_cast(values, n: int) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, DIM)


def arrow_cast(values, n: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(values, pa.float32()).to_numpy().reshape(n, DIM)


def main(argv=None) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rows_n, repeat = (16384, 2) if args.quick else (4 * ROW_GROUP, 9)
    pa.set_cpu_count(1)
    times: dict = {name: {"write": [], "read": [], "numpy": [], "arrow": []} for name in LAYOUTS}
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        tables = {name: layout_table(rows_n, nonnull) for name, (nonnull, _) in LAYOUTS.items()}
        for i, (name, (_, codec)) in enumerate(LAYOUTS.items()):
            path = Path(d) / f"{i}.parquet"
            pq.write_table(tables[name], path, row_group_size=ROW_GROUP, **options(codec))
            sizes[name] = path.stat().st_size
        for _ in range(repeat):  # interleaved: drift in the machine's speed hits every layout alike
            for i, (name, (_, codec)) in enumerate(LAYOUTS.items()):
                t = times[name]
                chunk = tables[name].slice(0, CHUNK)
                t0 = time.perf_counter()
                pq.write_table(chunk, pa.BufferOutputStream(), **options(codec))  # one actor chunk
                t["write"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                table = pq.ParquetFile(Path(d) / f"{i}.parquet").read(columns=["id", "label", "embedding"])
                t["read"].append(time.perf_counter() - t0)
                values = table.column("embedding").combine_chunks().flatten()
                for cast, fn in (("numpy", numpy_cast), ("arrow", arrow_cast)):
                    t0 = time.perf_counter()
                    fn(values, table.num_rows)
                    t[cast].append(time.perf_counter() - t0)
    base = times["nullable, snappy (before)"]
    rows = []
    for name, t in times.items():
        rows.append({"vector column": name, "rows": rows_n, "file MB": sizes[name] / 1e6,
                     f"write {CHUNK} rows ms (best / median)": f"{1e3 * min(t['write']):.1f} / {1e3 * np.median(t['write']):.1f}",
                     "write speed vs before": min(base["write"]) / min(t["write"]),
                     "read s (best / median)": f"{min(t['read']):.3f} / {np.median(t['read']):.3f}",
                     "read rows/s": rows_n / min(t["read"]), "read speed vs before": min(base["read"]) / min(t["read"]),
                     "numpy cast s (best / median)": f"{min(t['numpy']):.3f} / {np.median(t['numpy']):.3f}",
                     "arrow cast s (best / median)": f"{min(t['arrow']):.3f} / {np.median(t['arrow']):.3f}"})
    notes = (f"One Parquet file of {rows_n} x {DIM} float16 vectors (benchmarks/scale.py's Gaussian mixture, row groups of "
             f"{ROW_GROUP}) with id, label and split, written by distgan's options with the vector column as named; write = "
             f"one {CHUNK}-row chunk as an embedding actor writes it (to memory); read = `ParquetFile.read` of id, label "
             "and the vectors; then the vectors to float32 by numpy's astype (what distgan does) and by Arrow's cast. "
             f"Arrow on one thread; best and median of {repeat}, layouts interleaved. Speeds are best-time ratios "
             "against the nullable snappy column distgan wrote before. Random float16 barely compresses (a real 256-d "
             "shard: snappy saves 0.9%).")
    write_results("read_path", rows, list(rows[0]), "python -m benchmarks.read_path", notes, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
