"""Mixed precision, the sync-free hot loop, penalties in fp32, WGAN-GP validation and
GP/R1 under two-process DDP: all on the CPU (tests/test_gpu.py repeats the device
parts on CUDA)."""
import contextlib

import numpy as np
import pytest
import torch

from distgan import config as C
from distgan.config import UserError
from distgan.data import to_device, to_float
from distgan.models import resolve_amp
from distgan.steps import NonFiniteError, d_step, ema_update, g_step, grad_norm
from distgan.train import _load_optimizer, build_nets

torch.set_num_threads(2)
AMP_MODES = ["off", "bf16", "fp16"]


def _cfg(**extra):
    o = {"model.width": 8, "model.z_dim": 16, "model.channels": 1, **extra}
    return C.load(None, o)


def _real(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("amp", AMP_MODES)
def test_every_amp_mode_trains(amp):
    cfg = _cfg(**{"train.amp": amp, "loss.r1_gamma": 1.0})
    nets = build_nets(cfg, "cpu")
    assert nets.amp == amp and nets.scaler_d.is_enabled() == (amp == "fp16")
    g0, d0 = _params(nets.G), _params(nets.D)
    for step in range(1, 7):  # fp16: the first steps overflow at GradScaler's 2^16 and are skipped
        out = d_step(nets, _real(seed=step), cfg, step)
        out |= g_step(nets, 6, "cpu", cfg, step)
    nets.guard.check()  # overflowing fp16 gradients are not divergence
    assert all(torch.isfinite(v) for v in out.values())
    assert all(not torch.equal(a, b) for a, b in zip(d0, nets.D.parameters()) if a.dim() > 1)  # D weights moved
    assert all(not torch.equal(a, b) for a, b in zip(g0, nets.G.parameters()) if a.dim() > 1)
    if amp == "fp16":  # each optimizer's scaler backed off on its own
        assert nets.scaler_d.get_scale() < 2.0**16 and nets.scaler_g.get_scale() < 2.0**16


def test_auto_amp_is_off_on_cpu_and_named_values_pass_through():
    assert resolve_amp("auto", "cpu") == "off"
    assert [resolve_amp(m, "cpu") for m in AMP_MODES] == AMP_MODES
    with pytest.raises(UserError, match="train.amp='true' is not valid; choose one of: off, bf16, fp16, auto"):
        _cfg(**{"train.amp": "true"})


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("penalty", ["r1", "gp"])
def test_gradient_penalties_are_computed_in_fp32_under_amp(amp, penalty):
    """D's first block records its output dtype per forward: the forward a penalty
    differentiates must be fp32 while the other forwards run in the amp dtype."""
    extra = {"loss.r1_gamma": 1.0} if penalty == "r1" else {"loss.name": "wgan-gp", "model.spectral_norm": True}
    cfg = _cfg(**{"train.amp": amp, **extra})
    nets = build_nets(cfg, "cpu")
    seen = []
    hook = nets.D.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    d_step(nets, _real(), cfg, 1)
    hook.remove()
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if penalty == "r1":  # real (differentiated by R1) in fp32, fake in amp
        assert seen == [torch.float32, low]
    else:  # real and fake in amp, the interpolates of the penalty in fp32
        assert seen == [low, low, torch.float32]


@pytest.mark.parametrize("amp", AMP_MODES)
def test_divergence_under_amp_skips_the_update_and_is_named(amp):
    cfg = _cfg(**{"train.amp": amp})
    nets = build_nets(cfg, "cpu")
    d_step(nets, _real(), cfg, 1)
    d0 = _params(nets.D)
    d_step(nets, torch.full((6, 1, 32, 32), float("nan")), cfg, 2)
    assert all(torch.equal(a, b) for a, b in zip(d0, nets.D.parameters()))  # no NaN reached the weights
    with pytest.raises(NonFiniteError, match="at step 2"):
        nets.guard.check()


@contextlib.contextmanager
def _no_host_reads(monkeypatch):
    """Every Python-level way to read a tensor's value back to the host raises. On a GPU each
    of these is a device sync; on the CPU this is the same check without a GPU."""
    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host read in the hot loop: Tensor.{name}")
        return f

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, name, refuse(name))
        yield


@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("loss,extra", [("ns", {"loss.r1_gamma": 1.0}), ("wgan-gp", {"model.spectral_norm": True})])
def test_steps_never_read_values_back_to_the_host(monkeypatch, amp, loss, extra):
    cfg = _cfg(**{"train.amp": amp, "loss.name": loss, "optim.diffaugment": "translation,cutout,color", **extra})
    nets = build_nets(cfg, "cpu")
    real = _real()
    with _no_host_reads(monkeypatch):
        for step in (1, 2):
            d_step(nets, real, cfg, step)
            g_step(nets, 6, "cpu", cfg, step)
            ema_update(nets.G_ema, nets.G, 0.99)
        d_step(nets, real * float("nan"), cfg, 3)  # even a NaN step only marks the guard
    with pytest.raises(NonFiniteError, match="at step 3"):
        nets.guard.check()  # the one read, outside the hot loop


def test_the_no_host_read_check_can_fail(monkeypatch):
    with _no_host_reads(monkeypatch), pytest.raises(AssertionError, match="Tensor.__bool__"):
        if torch.isfinite(torch.ones(())):  # what the loop used to do per step
            pass


def test_foreach_grad_norm_and_ema_match_per_parameter_loops():
    cfg = _cfg()
    nets = build_nets(cfg, "cpu")
    d_step(nets, _real(), cfg, 1)
    g_step(nets, 6, "cpu", cfg, 1)
    by_loop = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in nets.G.parameters()))
    assert float(grad_norm(nets.G)) == pytest.approx(float(by_loop), rel=1e-5)
    before = _params(nets.G_ema)
    ema_update(nets.G_ema, nets.G, 0.9)
    for b, pe, p in zip(before, nets.G_ema.parameters(), nets.G.parameters()):
        torch.testing.assert_close(pe, 0.9 * b + 0.1 * p)
    for be, b in zip(nets.G_ema.buffers(), nets.G.buffers()):
        assert torch.equal(be, b)  # BatchNorm statistics copied


def test_uint8_batches_convert_on_the_device_exactly_like_to_float():
    u8 = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ref = to_float(u8)
    x = to_device(u8, "cpu")
    assert torch.equal(x, ref) and x.is_contiguous()
    y = to_device(u8, "cpu", channels_last=True)
    assert torch.equal(y, ref) and y.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_training_matches_the_default_layout():
    base = _cfg()
    nets = build_nets(base, "cpu")
    cl = C.apply_overrides(base, {"train.channels_last": True})
    nets_cl = build_nets(cl, "cpu")
    assert nets_cl.D.blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    a = d_step(nets, to_device((np.arange(6 * 32 * 32) % 256).astype(np.uint8).reshape(6, 32, 32, 1), "cpu"), base, 1)
    torch.manual_seed(1)
    b = d_step(nets_cl, to_device((np.arange(6 * 32 * 32) % 256).astype(np.uint8).reshape(6, 32, 32, 1), "cpu", True), cl, 1)
    assert float(a["loss/d"]) == pytest.approx(float(b["loss/d"]), rel=1e-4)


def test_older_checkpoints_load_amp_flag_and_non_fused_adam_state():
    old = C.to_dict(_cfg())
    old["train"]["amp"] = True  # configs saved when amp was a bf16 on/off switch
    assert C.from_dict(old).train.amp == "bf16"
    old["train"]["amp"] = False
    assert C.from_dict(old).train.amp == "off"
    nets = build_nets(_cfg(), "cpu")
    plain = torch.optim.Adam(nets.D.parameters(), lr=1e-3, foreach=False)  # how older distgan built it
    d_step(nets, _real(), _cfg(), 1)
    plain.step()
    _load_optimizer(nets.opt_d, plain.state_dict())
    assert nets.opt_d.param_groups[0]["fused"] is True  # the skip-on-device mechanism survives the load
    d0 = _params(nets.D)
    d_step(nets, _real() * float("nan"), _cfg(), 2)
    assert all(torch.equal(a, b) for a, b in zip(d0, nets.D.parameters()))


# ---------------------------------------------------------------- WGAN-GP with a BatchNorm D


def test_wgan_gp_with_batchnorm_d_is_one_line_before_ray(fake_dir, tmp_path, capsys, monkeypatch):
    import distgan.data
    from distgan.cli import main

    monkeypatch.setattr(distgan.data, "init_ray", lambda *a, **k: pytest.fail("Ray started before validation"))
    code = main(["train", "--data", str(fake_dir), "--storage", str(tmp_path), "--set", "loss.name=wgan-gp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "wgan-gp needs a D without BatchNorm" in err[0] and "model.spectral_norm=true" in err[0]
    assert not any(tmp_path.iterdir())  # nothing written
    # the same config with spectral norm, or the ResNet D (no BatchNorm), is fine
    C.load(None, {"loss.name": "wgan-gp", "model.spectral_norm": True})
    C.load(None, {"loss.name": "wgan-gp", "model.arch": "resnet"})


def test_tune_space_that_can_sample_wgan_gp_with_batchnorm_is_refused(tmp_path):
    from distgan.tune import load_space

    f = tmp_path / "space.yaml"
    f.write_text("loss.name: {choice: [hinge, wgan-gp]}\nmodel.spectral_norm: {choice: [true, false]}\n")
    with pytest.raises(UserError, match="can sample model.spectral_norm=False, loss.name=wgan-gp, which is not valid"):
        load_space(f)
    f.write_text("loss.name: {choice: [hinge, wgan-gp]}\n")
    load_space(f, _cfg(**{"model.spectral_norm": True}))  # the base config's D has no BatchNorm: fine
    with pytest.raises(UserError, match="wgan-gp"):
        load_space(f, _cfg())


# ---------------------------------------------------------------- GP and R1 under DDP


def _ddp_worker(rank: int, world: int, cfg_dict: dict, out: str) -> None:
    """One rank: the same wrapping as train.py, 3 D/G steps on this rank's own batches.
    The ranks meet through a file, not a TCP store that rank 0 serves: with TCP, rank 0's
    store thread could be torn down at exit while rank 1 still spoke to it (a SIGABRT,
    'terminate called without an active exception', once in a CI run)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        cfg = C.from_dict(cfg_dict)
        nets = build_nets(cfg, "cpu")
        nets.G = DDP(nets.G)
        nets.D = DDP(nets.D, broadcast_buffers=False)
        torch.manual_seed(100 + rank)  # ranks draw different z, augmentations and GP interpolates
        for step in (1, 2, 3):
            d_step(nets, _real(seed=10 * rank + step), cfg, step)
            g_step(nets, 6, "cpu", cfg, step)
        nets.guard.check()
        flat = torch.cat([p.detach().flatten() for m in (nets.G.module, nets.D.module) for p in m.parameters()])
        torch.save(flat, f"{out}/rank{rank}.pt")
        dist.barrier()  # both done with the group before either tears it down
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {"loss.name": "wgan-gp", "model.spectral_norm": True},  # a third D forward + double backward
    {"loss.name": "ns", "loss.r1_gamma": 10.0},  # the gradient of the real logits, double backward
    {"loss.name": "hinge", "loss.r1_gamma": 1.0, "model.arch": "resnet"},
], ids=["gp-dcgan-sn", "r1-dcgan-bn", "r1-resnet"])
def test_gradient_penalties_keep_two_ddp_replicas_identical(tmp_path, extra):
    import torch.multiprocessing as mp

    cfg = _cfg(**{"model.channels": 1, **extra})
    mp.spawn(_ddp_worker, args=(2, C.to_dict(cfg), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    fresh = torch.cat([p.detach().flatten() for m in (build_nets(cfg, "cpu").G, build_nets(cfg, "cpu").D)
                       for p in m.parameters()])
    assert not torch.equal(r0, fresh)  # they trained
    assert torch.equal(r0, r1)  # and stayed bit-identical: every gradient was all-reduced


# ---------------------------------------------------------------- embedding actors


@pytest.mark.parametrize("cpus", [1, 2])
def test_embedding_actor_threads_follow_its_own_resources(ray_running, untrained_checkpoint, cpus):
    """Threads from the CPUs Ray gave the actor, not the driver's (or the node's) core count."""
    import os

    import ray

    from distgan.embed import ShardEmbedder
    from distgan.models import load_state

    def facts_of(embedder):  # runs inside the actor (a local function: Ray ships it by value)
        import torch as t

        return {"threads": embedder.threads, "torch_threads": t.get_num_threads(), "amp": embedder.amp,
                "device": str(embedder.device)}

    state = load_state(untrained_checkpoint)
    actor = ray.remote(num_cpus=cpus)(ShardEmbedder).remote(state["D"], state["config"], features="multi",
                                                            readout="grid4-max", dtype="float32", amp="auto")
    facts = ray.get(actor.__ray_call__.remote(facts_of))
    ray.kill(actor)
    want = min(cpus, os.cpu_count())
    assert facts == {"threads": want, "torch_threads": want, "amp": "off", "device": "cpu"}  # CPU: fp32


def test_embedding_under_bf16_autocast_stays_close_to_fp32(untrained_checkpoint):
    """The GPU actors infer in bf16 (fp16 before Ampere); the same path on the CPU's bf16
    autocast gives embeddings within bf16 rounding of fp32 ones."""
    from distgan.embed import embed_images
    from distgan.models import discriminator_from_checkpoint, load_state, recalibrate_batchnorm

    D, _ = discriminator_from_checkpoint(load_state(untrained_checkpoint))
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 1), dtype=np.uint8)
    D = recalibrate_batchnorm(D, images)
    ref = embed_images(D, images, "multi")
    low = embed_images(D, images, "multi", amp="bf16")
    assert low.dtype == np.float32 and low.shape == ref.shape and not np.array_equal(low, ref)  # bf16 did run
    cos = (low * ref).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999
