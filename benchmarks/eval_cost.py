"""What in-training evaluation costs next to the training it interrupts.

Measured in one run, on the same data and thread count as a training worker:
the training step time of a DCGAN (1 worker, no evaluation, from the run's own
img_per_s) and the wall time of one evaluation (FID/KID in the domain
classifier's features, NMI and probe accuracy on D embeddings) for two values
of eval.num_images; then the share of wall time evaluation takes for several
eval.every values: eval_s / (eval_s + every x step_s).

    python -m benchmarks.eval_cost [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distgan import config as C
from distgan.data import init_ray, prepare
from distgan.evaluate import Evaluator, train_classifier
from distgan.train import build_nets, resolve_data, run_training

from .common import DATASETS, REPO, write_results

EVERY = (250, 500, 1000, 2000)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="digits, a short run, small evaluations")
    args = p.parse_args(argv)
    real = not args.quick and (DATASETS / "MNIST" / "raw").is_dir()
    source = "mnist" if real else "digits"
    sizes = (1000, 5000) if real else (200, 400)
    steps = 200 if not args.quick else 20
    tmp = Path(tempfile.mkdtemp(prefix="distgan-evalcost-"))
    data = tmp / source
    prepare(source, data, data_root=DATASETS if real else None, progress=False)
    clf = tmp / "clf.pt"
    train_classifier(data, clf, epochs=1 if real else 5, progress=False)
    # The model users train on MNIST (jobs/configs/dcgan_mnist.yaml), one worker.
    cfg = resolve_data(C.load(REPO / "jobs" / "configs" / "dcgan_mnist.yaml", {
        "data.path": str(data), "train.steps": steps, "train.log_every": max(steps // 4, 1),
        "train.checkpoint_every": steps}))
    init_ray()
    res = run_training(cfg, storage=str(tmp / "runs"), name="noeval")
    reports = [json.loads(l) for l in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    img_s = statistics.median(r["img_per_s"] for r in reports[1:] or reports)  # the first window holds warm-up
    step_s = cfg.data.batch_size * cfg.optim.n_critic / img_s
    torch.set_num_threads(cfg.train.cpus_per_worker)  # what a training worker runs with
    nets = build_nets(cfg, "cpu")
    rows = []
    for n in sizes:
        ev = Evaluator(C.apply_overrides(cfg, {"eval.every": 1, "eval.num_images": n, "eval.classifier": str(clf)}))
        ev(nets.G_ema, nets.D, 0)  # warm-up: first-call allocations
        times = []
        for rep in range(3):
            t = time.perf_counter()
            ev(nets.G_ema, nets.D, rep + 1)
            times.append(time.perf_counter() - t)
        eval_s = statistics.median(times)
        for every in EVERY:
            rows.append({"eval.num_images": n, "eval seconds": eval_s, "train step seconds": step_s,
                         "eval.every": every, "share of wall time": eval_s / (eval_s + every * step_s)})
    notes = (f"{source}, DCGAN width {cfg.model.width}, batch {cfg.data.batch_size}, 1 worker, "
             f"{cfg.train.cpus_per_worker} thread(s); training step from the median img_per_s of a {steps}-step run "
             f"without evaluation ({img_s:.0f} img/s); one evaluation = generate, classifier features, FID + KID, "
             "D embeddings with BatchNorm re-estimated, k-means NMI and a probe, median of 3.")
    write_results("eval_cost", rows, ["eval.num_images", "eval seconds", "train step seconds", "eval.every",
                                      "share of wall time"], "python -m benchmarks.eval_cost", notes, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
