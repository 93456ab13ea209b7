"""The GPU path on a real CUDA device: every AMP mode, no host sync in the hot loop,
NCCL, evaluation on the training device, GPU embedding actors, faiss on the GPU.

Skipped with a reason where CUDA is absent (every CPU-only machine, CI included);
`benchmarks/gpu.py` measures the same path. What ran where is in the README."""
import numpy as np
import pytest
import torch

from distgan import config as C
from distgan.steps import d_step, ema_update, g_step
from distgan.train import build_nets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: the GPU path is tested on a GPU machine"),
]
AMP_MODES = ["off", "bf16", "fp16", "auto"]


def _cfg(**extra):
    return C.load(None, {"model.width": 16, "model.z_dim": 32, "model.channels": 1, **extra})


def _batch(n=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)


def _skip_unsupported(amp):
    if amp == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability >= 8.0")


@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("extra", [{}, {"loss.r1_gamma": 1.0}, {"loss.name": "wgan-gp", "model.spectral_norm": True},
                                   {"model.arch": "resnet", "model.spectral_norm": True, "loss.name": "hinge"}],
                         ids=["ns", "r1", "wgan-gp", "resnet"])
def test_training_steps_under_each_amp_mode(amp, extra):
    from distgan.data import to_device

    _skip_unsupported(amp)
    cfg = _cfg(**{"train.amp": amp, **extra})
    nets = build_nets(cfg, "cuda")
    if amp == "auto":
        assert nets.amp == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")
    d0 = [p.detach().clone() for p in nets.D.parameters()]
    for step in range(1, 9):
        out = d_step(nets, to_device(_batch(seed=step), "cuda"), cfg, step)
        out |= g_step(nets, 32, "cuda", cfg, step)
        ema_update(nets.G_ema, nets.G, 0.99)
    nets.guard.check()
    assert all(torch.isfinite(v).item() for k, v in out.items() if not k.startswith("grad_norm"))
    assert any(not torch.equal(a, b) for a, b in zip(d0, nets.D.parameters()))


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_hot_loop_makes_no_host_sync(amp, channels_last):
    """CUDA's own sync detector turned to "error" around whole iterations: batch upload,
    D step, G step, EMA; and a NaN step that the guard only notes."""
    from distgan.data import to_device

    _skip_unsupported(amp)
    cfg = _cfg(**{"train.amp": amp, "train.channels_last": channels_last, "loss.r1_gamma": 1.0,
                  "optim.diffaugment": "translation,cutout,color"})
    nets = build_nets(cfg, "cuda")
    batches = [_batch(seed=s) for s in range(4)]
    d_step(nets, to_device(batches[0], "cuda", channels_last), cfg, 1)  # warm-up: lazy CUDA/cuBLAS init may sync
    g_step(nets, 32, "cuda", cfg, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (2, 3):
            real = to_device(batches[step], "cuda", channels_last)
            d_step(nets, real, cfg, step)
            g_step(nets, 32, "cuda", cfg, step)
            ema_update(nets.G_ema, nets.G, 0.99)
        d_step(nets, real * float("nan"), cfg, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    from distgan.steps import NonFiniteError

    with pytest.raises(NonFiniteError, match="at step 4"):
        nets.guard.check()


def test_ddp_over_nccl_one_gpu():
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from distgan.data import to_device

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        cfg = _cfg(**{"loss.r1_gamma": 1.0, "train.amp": "auto"})
        nets = build_nets(cfg, "cuda")
        nets.G, nets.D = DDP(nets.G), DDP(nets.D, broadcast_buffers=False)
        for step in (1, 2, 3):
            d_step(nets, to_device(_batch(seed=step), "cuda"), cfg, step)
            g_step(nets, 32, "cuda", cfg, step)
        nets.guard.check()  # all-reduces the guard over NCCL
    finally:
        dist.destroy_process_group()


def test_evaluator_runs_on_the_training_device(fake_dir):
    from distgan.evaluate import Evaluator
    from distgan.train import resolve_data

    cfg = resolve_data(C.load(None, {"data.path": str(fake_dir), "model.width": 8, "eval.every": 1,
                                     "eval.num_images": 200}))
    nets = build_nets(cfg, "cuda")
    ev = Evaluator(cfg)
    out = ev(nets.G_ema, nets.D, 1)
    assert {"eval/nmi", "eval/probe_acc", "eval/seconds"} <= set(out)
    assert next(nets.G_ema.parameters()).is_cuda and next(nets.D.parameters()).is_cuda
    assert ev.device.type == "cuda"


def test_embedding_actor_on_the_gpu_matches_cpu_embeddings(ray_running, untrained_checkpoint, fake_dir, tmp_path):
    import ray

    from distgan.cluster import collect, embedding_features
    from distgan.data import decode_images, read_arrays
    from distgan.embed import embed_dataset, embed_images, load_embedder, load_projection

    if not ray.cluster_resources().get("GPU"):
        pytest.skip("the shared Ray found no GPU")
    m = embed_dataset(untrained_checkpoint, fake_dir, tmp_path / "emb", features="multi", dtype="float32",
                      progress=False)
    ids, _, _, x = collect(embedding_features(tmp_path / "emb"))
    D, _ = load_embedder(untrained_checkpoint, fake_dir)
    a = read_arrays(fake_dir)
    order = np.argsort(a["id"])
    ref = embed_images(D, decode_images(a["image"][order], 32, 1), "multi",
                       project=load_projection(tmp_path / "emb"))  # fp32 on the CPU, the basis the run saved
    got = x[np.argsort(ids)]
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert m["count"] == len(ref) and cos.min() > 0.99  # bf16/fp16 on the GPU vs fp32 on the CPU


def test_faiss_kmeans_and_assignment_on_the_gpu_match_the_cpu():
    from distgan.cluster import assign, faiss_devices, kmeans

    if not faiss_devices():
        pytest.skip("this faiss build has no GPU support (install the gpu extra)")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 32)).astype(np.float32) * 10
    x = (centers[rng.integers(0, 8, 20000)] + rng.normal(size=(20000, 32))).astype(np.float32)
    km_cpu, km_gpu = kmeans(x, 8, seed=1, gpu=False), kmeans(x, 8, seed=1, gpu=True)
    c_cpu, d_cpu = assign(km_cpu, x)
    c_gpu, d_gpu = assign(km_gpu, x)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(c_cpu, c_gpu) > 0.999
    np.testing.assert_allclose(np.sort(d_cpu), np.sort(d_gpu), rtol=1e-3, atol=1e-2)


@pytest.mark.slow
def test_ray_train_one_gpu_worker(ray_running, fake_dir, tmp_path):
    from distgan.train import load_state, run_training

    import ray

    if not ray.cluster_resources().get("GPU"):
        pytest.skip("the shared Ray found no GPU")
    cfg = C.load(None, {"data.path": str(fake_dir), "model.width": 8, "data.batch_size": 16, "train.steps": 6,
                        "train.log_every": 2, "train.checkpoint_every": 3, "train.use_gpu": True, "train.amp": "auto"})
    res = run_training(cfg, storage=str(tmp_path), name="gpu")
    assert res.step == 6 and load_state(res.checkpoint)["config"]["train"]["amp"] == "auto"
