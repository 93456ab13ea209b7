"""Image sources: each yields chunks of uint8 images at their native size, with
stable ids, labels and a split. `SOURCES` is the registry `distgan prepare` uses."""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..config import UserError


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
    """Sources without an official split: 20% test, chosen by a multiplicative hash of
    the id, so it is stable per image and does not alias with periodic labels (the
    digits cycle 0..9 in file order; id % 5 would put only two classes in test)."""
    h = (ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return np.where(h < np.uint64(int(0.2 * 2**32)), "test", "train")


def _split_chunks(images, labels, wanted, ids: np.ndarray | None = None) -> Iterator[Chunk]:
    ids = np.arange(len(images), dtype=np.int64) if ids is None else ids
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
    # The dataset's own pickles, read with an unpickler that builds nothing but
    # dicts, lists, bytes and numpy arrays (torchvision would call pickle.load).
    meta = _unpickle(folder / "batches.meta", ("label_names",))
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
            d = _unpickle(path, ("data", "labels"))
            images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            yield Chunk(np.ascontiguousarray(images), np.asarray(d["labels"], dtype=np.int32), s, first + np.arange(len(images)))

    return Source(chunks(), classes, [])


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles of dicts, lists, bytes and numpy arrays. Only the
    globals numpy needs to rebuild an array (and `_codecs.encode`, with which Python 3
    writes bytes at protocol 2) may be loaded; any other (os.system, a class with a
    __reduce__) is refused, so a crafted batch file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="latin1").load()
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    except Exception as e:  # a corrupt or hostile batch file is a user-data problem, said in one line
        raise UserError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in keys if k not in d]
    if missing:
        raise UserError(f"CIFAR batch {path} lacks {', '.join(missing)}: not a CIFAR-10 python batch")
    return d


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
        # Written in a fixed random order, not path order: a class-sorted folder of millions of
        # files would otherwise give shards (and so read blocks and batches) of one class each.
        for i in np.random.default_rng(0).permutation(len(files)):
            path = files[i]
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


FAKE_CHUNK = 5_000  # images generated at once: (5k, 32, 32) float32 planes are 20 MB each (20k: 591 MiB peak, 5k: 302)


def _fake_images(seed: list[int], labels: np.ndarray, res: int) -> np.ndarray:
    """labels (N,) 0..9 -> (N, res, res, 1) uint8: one of 10 shapes per image, random position,
    size and brightness, plus pixel noise: learnable, clusterable. Vectorised over the chunk;
    shape parameters and noise come from two generators, row by row, so image i does not
    depend on N."""
    n = len(labels)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res  # (res, res)
    u = np.random.default_rng([*seed, 0]).random((n, 4), dtype=np.float32)  # (N, 4): cy, cx, r, brightness
    cy, cx, r, bright = (lo + (hi - lo) * u[:, j, None, None]  # (N, 1, 1) each
                         for j, (lo, hi) in enumerate(((0.35, 0.65), (0.35, 0.65), (0.18, 0.3), (0.6, 1.0))))
    noise = np.random.default_rng([*seed, 1]).standard_normal((n, res, res), dtype=np.float32) * 0.05
    img = np.empty((n, res, res), np.float32)
    for c, shape in enumerate(FAKE_SHAPES):
        sel = labels == c
        if sel.any():
            dy, dx = yy - cy[sel], xx - cx[sel]  # (n_c, res, res)
            img[sel] = shape(dy, dx, r[sel], xx)
    img = img * bright + noise
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)[..., None]


FAKE_SHAPES = [  # (dy, dx, r, xx) -> bool mask; dy, dx (n, res, res), r (n, 1, 1)
    lambda dy, dx, r, xx: np.hypot(dy, dx) < r,  # disc
    lambda dy, dx, r, xx: (np.abs(dy) < r) & (np.abs(dx) < r),  # square
    lambda dy, dx, r, xx: np.abs(np.hypot(dy, dx) - r) < 0.06,  # ring
    lambda dy, dx, r, xx: np.abs(dy) < 0.07,  # horizontal bar
    lambda dy, dx, r, xx: np.abs(dx) < 0.07,  # vertical bar
    lambda dy, dx, r, xx: np.abs(dy - dx) < 0.07,  # diagonal
    lambda dy, dx, r, xx: np.abs(dy + dx) < 0.07,  # anti-diagonal
    lambda dy, dx, r, xx: (np.abs(dy) < 0.07) | (np.abs(dx) < 0.07),  # cross
    lambda dy, dx, r, xx: (dy > 0) & (np.abs(dx) < dy),  # triangle
    lambda dy, dx, r, xx: (np.sin(xx * 25) > 0) & (np.hypot(dy, dx) < r * 1.3),  # stripes
]


def fake_chunks(count: int, resolution: int = 32, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, images (n, res, res, 1) uint8, labels (n,) int32) in chunks of FAKE_CHUNK, so ten
    million images never sit in memory at once; each chunk has its own generator (seed, chunk),
    so a chunk is the same whatever the count."""
    for start in range(0, count, FAKE_CHUNK):
        ids = np.arange(start, min(count, start + FAKE_CHUNK), dtype=np.int64)
        labels = (ids % 10).astype(np.int32)
        yield ids, _fake_images([seed, start // FAKE_CHUNK], labels, resolution), labels


def make_fake(count: int, resolution: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic procedural images (count, res, res, 1) and labels 0..9, in memory."""
    parts = list(fake_chunks(count, resolution, seed))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def source_fake(count: int = 1000, seed: int = 0):
    def source(root: Path | None, split: str, download: bool, resolution: int = 32) -> Source:
        def chunks() -> Iterator[Chunk]:
            for ids, images, labels in fake_chunks(count, resolution, seed):
                yield from _split_chunks(images, labels, split, ids)

        return Source(chunks(), [f"shape{i}" for i in range(10)], [])

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


