"""What reading stored embeddings costs before k-means or assignment sees them, and two
changes that were tried against it: one Parquet file of 262,144 x 256 float16 vectors (4
row groups of 65,536, benchmarks/scale.py's synthetic mixture) read back with pyarrow,
then turned into float32 the way `features.block_x` does. In one process: the vector
column snappy-compressed (distgan: pyarrow's default codec) and uncompressed (tried), and
float16 -> float32 by numpy's astype (distgan) and by Arrow's cast (tried). Best and
median of `repeat` runs, Arrow on one thread (a one-CPU actor: Ray sets OMP_NUM_THREADS=1,
which Arrow's pool follows).

    python -m benchmarks.read_path [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import write_results

DIM, ROW_GROUP = 256, 65536


def write_file(path: Path, rows: int, vector_codec: str) -> int:
    """One shard in distgan's embedding layout, the vector column written with `vector_codec`."""
    import pyarrow.parquet as pq

    from distgan.embed import PARQUET_OPTIONS

    from .scale import mixture_block, mixture_centres

    rng = np.random.default_rng(0)
    t = mixture_block(rng, mixture_centres(rng), 0, rows)
    codecs = {"id": "snappy", "label": "snappy", "split": "snappy", "embedding": vector_codec}
    opts = {**PARQUET_OPTIONS, "compression": codecs}
    pq.write_table(t, path, row_group_size=ROW_GROUP, **opts)
    return path.stat().st_size


def numpy_cast(values, n: int) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, DIM)


def arrow_cast(values, n: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(values, pa.float32()).to_numpy().reshape(n, DIM)


def measure(path: Path, repeat: int) -> dict:
    """Seconds to read the file's three columns, and to convert its vectors both ways."""
    import pyarrow.parquet as pq

    reads, casts = [], {"numpy": [], "arrow": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        table = pq.ParquetFile(path).read(columns=["id", "label", "embedding"])
        reads.append(time.perf_counter() - t0)
        values = table.column("embedding").combine_chunks().flatten()
        for name, fn in (("numpy", numpy_cast), ("arrow", arrow_cast)):
            t0 = time.perf_counter()
            x = fn(values, table.num_rows)
            casts[name].append(time.perf_counter() - t0)
        del x
    return {"read": reads, **casts, "rows": table.num_rows}


def main(argv=None) -> list[dict]:
    import pyarrow as pa

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rows_n, repeat = (16384, 2) if args.quick else (4 * ROW_GROUP, 9)
    pa.set_cpu_count(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for codec, who in (("snappy", "distgan"), ("none", "tried")):
            path = Path(d) / f"{codec}.parquet"
            size = write_file(path, rows_n, codec)
            m = measure(path, repeat)
            n = m["rows"]
            rows.append({"vector column": f"{codec} ({who})", "rows": n, "file MB": size / 1e6,
                         "read s (best)": min(m["read"]), "read s (median)": float(np.median(m["read"])),
                         "read rows/s": n / min(m["read"]),
                         "numpy cast s (best / median)": f"{min(m['numpy']):.3f} / {np.median(m['numpy']):.3f}",
                         "arrow cast s (best / median)": f"{min(m['arrow']):.3f} / {np.median(m['arrow']):.3f}"})
            print(rows[-1], flush=True)
    rows[1]["read time vs snappy"] = rows[1]["read s (best)"] / rows[0]["read s (best)"]
    cols = ["vector column", "rows", "file MB", "read s (best)", "read s (median)", "read rows/s", "read time vs snappy",
            "numpy cast s (best / median)", "arrow cast s (best / median)"]
    notes = (f"One Parquet file of {rows_n} x {DIM} float16 vectors (benchmarks/scale.py's Gaussian mixture, row groups "
             f"of {ROW_GROUP}) with id and label, read by pyarrow (`ParquetFile.read`), then the vectors turned into "
             "float32 by numpy's astype (what distgan does) and by Arrow's cast; Arrow on one thread; best and median "
             f"of {repeat}. Random float16 barely compresses (a real 256-d shard: snappy saves 0.9%), so both files "
             "are about the same size.")
    write_results("read_path", rows, cols, "python -m benchmarks.read_path", notes, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
