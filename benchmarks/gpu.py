"""The GPU path, measured in one run on one device:

- img/s of a plain single-process PyTorch loop against distgan on Ray Train with one
  GPU worker (same model, batch, precision), for DCGAN and ResNet;
- the achieved TFLOP/s as a fraction of the device's dense bf16 peak (its data-sheet
  figure where known, and a large bf16 GEMM measured in the same run), with the
  profiler's top kernels of the plain loop;
- the levers, each measured on the plain loop: per-GPU batch, channels_last, torch.compile;
- embedding img/s (bf16/fp16 autocast, the actors' path).

    python -m benchmarks.gpu [--quick]             # on a CUDA machine
    python -m benchmarks.gpu --quick --device cpu  # a smoke run of the same code on a CPU
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
from distgan.models import resolve_amp
from distgan.steps import d_step, g_step
from distgan.train import build_nets, resolve_data

from .common import write_results
from .train_throughput import distgan_run, plain_loop, step_flops

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
DENSE_BF16_PEAK = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                   "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


def nominal_peak(name: str) -> float | None:
    for key, peak in DENSE_BF16_PEAK.items():
        if all(part in name for part in key.split()):
            return peak
    return None


def gemm_ceiling(device: str, dtype=torch.bfloat16, n: int = 8192, reps: int = 10) -> float:
    """Best-of TFLOP/s of an (n x n) @ (n x n) matmul: what this device reaches on the easiest kernel."""
    if device == "cpu":
        n, reps, dtype = 1024, 3, torch.float32  # bf16 is emulated on most CPUs; fp32 is the CPU ceiling
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def top_kernels(cfg, images: np.ndarray, device: str, steps: int = 5, top: int = 8) -> list[dict]:
    """The profiler's most expensive kernels over a few plain-loop steps (self device time)."""
    from torch.profiler import ProfilerActivity, profile

    nets = build_nets(cfg, device)
    bs = cfg.data.batch_size
    for i in range(2):  # warm-up outside the trace
        d_step(nets, to_device(images[:bs], device, cfg.train.channels_last), cfg, i + 1)
        g_step(nets, bs, device, cfg, i + 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            d_step(nets, to_device(images[:bs], device, cfg.train.channels_last), cfg, i + 3)
            g_step(nets, bs, device, cfg, i + 3)
        if device == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    return [{"kernel": e.key[:80], "share": getattr(e, attr) / total, "calls": e.count} for e in events[:top]]


def embed_rate(cfg, images: np.ndarray, device: str, amp: str, batch: int) -> float:
    from distgan.embed import embed_images

    D = build_nets(cfg, device).D.eval()
    embed_images(D, images[:batch], "multi", device=device, batch_size=batch, amp=amp)  # warm-up
    t = time.perf_counter()
    embed_images(D, images, "multi", device=device, batch_size=batch, amp=amp)
    return len(images) / (time.perf_counter() - t)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    device, quick = args.device, args.quick
    on_gpu = device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a smoke run")
    steps = (10 if quick else 60) if on_gpu else 3
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    amp = resolve_amp("auto", device)
    from distgan.data import init_ray

    init_ray()
    tmp = Path(tempfile.mkdtemp(prefix="distgan-gpu-bench-"))
    n_img = 8192 if on_gpu else 512
    prepare("fake", tmp / "data", fake_count=n_img, resolution=32, progress=False)
    images = decode_images(read_arrays(tmp / "data")["image"], 32, 1)
    ceiling = gemm_ceiling(device)
    peak = nominal_peak(name)
    bs = (256 if on_gpu else 32)
    rows, levers, kernels = [], [], {}
    for arch, width in (("dcgan", 64), ("resnet", 128 if on_gpu else 32)):
        base = resolve_data(C.load(None, {
            "data.path": str(tmp / "data"), "model.arch": arch, "model.width": width, "model.spectral_norm": arch == "resnet",
            "data.batch_size": bs, "train.steps": steps, "train.log_every": max(2, steps // 6),
            "train.checkpoint_every": 10**6, "train.amp": amp, "train.use_gpu": on_gpu}))
        flops = step_flops(base, device)  # per (D + G) step at this batch
        tflops = lambda ips, b=bs: flops * ips / b / 1e12
        plain = plain_loop(base, images, steps, device=device)
        one = distgan_run(base, 1, str(tmp / "runs"), f"{arch}-1")
        rows.append({"arch": f"{arch} (width {width})", "batch": bs, "amp": amp, "GFLOP/step": flops / 1e9,
                     "plain img/s": plain, "distgan 1w img/s": one, "1w / plain": one / plain,
                     "plain TFLOP/s": tflops(plain), "% of GEMM ceiling": 100 * tflops(plain) / ceiling,
                     "% of data-sheet bf16 peak": 100 * tflops(plain) / peak if peak else "n/a"})
        # The levers, one at a time against the row above (plain loop, same precision).
        for lever, overrides, compile_ in [
            ("batch 64", {"data.batch_size": 64}, False),
            ("batch 1024", {"data.batch_size": 1024 if on_gpu else 64}, False),
            ("channels_last", {"train.channels_last": True}, False),
            ("torch.compile", {}, True),
        ]:
            if quick and not on_gpu and lever != "channels_last":
                continue  # CPU smoke run: one lever is enough to exercise the code
            cfg = C.apply_overrides(base, overrides)
            b = cfg.data.batch_size
            t = time.perf_counter()
            ips = plain_loop(cfg, images, steps, device=device, compile=compile_)
            levers.append({"arch": arch, "lever": lever, "img/s": ips, "vs baseline": ips / plain,
                           "TFLOP/s": step_flops(cfg, device) * ips / b / 1e12, "wall s": time.perf_counter() - t})
        kernels[arch] = top_kernels(base, images, device)
        emb_batch = 1024 if on_gpu else 128
        rows[-1]["embed img/s"] = embed_rate(base, np.concatenate([images] * (4 if on_gpu else 1)), device, amp, emb_batch)
    lines = [f"Device: {name}; precision {amp}; data-sheet dense bf16 peak "
             f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown for this device'}; measured "
             f"{'bf16' if on_gpu else 'fp32'} GEMM ceiling {ceiling:.1f} TFLOP/s (same run). 1-channel 32x32 images (the procedural fake set), "
             f"{steps} steps per measurement; distgan img/s is the median of its report windows after the first.",
             "", "Levers (plain loop, one change each against the row's baseline):", ""]
    from .common import markdown_table

    lines.append(markdown_table(levers, ["arch", "lever", "img/s", "vs baseline", "TFLOP/s", "wall s"]))
    for arch, ks in kernels.items():
        lines += [f"Top kernels, {arch} (share of {'GPU' if on_gpu else 'CPU'} self time over 5 steps):", "",
                  markdown_table(ks, ["kernel", "share", "calls"])]
    write_results("gpu", rows, list(rows[0]), f"python -m benchmarks.gpu --device {device}", "\n".join(lines), quick=quick)
    out = (Path(__file__).parent / "results" / ("quick" if quick else "") / "gpu_details.json")
    out.write_text(json.dumps({"levers": levers, "kernels": kernels, "gemm_tflops": ceiling, "peak": peak,
                               "device": name}, indent=2))
    return rows


if __name__ == "__main__":
    main()
