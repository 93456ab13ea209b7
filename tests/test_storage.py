"""Every location through storage.py: the same operations on a local folder and on a real
S3 server (SeaweedFS on loopback), datasets written straight to a bucket, the data order a
class-sorted image folder gets, and each bad location as one line before Ray starts."""
from __future__ import annotations


import numpy as np
import pytest

from distgan import storage
from distgan.cli import main
from distgan.data import open_dataset, prepare, read_arrays, read_manifest
from distgan.storage import loc


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return loc(tmp_path / "root")
    bucket = request.getfixturevalue("bucket")
    return loc(f"{bucket}/{request.node.name.replace('[', '-').rstrip(']')}")


def test_a_location_reads_like_a_folder(root):
    assert not root.exists() and root.iterdir() == []
    (root / "a" / "x.json").write_json({"k": 1})
    (root / "a" / "y.bin").write_bytes(b"\x00\x01")
    (root / "b.txt").write_text("hello")
    assert [c.name for c in root.iterdir()] == ["a", "b.txt"]
    assert root.is_dir() and (root / "b.txt").is_file() and not (root / "a").is_file()
    assert [c.name for c in (root / "a").glob("*.json")] == ["x.json"]
    assert (root / "a" / "x.json").read_json() == {"k": 1} and (root / "a" / "y.bin").size() == 2
    # a folder moves whole (locally a rename; in S3 a copy per object, then the source goes)
    (root / "a").move(root / "c")
    assert not (root / "a").exists() and (root / "c" / "y.bin").read_bytes() == b"\x00\x01"
    # a Loc travels to Ray tasks as its URI and resolves again there
    import pickle

    assert pickle.loads(pickle.dumps(root / "c")) == root / "c"
    root.rmtree()
    assert not root.exists()


def test_parquet_from_chunks_is_one_file_of_row_groups_or_nothing(root):
    """write_parquet of an iterable: one row group per chunk, equal to the concatenation;
    a producer that fails part-way leaves no file (local or in the bucket)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [pa.table({"id": np.arange(i, i + 3), "v": np.full(3, i * 0.5)}) for i in (0, 3, 6)]
    storage.write_parquet(iter(parts), root / "ok.parquet", write_statistics=["id"])
    with (root / "ok.parquet").open_input() as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == 3 and pf.read().equals(pa.concat_tables(parts))

    def failing():
        yield parts[0]
        raise RuntimeError("embedding failed")

    with pytest.raises(RuntimeError, match="embedding failed"):
        storage.write_parquet(failing(), root / "bad.parquet")
    assert not (root / "bad.parquet").exists() and [c.name for c in root.iterdir()] == ["ok.parquet"]


def test_uris_and_paths_resolve_to_one_kind_of_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert loc("rel/x").uri == str(tmp_path / "rel" / "x")  # absolute: Ray workers run elsewhere
    assert loc(f"file://{tmp_path}/y").is_local and loc(f"file://{tmp_path}/y").path == f"{tmp_path}/y"
    s3 = loc("s3://some-bucket/a/b?scheme=http&endpoint_override=127.0.0.1:1")
    assert (s3.scheme, s3.path, (s3 / "c").uri) == (
        "s3", "some-bucket/a/b", "s3://some-bucket/a/b/c?scheme=http&endpoint_override=127.0.0.1:1")


def test_prepare_writes_a_dataset_into_the_bucket(bucket, ray_running, fake_dir):
    out = f"{bucket}/datasets/fake"
    m = prepare("fake", out, fake_count=400, shard_rows=100, progress=False)
    assert read_manifest(out) == m and m["shards"] == [f"shard-{i:05d}.parquet" for i in range(4)]
    # byte for byte what the same command writes to a local folder
    a, b = read_arrays(out), read_arrays(fake_dir)
    assert all(np.array_equal(a[c], b[c]) for c in ("id", "label")) and list(a["image"]) == list(b["image"])
    # Ray Data tasks read the shards from the bucket themselves
    assert sorted(open_dataset(out).to_pandas()["id"]) == sorted(b["id"])


def test_a_failed_prepare_leaves_nothing_in_the_bucket(bucket, monkeypatch):
    import distgan.data.prepared as prepared

    calls = {"n": 0}
    real = prepared.write_parquet

    def fail_later(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # two shards are already in the bucket
            raise KeyboardInterrupt
        return real(table, where, **kw)

    monkeypatch.setattr(prepared, "write_parquet", fail_later)
    out = loc(f"{bucket}/datasets/interrupted")
    with pytest.raises(KeyboardInterrupt):
        prepare("digits", out, shard_rows=50, progress=False)
    assert calls["n"] == 3 and not out.exists()


def test_a_class_sorted_folder_gives_batches_of_mixed_classes(ray_running, tmp_path):
    """Files sorted by class (the usual layout of a big image folder) are written in a seeded random
    order, and training reads the shards in a new seeded order each epoch."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a_cats", "b_dogs", "c_eels"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i:03d}.png")
    prepare("folder", tmp_path / "ds", data_root=tmp_path / "imgs", resolution=8, shard_rows=20, progress=False)
    shards = [read_arrays_of(f) for f in sorted((tmp_path / "ds").glob("*.parquet"))]
    assert all(len(set(s)) >= 2 for s in shards), shards  # no shard holds one class
    ds = open_dataset(tmp_path / "ds", seed=3)
    epochs = [[np.asarray(b["label"]) for b in ds.iter_batches(batch_size=20, batch_format="numpy")] for _ in range(2)]
    assert all(len(set(b.tolist())) >= 2 for e in epochs for b in e)
    assert [b.tolist() for b in epochs[0]] != [b.tolist() for b in epochs[1]]  # another file order per epoch


def read_arrays_of(f):
    import pyarrow.parquet as pq

    return pq.read_table(f, columns=["label"])["label"].to_pylist()


# ---------------------------------------------------------------- bad locations


def _one_line(capsys, argv, expect):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("distgan: error:") and len(err.splitlines()) == 1, err
    assert expect in err, err
    return err


@pytest.fixture
def fresh_clients():
    """Filesystems are cached per bucket: a test that changes the credentials needs new ones."""
    storage._FS_CACHE.clear()
    yield
    storage._FS_CACHE.clear()


def test_unknown_scheme(no_ray, capsys, fake_dir):
    _one_line(capsys, ["train", "--data", str(fake_dir), "--storage", "nosuch://b/runs"], "cannot open nosuch://b/runs")


def test_missing_bucket(no_ray, capsys, bucket, fake_dir):
    err = _one_line(capsys, ["embed", "--checkpoint", "s3://no-such-bucket/ckpt", "--data", str(fake_dir),
                             "--out", f"{bucket}/bad/emb"], "s3://no-such-bucket/ckpt")
    assert "does not exist" in err
    assert not loc(f"{bucket}/bad").exists()


def test_wrong_credentials(no_ray, capsys, bucket, fresh_clients, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    err = _one_line(capsys, ["prepare", "fake", "--out", f"{bucket}/bad/creds"], f"{bucket}/bad/creds")
    assert "access denied" in err
    monkeypatch.undo()
    storage._FS_CACHE.clear()
    assert not loc(f"{bucket}/bad").exists()


def test_unreachable_endpoint(no_ray, capsys, bucket, fresh_clients, monkeypatch, tmp_path):
    from s3server import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    err = _one_line(capsys, ["pipeline", "--dataset", "digits", "--out", f"{bucket}/bad/pipe", "--smoke-test"],
                    f"{bucket}/bad/pipe")
    assert "cannot be reached" in err
