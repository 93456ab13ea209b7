"""Image sources -> Parquet shards (the prepared-dataset contract) -> tensors.

A prepared dataset is a folder (a local path or a URI: storage.py) of
`shard-NNNNN.parquet` files with columns `id` int64, `image` binary (raw uint8,
H x W x C), `label` int32 (null when unknown), `split` string, plus
`dataset.json`. Each shard is written whole or not at all and `dataset.json`
last: a folder without it is not a dataset (every reader refuses it), so a
crash never leaves one that looks complete; a failed prepare removes its shards.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..config import UserError
from ..storage import Loc, check_access, loc, write_parquet
from .sources import check_resolution, fit_resolution, get_source

COLUMNS = ("id", "image", "label", "split")
MANIFEST = "dataset.json"


# ---------------------------------------------------------------- writing


def _shard_table(ids, images, labels, splits):
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "image": pa.array([im.tobytes() for im in images], pa.binary()),
            "label": pa.array(labels, pa.int32()),  # None entries become nulls
            "split": pa.array(splits, pa.string()),
        }
    )


def _check_out_dir(out: Loc, overwrite: bool) -> None:
    check_access(out, write=True)
    if out.is_file():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.iterdir() and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite to replace it")


def prepare(
    source: str,
    out: str | Path,
    data_root: str | Path | None = None,
    split: str = "all",
    resolution: int = 32,
    shard_rows: int = 10000,
    download: bool = False,
    overwrite: bool = False,
    fake_count: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a prepared dataset; returns its manifest."""
    from tqdm import tqdm

    out = loc(out)
    check_resolution(resolution)
    if split not in ("train", "test", "all"):
        raise UserError(f"--split must be train, test or all, got '{split}'")
    if shard_rows < 1:
        raise UserError(f"--shard-rows must be positive, got {shard_rows}")
    _check_out_dir(out, overwrite)
    fn = get_source(source, fake_count, seed)
    root = Path(data_root) if data_root else None
    kwargs = {"resolution": resolution} if source in ("folder", "fake") else {}
    src = fn(root, split, download, **kwargs)

    # The old dataset stops being one (its manifest goes first), then the new shards are
    # written, each whole, and the manifest last.
    (out / MANIFEST).unlink()
    out.rmtree()
    out.mkdir()
    complete = False
    try:
        buf: dict[str, list] = {"id": [], "image": [], "label": [], "split": []}
        shards: list[str] = []
        channels = None
        class_counts: dict[str, int] = {}
        split_counts: dict[str, int] = {}
        n_unlabelled = 0

        def flush():
            if not buf["id"]:
                return
            name = f"shard-{len(shards):05d}.parquet"
            write_parquet(_shard_table(buf["id"], buf["image"], buf["label"], buf["split"]), out / name)
            shards.append(name)
            for v in buf.values():
                v.clear()

        # `with`: an error mid-source closes the bar first, so the error's one line stands on its own
        with tqdm(desc=f"prepare {source}", unit="img", disable=not progress) as bar:
            for chunk in src.chunks:
                images = fit_resolution(chunk.images, resolution)
                channels = images.shape[-1]
                for i in range(len(images)):
                    label = None if chunk.labels is None else int(chunk.labels[i])
                    buf["id"].append(int(chunk.ids[i]))
                    buf["image"].append(images[i])
                    buf["label"].append(label)
                    buf["split"].append(chunk.split)
                    split_counts[chunk.split] = split_counts.get(chunk.split, 0) + 1
                    if label is None:
                        n_unlabelled += 1
                    else:
                        key = src.class_names[label] if label < len(src.class_names) else str(label)
                        class_counts[key] = class_counts.get(key, 0) + 1
                    if len(buf["id"]) >= shard_rows:
                        flush()
                bar.update(len(images))
        flush()
        count = sum(split_counts.values())
        if count == 0:
            detail = f"; {len(src.skipped)} unreadable files, first: {src.skipped[0]}" if src.skipped else ""
            raise UserError(f"source '{source}' gave no images for split '{split}'{detail}")
        manifest = {
            "name": out.name,
            "source": source,
            "data_root": str(root) if root else None,
            "count": count,
            "resolution": resolution,
            "channels": int(channels),
            "class_names": src.class_names,
            "class_counts": {c: class_counts[c] for c in sorted(class_counts, key=_class_order(src.class_names))},
            "unlabelled": n_unlabelled,
            "split_counts": split_counts,
            "shards": shards,
            "skipped": src.skipped,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: the dataset is complete
        complete = True
        return manifest
    finally:
        if not complete:  # any failure (Ctrl-C included): nothing half-written stays behind
            out.rmtree()


def _class_order(names: list[str]):
    index = {n: i for i, n in enumerate(names)}
    return lambda c: (index.get(c, len(index)), c)


# ---------------------------------------------------------------- reading


def read_manifest(path: str | Path | Loc) -> dict:
    path = loc(path)
    f = path / MANIFEST
    check_access(path)
    if not path.is_dir():
        raise UserError(f"prepared dataset not found: {path} (create it with `distgan prepare`)")
    if not f.is_file():
        raise UserError(f"{path} has no {MANIFEST}: not a prepared dataset (create it with `distgan prepare`)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is corrupt: {e}") from None


def shard_paths(path: str | Path | Loc) -> list[Loc]:
    """The dataset's shards, each checked to be Parquet with the contract's columns."""
    import pyarrow.parquet as pq

    path = loc(path)
    read_manifest(path)
    files = path.glob("*.parquet")
    if not files:
        raise UserError(f"{path} holds no .parquet shards")
    for f in files:
        try:
            with f.open_input() as fh:
                names = pq.read_schema(fh).names
        except Exception as e:  # pyarrow raises several types for a damaged footer
            raise UserError(f"{f} is not a readable Parquet file ({type(e).__name__}); re-run `distgan prepare`") from None
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise UserError(f"{f} lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    return files


def open_dataset(path: str | Path | Loc, split: str = "all", seed: int | None = None):
    """A prepared dataset as a `ray.data.Dataset`, streamed from its shards (through the
    store's filesystem: each read task opens its files itself). With `seed`, the order of the
    files is shuffled on every execution (each epoch): a dataset whose shards each hold one
    class never yields single-class stretches."""
    import ray.data
    from ray.data import FileShuffleConfig

    files = shard_paths(path)
    ds = ray.data.read_parquet([f.path for f in files], filesystem=files[0].fs,
                               shuffle=FileShuffleConfig(seed=seed) if seed is not None else None,
                               ).select_columns(list(COLUMNS))
    if split != "all":
        ds = ds.filter(expr=f"split == '{split}'")
    return ds


def read_arrays(path: str | Path, split: str = "all", columns=COLUMNS) -> dict[str, np.ndarray]:
    """The whole dataset in memory (for small sets, baselines and tests), no Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f.path, columns=list(columns), filesystem=f.fs) for f in shard_paths(path)])
    if split != "all":
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["split"], split))
    return {c: _column_numpy(table[c]) for c in columns}


SAMPLE_PER_SHARD = 32  # rows a sample takes from each shard it reads, at least


def sample_rows(path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to n images spread over the shards, without Ray: ((n, H, W, C) uint8, (n,) labels
    with -1 where unknown). What BatchNorm re-estimation and checkpoint selection look at.
    Every shard is read while n / SAMPLE_PER_SHARD covers them; beyond that, that many shards
    chosen at random: the 2,048 calibration images of 10M images in 1,000 shards read 64
    shards (0.5 GB), not all 1,000 (8 GB) for two rows each."""
    import pyarrow.parquet as pq

    m = read_manifest(path)
    shards = shard_paths(path)
    rng = np.random.default_rng(seed)
    use = min(len(shards), max(1, -(-n // SAMPLE_PER_SHARD)))
    order = range(len(shards)) if use == len(shards) else rng.permutation(len(shards))
    images, labels, got = [], [], 0
    for j, i in enumerate(order):
        if got >= n:
            break
        # (use,) quotas summing to n; shards too small for theirs: the next shards make up the rest
        quota = n // use + (j < n % use) if j < use else n - got
        f = shards[i]
        t = pq.read_table(f.path, columns=["image", "label"], filesystem=f.fs)
        take = rng.choice(len(t), size=min(quota, len(t), n - got), replace=False)
        images.append(decode_images(t["image"].take(take).to_pylist(), m["resolution"], m["channels"]))
        labels.append(_column_numpy(t["label"].take(take)))
        got += len(take)
    release_arrow_memory()
    return np.concatenate(images), np.concatenate(labels)


def release_arrow_memory() -> None:
    """Give back to the OS what Arrow's allocator kept from reads that are over. Its default
    pool (mimalloc) keeps freed pages for reuse, so a driver that read whole shards once for a
    few rows carries them to the end of the run: the 2,048 calibration images of 200k (20
    shards) left 86 MiB behind, most of the pipeline driver's peak that came from reading."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def read_images_by_id(path, ids: np.ndarray) -> dict[int, bytes]:
    """{id: encoded image} for the given ids, reading only the row groups whose id range (the
    Parquet statistics) holds one of them, one at a time. A pyarrow dataset scan with an
    `isin` filter did the same selection but read ~160 of 1,000 shards at once: 24 s and
    +870 MiB of driver memory for an 80-image montage of 10M images."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = np.unique(np.asarray(ids, np.int64))
    value_set = pa.array(wanted)
    found: dict[int, bytes] = {}
    for f in shard_paths(path):
        with f.fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh)
            meta = pf.metadata
            col = pf.schema_arrow.get_field_index("id")  # the contract's columns are flat: field index = leaf index
            for g in range(meta.num_row_groups):
                st = meta.row_group(g).column(col).statistics
                if st is not None and st.has_min_max:
                    i = np.searchsorted(wanted, st.min)  # the first wanted id >= min
                    if i == len(wanted) or wanted[i] > st.max:
                        continue  # no wanted id inside [min, max]
                t = pf.read_row_group(g, columns=["id", "image"])
                t = t.filter(pc.is_in(t["id"], value_set=value_set))
                found.update(zip(t["id"].to_pylist(), t["image"].to_pylist()))
        if len(found) == len(wanted):
            break
    release_arrow_memory()
    return found


def _column_numpy(col) -> np.ndarray:
    if col.type == "int32":  # label: nulls become -1
        return col.fill_null(-1).to_numpy()
    return col.to_numpy(zero_copy_only=False)


def decode_images(images, resolution: int, channels: int) -> np.ndarray:
    """Column of raw bytes -> (N, H, W, C) uint8."""
    flat = np.frombuffer(bytearray(b"".join(images)), dtype=np.uint8)  # writable: torch shares it
    return flat.reshape(len(images), resolution, resolution, channels)


def to_float(images_u8: np.ndarray):
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 tensor in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_device(images_u8: np.ndarray, device, channels_last: bool = False):
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1] on `device`, equal to to_float's.

    The uint8 batch crosses to the device (a quarter of float32's bytes), from pinned
    memory so the copy is asynchronous, and is converted there. The NHWC -> NCHW
    permute is a view whose memory is already channels_last; `.contiguous()` makes it
    NCHW unless channels_last is wanted."""
    import torch

    device = torch.device(device)
    u8 = torch.from_numpy(np.ascontiguousarray(images_u8))
    if device.type == "cuda":
        u8 = u8.pin_memory().to(device, non_blocking=True)
    x = u8.permute(0, 3, 1, 2).float()
    if not channels_last:
        x = x.contiguous()
    return x / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8; exact inverse of to_float."""
    import torch

    u = torch.round((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu().numpy()


def batch_to_tensors(batch: dict, resolution: int, channels: int):
    """A Ray Data numpy batch -> (x (N, C, H, W) float in [-1, 1], labels (N,) int64 with -1 unknown, ids (N,) int64)."""
    import torch

    x = to_float(decode_images(batch["image"], resolution, channels))
    labels = np.asarray(batch["label"])
    if labels.dtype.kind == "f":  # nulls arrive as NaN
        labels = np.where(np.isnan(labels), -1, labels)
    labels = torch.from_numpy(labels.astype(np.int64))
    ids = torch.from_numpy(np.asarray(batch["id"]).astype(np.int64))
    return x, labels, ids


def save_grid(images_u8: np.ndarray, path: str | Path | Loc, nrow: int = 8) -> None:
    """(N, H, W, C) uint8 -> one PNG grid, nrow images a row, 2-pixel white gaps (torchvision's
    make_grid layout), at a local path or a URI. numpy and PIL, not torch: the clustering
    driver writes a montage and importing torch + torchvision costs it 660 MiB of RSS."""
    import io

    from PIL import Image

    n, h, w, c = images_u8.shape
    cols = max(1, min(nrow, n))
    rows, pad = max(1, -(-n // cols)), 2
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images_u8):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top : top + h, left : left + w] = im
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="png")
    loc(path).write_bytes(buf.getvalue())


def actor_threads() -> int:
    """Threads for this Ray task or actor: the CPUs Ray assigned to it (at least 1, at most
    the machine's cores), not the node's core count, which every actor would claim at once.
    Outside a Ray worker (an actor class used in-process, or in the driver), the machine's
    cores; Ray is not started."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return os.cpu_count() or 1
    assigned = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    return max(1, min(assigned, os.cpu_count() or 1))


def largest_node(resource: str = "CPU") -> float:
    """The most of `resource` (CPU, GPU) that one live node of the Ray cluster has: what a task
    that must fit on one node can ask for."""
    import ray

    return max((n["Resources"].get(resource, 0) for n in ray.nodes() if n.get("Alive")), default=0)


def actor_cpus(n_actors: int) -> float:
    """CPUs for each of n CPU actors of a Ray Data pool: an equal share of the cluster's CPUs
    with one share left for the read tasks, never more than half of the largest node (an
    actor must fit on one node beside reads); whole CPUs when there is room (threads = CPUs)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    share = min(cpus / (n_actors + 1), (largest_node("CPU") or cpus) / 2)
    return float(int(share)) if share >= 1 else share
