"""Representation objectives (contrastive, rotation, autoencoder), the read-outs and the
manifold step: losses against hand-computed values, heads and gradients, view augmentations,
and short real runs that must beat their own random-init control."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distgan import config as C
from distgan.cli import main
from distgan.losses import nt_xent, supcon_fake
from distgan.models import build_discriminator, embedding_dim, readout
from distgan.objectives import VIEW_AUGMENTS, _rotate, _rotated, augment_views, steps_for
from distgan.train import build_nets

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def test_nt_xent_matches_a_hand_computed_batch_of_four():
    # Views a = [e1, e2], b = [e1, e2]: each of the 4 rows has similarity 1 with its positive,
    # 0 with the two others (itself excluded). At temperature 0.5 every row's loss is
    # -log(e^2 / (e^0 + e^2 + e^0)) = log(2 + e^2) - 2.
    a = torch.stack([E1, E2])
    assert nt_xent(a, a.clone(), 0.5).item() == pytest.approx(math.log(2 + math.e**2) - 2, rel=1e-6)
    # Swapping b's rows makes each positive orthogonal (sim 0) and a negative identical (sim 1):
    # -log(e^0 / (e^2 + e^0 + e^0)) = log(2 + e^2); a worse pairing scores a higher loss.
    assert nt_xent(a, a.flip(0), 0.5).item() == pytest.approx(math.log(2 + math.e**2), rel=1e-6)


def test_supcon_fake_matches_a_hand_computed_example():
    # Fakes [e1, e1], reals all e2, temperature 1: each fake sees 4 reals at sim 0 and the other
    # fake at sim 1 (its only positive): loss = -log(e / (4 + e)) = log(4 + e) - 1.
    reals, fakes = torch.stack([E2, E2]), torch.stack([E1, E1])
    assert supcon_fake(reals, reals, fakes, 1.0).item() == pytest.approx(math.log(4 + math.e) - 1, rel=1e-6)


@pytest.mark.parametrize("objective", ["contrastive", "rotation", "autoencoder"])
def test_every_head_gets_a_gradient_and_the_checkpoint_holds_it(objective):
    cfg = C.load(None, {"objective.name": objective, "model.width": 8, "model.z_dim": 16, "data.batch_size": 8})
    nets = build_nets(cfg, "cpu")
    d_step, g_step = steps_for(cfg)
    out = d_step(nets, torch.rand(8, 1, 32, 32) * 2 - 1, cfg, 1)
    assert all(torch.isfinite(v) for v in out.values())
    for name, p in nets.D.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{objective}: D parameter {name} got no gradient"
    if objective == "autoencoder":  # one loss trains the encoder (D) and the decoder (G)
        assert g_step is None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.G.parameters())
    else:
        before = [p.detach().clone() for p in nets.G.parameters()]
        g_step(nets, 8, "cpu", cfg, 1)
        assert any(not torch.equal(b, p) for b, p in zip(before, nets.G.parameters())), "G did not move"
    heads = {"contrastive": ("proj.", "proj_fake.", "dis."), "rotation": ("rot.",), "autoencoder": ("code.",)}[objective]
    state = nets.D.state_dict()
    assert all(any(k.startswith(h) for k in state) for h in heads)
    rebuilt = build_discriminator(cfg.model, objective)
    rebuilt.load_state_dict(state)  # the checkpoint's D dict rebuilds the same module, heads included


@pytest.mark.parametrize("name", sorted(VIEW_AUGMENTS))
def test_view_augmentations_keep_shape_range_and_gradient(name):
    torch.manual_seed(0)
    x = (torch.rand(6, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = VIEW_AUGMENTS[name](x)
    assert y.shape == x.shape
    if name not in ("color", "intensity"):  # DiffAugment's colour jitter shifts brightness by design
        assert y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if name in ("crop", "rotate", "translation", "cutout"):
        assert not torch.equal(y, x), f"{name} changed nothing"


def test_rotate_turns_about_the_centre_by_the_drawn_angle():
    # A quarter turn maps pixel centres onto pixel centres, so the bilinear resample is exact:
    # +90 degrees is torch.rot90 (counter-clockwise), -90 its inverse.
    x = torch.arange(2 * 25, dtype=torch.float32).view(2, 1, 5, 5)
    assert torch.allclose(_rotate(x, (90.0, 90.0)), torch.rot90(x, 1, (2, 3)), atol=1e-4)
    assert torch.allclose(_rotate(x, (-90.0, -90.0)), torch.rot90(x, -1, (2, 3)), atol=1e-4)
    # the default draw stays small: a 15-degree slant moves a corner pixel, not the centre one
    torch.manual_seed(0)
    y = _rotate(x)
    assert torch.allclose(y[:, :, 2, 2], x[:, :, 2, 2], atol=1e-4) and not torch.allclose(y, x)


def test_auto_views_have_no_flips_or_colour_on_grayscale():
    assert C.view_augments("auto", 1) == ["crop", "cutout"]
    assert set(C.view_augments("auto", 3)) >= {"flip", "color"}
    assert augment_views(torch.zeros(2, 1, 32, 32), ["crop", "cutout"]).shape == (2, 1, 32, 32)


def test_intensity_jitter_changes_a_grayscale_view_and_colour_is_refused_there():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 32, 32) * 2 - 1
    y = augment_views(x, ["intensity"])
    assert not torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.05)  # brightness moved
    assert not torch.allclose(y.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), rtol=0.05)  # contrast moved
    gray = {"objective.name": "contrastive", "model.channels": 1}
    C.validate_for_data(C.load(None, {**gray, "objective.augment": "crop,intensity"}))
    with pytest.raises(C.UserError, match="RGB"):
        C.validate_for_data(C.load(None, {**gray, "objective.augment": "crop,color"}))


def test_crop_scale_sets_how_small_a_crop_may_be():
    # A horizontal ramp from -1 to 1: a crop keeping a fraction w of the width spans ~2w of the
    # ramp, so each view's value range measures its crop's width. Whole-area crops (scale 1) keep
    # at least sqrt(3/4) of the width (aspect 3/4..4/3); scale 0.05 may keep a quarter of it.
    torch.manual_seed(0)
    ramp = torch.linspace(-1, 1, 32).expand(512, 1, 32, 32).contiguous()
    span = lambda scale: (lambda v: v.amax(dim=(1, 2, 3)) - v.amin(dim=(1, 2, 3)))(augment_views(ramp, ["crop"], scale))  # noqa: E731
    assert span(1.0).min() > 1.6
    assert (span(0.05) < 1.0).float().mean() > 0.1
    with pytest.raises(C.UserError, match="crop_scale"):
        C.load(None, {"objective.crop_scale": 0})


def test_rotations_are_the_ones_labelled():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    xr, turns = _rotated(x)
    for i in range(2):
        assert torch.equal(xr[i], torch.rot90(x[i], int(turns[i]), dims=(1, 2)))


def test_grid_readout_pools_each_block_and_normalises_it():
    a = torch.rand(3, 2, 8, 8)  # (N, C, H, W): two blocks
    b = torch.rand(3, 4, 4, 4) * 100  # a block with a much larger scale
    out = readout([a, b], "grid2-max")
    assert out.shape == (3, 2 * 4 + 4 * 4)
    first = F.adaptive_max_pool2d(a, 2).flatten(1)
    assert torch.allclose(out[:, :8], first / first.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(out[:, 8:].norm(dim=1), torch.ones(3))  # the large block no longer dominates
    assert torch.allclose(readout([a], "gap"), a.mean(dim=(2, 3)))  # the old read-out, unchanged


def test_proj_readout_is_the_contrastive_heads_unit_output_and_other_ds_refuse_it():
    cfg = C.load(None, {"objective.name": "contrastive", "model.width": 8})
    D = build_discriminator(cfg.model, "contrastive").eval()
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    assert embedding_dim(D, "multi", "proj", 32, 1) == 128
    with torch.no_grad():
        out = D.embed(x, "multi", "proj")
        # by hand: the last block (N, 4w, 4, 4) flattened, Linear -> LeakyReLU(0.2) -> Linear, unit length
        h = D.net.features(x)[-1].reshape(5, -1)
        z = F.linear(F.leaky_relu(F.linear(h, D.proj[0].weight, D.proj[0].bias), 0.2), D.proj[2].weight, D.proj[2].bias)
    assert out.shape == (5, 128)
    assert torch.allclose(out, z / z.norm(dim=1, keepdim=True), atol=1e-5)
    for objective in ("gan", "rotation", "autoencoder"):
        other = build_discriminator(cfg.model, objective)
        with pytest.raises(C.UserError, match="projection head"):
            embedding_dim(other, "multi", "proj", 32, 1)
    with pytest.raises(C.UserError, match="cluster.readout proj reads the contrastive D's projection head"):
        C.load(None, {"cluster.readout": "proj"})  # a config whose D has no such head
    assert C.load(None, {"cluster.readout": "proj", "objective.name": "contrastive"}).cluster.readout == "proj"


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_grid_plus_proj_readout_is_the_pooled_blocks_then_the_unit_projection(arch):
    cfg = C.load(None, {"objective.name": "contrastive", "model.width": 8, "model.arch": arch})
    D = build_discriminator(cfg.model, "contrastive").eval()
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    pooled_dim = embedding_dim(D, "multi", "grid2-max", 32, 1)
    assert embedding_dim(D, "multi", "grid2-max+proj", 32, 1) == pooled_dim + 128
    with torch.no_grad():
        out = D.embed(x, "multi", "grid2-max+proj")
        feats = D.net.features(x)  # by hand: each block max-pooled to 2 x 2, unit length per block ...
        blocks = [F.normalize(F.adaptive_max_pool2d(f, 2).flatten(1), dim=1) for f in feats]
        h = feats[-1].flatten(1) if arch == "dcgan" else feats[-1].sum(dim=(2, 3))  # ... and the trunk the head reads
        z = F.linear(F.leaky_relu(F.linear(h, D.proj[0].weight, D.proj[0].bias), 0.2), D.proj[2].weight, D.proj[2].bias)
    assert out.shape == (5, pooled_dim + 128)
    assert torch.allclose(out, torch.cat([*blocks, z / z.norm(dim=1, keepdim=True)], dim=1), atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.full((5,), 2.0 if arch == "dcgan" else 5 ** 0.5), atol=1e-5)
    with pytest.raises(C.UserError, match="projection head"):
        embedding_dim(build_discriminator(cfg.model, "gan"), "multi", "grid2-max+proj", 32, 1)
    with pytest.raises(C.UserError, match="cluster.readout grid4-max\\+proj reads the contrastive D's projection head"):
        C.load(None, {"cluster.readout": "grid4-max+proj"})
    for bad in ("gap+proj", "proj+proj", "grid4-max+proj+proj", "+proj"):
        with pytest.raises(C.UserError, match="unknown read-out"):
            C.parse_readout(bad)


def test_grid_larger_than_a_block_is_refused():
    cfg = C.load(None, {"model.width": 8})
    D = build_discriminator(cfg.model)
    assert embedding_dim(D, "multi", "grid4-max", 32, 1) == (8 + 16 + 32) * 16
    with pytest.raises(C.UserError, match="4x4"):
        embedding_dim(D, "multi", "grid8-max", 32, 1)


def test_manifold_places_sample_points_where_umap_put_them():
    faiss = pytest.importorskip("faiss")
    pytest.importorskip("umap")
    from distgan.cluster.manifold import fit_umap, place

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 10
    x = np.concatenate([c + rng.normal(size=(200, 16)) for c in centres]).astype(np.float32)
    anchors, coords = fit_umap(x, 2, seed=0, sample=300)
    index = faiss.IndexFlatL2(16)
    index.add(anchors)
    placed = place(index, coords, anchors)
    spread = coords.std(axis=0).mean()
    assert np.abs(placed - coords).max(axis=1).mean() < 0.1 * spread  # an anchor stays (about) where it was
    # every point (most never in the sample) lands nearest the centre of its own blob's anchors
    y = np.repeat(np.arange(3), 200)
    own = np.stack([coords[np.isin(anchors, x[y == j]).all(axis=1)].mean(axis=0) for j in range(3)])
    nearest = np.argmin(((place(index, coords, x)[:, None] - own[None]) ** 2).sum(-1), axis=1)
    assert (nearest == y).mean() > 0.99


def test_autoencoder_reconstructs_a_toy_set():
    """Four fixed patterns (quadrants lit): after 300 steps the reconstruction error is a small
    fraction of the error of predicting the mean image."""
    from distgan.objectives import autoencoder_step

    torch.manual_seed(0)
    cfg = C.load(None, {"objective.name": "autoencoder", "model.width": 8, "model.z_dim": 8, "optim.lr_g": 2e-3,
                        "optim.lr_d": 2e-3, "optim.beta1": 0.9})
    nets = build_nets(cfg, "cpu")
    toy = -torch.ones(4, 1, 32, 32)
    for i, (r, c) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
        toy[i, :, r : r + 16, c : c + 16] = 1.0
    batch = toy.repeat(4, 1, 1, 1)  # (16, 1, 32, 32)
    for step in range(300):
        autoencoder_step(nets, batch, cfg, step + 1)
    with torch.no_grad():  # train mode: the batch's own BatchNorm statistics, as in training
        err = F.mse_loss(nets.G(nets.D(batch)), batch).item()
    baseline = F.mse_loss(toy.mean(0, keepdim=True).expand_as(toy), toy).item()  # 0.75
    assert err < 0.15 * baseline, (err, baseline)  # untrained: about 1.3x the baseline (1.0)


@pytest.mark.slow
def test_contrastive_run_on_digits_beats_its_random_init_control(ray_running, digits_dir, tmp_path):
    """A short ContraD run through the real loop; its embeddings must cluster the digits better
    (NMI, same read-out, same k-means) than the same D at initialisation."""
    from distgan.cluster import clustering_metrics, fit_preprocess, kmeans, search
    from distgan.data import decode_images, read_arrays
    from distgan.embed import embed_images, load_embedder
    from distgan.train import resolve_data, run_training, save_untrained_checkpoint

    cfg = resolve_data(C.load(None, {"data.path": str(digits_dir), "model.width": 16, "model.z_dim": 32,
                                     "objective.name": "contrastive", "model.spectral_norm": True,
                                     "loss.name": "hinge", "data.batch_size": 64, "train.steps": 200,
                                     "train.log_every": 100, "train.checkpoint_every": 200, "data.split": "all",
                                     "train.threads_per_worker": 2}))
    trained = run_training(cfg, storage=str(tmp_path), name="contrad").checkpoint
    control = save_untrained_checkpoint(cfg, tmp_path / "control")
    a = read_arrays(digits_dir)
    images = decode_images(a["image"], 32, 1)

    def nmi(ckpt):
        D, _ = load_embedder(ckpt, digits_dir)
        x = embed_images(D, images, "multi", "grid4-max")
        z = fit_preprocess(x, "pca", 32)(x)
        return np.mean([clustering_metrics(a["label"], search(kmeans(z, 10, niter=30, seed=s).index, z)[0])["nmi"]
                        for s in (0, 1, 2)])

    got, ctrl = nmi(trained), nmi(control)
    assert got > ctrl + 0.02, f"contrastive D NMI {got:.3f} vs random-init control {ctrl:.3f}"


@pytest.mark.slow
def test_autoencoder_trains_embeds_and_clusters_through_the_cli(ray_running, fake_dir, tmp_path, capsys):
    sets = ["--set=objective.name=autoencoder", "--set=model.width=8", "--set=model.z_dim=16",
            "--set=data.batch_size=16", "--set=train.log_every=20", "--set=train.checkpoint_every=60",
            "--set=train.threads_per_worker=1"]
    assert main(["train", "--data", str(fake_dir), "--storage", str(tmp_path), "--name", "ae", "--steps", "60", *sets]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ae" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/rec" in rows[0] and "loss/g" not in rows[0]
    assert rows[-1]["loss/rec"] < rows[0]["loss/rec"], [r["loss/rec"] for r in rows]
    out = tmp_path / "clusters"
    assert main(["cluster", "--checkpoint", str(tmp_path / "ae"), "--data", str(fake_dir), "--k", "4",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 400 and len(m["sizes"]) == 4
    emb = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert emb["readout"] == C.ClusterConfig().readout and emb["readout_dim"] == (8 + 16 + 32) * 16
    assert emb["dim"] == C.ClusterConfig().embed_dim == 256  # stored projected (embed --dim)
