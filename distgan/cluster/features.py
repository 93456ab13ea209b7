"""Feature sources: embeddings (Parquet shards from `distgan embed`), raw pixels of a
prepared dataset, or in-memory arrays. Each is a re-iterable stream of batches of
(ids (B,), labels (B,) int with -1 unknown, splits (B,), x (B, E) float32) for
code that runs in one process, plus the files and columns Ray Data reads when the
work is spread over a cluster."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..config import UserError
from ..data import decode_images, read_manifest, shard_paths
from ..storage import Loc, check_access, loc

Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------- feature sources


@dataclass
class Features:
    """A re-iterable stream of feature batches plus what is known up front, and how Ray
    Data reads the same points: `dataset()` yields blocks with columns id, label and
    either `embedding` (fixed-size list of float16/32) or `image` (raw uint8 bytes),
    which `block_x` turns into (B, dim) float32."""

    batches: Callable[[], Iterator[Batch]]
    count: int
    dim: int
    description: str
    data: str | None  # prepared dataset the ids refer to, when known
    kind: str = "embedding"  # embedding | pixels
    files: list[str] = field(default_factory=list)  # Parquet shards' URIs (empty: in-memory tables)
    tables: list = field(default_factory=list)  # in-memory pyarrow tables (array_features)

    def dataset(self):
        """A Ray Data dataset of this feature source (only the columns assignment needs). Files are
        read by pyarrow in Ray Data tasks, a unit of row groups (about READ_ROWS rows) each:
        measured here, `ray.data.read_parquet` delivered 63k rows/s of 256-d float16 embeddings
        where pyarrow reads millions."""
        import ray.data

        if not self.files:
            return ray.data.from_arrow(self.tables)
        units = read_units(self.files)
        return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            _read_units, fn_kwargs={"columns": self.columns}, batch_size=1, batch_format="pyarrow")

    @property
    def columns(self) -> list[str]:
        """The columns assignment reads."""
        return ["id", "label", "embedding" if self.kind == "embedding" else "image"]


READ_ROWS = 65536


def read_units(files: list[str]) -> list[dict]:
    """Row-group ranges of about READ_ROWS rows from the files' footers: one Ray Data block each."""
    import pyarrow.parquet as pq

    units = []
    for f in files:
        with loc(f).open_input() as fh:
            meta = pq.ParquetFile(fh).metadata
        start, rows = 0, 0
        for g in range(meta.num_row_groups):
            rows += meta.row_group(g).num_rows
            if rows >= READ_ROWS or g == meta.num_row_groups - 1:
                units.append({"file": f, "first": start, "last": g})
                start, rows = g + 1, 0
    return units


def read_unit(file: str, first: int, last: int, columns: list[str]):
    """Row groups first..last of one file (a unit of `read_units`) as a pyarrow table."""
    import pyarrow.parquet as pq

    with loc(file).open_input() as fh:
        return pq.ParquetFile(fh).read_row_groups(range(first, last + 1), columns=columns)


def _read_units(batch, columns: list[str]):
    import pyarrow as pa

    # permissive: shards written before the vectors were declared non-nullable may sit beside newer ones
    return pa.concat_tables([read_unit(f.as_py(), first.as_py(), last.as_py(), columns)
                             for f, first, last in zip(batch["file"], batch["first"], batch["last"])],
                            promote_options="permissive")


def block_x(table, kind: str, dim: int) -> np.ndarray:
    """A pyarrow block -> (B, dim) float32, without a Python object per row: the fixed-size
    list's (or the equal-sized binary column's) value buffer is reinterpreted in place."""
    n = table.num_rows
    if kind == "embedding":
        values = table.column("embedding").combine_chunks().flatten()  # (B * dim,) float16 or float32
        x = values.to_numpy(zero_copy_only=False).reshape(n, dim)
    else:  # raw uint8 images, all of one size: the data buffer between the first and last offset
        col = table.column("image").combine_chunks()
        offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset : col.offset + n + 1]
        x = np.frombuffer(col.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(n, dim)
        return x.astype(np.float32) * np.float32(1 / 255.0)
    return x.astype(np.float32, copy=False)


def block_labels(table) -> np.ndarray:
    return table.column("label").fill_null(-1).to_numpy().astype(np.int32)


def embedding_features(path: str, batch_rows: int = 65536) -> Features:
    import pyarrow.parquet as pq

    path = loc(path)
    check_access(path)
    mf = path / "embeddings.json"
    if not mf.is_file():
        raise UserError(f"{path} has no embeddings.json: not a `distgan embed` output (or the run did not finish)")
    manifest = mf.read_json()
    files = [path / s for s in manifest["shards"]]
    present = {c.name for c in path.iterdir()}
    missing = [f.name for f in files if f.name not in present]
    if missing:
        raise UserError(f"{path} is missing embedding shards {missing[:3]}; rerun `distgan embed` to redo them")
    _check_dims(files, manifest["dim"])

    def batches():
        for f in files:
            try:
                pf = pq.ParquetFile(f.open_input())
                for rb in pf.iter_batches(batch_size=batch_rows, columns=["id", "label", "split", "embedding"]):
                    emb = rb.column("embedding")
                    x = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rb), -1)
                    yield (rb.column("id").to_numpy(), rb.column("label").fill_null(-1).to_numpy(),
                           rb.column("split").to_numpy(zero_copy_only=False), x)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read embeddings shard {f}: {e}") from None

    desc = f"D embeddings ({manifest['arch']}, features={manifest['features']}, step {manifest['step']}"
    desc += f", projected from {manifest['readout_dim']}-d)" if manifest.get("projection") else ")"
    return Features(batches, manifest["count"], manifest["dim"], desc, manifest.get("data"), "embedding",
                    [f.uri for f in files])


def _check_dims(files: list[Loc], dim: int) -> None:
    """Every shard's embedding width must be the manifest's: read from the schemas (footers only)."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            with f.open_input() as fh:
                width = pq.read_schema(fh).field("embedding").type.list_size
        except (OSError, KeyError, AttributeError, ValueError) as e:
            raise UserError(f"cannot read embeddings shard {f}: {e}") from None
        if width != dim:
            raise UserError(f"embeddings shard {f.name} holds {width}-d vectors but embeddings.json says {dim}-d; "
                            "the folder mixes two embedding runs: re-embed into an empty --out")


def pixel_features(data: str, batch_rows: int = 8192) -> Features:
    """Raw pixels of a prepared dataset scaled to [0, 1]: the baseline."""
    import pyarrow.parquet as pq

    m = read_manifest(data)
    files = shard_paths(data)
    res, ch = m["resolution"], m["channels"]

    def batches():
        for f in files:
            for rb in pq.ParquetFile(f.open_input()).iter_batches(batch_size=batch_rows, columns=["id", "image", "label", "split"]):
                imgs = decode_images(rb.column("image").to_pylist(), res, ch)
                yield (rb.column("id").to_numpy(), rb.column("label").fill_null(-1).to_numpy(),
                       rb.column("split").to_numpy(zero_copy_only=False),
                       imgs.reshape(len(imgs), -1).astype(np.float32) / 255.0)

    return Features(batches, m["count"], res * res * ch, f"raw pixels ({res}x{res}x{ch})", loc(data).uri,
                    "pixels", [f.uri for f in files])


def array_features(ids, labels, splits, x: np.ndarray, description: str, batch_rows: int = 65536) -> Features:
    """In-memory arrays as a feature stream (notebooks, benchmarks, tests)."""
    import pyarrow as pa

    def batches():
        for i in range(0, len(x), batch_rows):
            s = slice(i, i + batch_rows)
            yield ids[s], labels[s], splits[s], x[s]

    def table(s):
        xs = np.ascontiguousarray(x[s], np.float32)
        return pa.table({"id": pa.array(ids[s], pa.int64()), "label": pa.array(labels[s], pa.int32(), mask=labels[s] < 0),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xs.reshape(-1)), x.shape[1])})

    tables = [table(slice(i, i + batch_rows)) for i in range(0, len(x), batch_rows)]
    return Features(batches, len(x), x.shape[1], description, None, "embedding", [], tables)


def collect(features: Features, limit: int | None = None, seed: int = 0) -> Batch:
    """All points (or a uniform sample of `limit`) in memory, NaN/Inf refused."""
    rng = np.random.default_rng(seed)
    keep = None
    if limit and limit < features.count:
        keep = np.zeros(features.count, bool)
        keep[rng.choice(features.count, limit, replace=False)] = True
    parts, offset, bad, bad_rows = [], 0, 0, 0
    for ids, labels, splits, x in features.batches():
        finite = np.isfinite(x)
        if not finite.all():
            bad += int((~finite).sum())
            bad_rows += int((~finite.all(axis=1)).sum())
        sel = slice(None) if keep is None else keep[offset : offset + len(ids)]
        parts.append((ids[sel], labels[sel], splits[sel], x[sel]))
        offset += len(ids)
    if bad:
        raise UserError(f"embeddings contain {bad} non-finite values (NaN/Inf) in {bad_rows} rows; "
                        "re-embed from a checkpoint that trained without diverging")
    if not parts:
        raise UserError("no points to cluster")
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]

