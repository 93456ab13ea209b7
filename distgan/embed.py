"""Discriminator embeddings of every image of a prepared dataset, with Ray Data.

Input shards -> Ray Data `map_batches` over an actor pool holding D (one GPU per
actor when GPUs exist): each actor call reads one input shard, decodes and embeds
it WRITE_ROWS images at a time (Parquet encodes a chunk while the next is embedded),
and writes one output shard (`emb-<input>.parquet`) whole or not at all
(storage.write_parquet), local or in object storage. The driver sees one small row
per shard. A rerun of the same command skips shards already present, so after a
crash only the missing output is redone. `embeddings.json` is written last.

Wide read-outs are stored projected (`dim`, default 256): the grid read-out is 3,584-d at
width 32, and Parquet encoding that many float16 values a row cost the actors more than
embedding them (README, Benchmarks). The basis is the top `dim` right singular vectors of the
read-outs of the BatchNorm calibration images (2,048), fitted once before the shards and saved beside them (`projection.npy`),
so a resumed run projects with the same basis.
"""
from __future__ import annotations

import time

import numpy as np

from .config import UserError
from .data import COLUMNS, actor_cpus, actor_threads, decode_images, init_ray, read_manifest, sample_rows, shard_paths, to_device
from .faults import slow_down
from .storage import Loc, loc, write_parquet
from .models import DEFAULT_DIM, DEFAULT_READOUT, check_data_fits, discriminator_from_checkpoint, embedding_dim, load_state, recalibrate_batchnorm

MANIFEST = "embeddings.json"
AMP_MODES = ("auto", "off", "bf16", "fp16")
SPEC = ".embed-spec.json"  # what a partial output folder is being computed from
# How embedding shards are written. No dictionary for the vectors: float16 values repeat, so
# Parquet dictionary-encodes them and decoding then runs at ~144k rows/s of 256-d; plain pages
# read ~1M rows/s. No statistics for them: min/max of every float16 element made writing a
# 3,584-d shard 2.4x slower, and nothing filters on a vector's range (id keeps its statistics:
# the montage's row-group pushdown uses them).
PARQUET_OPTIONS = {"use_dictionary": ["label", "split"], "write_statistics": ["id", "label", "split"]}
WRITE_ROWS = 8192  # images embedded per chunk; Parquet encodes a chunk while the next is embedded
PROJECTION = "projection.npy"  # (E, dim) float32: stored vector = read-out @ basis
CALIBRATION_SAMPLE = 2048  # images BatchNorm is re-estimated on; the projection is fitted on the same ones


class ShardEmbedder:
    """Ray Data actor: holds D (recalibrated, eval mode) and embeds whole input shards,
    reading, decoding, embedding and writing each output shard itself (under a temporary
    name, renamed when complete); the driver gets one small row per shard.
    On a GPU it infers under bf16 (or fp16 before Ampere) autocast unless amp says otherwise."""

    def __init__(self, state_d: dict, config: dict, features: str, readout: str, dtype: str, amp: str = "auto",
                 batch_size: int = 256, project: np.ndarray | None = None):
        import torch

        from . import config as C
        from .models import build_discriminator, resolve_amp

        self.threads = actor_threads()
        torch.set_num_threads(self.threads)
        full = C.from_dict(config)
        self.cfg = full.model
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.amp = resolve_amp(amp, self.device)
        self.D = build_discriminator(self.cfg, full.objective.name)
        self.D.load_state_dict(state_d)
        self.D.to(self.device).eval()
        self.features, self.readout, self.dtype, self.batch_size = features, readout, np.dtype(dtype), batch_size
        self.project = None if project is None else np.array(project)  # writable: Ray hands a read-only view

    def __call__(self, batch: dict) -> dict:
        import pyarrow.parquet as pq

        rows = []
        for src, dst in zip(batch["src"], batch["dst"]):
            slow_down()
            src = loc(str(src))  # resolved on this node, through its own credentials
            t = pq.read_table(src.path, columns=list(COLUMNS), filesystem=src.fs)
            write_parquet(self.chunks(t), loc(str(dst)), **PARQUET_OPTIONS)  # whole or absent
            rows.append(t.num_rows)
        return {"dst": np.asarray(batch["dst"]), "rows": np.asarray(rows, np.int64)}

    def chunks(self, t):
        """An input shard's output table, WRITE_ROWS rows at a time (one row group each; an
        empty shard gives one empty table, so its file still has the schema)."""
        for i in range(0, max(t.num_rows, 1), WRITE_ROWS):
            part = t.slice(i, WRITE_ROWS)
            images = decode_images(part["image"].to_pylist(), self.cfg.resolution, self.cfg.channels)  # (n, H, W, C)
            emb = embed_images(self.D, images, self.features, self.readout, self.device, self.batch_size, amp=self.amp,
                               project=self.project)
            yield _table(part["id"].to_numpy(), part["label"].fill_null(-1).to_numpy(),
                         part["split"].to_numpy(zero_copy_only=False), emb.astype(self.dtype))


def embed_images(D, images_u8: np.ndarray, features: str, readout: str = DEFAULT_READOUT, device="cpu",
                 batch_size: int = 512, amp: str = "off", project: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, E) float32 with an eval-mode D; the in-process path.
    amp: a resolved precision (off | bf16 | fp16) for the forward pass; the result is float32.
    project: an (E, d) basis (fit_projection): the result is then (N, d), projected on the device
    in float32."""
    import torch

    from .models import autocast

    p = None if project is None else torch.as_tensor(project, dtype=torch.float32, device=device)
    outs = []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch_size):
            x = to_device(images_u8[i : i + batch_size], device)  # uint8 crosses to the device
            with autocast(device, amp):
                e = D.embed(x, features, readout).float()  # (B, E)
            outs.append((e if p is None else e @ p).cpu().numpy())  # (B, E) or (B, d)
    if not outs:
        h, w, c = images_u8.shape[1:]
        return np.zeros((0, embedding_dim(D, features, readout, h, c) if p is None else p.shape[1]), np.float32)
    return np.concatenate(outs)


def fit_projection(x: np.ndarray, dim: int) -> np.ndarray:
    """(n, E) read-outs -> (E, d) float32 orthonormal basis, d = min(dim, n, E): the top d right
    singular vectors of x, not centred, so a stored vector keeps the length and inner products
    of its read-out within that subspace (cluster's PCA centres later; `l2` and spherical
    k-means see the read-out's own geometry). Exact, from the smaller Gram matrix: x xᵀ (n, n)
    for a calibration sample narrower than the read-out (2,048 x 3,584 at width 32), else xᵀ x,
    and only its top d eigenpairs (scipy's subset eigensolver) — 0.53-0.60 s there, where
    scikit-learn's randomized SVD took 0.76-0.99 s and, on a flat spectrum, only approximated the
    last directions.
    Signs fixed (each column's largest entry positive), so a refit gives the same basis."""
    from scipy.linalg import eigh
    from sklearn.utils.extmath import svd_flip

    x = np.asarray(x, np.float32)
    n, e = x.shape
    d = min(dim, n, e)
    wide = n < e
    g = x @ x.T if wide else x.T @ x  # float32 throughout: float64 doubled the eigensolver's time
    w, v = eigh(g, subset_by_index=[len(g) - d, len(g) - 1])  # ascending
    w, v = w[::-1], v[:, ::-1]
    if wide:  # v = xᵀu / s (E, d), re-orthonormalised where a tiny singular value cost precision
        v = np.linalg.qr(x.T @ v / np.sqrt(np.maximum(w, 1e-30)))[0]
    v, _ = svd_flip(np.ascontiguousarray(v), None)  # each column's largest entry positive
    return np.ascontiguousarray(v, dtype=np.float32)


def load_projection(embeddings) -> np.ndarray | None:
    """The (E, d) basis a `distgan embed` output was projected with, or None (stored whole):
    `embed_images(..., project=load_projection(out))` embeds new images into the same space."""
    f = loc(embeddings) / PROJECTION
    return f.read_npy() if f.exists() else None


def _projection(D, images: np.ndarray, out: Loc, features: str, readout: str, dim: int, readout_dim: int,
                resumed: bool) -> np.ndarray | None:
    """The basis for this output: the saved one on a rerun, else fitted now and saved before any shard."""
    if not dim or dim >= readout_dim:
        return None
    saved = load_projection(out)
    if saved is not None:
        return saved
    if resumed:
        raise UserError(f"{out} holds embedding shards but not their {PROJECTION}; pass --overwrite")
    basis = fit_projection(embed_images(D, images, features, readout, batch_size=256), dim)
    (out / PROJECTION).write_npy(basis)
    return basis


def load_embedder(checkpoint: str, data: str, calibrate: int = CALIBRATION_SAMPLE, with_sample: bool = False):
    """D from a checkpoint, BatchNorm stats re-estimated on real images of `data`; with_sample
    also returns those (n, H, W, C) uint8 images (embed fits its projection on them: no second read)."""
    state = load_state(checkpoint)
    D, mcfg = discriminator_from_checkpoint(state)
    check_data_fits(read_manifest(data), mcfg, data)
    images = sample_rows(data, calibrate)[0]
    recalibrate_batchnorm(D, images)
    return (D, state, images) if with_sample else (D, state)


def _table(ids, labels, splits, emb: np.ndarray):
    """One output chunk: id, label (null where unknown), split, and the (n, E) vectors as a
    fixed-size list column. The vectors and their elements are declared non-nullable (they
    never are null): Parquet then stores no definition level per element, which made an
    8,192-row chunk write 1.3x faster and a shard read 1.5-1.6x faster, 256- and 3,584-d
    (benchmarks/read_path.py). Readers see the same fixed_size_list<halffloat> (pandas: one
    numpy array per row)."""
    import pyarrow as pa

    n, e = emb.shape
    item = pa.float16() if emb.dtype == np.float16 else pa.float32()
    vector = pa.list_(pa.field("item", item, nullable=False), e)
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("label", pa.int32()), pa.field("split", pa.string()),
                        pa.field("embedding", vector, nullable=False)])
    return pa.Table.from_arrays([
        pa.array(ids, pa.int64()),
        pa.array(labels, pa.int32(), mask=np.asarray(labels) < 0),
        pa.array(splits, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), item), type=vector),
    ], schema=schema)


def embed_dataset(
    checkpoint: str,
    data: str,
    out: str,
    batch_size: int = 256,
    dtype: str = "float16",
    features: str = "multi",
    readout: str = DEFAULT_READOUT,
    dim: int = DEFAULT_DIM,
    num_actors: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    amp: str = "auto",
    selection: dict | None = None,
) -> dict:
    """Embed every image of `data` into `out`; returns the embeddings manifest (holding
    `selection`, the checkpoint choice of `embed --select`, when given). dim: read-outs wider
    than this are stored projected to it (module docstring); 0 stores them whole."""
    import pyarrow.parquet as pq
    import ray
    import ray.data
    from tqdm import tqdm

    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype must be float16 or float32, got '{dtype}'")
    if features not in ("last", "multi"):
        raise UserError(f"--features must be last or multi, got '{features}'")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if amp not in AMP_MODES:
        raise UserError(f"--amp must be one of {', '.join(AMP_MODES)}, got '{amp}'")
    if num_actors is not None and num_actors < 1:
        raise UserError(f"--actors must be >= 1, got {num_actors}")
    if dim < 0:
        raise UserError(f"--dim must be >= 0 (0 stores the whole read-out), got {dim}")
    from .storage import check_access

    data, out = loc(data), loc(out)
    check_access(out, write=True)
    inputs = shard_paths(data)
    D, state, sample = load_embedder(checkpoint, data, with_sample=True)
    mcfg = state["config"]["model"]
    readout_dim = embedding_dim(D, features, readout, mcfg["resolution"], mcfg["channels"])  # a grid too large: UserError here
    spec = {"checkpoint": loc(checkpoint).uri, "step": state["step"], "data": data.uri,
            "features": features, "readout": readout, "dtype": dtype, "embed_dim": dim}
    if overwrite:
        out.rmtree()
    out.mkdir()
    if (out / SPEC).exists():
        old = (out / SPEC).read_json()
        if old != spec:
            raise UserError(f"{out} holds embeddings made with other settings ({old['checkpoint']}, {old['features']}, "
                            f"{old.get('readout', 'gap')}, {old['dtype']}); pass --overwrite or choose another --out")
    elif out.iterdir():
        raise UserError(f"output directory {out} is not empty; pass --overwrite to replace it")
    (out / SPEC).write_json(spec)

    def rows(f: Loc) -> int:
        with f.open_input() as fh:
            return pq.ParquetFile(fh).metadata.num_rows

    expected = {f.uri: rows(f) for f in inputs}
    target = {f.uri: out / f"emb-{f.stem}.parquet" for f in inputs}
    present = {c.name for c in out.iterdir()}  # one listing, not a request per shard
    todo = [f for f in inputs if target[f.uri].name not in present]
    done_before = len(inputs) - len(todo)
    count = sum(expected.values())
    project = _projection(D, sample, out, features, readout, dim, readout_dim, resumed=done_before > 0)
    del sample

    if todo:
        from .capacity import wait_for

        init_ray()  # only now: every check above runs before Ray's start-up
        gpus = int(ray.cluster_resources().get("GPU", 0))
        # A cluster scaled to zero is asked for one actor's worth first (a GPU when the request
        # or the cluster says so, else a CPU); the pool then grows to n_actors as nodes join.
        wait_for([{"GPU": 1} if gpus else {"CPU": 1}], "one embedding actor")
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = bool(gpus)
        # Default: one actor per GPU, or 2 on CPUs; never more than input shards (one shard is
        # one read block here, so a second actor would only wait, and Ray Data warns about it).
        n_actors = num_actors or min(gpus if use_gpu else 2, len(todo))
        print(f"embedding {sum(expected[f.uri] for f in todo)} images from {len(todo)} shard(s) "
              f"({done_before} already done) with {n_actors} {'GPU' if use_gpu else 'CPU'} actor(s)")
        # One item per input shard: each actor call embeds a whole shard and writes its output.
        items = [{"src": f.uri, "dst": target[f.uri].uri} for f in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardEmbedder,
            fn_constructor_kwargs={"state_d": D.state_dict(), "config": state["config"], "features": features,
                                   "readout": readout, "dtype": dtype, "amp": amp, "batch_size": batch_size,
                                   "project": project},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors),
            # CPU actors share the CPUs with Ray Data's own tasks (one CPU's worth left for them);
            # each actor's torch threads follow what it was given (actor_threads).
            num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else actor_cpus(n_actors),
        )
        with tqdm(total=sum(expected[f.uri] for f in todo), unit="img", desc="embed", disable=not progress) as bar:
            for row in ds.iter_rows():
                bar.update(int(row["rows"]))
        present = {c.name for c in out.iterdir()}
        missing = [target[f.uri].name for f in todo if target[f.uri].name not in present]
        if missing:
            raise RuntimeError(f"embedding finished but shards are incomplete: {missing}")

    manifest = {**spec, "count": count, "dim": readout_dim if project is None else project.shape[1],
                "readout_dim": readout_dim, "projection": None if project is None else PROJECTION,
                "arch": state["config"]["model"]["arch"],
                "shards": sorted(p.name for p in target.values()), "reused_shards": done_before,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if selection:
        manifest["selection"] = selection
    (out / MANIFEST).write_json(manifest)
    return manifest
