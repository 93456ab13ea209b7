"""Image sources -> Parquet shards (the prepared-dataset contract) -> tensors.

A prepared dataset is a folder of `shard-NNNNN.parquet` files with columns
`id` int64, `image` binary (raw uint8, H x W x C), `label` int32 (null when
unknown), `split` string, plus `dataset.json`. The whole folder is written
under a temporary name and renamed at the end, so a crash never leaves a
dataset that looks complete.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import UserError

COLUMNS = ("id", "image", "label", "split")
MANIFEST = "dataset.json"


@dataclass
class Chunk:
    """A block of source images at their native size: images (N, H, W, C) uint8."""

    images: np.ndarray
    labels: np.ndarray | None  # (N,) int, or None when the source has no labels
    split: str
    ids: np.ndarray  # (N,) int64, stable across runs


@dataclass
class Source:
    chunks: Iterator[Chunk]
    class_names: list[str]
    skipped: list[str]  # unreadable files (folder source)


# ---------------------------------------------------------------- sources


def _want(split: str, wanted: str) -> bool:
    return wanted == "all" or split == wanted


def _holdout_split(ids: np.ndarray) -> np.ndarray:
    # Sources without an official split: every 5th id is test (20%), stable by id.
    return np.where(ids % 5 == 4, "test", "train")


def _split_chunks(images, labels, wanted) -> Iterator[Chunk]:
    ids = np.arange(len(images), dtype=np.int64)
    splits = _holdout_split(ids)
    for s in ("train", "test"):
        sel = splits == s
        if _want(s, wanted) and sel.any():
            yield Chunk(images[sel], None if labels is None else labels[sel], s, ids[sel])


def source_digits(root: Path | None, split: str, download: bool) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn: 1,797 8x8 images, values 0..16
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Source(_split_chunks(images, d.target.astype(np.int32), split), [str(i) for i in range(10)], [])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        magic, = struct.unpack(">I", raw[:4])
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except (OSError, EOFError, struct.error, ValueError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None


MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _mnist_like(folder: str, torchvision_cls: str, classes: list[str]):
    def source(root: Path | None, split: str, download: bool) -> Source:
        root = _require_root(root, folder)
        raw = root / folder / "raw"
        names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
        if download:
            import torchvision.datasets as tvd

            for train in (True, False):
                getattr(tvd, torchvision_cls)(str(root), train=train, download=True)

        def find(stem: str) -> Path:
            for cand in (raw / (stem + ".gz"), raw / stem):
                if cand.is_file():
                    return cand
            raise UserError(
                f"{folder}: expected {raw / stem}.gz (torchvision layout <data-root>/{folder}/raw/); "
                "point --data-root at the folder that holds it, or pass --download"
            )

        files = {s: (find(i), find(lab)) for s, (i, lab) in names.items() if _want(s, split)}

        def chunks():
            offset = {"train": 0, "test": 60000}  # official order; test ids follow train ids
            for s, (img_path, lab_path) in files.items():
                images, labels = _read_idx(img_path), _read_idx(lab_path)
                if images.ndim != 3 or len(images) != len(labels):
                    raise UserError(f"{img_path}: expected N x 28 x 28 images matching {lab_path}")
                yield Chunk(images[..., None], labels.astype(np.int32), s, offset[s] + np.arange(len(images)))

        return Source(chunks(), classes, [])

    return source


def _require_root(root: Path | None, folder: str) -> Path:
    if root is None:
        raise UserError(f"this source reads torchvision's layout: pass --data-root DIR (DIR/{folder}/...), or --download")
    if not root.is_dir():
        raise UserError(f"--data-root {root} does not exist")
    return root


CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-10-jpeg-batches-py")


def source_cifar10(root: Path | None, split: str, download: bool) -> Source:
    root = _require_root(root, CIFAR_FOLDERS[0])
    if download:
        import torchvision.datasets as tvd

        tvd.CIFAR10(str(root), train=True, download=True)
    folder = next((root / f for f in CIFAR_FOLDERS if (root / f / "batches.meta").is_file()), None)
    if folder is None:
        raise UserError(
            f"cifar10: expected {root}/cifar-10-batches-py/ with batches.meta, data_batch_1..5 and test_batch "
            "(torchvision layout); point --data-root at its parent, or pass --download"
        )
    # These are the dataset's own pickles (numpy arrays and lists only), read from
    # the user's data root exactly as torchvision reads them.
    meta = _unpickle(folder / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta["label_names"]]
    batches = []
    if _want("train", split):
        batches += [(folder / f"data_batch_{i}", "train", 10000 * (i - 1)) for i in range(1, 6)]
    if _want("test", split):
        batches += [(folder / "test_batch", "test", 50000)]
    present = [b for b in batches if b[0].is_file()]
    if not present:
        raise UserError(f"cifar10: no data batches for split '{split}' in {folder}")

    def chunks():
        for path, s, first in present:
            d = _unpickle(path)
            images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            yield Chunk(np.ascontiguousarray(images), np.asarray(d["labels"], dtype=np.int32), s, first + np.arange(len(images)))

    return Source(chunks(), classes, [])


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except Exception as e:  # a corrupt batch file is a user-data problem, said in one line
        raise UserError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def source_folder(root: Path | None, split: str, download: bool, resolution: int = 32) -> Source:
    if root is None or not root.is_dir():
        raise UserError(f"folder source: pass --data-root DIR, a directory of images (got {root})")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise UserError(f"folder source: no image files ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
    # Class subfolders give labels when every image sits in one; otherwise labels are unknown.
    parents = sorted({p.parent.relative_to(root).as_posix() for p in files})
    labelled = "." not in parents
    classes = parents if labelled else []
    index = {c: i for i, c in enumerate(classes)}
    skipped: list[str] = []

    def chunks():
        from PIL import Image

        ids = np.arange(len(files), dtype=np.int64)  # sorted path order: stable while files stay
        splits = _holdout_split(ids)
        for i, path in enumerate(files):
            if not _want(str(splits[i]), split):
                continue
            try:
                with Image.open(path) as im:
                    arr = center_crop_resize(np.asarray(im.convert("RGB")), resolution)
            except Exception as e:  # unreadable image: counted and listed, never fatal alone
                skipped.append(f"{path.relative_to(root)}: {type(e).__name__}")
                continue
            lab = np.array([index[path.parent.relative_to(root).as_posix()]], np.int32) if labelled else None
            yield Chunk(arr[None], lab, str(splits[i]), ids[i : i + 1])

    return Source(chunks(), classes, skipped)


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C): center square crop, then area/bilinear resize."""
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top : top + s, left : left + s]
    if s != size:
        pil = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
        pil = pil.resize((size, size), Image.BOX if s > size else Image.BILINEAR)
        img = np.asarray(pil)
        if img.ndim == 2:
            img = img[..., None]
    return img


def _fake_image(rng: np.random.Generator, cls: int, res: int) -> np.ndarray:
    # One of 10 shapes, random position, size and brightness: learnable, clusterable.
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.18, 0.3)
    dy, dx = yy - cy, xx - cx
    shapes = [
        np.hypot(dy, dx) < r,  # disc
        (np.abs(dy) < r) & (np.abs(dx) < r),  # square
        np.abs(np.hypot(dy, dx) - r) < 0.06,  # ring
        np.abs(dy) < 0.07,  # horizontal bar
        np.abs(dx) < 0.07,  # vertical bar
        np.abs(dy - dx) < 0.07,  # diagonal
        np.abs(dy + dx) < 0.07,  # anti-diagonal
        (np.abs(dy) < 0.07) | (np.abs(dx) < 0.07),  # cross
        (dy > 0) & (np.abs(dx) < dy),  # triangle
        (np.sin(xx * 25) > 0) & (np.hypot(dy, dx) < r * 1.3),  # stripes
    ]
    img = shapes[cls].astype(np.float32) * rng.uniform(0.6, 1.0) + rng.normal(0, 0.05, (res, res))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)[..., None]


def make_fake(count: int, resolution: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic procedural images (count, res, res, 1) and labels 0..9."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int32) % 10
    images = np.stack([_fake_image(rng, int(c), resolution) for c in labels])
    return images, labels


def source_fake(count: int = 1000, seed: int = 0):
    def source(root: Path | None, split: str, download: bool, resolution: int = 32) -> Source:
        images, labels = make_fake(count, resolution, seed)
        return Source(_split_chunks(images, labels, split), [f"shape{i}" for i in range(10)], [])

    return source


SOURCES: dict[str, Callable[..., Source]] = {
    "digits": source_digits,
    "mnist": _mnist_like("MNIST", "MNIST", MNIST_CLASSES),
    "fashion-mnist": _mnist_like("FashionMNIST", "FashionMNIST", FASHION_CLASSES),
    "cifar10": source_cifar10,
    "folder": source_folder,
    "fake": source_fake(),
}


def get_source(name: str, fake_count: int = 1000, seed: int = 0) -> Callable[..., Source]:
    if name == "fake":
        return source_fake(fake_count, seed)
    if name not in SOURCES:
        raise UserError(f"unknown source '{name}'; valid sources: {', '.join(SOURCES)}")
    return SOURCES[name]


# ---------------------------------------------------------------- resolution


def fit_resolution(images: np.ndarray, resolution: int) -> np.ndarray:
    """(N, H, W, C) -> (N, R, R, C). 28-pixel sources are zero-padded to 32 first
    (the usual MNIST treatment), then anything else is resized."""
    n, h, w, c = images.shape
    if h == 28 and w == 28 and resolution >= 32:
        images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
        h = w = 32
    if h == resolution and w == resolution:
        return images
    return np.stack([center_crop_resize(im, resolution) for im in images]) if n else images.reshape(0, resolution, resolution, c)


def check_resolution(resolution: int) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise UserError(f"--resolution must be a power of two >= 8 (8, 16, 32, 64, ...), got {resolution}")


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


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
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
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out = Path(out)
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

    # Everything goes into a sibling temp folder that is renamed when complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
            pq.write_table(_shard_table(buf["id"], buf["image"], buf["label"], buf["split"]), tmp / name)
            shards.append(name)
            for v in buf.values():
                v.clear()

        bar = tqdm(desc=f"prepare {source}", unit="img", disable=not progress)
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
        bar.close()
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return manifest
    finally:
        # On any failure (including Ctrl-C) nothing half-written stays behind.
        shutil.rmtree(tmp, ignore_errors=True)


def _class_order(names: list[str]):
    index = {n: i for i, n in enumerate(names)}
    return lambda c: (index.get(c, len(index)), c)


# ---------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    f = path / MANIFEST
    if not path.is_dir():
        raise UserError(f"prepared dataset not found: {path} (create it with `distgan prepare`)")
    if not f.is_file():
        raise UserError(f"{path} has no {MANIFEST}: not a prepared dataset (create it with `distgan prepare`)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is corrupt: {e}") from None


def shard_paths(path: str | Path) -> list[Path]:
    """The dataset's shards, each checked to be Parquet with the contract's columns."""
    import pyarrow.parquet as pq

    path = Path(path)
    read_manifest(path)
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise UserError(f"{path} holds no .parquet shards")
    for f in files:
        try:
            names = pq.read_schema(f).names
        except Exception as e:  # pyarrow raises several types for a damaged footer
            raise UserError(f"{f} is not a readable Parquet file ({type(e).__name__}); re-run `distgan prepare`") from None
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise UserError(f"{f} lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    return files


def open_dataset(path: str | Path, split: str = "all"):
    """A prepared dataset as a `ray.data.Dataset`, streamed from its shards."""
    import ray.data

    files = shard_paths(path)
    ds = ray.data.read_parquet([str(f) for f in files]).select_columns(list(COLUMNS))
    if split != "all":
        ds = ds.filter(expr=f"split == '{split}'")
    return ds


def read_arrays(path: str | Path, split: str = "all", columns=COLUMNS) -> dict[str, np.ndarray]:
    """The whole dataset in memory (for small sets, baselines and tests), no Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f, columns=list(columns)) for f in shard_paths(path)])
    if split != "all":
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["split"], split))
    return {c: _column_numpy(table[c]) for c in columns}


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


def save_grid(images_u8: np.ndarray, path: str | Path, nrow: int = 8) -> None:
    """(N, H, W, C) uint8 -> one PNG grid, 2-pixel gaps."""
    import torch
    from torchvision.utils import save_image

    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x, str(path), nrow=nrow, padding=2, pad_value=1.0)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster when launched by `ray job submit` (or RAY_ADDRESS is set);
    otherwise start a local Ray. Locally, Ray gets at least 4 logical CPUs so two
    training workers and Ray Data's read tasks fit on a 2-core laptop; each worker
    then caps its torch threads so they do not fight over the real cores."""
    import ray

    if ray.is_initialized():
        return
    # Ray Data's per-operator progress bars flood a terminal that also shows training
    # progress; distgan prints its own (the setting travels with each Dataset).
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=True)
