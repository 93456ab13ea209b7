import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from distgan import data as D
from distgan.cli import main
from distgan.config import UserError


def _read_all(path):
    return D.read_arrays(path)


def test_contract_columns_and_manifest(digits_dir):
    f = sorted(digits_dir.glob("*.parquet"))[0]
    schema = pq.read_schema(f)
    assert [schema.field(c).type for c in D.COLUMNS] == [
        __import__("pyarrow").int64(), __import__("pyarrow").binary(), __import__("pyarrow").int32(), __import__("pyarrow").string()]
    m = json.loads((digits_dir / "dataset.json").read_text())
    assert m["count"] == 1797 and m["resolution"] == 32 and m["channels"] == 1
    assert sum(m["split_counts"].values()) == 1797 and sum(m["class_counts"].values()) == 1797
    assert list(m["class_counts"]) == [str(i) for i in range(10)]
    a = _read_all(digits_dir)
    assert len(np.unique(a["id"])) == 1797
    assert not list(digits_dir.parent.glob(".*partial*"))


def test_digits_pixels_match_sklearn(digits_dir):
    from sklearn.datasets import load_digits

    a = _read_all(digits_dir)
    imgs = D.decode_images(a["image"], 32, 1)
    order = np.argsort(a["id"])
    ref = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    assert np.array_equal(imgs[order], D.fit_resolution(ref[..., None], 32))  # exactly the resized source
    # and the resize kept the picture: block means correlate with the 8x8 original
    down = imgs[order, :, :, 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.corrcoef(down.ravel(), ref.ravel().astype(float))[0, 1] > 0.9
    assert (a["label"][order] == load_digits().target).all()


def test_exact_pixel_round_trip(tmp_path):
    imgs, labels = D.make_fake(50, 32, seed=3)
    out = tmp_path / "f"
    D.prepare("fake", out, fake_count=50, seed=3, progress=False)
    a = _read_all(out)
    order = np.argsort(a["id"])
    stored = D.decode_images(a["image"][order], 32, 1)
    assert np.array_equal(stored, imgs)  # source -> Parquet
    batch = {k: v[order] for k, v in a.items()}
    x, lab, ids = D.batch_to_tensors(batch, 32, 1)
    assert x.shape == (50, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(D.to_uint8(x), imgs)  # Parquet -> tensor -> uint8
    assert lab.tolist() == labels.tolist() and ids.tolist() == list(range(50))


def test_fake_is_deterministic():
    a, _ = D.make_fake(20, 32, seed=1)
    b, _ = D.make_fake(20, 32, seed=1)
    c, _ = D.make_fake(20, 32, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_fake_chunks_do_not_depend_on_the_count():
    """The fake source is generated a chunk at a time (10M images never sit in memory): an image
    is the same whether 30 or FAKE_CHUNK + 30 were asked for, and the next chunk differs."""
    small, _ = D.make_fake(30, 32, seed=4)
    big, labels = D.make_fake(D.FAKE_CHUNK + 30, 32, seed=4)
    assert np.array_equal(small, big[:30]) and labels[D.FAKE_CHUNK] == 0
    assert not np.array_equal(big[:30], big[D.FAKE_CHUNK:])


def test_a_small_sample_reads_few_shards_and_small_shards_still_fill_it(tmp_path):
    """sample_rows reads n / SAMPLE_PER_SHARD shards when there are more (a 2,048-image
    calibration sample of 1,000 shards read all of them), and keeps reading while the shards
    it picked are too small to fill n."""
    def shard_of(out):
        return {int(i): k for k, f in enumerate(sorted(out.glob("*.parquet"))) for i in pq.read_table(f)["id"].to_pylist()}

    big = tmp_path / "big"
    D.prepare("fake", big, fake_count=400, shard_rows=100, progress=False)  # 4 shards of 100
    images, labels = D.sample_rows(big, 2 * D.SAMPLE_PER_SHARD)
    ref, ref_labels = D.make_fake(400, 32)
    rows = [int(np.flatnonzero((ref == im).all(axis=(1, 2, 3)))[0]) for im in images]
    assert len(rows) == len(set(rows)) == 64 and (ref_labels[rows] == labels).all()
    assert len({shard_of(big)[r] for r in rows}) == 2  # 64 rows: two shards read, 32 from each
    small = tmp_path / "small"
    D.prepare("fake", small, fake_count=400, shard_rows=10, progress=False)  # 40 shards of 10
    images, _ = D.sample_rows(small, 64)
    assert len(images) == 64  # two shards' quota, filled from seven


@pytest.mark.parametrize("channels,n", [(1, 11), (3, 4)])
def test_save_grid_lays_out_like_torchvision(tmp_path, channels, n):
    """The montage grid is written without torch; its pixels are torchvision's make_grid's."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    imgs = np.random.default_rng(0).integers(0, 256, (n, 6, 5, channels), dtype=np.uint8)
    D.save_grid(imgs, tmp_path / "g.png", nrow=4)
    got = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    ref = make_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2), nrow=4, padding=2, pad_value=255)
    assert np.array_equal(got, ref.permute(1, 2, 0).numpy())


def test_shards_and_split(tmp_path):
    out = tmp_path / "f"
    m = D.prepare("fake", out, fake_count=250, shard_rows=100, split="test", progress=False)
    n_test = m["split_counts"]["test"]
    assert len(list(out.glob("*.parquet"))) == 1 and set(m["split_counts"]) == {"test"} and 40 <= n_test <= 60
    m = D.prepare("fake", out, fake_count=250, shard_rows=100, overwrite=True, progress=False)
    assert len(list(out.glob("*.parquet"))) == 3 and m["split_counts"] == {"train": 250 - n_test, "test": n_test}
    a = D.read_arrays(out, columns=("label", "split"))
    assert len(np.unique(a["label"][a["split"] == "test"])) == 10  # every class in the held-out split


def test_folder_source_with_classes_and_corrupt_files(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    m = D.prepare("folder", tmp_path / "out", data_root=root, resolution=16, progress=False)
    assert m["count"] == 10 and m["channels"] == 3 and m["resolution"] == 16
    assert m["class_names"] == ["cat", "dog"] and m["class_counts"] == {"cat": 5, "dog": 5}
    assert len(m["skipped"]) == 1 and "broken.jpg" in m["skipped"][0]


def test_folder_without_classes_has_null_labels(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(root / f"{i}.png")
    m = D.prepare("folder", tmp_path / "out", data_root=root, resolution=8, progress=False)
    assert m["unlabelled"] == 6 and m["class_counts"] == {}
    t = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))[0])
    assert t["label"].null_count == 6


def test_folder_all_unreadable_fails_and_leaves_nothing(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no images"):
        D.prepare("folder", tmp_path / "out", data_root=root, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------- CLI errors: one line, exit 2


def _cli_error(capsys, argv):
    """Exit status 2 and one error line, on a line of its own. The only other stderr
    output allowed is a progress bar the failing stage had started."""
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    *before, err = lines
    assert err.startswith("distgan: error:") and "Traceback" not in err, lines
    assert all(line.startswith("prepare ") and "img" in line for line in before), lines
    return err


def test_cli_unknown_source(capsys, tmp_path):
    err = _cli_error(capsys, ["prepare", "imagenet", "--out", str(tmp_path / "o")])
    assert "digits, mnist, fashion-mnist, cifar10, folder, fake" in err


def test_cli_missing_data_root(capsys, tmp_path):
    err = _cli_error(capsys, ["prepare", "mnist", "--out", str(tmp_path / "o"), "--data-root", str(tmp_path)])
    assert "train-images-idx3-ubyte.gz" in err and "--download" in err
    assert not (tmp_path / "o").exists()


def test_cli_non_empty_out_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _cli_error(capsys, ["prepare", "digits", "--out", str(out)])
    assert "--overwrite" in err and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("res", ["0", "24", "4", "-32"])
def test_cli_bad_resolution(capsys, tmp_path, res):
    err = _cli_error(capsys, ["prepare", "digits", "--out", str(tmp_path / "o"), "--resolution", res])
    assert "power of two" in err


def test_cli_corrupt_and_incomplete_parquet(capsys, tmp_path):
    out = tmp_path / "d"
    D.prepare("fake", out, fake_count=20, progress=False)
    shard = sorted(out.glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    err = _cli_error(capsys, ["info", str(out)])
    assert shard.name in err
    D.prepare("fake", out, fake_count=20, progress=False, overwrite=True)
    shard = sorted(out.glob("*.parquet"))[0]
    t = pq.read_table(shard).drop_columns(["label"])
    pq.write_table(t, shard)
    err = _cli_error(capsys, ["info", str(out)])
    assert "label" in err and shard.name in err


def _write_cifar(root, n=20, seed=0):
    """A tiny CIFAR-10 in torchvision's layout: pickled dicts of bytes keys and numpy arrays."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    batches = {}
    for name in ("data_batch_1", "test_batch"):
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # [N, 3072], channel-major rows
        labels = [int(i) % 10 for i in range(n)]
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
        batches[name] = (data, labels)
    return folder, batches


def test_cifar10_torchvision_layout(tmp_path):
    folder, batches = _write_cifar(tmp_path / "root")
    m = D.prepare("cifar10", tmp_path / "c", data_root=tmp_path / "root", progress=False)
    assert m["channels"] == 3 and m["split_counts"] == {"train": 20, "test": 20}
    assert m["class_names"][9] == "truck"
    a = D.read_arrays(tmp_path / "c")
    order = np.argsort(a["id"])
    img = D.decode_images(a["image"][order], 32, 3)  # [N, 32, 32, 3] uint8
    want = batches["test_batch"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(img[20:], want) and a["id"][order][20] == 50000  # test ids start at 50000


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_cifar10_hostile_pickle_is_refused_and_runs_nothing(capsys, tmp_path):
    import pickle

    folder, _ = _write_cifar(tmp_path / "root")
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": []}))
    err = _cli_error(capsys, ["prepare", "cifar10", "--data-root", str(tmp_path / "root"), "--split", "test",
                              "--out", str(tmp_path / "o")])
    assert "test_batch" in err and ("posix.system" in err or "os.system" in err)
    assert not marker.exists() and not (tmp_path / "o").exists()
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": []}))
    err = _cli_error(capsys, ["prepare", "cifar10", "--data-root", str(tmp_path / "root"), "--split", "test",
                              "--out", str(tmp_path / "o")])
    assert "lacks data" in err and not (tmp_path / "o").exists()


def test_cli_info_prints_table(capsys, digits_dir):
    assert main(["info", str(digits_dir)]) == 0
    out = capsys.readouterr().out
    assert "1797" in out and "32x32x1" in out and "train 1436" in out and "test 361" in out


def test_console_script_exit_status(tmp_path):
    """The installed `distgan` command: a bad input exits 2 without a traceback."""
    r = subprocess.run([sys.executable, "-m", "distgan.cli", "prepare", "nope", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown source" in r.stderr


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize("source,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_real_mnist_like(tmp_path, datasets_root, source, folder):
    out = tmp_path / source
    m = D.prepare(source, out, data_root=datasets_root, progress=False)
    assert m["split_counts"] == {"train": 60000, "test": 10000}
    a = D.read_arrays(out, columns=("id", "label", "split"))
    assert len(np.unique(a["id"])) == 70000
    for split, n in (("train", 6000), ("test", 1000)):
        counts = np.bincount(a["label"][a["split"] == split], minlength=10)
        if source == "fashion-mnist":
            assert (counts == n).all()
        else:
            assert counts.sum() == n * 10
    if source == "mnist":
        assert np.bincount(a["label"][a["split"] == "test"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # 28 px padded to 32: the 2-pixel border is blank, the inside is the original
    img = D.decode_images(D.read_arrays(out, columns=("image",))["image"][:5], 32, 1)
    assert img[:, :2].max() == 0 and img[:, 2:30, 2:30].max() > 0


@pytest.mark.realdata
def test_real_cifar10_jpeg_copy(tmp_path, datasets_root):
    m = D.prepare("cifar10", tmp_path / "c", data_root=datasets_root, split="test", progress=False)
    assert m["channels"] == 3 and m["split_counts"] == {"test": 10000}
    assert set(m["class_counts"].values()) == {1000}


# ---------------------------------------------------------------- Ray Data


def test_ray_data_streaming_split_sees_every_id_once(ray_running, fake_dir):
    import ray

    ds = D.open_dataset(fake_dir)
    a, b = ds.streaming_split(2, equal=True)  # what Ray Train does with a "train" dataset

    @ray.remote
    def consume(it):
        return [int(i) for batch in it.iter_batches(batch_size=32, batch_format="numpy") for i in batch["id"]]

    ids_a, ids_b = ray.get([consume.remote(a), consume.remote(b)])
    assert len(ids_a) == len(ids_b) == 200
    assert sorted(ids_a + ids_b) == list(range(400))


def test_ray_data_split_filter(ray_running, fake_dir):
    ds = D.open_dataset(fake_dir, split="test")
    assert ds.count() == 80
