"""k-means, metrics, streamed assignment, embedding with Ray Data, probe, bad inputs."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distgan import cluster as K
from distgan.cli import main
from distgan.config import UserError


def _blobs(n_per=200, k=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, (k, d))
    x = np.concatenate([c + rng.normal(0, 0.5, (n_per, d)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    return x, y


def _features(x, y, splits=None, batch=97):
    splits = np.asarray(splits if splits is not None else ["train"] * len(x))
    return K.array_features(np.arange(len(x)), y, splits, x, "test features", batch_rows=batch)


def test_faiss_recovers_separated_blobs():
    x, y = _blobs()
    km = K.kmeans(x, 5, niter=20, nredo=3)
    c, _ = K.assign(km, x)
    assert K.cluster_acc(y, c) == 1.0


def test_faiss_distance_path_follows_k_in_training_and_search(monkeypatch):
    """Below 16 centroids training and search run faiss's direct loop (the BLAS threshold out
    of reach), from 16 up faiss's own setting; either way the setting is put back after."""
    import faiss

    default = faiss.cvar.distance_compute_blas_threshold
    seen = []
    train, index_search = faiss.Kmeans.train, faiss.IndexFlatL2.search

    def spy_train(self, *a, **kw):
        seen.append(("train", self.k, faiss.cvar.distance_compute_blas_threshold))
        return train(self, *a, **kw)

    def spy_search(self, x, k, *a, **kw):
        seen.append(("search", self.ntotal, faiss.cvar.distance_compute_blas_threshold))
        return index_search(self, x, k, *a, **kw)

    monkeypatch.setattr(faiss.Kmeans, "train", spy_train)
    monkeypatch.setattr(faiss.IndexFlatL2, "search", spy_search)
    x, y = _blobs(n_per=40, k=20, d=8)
    for k in (10, 20):
        km = K.kmeans(x, k, niter=5)
        K.assign(km, x)
        assert faiss.cvar.distance_compute_blas_threshold == default
    assert seen == [("train", 10, 2**31 - 1), ("search", 10, 2**31 - 1), ("train", 20, default), ("search", 20, default)]
    assert default != 2**31 - 1  # otherwise the k >= 16 rows would not tell the two paths apart


def test_metrics_agree_with_sklearn_and_hand_examples():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    perm = np.array([2, 0, 1])[y]  # same partition, other cluster ids
    assert K.cluster_acc(y, perm) == 1.0 and K.purity(y, perm) == 1.0
    c = np.array([1, 1, 0, 0, 0, 0, 2, 2, 2, 1])  # hand-worked: best matching 1->0, 0->1, 2->2 = 2+3+3 = 8/10
    assert K.cluster_acc(y, c) == pytest.approx(0.8)
    m = K.clustering_metrics(y, c)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y, c))
    assert m["ari"] == pytest.approx(adjusted_rand_score(y, c))
    rng = np.random.default_rng(0)
    y2, c2 = rng.integers(0, 7, 500), rng.integers(0, 9, 500)
    m2 = K.clustering_metrics(y2, c2)
    assert m2["nmi"] == pytest.approx(normalized_mutual_info_score(y2, c2))
    assert m2["ari"] == pytest.approx(adjusted_rand_score(y2, c2))
    assert "labels" in K.clustering_metrics(np.full(5, -1), np.arange(5))  # no labels: left out, said so


def test_contingency_tables_summed_over_blocks_give_sklearns_metrics():
    """What distributed assignment does: each block's (k x classes) table, summed; no label
    array in one place. Compared with scikit-learn on the full arrays (unknown labels left out)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    rng = np.random.default_rng(1)
    k, n_classes = 12, 10
    for trial in range(5):
        n = int(rng.integers(50, 3000))
        y = rng.integers(-1, n_classes, n)  # -1: unknown
        c = np.where(rng.random(n) < 0.6, y.clip(0) % k, rng.integers(0, k - 2, n))  # structure + noise, 2 empty clusters
        cuts = np.sort(rng.choice(np.arange(1, n), 4, replace=False))
        table = sum(K.contingency(cb, yb, k, n_classes) for cb, yb in zip(np.split(c, cuts), np.split(y, cuts)))
        got = K.metrics_from_contingency(table)
        known = y >= 0
        yk, ck = y[known], c[known]
        ref = contingency_matrix(yk, ck)
        r, cc = linear_sum_assignment(-ref)
        assert got["labelled_points"] == known.sum()
        assert got["acc"] == pytest.approx(ref[r, cc].sum() / known.sum())
        assert got["nmi"] == pytest.approx(normalized_mutual_info_score(yk, ck), abs=1e-12)
        assert got["ari"] == pytest.approx(adjusted_rand_score(yk, ck), abs=1e-12)
        assert got["purity"] == pytest.approx(ref.max(axis=0).sum() / known.sum())
    one = K.metrics_from_contingency(np.array([[5, 0], [0, 0]]))  # one cluster, one class
    assert one["nmi"] == normalized_mutual_info_score([0] * 5, [0] * 5) and one["ari"] == 1.0


def _assignments(out):
    return pq.read_table(out / "assignments").to_pandas().sort_values("id").reset_index(drop=True)


def test_spherical_distances_rank_the_most_similar_point_first(ray_running, tmp_path):
    """Spherical k-means searches an inner-product index (similarities); distances, inertia and
    the montage order must still put the point most cosine-similar to its centroid first."""
    x, y = _blobs(n_per=120, k=4, d=8, seed=2)
    x *= np.random.default_rng(0).uniform(0.2, 5.0, (len(x), 1)).astype(np.float32)  # norms differ a lot
    m = K.run_clustering(_features(x, y), tmp_path / "s", k=4, preprocess="none", spherical=True, seed=0, progress=False)
    df = _assignments(tmp_path / "s")
    cent = np.load(tmp_path / "s" / "centroids.npy")  # unit vectors
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = (xn * cent[df["cluster"].to_numpy()]).sum(1)
    np.testing.assert_allclose(df["distance"].to_numpy(), 2 - 2 * cos, atol=1e-4)
    assert (df["distance"] >= 0).all() and m["inertia"] == pytest.approx(float((2 - 2 * cos).sum()), rel=1e-4)
    chosen = K.montage_ids(df["id"].to_numpy(), df["cluster"].to_numpy(), df["distance"].to_numpy(), 4, 8)
    for c in range(4):
        members = np.flatnonzero(df["cluster"].to_numpy() == c)
        assert chosen[c, 0] == df["id"].to_numpy()[members[np.argmax(cos[members])]]  # the most similar first
        assert chosen[c, -1] != df["id"].to_numpy()[members[np.argmin(cos[members])]]  # not the least similar
    # the montage of the run itself is built from per-block summaries: its first column is the same
    fit_chosen = K.montage_ids(df["id"].to_numpy(), df["cluster"].to_numpy(), df["distance"].to_numpy(), 4, 1)
    assert m["sizes"] == np.bincount(df["cluster"], minlength=4).tolist() and fit_chosen.min() >= 0


def test_distributed_assignment_equals_single_process(ray_running, tmp_path):
    """Ray Data actors over many blocks vs one process, on the same fitted centroids and
    preprocessing: every id exactly once, the same clusters and distances; metrics summed
    from per-block contingency tables equal scikit-learn's on the full arrays."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x, y = _blobs(n_per=300, k=6, d=24, seed=1)
    y = np.where(np.arange(len(y)) % 7 == 0, -1, (y + np.arange(len(y)) % 3 * (np.arange(len(y)) % 11 == 0)) % 6)
    feats = _features(x, y, batch=97)  # 19 blocks
    m = K.run_clustering(feats, tmp_path / "c", k=6, preprocess="pca-whiten", pca_dim=8, seed=3, actors=2,
                         progress=False)
    got = _assignments(tmp_path / "c")
    assert got["id"].tolist() == list(range(len(x)))  # every id exactly once
    cent = np.load(tmp_path / "c" / "centroids.npy")
    pz = np.load(tmp_path / "c" / "preprocess.npz")
    pre = K.Preprocess(str(pz["method"]), pz["mean"], pz["proj"])
    c, d = K.search(K.centroid_index(cent, spherical=False), pre(x))  # single process
    assert (got["cluster"].to_numpy() == c).all()
    np.testing.assert_allclose(got["distance"].to_numpy(), d, rtol=1e-5, atol=1e-5)
    assert m["inertia"] == pytest.approx(float(d.astype(np.float64).sum()), rel=1e-5)
    assert sum(m["sizes"]) == len(x) and m["trained_on"] == len(x)
    known = y >= 0
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y[known], c[known]))
    assert m["ari"] == pytest.approx(adjusted_rand_score(y[known], c[known]))
    assert m["labelled_points"] == known.sum()
    assert [p.name for p in (tmp_path / "c").rglob("*tmp*")] == []  # no temporary left


def test_fit_samples_and_faiss_threads_follow_the_task(ray_running, tmp_path):
    """The fit task trains on --sample points with faiss's OpenMP threads set to its CPUs."""
    import os

    import ray

    x, y = _blobs(n_per=300, k=4, d=8)
    fits, pre, info = K.fit_remote(_features(x, y), [4], "l2", 8, 10, 1, False, 500, 0)
    assert fits[4]["centroids"].shape == (4, 8) and info["trained_on"] == 500
    want = min(int(max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])), os.cpu_count())
    assert info["threads"] == want

    @ray.remote(num_cpus=1)
    def threads_in_a_one_cpu_task():
        import faiss

        return K.set_faiss_threads(), faiss.omp_get_max_threads()

    assert ray.get(threads_in_a_one_cpu_task.remote()) == (1, 1)


def test_kmeans_sample_does_not_depend_on_the_order_blocks_arrive_in(ray_running):
    """Ray Data hands the materialized sample back in task-completion order; the same seed must
    still give the same rows (the 10M pixel clustering moved 0.604-0.643 ACC between runs)."""
    import ray.data

    from distgan.cluster.distributed import _collect_sample

    blocks = [pa.table({"id": pa.array(np.arange(10 * b, 10 * b + 10), pa.int64()),
                        "image": pa.array([bytes([i % 256] * 3) for i in range(10 * b, 10 * b + 10)], pa.binary())})
              for b in range(4)]
    a = _collect_sample(ray.data.from_arrow(blocks), "pixels", 3, 15, seed=0)
    b = _collect_sample(ray.data.from_arrow([blocks[i] for i in (3, 1, 0, 2)]), "pixels", 3, 15, seed=0)
    assert a.shape == (15, 3) and np.array_equal(a, b)
    assert np.all(np.diff(a[:, 0]) > 0)  # in id order
    # the seeded trim of the 40 rows in id order: row i's pixels are all i / 255
    kept = np.sort(np.random.default_rng(0).choice(40, 15, replace=False))
    assert np.allclose(a, np.repeat(kept[:, None] / 255.0, 3, axis=1))


def test_kmeans_sample_keeps_rows_by_id_whatever_the_blocks():
    from distgan.cluster.distributed import _keep_by_id_hash

    t = pa.table({"id": pa.array(np.arange(100_000), pa.int64())})
    whole = _keep_by_id_hash(t, 0.1, seed=3)["id"].to_numpy()
    parts = np.concatenate([_keep_by_id_hash(t.slice(lo, 30_000), 0.1, seed=3)["id"].to_numpy()
                            for lo in range(0, 100_000, 30_000)])
    assert np.array_equal(whole, parts) and 9_500 < len(whole) < 10_500  # binomial sd ~95
    other = _keep_by_id_hash(t, 0.1, seed=4)["id"].to_numpy()
    assert len(np.intersect1d(whole, other)) < 1_500  # another seed, another sample (~1,000 shared by chance)


def test_k_sample_and_gpus_out_of_range_and_nan(ray_running, tmp_path):
    x, y = _blobs(n_per=3, k=2)
    with pytest.raises(UserError, match="between 2 and the k-means sample"):
        K.run_clustering(_features(x, y), tmp_path / "a", k=7, progress=False)
    with pytest.raises(UserError, match="between 2"):
        K.run_clustering(_features(x, y), tmp_path / "b", k=1, progress=False)
    with pytest.raises(UserError, match="--sample must be between 1 and the number of points \\(6\\)"):
        K.run_clustering(_features(x, y), tmp_path / "b", k=2, sample=7, progress=False)
    with pytest.raises(UserError, match="--k must be between 2 and the k-means sample \\(3 of 6 points\\)"):
        K.run_clustering(_features(x, y), tmp_path / "b", k=4, sample=3, progress=False)
    with pytest.raises(UserError, match="--gpus 64: no node of this cluster has 64 GPUs"):
        K.run_clustering(_features(x, y), tmp_path / "b", k=2, gpus=64, progress=False)
    assert not (tmp_path / "b").exists()  # refused before anything was written
    x[1, 2] = np.nan
    x[4, :2] = np.inf
    with pytest.raises(UserError, match="non-finite"):
        K.run_clustering(_features(x, y), tmp_path / "c", k=2, progress=False)
    assert not (tmp_path / "c" / "assignments").exists()


def test_embeddings_whose_width_differs_between_shards_are_refused(tmp_path, capsys):
    import shutil

    out = tmp_path / "emb"
    out.mkdir()
    for i, dim in enumerate((16, 16, 24)):  # the third shard came from another run
        x = np.zeros((5, dim), np.float32)
        pq.write_table(pa.table({"id": np.arange(5) + 5 * i, "label": pa.array([0] * 5, pa.int32()), "split": ["train"] * 5,
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)}),
                       out / f"emb-{i}.parquet")
    (out / "embeddings.json").write_text(json.dumps({"count": 15, "dim": 16, "shards": [f"emb-{i}.parquet" for i in range(3)],
                                                     "arch": "dcgan", "features": "last", "step": 0}))
    code = main(["cluster", "--embeddings", str(out), "--k", "2", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "emb-2.parquet holds 24-d vectors but embeddings.json says 16-d" in err[0]
    assert not (tmp_path / "c").exists()
    shutil.rmtree(out)


def test_no_labels_leaves_label_metrics_out(ray_running, tmp_path, capsys):
    x, _ = _blobs(n_per=20, k=3)
    m = K.run_clustering(_features(x, np.full(len(x), -1)), tmp_path / "c", k=3, preprocess="l2", progress=False)
    assert "acc" not in m and "need labels" in m["labels"]
    from distgan.cli import print_cluster_metrics

    print_cluster_metrics(m)
    assert "no label metrics" in capsys.readouterr().out


# ---------------------------------------------------------------- embedding (Ray Data)


@pytest.fixture(scope="module")
def embedded(ray_running, untrained_checkpoint, fake_dir, tmp_path_factory):
    from distgan.embed import embed_dataset

    out = tmp_path_factory.mktemp("emb") / "e"
    m = embed_dataset(untrained_checkpoint, fake_dir, out, batch_size=64, dtype="float32", features="multi",
                      num_actors=2, progress=False)
    return out, m


def test_embedding_with_two_actors_equals_single_process(embedded, untrained_checkpoint, fake_dir):
    from distgan.data import decode_images, read_arrays
    from distgan.embed import embed_images, load_embedder, load_projection

    out, m = embedded
    t = pq.read_table(sorted(out.glob("*.parquet"))).sort_by("id")  # pyarrow reads a list of files
    vec = t.schema.field("embedding")  # fixed-size float32 lists, declared non-nullable (no per-element levels)
    assert pa.types.is_fixed_size_list(vec.type) and vec.type.list_size == m["dim"]
    assert vec.type.value_type == pa.float32() and not vec.type.value_field.nullable and not vec.nullable
    a = read_arrays(fake_dir)
    order = np.argsort(a["id"])
    D, _ = load_embedder(untrained_checkpoint, fake_dir)
    full = embed_images(D, decode_images(a["image"][order], 32, 1), "multi")  # (400, 896): the whole read-out
    # stored projected to the default 256 dimensions with the basis saved beside the shards
    basis = load_projection(out)
    assert m["readout_dim"] == full.shape[1] == 896 and m["projection"] == "projection.npy"
    assert basis.shape == (896, 256) and np.allclose(basis.T @ basis, np.eye(256), atol=1e-4)
    ref = full @ basis
    assert t["id"].to_pylist() == a["id"][order].tolist()
    got = np.stack(t["embedding"].to_numpy(zero_copy_only=False))
    assert got.shape == ref.shape == (400, m["dim"]) == (400, 256)
    assert np.allclose(got, ref, atol=1e-4)
    assert t["label"].to_pylist() == a["label"][order].tolist()
    # written as distgan.embed.PARQUET_OPTIONS says: the vectors plain and without min/max
    # statistics (they cost 2.4x the write), id with them (row-group pushdown by id)
    meta = pq.ParquetFile(sorted(out.glob("*.parquet"))[0]).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    vec = next(c for p, c in cols.items() if p.startswith("embedding"))
    assert not vec.is_stats_set and "PLAIN" in vec.encodings and "RLE_DICTIONARY" not in vec.encodings
    assert cols["id"].is_stats_set and cols["id"].statistics.has_min_max


def test_an_actor_embeds_a_shard_in_chunks_into_one_file(untrained_checkpoint, fake_dir, tmp_path, monkeypatch):
    """ShardEmbedder (in this process): a shard embedded WRITE_ROWS images at a time, each
    chunk encoded while the next is embedded, is one file equal to embedding it at once."""
    from distgan import embed as E
    from distgan.data import decode_images, shard_paths

    monkeypatch.setattr(E, "WRITE_ROWS", 32)
    D, state = E.load_embedder(untrained_checkpoint, fake_dir)
    actor = E.ShardEmbedder(D.state_dict(), state["config"], "multi", "grid4-max", "float32")
    src = shard_paths(fake_dir)[0]
    dst = tmp_path / "emb.parquet"
    out = actor({"src": np.array([src.uri]), "dst": np.array([str(dst)])})
    t_in = pq.read_table(src.path)
    n = t_in.num_rows
    assert n > 2 * 32 and out["rows"].tolist() == [n]
    pf = pq.ParquetFile(dst)
    assert pf.metadata.num_row_groups == -(-n // 32)
    got = np.stack(pf.read()["embedding"].to_numpy(zero_copy_only=False))
    ref = E.embed_images(D, decode_images(t_in["image"].to_pylist(), 32, 1), "multi", "grid4-max")
    assert pf.read()["id"].to_pylist() == t_in["id"].to_pylist()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_embed_rerun_redoes_only_missing_shards(embedded, untrained_checkpoint, fake_dir, capsys):
    from distgan.embed import embed_dataset

    out, _ = embedded
    shards = sorted(out.glob("emb-*.parquet"))
    assert len(shards) == 4  # one per input shard
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    redone = pq.read_table(shards[2])
    basis = (out / "projection.npy").read_bytes()
    shards[2].unlink()
    m = embed_dataset(untrained_checkpoint, fake_dir, out, batch_size=64, dtype="float32", features="multi",
                      progress=False)
    assert m["reused_shards"] == 3
    # projected with the saved basis, not one fitted again: the shard comes back as it was
    assert (out / "projection.npy").read_bytes() == basis
    np.testing.assert_allclose(np.stack(pq.read_table(shards[2])["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(redone["embedding"].to_numpy(zero_copy_only=False)), atol=1e-5)
    # the default pool (2 CPU actors) is cut to the one shard left to do
    assert "from 1 shard(s) (3 already done) with 1 CPU actor(s)" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("emb-*.parquet"))}
    assert set(after) == set(before)
    assert [n for n in after if after[n] != before[n]] == [shards[2].name]
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(UserError, match="other settings"):  # a different spec never mixes into this folder
        embed_dataset(untrained_checkpoint, fake_dir, out, dtype="float16", features="multi", progress=False)
    (out / "projection.npy").rename(out / "aside.npy")
    try:  # shards without their basis: refitting could give another space, so nothing is redone
        with pytest.raises(UserError, match="holds embedding shards but not their projection.npy"):
            embed_dataset(untrained_checkpoint, fake_dir, out, batch_size=64, dtype="float32", features="multi",
                          progress=False)
    finally:
        (out / "aside.npy").rename(out / "projection.npy")


def test_fit_projection_spans_the_top_singular_directions():
    """The basis against numpy's full SVD of the same sample (a rank-5 signal plus noise, off the
    origin: the basis is not centred, so the offset is part of what it keeps)."""
    from distgan.embed import fit_projection

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 5)) * [50, 40, 30, 20, 10]) @ rng.normal(size=(5, 64)) + rng.normal(size=(500, 64)) + 5.0
    b = fit_projection(x.astype(np.float32), 5)
    v = np.linalg.svd(x, full_matrices=False)[2][:5].T  # (64, 5)
    assert b.shape == (64, 5) and b.dtype == np.float32
    np.testing.assert_allclose(b @ b.T, v @ v.T, atol=1e-4)  # the same subspace (projectors)
    assert fit_projection(x[:3].astype(np.float32), 5).shape == (64, 3)  # no more directions than points
    # fewer points than dimensions (embed's 2,048 calibration images, 3,584-d read-outs) and a flat
    # spectrum, where an approximate (randomized) SVD misses the last directions: still exact
    w = np.abs(rng.normal(size=(120, 300))).astype(np.float32)
    b = fit_projection(w, 60)
    v = np.linalg.svd(w.astype(np.float64), full_matrices=False)[2][:60].T
    np.testing.assert_allclose(b @ b.T, v @ v.T, atol=1e-4)
    np.testing.assert_allclose(b.T @ b, np.eye(60), atol=1e-5)
    # the same basis, signs included, whatever order the sample's rows came in
    np.testing.assert_allclose(fit_projection(w[rng.permutation(120)], 60), b, atol=1e-3)  # float32 rounding; a flip is ~0.1


def test_embed_dim_0_or_a_narrow_read_out_stores_it_whole(ray_running, untrained_checkpoint, fake_dir, tmp_path):
    from distgan.embed import embed_dataset

    for dim, readout in ((0, "grid4-max"), (256, "gap")):  # gap: 56-d here, narrower than 256
        m = embed_dataset(untrained_checkpoint, fake_dir, tmp_path / f"e{dim}", dtype="float32", readout=readout,
                          dim=dim, num_actors=1, progress=False)
        assert m["dim"] == m["readout_dim"] == (896 if dim == 0 else 56) and m["projection"] is None
        assert not (tmp_path / f"e{dim}" / "projection.npy").exists()
        assert pq.read_schema(next((tmp_path / f"e{dim}").glob("emb-*.parquet"))).field("embedding").type.list_size == m["dim"]


def test_cluster_and_probe_cli_on_embeddings(embedded, fake_dir, tmp_path, capsys):
    out, _ = embedded
    assert main(["cluster", "--embeddings", str(out), "--k", "10", "--out", str(tmp_path / "c"), "--data", str(fake_dir)]) == 0
    for f in ("centroids.npy", "preprocess.npz", "metrics.json", "montage.png"):
        assert (tmp_path / "c" / f).is_file()
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert {"k", "n", "inertia", "sizes", "acc", "nmi", "ari", "purity"} <= set(metrics) and metrics["n"] == 400
    import pandas as pd

    df = pd.read_parquet(tmp_path / "c" / "assignments")  # a folder of shards: pandas and Ray Data read it
    assert list(df.columns) == ["id", "cluster", "distance", "label"] and len(df) == 400
    import ray.data

    assert ray.data.read_parquet(str(tmp_path / "c" / "assignments")).count() == 400
    assert main(["probe", "--embeddings", str(out), "--baselines", "--out", str(tmp_path / "p")]) == 0
    rows = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert [r["method"] for r in rows] == ["logistic regression", "logistic regression", "linear SVM", "random forest", "k-NN (k=5)"]
    assert rows[0]["test"] == 80 and rows[0]["train"] == 320  # 400 images: all of both splits (under the caps)
    assert min(r["accuracy"] for r in rows[1:]) > 0.3, rows  # the pixel baselines learn the fake classes (chance: 0.1)
    assert "| accuracy |" in (tmp_path / "p" / "probe.md").read_text()


def test_probe_runs_on_a_bounded_sample_and_says_so(embedded, ray_running, fake_dir):
    from distgan.cluster import embedding_features, probe_remote, probe_table

    out, _ = embedded
    rows = probe_remote(embedding_features(out), fake_dir, max_train=100, max_test=30)
    assert [(r["train"], r["test"], r["train_of"], r["test_of"]) for r in rows] == [(100, 30, 320, 80)] * 5
    assert "On a uniform sample: 100 of 320 train and 30 of 80 test images" in probe_table(rows)


class _Batches:
    """Features stand-in: 5 batches of 40 rows, x = the row's id, splits alternating."""
    dim = 1

    def batches(self):
        for b in range(5):
            ids = np.arange(40 * b, 40 * (b + 1))
            yield ids, ids % 3 - (ids % 7 == 0), np.where(ids % 2 == 0, "train", "test"), ids[:, None].astype(np.float32)


def test_probe_sample_is_the_rows_with_the_smallest_keys():
    """The streamed sample (cut back only when its buffer passes twice the cap) keeps exactly the
    rows a one-shot selection over the same random keys keeps."""
    from distgan.cluster.probe import sample_splits

    xtr, ytr, xte, yte, seen = sample_splits(_Batches(), max_train=7, max_test=30, seed=3)
    rng = np.random.default_rng(3)
    keys = np.concatenate([rng.random(40) for _ in range(5)])  # the keys the sampler drew, batch by batch
    ids = np.arange(200)
    labelled = ids % 3 - (ids % 7 == 0) >= 0
    for x, y, split, cap in ((xtr, ytr, 0, 7), (xte, yte, 1, 30)):
        pool = ids[labelled & (ids % 2 == split)]
        expect = pool[np.argsort(keys[pool])[:cap]]
        got = x[:, 0].astype(int)
        assert sorted(got) == sorted(expect) and (y == got % 3 - (got % 7 == 0)).all()
    assert seen == {"train": int((labelled & (ids % 2 == 0)).sum()), "test": int((labelled & (ids % 2 == 1)).sum())}


def test_ids_that_do_not_match_the_dataset(embedded, tmp_path, capsys):
    from distgan.data import prepare

    other = tmp_path / "other"
    prepare("fake", other, fake_count=50, progress=False)  # ids 0..49 only
    out, _ = embedded
    code = main(["cluster", "--embeddings", str(out), "--k", "10", "--out", str(tmp_path / "c"), "--data", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "do not match" in err and "not in the dataset" in err


def test_embed_rejects_a_non_distgan_checkpoint(tmp_path, fake_dir, capsys):
    import torch

    (tmp_path / "ck").mkdir()
    torch.save({"model": torch.zeros(3)}, tmp_path / "ck" / "state.pt")
    code = main(["embed", "--checkpoint", str(tmp_path / "ck"), "--data", str(fake_dir), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a distgan checkpoint" in err and len(err.splitlines()) == 1


def test_cluster_cli_bad_k(capsys, fake_dir, tmp_path):
    code = main(["cluster", "--pixels", str(fake_dir), "--k", "1000", "--out", str(tmp_path / "c")])
    assert code == 2 and "between 2 and the k-means sample (400 of 400 points)" in capsys.readouterr().err
    assert not (tmp_path / "c" / "metrics.json").exists()


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
def test_raw_pixel_kmeans_on_mnist_test_set(ray_running, tmp_path, datasets_root):
    from distgan.data import prepare

    prepare("mnist", tmp_path / "mnist", data_root=datasets_root, split="test", progress=False)
    m = K.run_clustering(K.pixel_features(tmp_path / "mnist"), tmp_path / "c", k=10, preprocess="none",
                         niter=50, seed=0, progress=False)
    assert m["n"] == 10000
    assert 0.45 <= m["nmi"] <= 0.56, m  # where raw pixels are known to land (about 0.51)


# ---------------------------------------------------------------- scale: the driver stays flat

_FLAT_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from distgan.data import init_ray
from distgan.cluster import embedding_features, run_clustering

def hwm_kib():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])

def write(n, out, dim=128):
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for i, start in enumerate(range(0, n, 100_000)):
        m = min(100_000, n - start)
        x = rng.normal(0, 1, (m, dim)).astype(np.float16)
        pq.write_table(pa.table({"id": np.arange(start, start + m), "label": pa.array(np.arange(m) % 10, pa.int32()),
                                 "split": ["train"] * m,
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)}),
                       out / f"emb-{i}.parquet")
        shards.append(f"emb-{i}.parquet")
    (out / "embeddings.json").write_text(json.dumps({"count": n, "dim": dim, "shards": shards, "arch": "synthetic",
                                                     "features": "none", "step": 0, "data": None}))
    return out

root = Path(sys.argv[1])
small, large = write(20_000, root / "small"), write(300_000, root / "large")
init_ray()
peaks = []
for name, path in (("small", small), ("large", large)):
    run_clustering(embedding_features(path), root / f"out-{name}", 10, preprocess="none", sample=20_000, progress=False)
    peaks.append(hwm_kib())
print("PEAKS", *peaks)
"""


@pytest.mark.slow
def test_driver_memory_stays_flat_as_points_grow(tmp_path):
    """15x the points (20k -> 300k, 128-d): the driver's peak RSS may not grow by more than
    40 MiB. Holding the large set's vectors as float32 alone would take 146 MiB (float16: 73)."""
    import subprocess
    import sys

    script = tmp_path / "flat.py"
    script.write_text(_FLAT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, large = (int(v) for v in next(l for l in proc.stdout.splitlines() if l.startswith("PEAKS")).split()[1:])
    assert (large - small) / 1024 < 40, (small, large)


def test_restarts_default_to_fifty_on_a_manifold_only():
    assert (K.restarts(0, "umap"), K.restarts(0, "none"), K.restarts(3, "umap"), K.restarts(2, "none")) == (50, 1, 3, 2)
    # restarts keep the lowest objective (faiss's first restart is the single start with the same
    # seed): with this seed one start merges blobs (objective ~1700), ten find them (~360)
    x, _ = _blobs(n_per=60, k=12, d=2, seed=1)
    one, ten = (K.kmeans(x, 12, niter=10, nredo=r, seed=3).obj[-1] for r in (1, 10))
    assert ten < 0.5 * one, (one, ten)


def test_umap_manifold_runs_in_the_fit_task_and_the_actors(ray_running, tmp_path):
    """--manifold umap: fitted in the Ray task on a sample, saved as arrays, applied by every
    assignment actor; the single-process replay of preprocess.npz gives the same clusters."""
    pytest.importorskip("umap")
    x, y = _blobs(n_per=150, k=4, d=12, seed=4)
    m = K.run_clustering(_features(x, y), tmp_path / "u", k=4, preprocess="pca", pca_dim=8, manifold="umap",
                         manifold_dim=3, seed=0, actors=2, progress=False)
    # nredo not given: 50 restarts on a manifold map (fit.restarts), recorded in the metrics
    assert m["manifold"] == "umap" and m["manifold_dim"] == 3 and m["nredo"] == 50 and m["acc"] > 0.99
    pz = np.load(tmp_path / "u" / "preprocess.npz", allow_pickle=False)
    assert pz["anchors"].shape == (600, 8) and pz["coords"].shape == (600, 3)
    pre = K.Preprocess.from_arrays(pz)
    c, _ = K.search(K.centroid_index(np.load(tmp_path / "u" / "centroids.npy"), spherical=False), pre(x))
    assert (_assignments(tmp_path / "u")["cluster"].to_numpy() == c).all()


def _wide_and_tight(seed=0):
    """A wide cluster (std 3, 800 points) and a tight one (std 0.3, 200 points) 5 apart: k-means's
    midway boundary gives the tight one a slice of the wide one, a mixture's covariances do not."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 3, (800, 2)), rng.normal(0, 0.3, (200, 2)) + [5, 0]]).astype(np.float32)
    return x, np.repeat([0, 1], [800, 200])


def test_gaussian_mixture_assigns_like_scikit_learn_and_follows_elongated_clusters():
    from scipy.spatial.distance import cdist
    from sklearn.mixture import GaussianMixture

    x, y = _wide_and_tight()
    gm = GaussianMixture(2, covariance_type="full", random_state=0).fit(x)
    mix = K.Mixture(gm.means_, gm.precisions_cholesky_, np.log(gm.weights_))
    c, d = K.search(mix.index, x)
    assert (c == gm.predict(x)).all()
    # the distance is the squared Mahalanobis distance to the assigned component (scipy's)
    maha = np.stack([cdist(x, gm.means_[j:j + 1], "mahalanobis", VI=np.linalg.inv(gm.covariances_[j]))[:, 0]
                     for j in range(2)], axis=1) ** 2
    np.testing.assert_allclose(d, maha[np.arange(len(x)), c], rtol=1e-4)
    # what the mixture is for (measured: 0.98-0.99 against k-means's 0.69-0.74 over 4 data seeds)
    assert K.cluster_acc(y, K.search(K.gaussian_mixture(x, 2, seed=0).index, x)[0]) > 0.95
    assert K.cluster_acc(y, K.assign(K.kmeans(x, 2, niter=20, nredo=5), x)[0]) < 0.8


def _one_wide_two_tight(seed=0):
    """Three classes of 300: a wide one (std 2.5) and two tight ones (std 0.3) 1.5 apart, 7 from it.
    k-means spends two clusters on the wide one and merges the tight pair."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 2.5, (300, 2)), rng.normal(0, 0.3, (300, 2)) + [7, 0],
                        rng.normal(0, 0.3, (300, 2)) + [8.5, 0]]).astype(np.float32)
    return x, np.repeat([0, 1, 2], 300)


def test_balanced_kmeans_holds_equal_sizes_where_kmeans_does_not():
    x, y = _one_wide_two_tight()
    b = K.fit_clusters(x, 3, "balanced", niter=20, nredo=5, seed=0)
    c, d = K.search(b.index, x)
    assert np.abs(np.bincount(c, minlength=3) - 300).max() <= 15
    assert K.cluster_acc(y, c) > 0.97
    assert K.cluster_acc(y, K.assign(K.kmeans(x, 3, niter=20, nredo=5, seed=0), x)[0]) < 0.7  # (measured 0.50)
    # the offsets decide the cluster; the distance is still the squared L2 distance to its centroid
    np.testing.assert_allclose(d, ((x - b.centroids[c]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
    assert (b.offsets != b.offsets[0]).any()
    # the offset rule, written out: argmin |x - c_j|^2 - offsets[j]
    rule = (((x[:, None] - b.centroids[None]) ** 2).sum(-1) - b.offsets[None]).argmin(1)
    assert (rule == c).mean() > 0.995  # float32 near-ties aside


def test_sinkhorn_potentials_reach_equal_shares_and_the_exact_balanced_assignment():
    """The balancing step at fixed centroids: its plan's rows sum to 1 and its columns to m / k
    (checked with scipy's logsumexp), and with a small epsilon its argmax is the exact min-cost
    assignment onto equal shares (scipy's Hungarian over each centroid repeated m / k times)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.special import logsumexp

    from distgan.cluster.fit import sinkhorn_potentials

    rng = np.random.default_rng(0)
    m, k = 240, 4
    x = rng.normal(size=(m, 2))
    c = np.array([[0.0, 0.0], [0.3, 0.1], [2.0, 2.0], [-1.0, 1.5]])  # two centroids nearly on top of each other
    cost = ((x[:, None] - c[None]) ** 2).sum(-1)  # (m, k)
    logits = (-cost / (0.01 * np.median(cost))).astype(np.float32)
    v, sweeps = sinkhorn_potentials(logits, np.zeros(k), sweeps=2000, tol=1e-6)
    assert sweeps < 2000
    u = -logsumexp(logits.astype(np.float64) + v[None], axis=1)
    np.testing.assert_allclose(logsumexp(logits + u[:, None] + v[None], axis=0), np.log(m / k), atol=1e-4)
    a = np.argmax(logits + v[None], axis=1)
    rows, cols = linear_sum_assignment(np.repeat(cost, m // k, axis=1))  # column j * m/k + r is centroid j's r-th seat
    exact = cols[np.argsort(rows)] // (m // k)
    assert np.bincount(exact, minlength=k).tolist() == [m // k] * k
    assert (a == exact).mean() > 0.97
    assert np.abs(np.bincount(a, minlength=k) - m // k).max() <= 3
    # nearest-centroid assignment is far from equal shares here: the balancing did the work
    assert np.abs(np.bincount(cost.argmin(1), minlength=k) - m // k).max() > 20
    # row blocks swept by threads: the same potentials as one block
    big = (-rng.exponential(size=(6000, 7)) * rng.uniform(1, 20, 7)).astype(np.float32)  # columns unequally near
    one, n1 = sinkhorn_potentials(big, np.zeros(7), sweeps=50, tol=0)
    three, n3 = sinkhorn_potentials(big, np.zeros(7), sweeps=50, tol=0, threads=3)
    assert n1 == n3 == 50 and np.abs(one).max() > 0.1
    np.testing.assert_allclose(three, one, atol=1e-5)


@pytest.mark.parametrize("method,manifold", [("gmm", "umap"), ("balanced", "none")])
def test_own_index_method_runs_in_the_fit_task_and_the_actors_and_resumes(ray_running, tmp_path, method, manifold):
    """--method gmm / balanced: the clusterer is fitted in the Ray task (gmm on the UMAP map, which
    it needs; balanced on the PCA space, sparing the fit task UMAP's ~10 s of compilation), saved
    as arrays in preprocess.npz, applied by every actor (= the single-process replay), and
    reloaded by a rerun of the same command."""
    if manifold == "umap":
        pytest.importorskip("umap")
    x, y = _blobs(n_per=150, k=4, d=12, seed=4)
    kw = dict(k=4, preprocess="pca", pca_dim=8, manifold=manifold, manifold_dim=3, method=method, seed=0, actors=2,
              progress=False)
    m = K.run_clustering(_features(x, y), tmp_path / "g", **kw)
    assert m["method"] == method and m["acc"] > 0.99
    pz = np.load(tmp_path / "g" / "preprocess.npz", allow_pickle=False)
    pre = K.Preprocess.from_arrays(pz)
    centroids = np.load(tmp_path / "g" / "centroids.npy")
    if method == "gmm":
        assert pz["gmm_prec_chol"].shape == (4, 3, 3) and pz["gmm_log_weights"].shape == (4,)
        model = K.Mixture(centroids, pz["gmm_prec_chol"], pz["gmm_log_weights"])
    else:
        assert pz["balanced_offsets"].shape == (4,) and m["sizes"] == [150] * 4
        model = K.Balanced(centroids, pz["balanced_offsets"])
    c, _ = K.search(model, pre(x))
    first = _assignments(tmp_path / "g")
    assert (first["cluster"].to_numpy() == c).all()
    # an interrupted run (assignments and metrics gone) reuses the saved fit, clusterer included
    (tmp_path / "g" / "metrics.json").unlink()
    shutil.rmtree(tmp_path / "g" / "assignments")
    again = K.run_clustering(_features(x, y), tmp_path / "g", **kw)
    assert again["resumed"] and (_assignments(tmp_path / "g")["cluster"].to_numpy() == c).all()


def test_units_of_older_nullable_shards_read_beside_new_ones(tmp_path):
    """Shards written before the vectors were declared non-nullable, beside newer ones (an
    embedding folder resumed across versions), still come back as one block."""
    import pyarrow.parquet as pq

    from distgan.cluster.features import _read_units, block_x
    from distgan.embed import _table

    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    new = _table(np.arange(3), np.zeros(3, np.int32), np.array(["train"] * 3, object), x)
    old = new.set_column(3, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1) + 1), 4))
    assert not new.schema.equals(old.schema)
    pq.write_table(new, tmp_path / "a.parquet")
    pq.write_table(old, tmp_path / "b.parquet")
    batch = pa.table({"file": [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], "first": [0, 0], "last": [0, 0]})
    got = _read_units(batch, ["id", "label", "embedding"])
    assert np.array_equal(block_x(got, "embedding", 4), np.concatenate([x, x + 1]).astype(np.float32))
