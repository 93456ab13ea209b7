"""Training throughput: a plain single-process PyTorch loop vs distgan on Ray Train
with 1 and 2 workers: same model, batch and total threads (2). Also the achieved
GFLOP/s of a training step as a fraction of the best dense kernel measured in the
same run (a large 3x3 convolution), in fp32 and under bf16 autocast.

    python -m benchmarks.train_throughput [--quick]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distgan import config as C
from distgan.data import decode_images, prepare, read_arrays, to_device
from distgan.steps import d_step, ema_update, g_step
from distgan.train import build_nets, resolve_data, run_training

from .common import write_results

THREADS = 2


def peak_conv_gflops(amp: bool, reps: int = 5) -> float:
    """Best-of GFLOP/s of a (32, 256, 32, 32) x 3x3 -> 256 convolution: the dense ceiling."""
    torch.set_num_threads(THREADS)
    x = torch.randn(32, 256, 32, 32)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)
    flops = 2 * 32 * 256 * 32 * 32 * 256 * 9
    best = float("inf")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        conv(x)
        for _ in range(reps):
            t = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def step_flops(cfg, device="cpu") -> int:
    """FLOPs of one D step + one G step (torch's FlopCounterMode: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    nets = build_nets(cfg, device)
    real = torch.rand(cfg.data.batch_size, cfg.model.channels, 32, 32, device=device) * 2 - 1
    with FlopCounterMode(display=False) as fc:
        d_step(nets, real, cfg)
        g_step(nets, cfg.data.batch_size, device, cfg)
    return fc.get_total_flops()


def plain_loop(cfg, images: np.ndarray, steps: int, warmup: int = 3, device="cpu", compile: bool = False,
               threads: int = THREADS) -> float:
    """img/s of the same D/G steps in one process, no Ray; batches from an in-memory uint8 array,
    uploaded and converted the way training does (to_device). `compile`: torch.compile G and D."""
    torch.set_num_threads(threads)
    nets = build_nets(cfg, device)
    if compile:
        nets.G, nets.D = torch.compile(nets.G), torch.compile(nets.D)
    bs = cfg.data.batch_size
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    t0 = None
    for i in range(steps + warmup):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        real = to_device(images[rng.choice(len(images), bs, replace=False)], device, cfg.train.channels_last)
        d_step(nets, real, cfg, i + 1)
        g_step(nets, bs, device, cfg, i + 1)
        ema_update(nets.G_ema, nets.G, cfg.optim.ema_decay)
    sync()
    return steps * bs / (time.perf_counter() - t0)


def distgan_run(cfg, workers: int, storage: str, name: str) -> float:
    """Median img/s over report windows after the first (which holds start-up and the first read)."""
    cfg = C.apply_overrides(cfg, {"train.num_workers": workers, "train.threads_per_worker": THREADS // workers})
    res = run_training(cfg, storage=storage, name=name)
    rows = [json.loads(l) for l in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return float(np.median([r["img_per_s"] for r in rows[1:]]))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    steps = 20 if args.quick else 60
    bf16_steps = 1 if args.quick else 3  # emulated bf16 runs at a few img/s on CPUs without bf16 units
    from distgan.data import init_ray

    init_ray()
    tmp = Path(tempfile.mkdtemp(prefix="distgan-bench-"))
    prepare("fake", tmp / "data", fake_count=2048, progress=False)
    images = decode_images(read_arrays(tmp / "data")["image"], 32, 1)
    peak = {False: peak_conv_gflops(False), True: peak_conv_gflops(True)}
    rows = []
    for arch, width in (("dcgan", 64), ("resnet", 32)):
        base = C.load(None, {"data.path": str(tmp / "data"), "model.arch": arch, "model.width": width,
                             "data.batch_size": 64, "train.steps": steps, "train.log_every": max(5, steps // 6),
                             "train.checkpoint_every": 10**6})
        base = resolve_data(base)
        flops = step_flops(base)
        plain = plain_loop(base, images, steps)
        one = distgan_run(base, 1, str(tmp / "runs"), f"{arch}-1")
        two = distgan_run(base, 2, str(tmp / "runs"), f"{arch}-2")
        amp_cfg = C.apply_overrides(base, {"train.amp": "bf16"})
        plain_bf16 = plain_loop(amp_cfg, images, bf16_steps, warmup=1)  # a few steps: see the note on bf16 below
        bs = base.data.batch_size
        gflops = lambda ips: flops * ips / bs / 1e9  # FLOPs per step x steps/s
        rows.append({
            "arch": f"{arch} (width {width})", "GFLOP/step": flops / 1e9,
            "plain img/s": plain, "distgan 1w img/s": one, "distgan 2w img/s": two,
            "1w / plain": one / plain, "2w / plain": two / plain,
            "plain GFLOP/s": gflops(plain), "% of conv peak": 100 * gflops(plain) / peak[False],
            "bf16 plain img/s": plain_bf16, "bf16 % of bf16 peak": 100 * gflops(plain_bf16) / peak[True],
        })
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16_hw = "avx512_bf16" in flags or "amx_bf16" in flags
    notes = (f"bf16 autocast on this CPU: {'native (avx512_bf16/amx_bf16 present)' if bf16_hw else 'no avx512_bf16 or amx_bf16 flag, so bf16 kernels are emulated and slower than fp32'}; "
             f"measured over {bf16_steps} step(s). "
             f"Dense ceiling measured in the same run: 3x3 conv {peak[False]:.0f} GFLOP/s fp32, "
             f"{peak[True]:.0f} GFLOP/s bf16 autocast ({THREADS} threads). Batch 64 per worker, 1-channel 32x32 "
             f"images, {steps} steps; distgan img/s is the median of its report windows after the first. "
             "2 workers split the same 2 cores (1 thread each) and add gloo all-reduces: on one machine they "
             "measure overhead, not scaling.")
    write_results("train_throughput", rows, list(rows[0]), "python -m benchmarks.train_throughput", notes, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
