"""Architectures x losses, D/G steps, EMA, checkpoint state: plain PyTorch, no Ray."""
import itertools
import math

import pytest
import torch

from distgan import config as C
from distgan.config import UserError
from distgan.losses import LOSSES, d_hinge, d_lsgan, d_ns, d_wgan, g_hinge, g_lsgan, g_ns, g_wgan, gradient_penalty, r1_penalty
from distgan.models import build_discriminator, build_generator, embedding_dim
from distgan.steps import NonFiniteError, d_step, diff_augment, ema_update, g_step
from distgan.train import build_nets, load_state, restore, state_dict

torch.set_num_threads(2)
ARCHS = ["dcgan", "resnet"]
LOSS_NAMES = list(LOSSES)


def _cfg(arch="dcgan", loss="ns", **extra):
    o = {"model.arch": arch, "loss.name": loss, "model.width": 8, "model.z_dim": 16, "model.channels": 3, **extra}
    return C.load(None, o)


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _changed(before, m):
    return [not torch.equal(a, b) for a, b in zip(before, m.parameters())]


def _weights_changed(before, m):
    # Biases are left out: the head bias has exactly zero gradient under WGAN
    # (it cancels in E[D(fake)] - E[D(real)]) and under hinge while all margins are active.
    return [c for (name, _), c in zip(m.named_parameters(), _changed(before, m)) if not name.endswith("bias")]


@pytest.mark.parametrize("arch,sn", list(itertools.product(ARCHS, [False, True])))
def test_shapes_and_embed_sizes(arch, sn):
    cfg = _cfg(arch, **{"model.spectral_norm": sn})
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    x = G(torch.randn(4, 16))
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (4,)
    w = cfg.model.width
    blocks = {"dcgan": [(w, 16), (2 * w, 8), (4 * w, 4)], "resnet": [(2 * w, 16)] + [(2 * w, 8)] * 3}[arch]  # (C, H)
    for feats, chosen in (("last", blocks[-1:]), ("multi", blocks)):
        for readout, per in (("gap", lambda c, h: c), ("grid4-max", lambda c, h: 16 * c), ("grid2-avg", lambda c, h: 4 * c)):
            assert D.embed(x, feats, readout).shape == (4, sum(per(c, h) for c, h in chosen))
            assert embedding_dim(D, feats, readout, 32, 3) == sum(per(c, h) for c, h in chosen)


def test_dcgan_64px_single_channel():
    cfg = C.load(None, {"model.resolution": 64, "model.channels": 1, "model.width": 8})
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    x = G(torch.randn(2, cfg.model.z_dim))
    assert x.shape == (2, 1, 64, 64) and D.embed(x, "multi").shape == (2, 8 * 15)


def test_unknown_arch_lists_valid():
    from distgan.models import _lookup, GENERATORS

    with pytest.raises(UserError, match="dcgan, resnet"):
        _lookup(GENERATORS, "stylegan", "architecture")


@pytest.mark.parametrize("arch,loss", list(itertools.product(ARCHS, LOSS_NAMES)))
def test_d_step_changes_only_d_and_g_step_only_g(arch, loss):
    sn = loss == "wgan-gp"  # the gradient penalty needs a D without BatchNorm (validate)
    cfg = _cfg(arch, loss, **{"optim.diffaugment": "translation,cutout,color", "loss.r1_gamma": 1.0,
                              "model.spectral_norm": sn})
    nets = build_nets(cfg, "cpu")
    real = torch.rand(6, 3, 32, 32) * 2 - 1
    g0, d0 = _params(nets.G), _params(nets.D)
    out = d_step(nets, real, cfg)
    assert not any(_changed(g0, nets.G)), "D step changed G"
    assert all(_weights_changed(d0, nets.D)), "D step left some D weight unchanged"
    assert all(math.isfinite(float(v)) for v in out.values())
    g0, d0 = _params(nets.G), _params(nets.D)
    out = g_step(nets, 6, "cpu", cfg)
    assert not any(_changed(d0, nets.D)), "G step changed D"
    assert all(_weights_changed(g0, nets.G)), "G step left some G weight unchanged"
    assert all(p.requires_grad for p in nets.D.parameters())  # D unfrozen again


def test_losses_match_hand_computed_values():
    r = torch.tensor([2.0, -1.0])
    f = torch.tensor([0.5, -3.0])
    sp = lambda x: math.log1p(math.exp(x))  # softplus
    assert d_ns(r, f).item() == pytest.approx((sp(-2) + sp(1)) / 2 + (sp(0.5) + sp(-3)) / 2, rel=1e-6)
    assert g_ns(f).item() == pytest.approx((sp(-0.5) + sp(3)) / 2, rel=1e-6)
    assert d_hinge(r, f).item() == pytest.approx((0 + 2) / 2 + (1.5 + 0) / 2)
    assert g_hinge(f).item() == pytest.approx(1.25)
    assert d_wgan(r, f).item() == pytest.approx(-1.25 - 0.5)
    assert g_wgan(f).item() == pytest.approx(1.25)
    assert d_lsgan(r, f).item() == pytest.approx(0.5 * (1 + 4) / 2 + 0.5 * (0.25 + 9) / 2)
    assert g_lsgan(f).item() == pytest.approx(0.5 * (0.25 + 16) / 2)


def test_ns_loss_cannot_overflow():
    big = torch.tensor([1e4, 1e4])
    assert d_ns(big, -big).item() == 0.0  # D perfectly right: zero loss, not NaN
    assert d_ns(-big, big).item() == pytest.approx(2e4)  # D perfectly wrong: large, finite
    assert g_ns(-big).item() == pytest.approx(1e4)


def test_gradient_penalties_hand_computed():
    # D(x) = sum(w * x): grad is w everywhere, ||w|| = 2 -> GP = (2 - 1)^2 = 1, R1 = 4
    w = torch.full((1, 1, 2, 2), 1.0)
    D = lambda x: (x * w).flatten(1).sum(1)
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    assert gradient_penalty(D, real, fake).item() == pytest.approx(1.0)
    x = real.clone().requires_grad_(True)
    assert r1_penalty(D(x), x).item() == pytest.approx(4.0)


def test_diffaugment_keeps_shape_and_changes_images():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    for policy in ("color", "translation", "cutout"):
        y = diff_augment(x, policy)
        assert y.shape == x.shape and not torch.equal(x, y)
    y = diff_augment(x, "cutout")
    holes = (y == 0).flatten(1).float().mean(1)  # a 16x16 hole per image: 25% of it, at least a corner's 6.25%
    assert (holes >= 0.0625).all() and (holes <= 0.25).all()


def test_ema_update():
    cfg = _cfg()
    nets = build_nets(cfg, "cpu")
    with torch.no_grad():
        for p in nets.G.parameters():
            p.add_(1.0)
    before = _params(nets.G_ema)
    ema_update(nets.G_ema, nets.G, 0.9)
    for b, pe, p in zip(before, nets.G_ema.parameters(), nets.G.parameters()):
        assert torch.allclose(pe, 0.9 * b + 0.1 * p)


def test_non_finite_update_is_skipped_on_device_and_named_at_check():
    cfg = _cfg()
    nets = build_nets(cfg, "cpu")
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    d_step(nets, real, cfg, step=1)
    nets.guard.check()  # a healthy step: nothing to report
    d0 = _params(nets.D)
    d_step(nets, torch.full((4, 3, 32, 32), float("nan")), cfg, step=2)  # no exception: nothing is read back
    assert not any(_changed(d0, nets.D))  # the fused Adam skipped the update: weights untouched
    d_step(nets, real, cfg, step=3)  # later healthy steps train again...
    assert all(_weights_changed(d0, nets.D))
    with pytest.raises(NonFiniteError, match="non-finite D loss or gradient at step 2"):
        nets.guard.check()  # ...but the first bad step is remembered and named


def test_checkpoint_state_round_trip_weights_only(tmp_path):
    cfg = _cfg("resnet", "hinge", **{"model.spectral_norm": True})
    nets = build_nets(cfg, "cpu")
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    for _ in range(2):
        d_step(nets, real, cfg)
        g_step(nets, 4, "cpu", cfg)
    ema_update(nets.G_ema, nets.G, 0.5)
    torch.save(state_dict(nets, cfg, 2, 0), tmp_path / "state.pt")
    state = load_state(tmp_path)  # torch.load(weights_only=True) inside
    assert state["step"] == 2 and C.from_dict(state["config"]) == cfg
    fresh = build_nets(C.apply_overrides(cfg, {"train.seed": 5}), "cpu")
    restore(fresh, state, cfg)
    for a, b in [(nets.G, fresh.G), (nets.D, fresh.D), (nets.G_ema, fresh.G_ema)]:
        for (k, t1), t2 in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(t1, t2), k
    for o1, o2 in [(nets.opt_g, fresh.opt_g), (nets.opt_d, fresh.opt_d)]:
        s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_load_state_rejects_non_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no state.pt"):
        load_state(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="not a distgan checkpoint"):
        load_state(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot be loaded"):
        load_state(tmp_path)
