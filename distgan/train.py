"""Data-parallel GAN training on Ray Train.

Ray touches the loop in five numbered places: [1] dataset shard, [2] restore,
[3] prepare_model, [4] report (+ checkpoint), [5] the trainer on the driver.
The global batch is `data.batch_size * train.num_workers` real images per D step.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import config as C
from . import faults
from .config import Config, UserError
from .data import decode_images, open_dataset, ray_data_console, read_manifest, save_grid, to_device, to_uint8
from .models import STATE_FILE, build_discriminator, build_generator, load_state, resolve_amp, unwrap
from .storage import Loc, check_access, in_fs, loc, upload_dir
from .faults import FAULT_ENV, fault_at, slow_down  # noqa: F401  (FAULT_ENV re-exported for the tests)
from .objectives import steps_for
from .steps import FiniteGuard, Nets, NonFiniteError, ema_update, sample_z



class TrainingDiverged(UserError):
    pass


# ---------------------------------------------------------------- checkpoints


def build_nets(cfg: Config, device) -> Nets:
    device = torch.device(device)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    fmt = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    G = build_generator(cfg.model).to(device, memory_format=fmt)
    D = build_discriminator(cfg.model, cfg.objective.name).to(device, memory_format=fmt)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    o = cfg.optim
    # fused=True: one kernel per step, and the only Adam that takes `found_inf` on the device,
    # which is how a non-finite update is skipped without a host sync (steps.py).
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2), fused=True)
    amp = resolve_amp(cfg.train.amp, device)
    scalers = [torch.amp.GradScaler(device.type, enabled=amp == "fp16") for _ in range(2)]
    return Nets(G, D, G_ema, opt_g, opt_d, amp=amp, scaler_g=scalers[0], scaler_d=scalers[1],
                guard=FiniteGuard(device))


def state_dict(nets: Nets, cfg: Config, step: int, epoch: int, metrics: dict | None = None) -> dict:
    """Plain tensors, numbers and strings only: loadable with weights_only=True."""
    return {
        "format": "distgan-checkpoint-v1",
        "G": unwrap(nets.G).state_dict(),
        "D": unwrap(nets.D).state_dict(),
        "G_ema": nets.G_ema.state_dict(),
        "opt_g": nets.opt_g.state_dict(),
        "opt_d": nets.opt_d.state_dict(),
        "scaler_g": nets.scaler_g.state_dict() if nets.scaler_g and nets.scaler_g.is_enabled() else {},
        "scaler_d": nets.scaler_d.state_dict() if nets.scaler_d and nets.scaler_d.is_enabled() else {},
        "step": step,
        "epoch": epoch,
        "config": C.to_dict(cfg),
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))},  # the report it was saved with
    }


def restore(nets: Nets, state: dict, cfg: Config) -> None:
    unwrap(nets.G).load_state_dict(state["G"])
    unwrap(nets.D).load_state_dict(state["D"])
    nets.G_ema.load_state_dict(state["G_ema"])
    for opt, key in ((nets.opt_g, "opt_g"), (nets.opt_d, "opt_d")):
        _load_optimizer(opt, state[key])
    for scaler, key in ((nets.scaler_g, "scaler_g"), (nets.scaler_d, "scaler_d")):
        if scaler is not None and scaler.is_enabled() and state.get(key):
            scaler.load_state_dict(state[key])
    # Re-apply the config's learning rates and betas: under PBT the checkpoint may
    # come from another trial whose hyperparameters have since been mutated.
    o = cfg.optim
    for opt, lr in ((nets.opt_g, o.lr_g), (nets.opt_d, o.lr_d)):
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr, (o.beta1, o.beta2)


def _load_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load Adam state, keeping this optimizer's implementation flags: a checkpoint written by
    a non-fused Adam (older distgan) must not turn fused off, since the steps rely on it."""
    keep = ("fused", "foreach", "capturable")
    groups = [{**g, **{k: mine[k] for k in keep if k in mine}} for g, mine in zip(saved["param_groups"], opt.param_groups)]
    opt.load_state_dict({**saved, "param_groups": groups})


def save_untrained_checkpoint(cfg: Config, path) -> str:
    """A step-0 checkpoint of freshly initialised nets: the random-D control for
    embeddings, and the input of smoke tests. `path` is the checkpoint folder (local or a
    URI); returns its URI."""
    import io

    buf = io.BytesIO()
    torch.save(state_dict(build_nets(cfg, "cpu"), cfg, 0, 0), buf)
    (loc(path) / STATE_FILE).write_bytes(buf.getvalue())
    return loc(path).uri


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


# ---------------------------------------------------------------- run directory (rank 0)


class RunLog:
    """metrics.jsonl, TensorBoard event files and sample grids in the run's storage folder
    (rank 0 only). They are written to a local folder and, when the run lives in object
    storage, uploaded there after every report: no node's disk holds the only copy."""

    def __init__(self, run_dir: Loc | None, resume_step: int):
        self.run_dir = run_dir
        self.tb = self.staging = None
        if run_dir is None:
            return
        self.staging = None if run_dir.is_local else tempfile.TemporaryDirectory(prefix="distgan-runlog-")
        self.local = run_dir.local_path() if run_dir.is_local else Path(self.staging.name)
        self.local.mkdir(parents=True, exist_ok=True)
        self.metrics = self.local / "metrics.jsonl"
        stored = run_dir / "metrics.jsonl"
        if stored.is_file():  # drop lines an interrupted attempt wrote past the checkpoint
            keep = [line for line in stored.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.metrics.write_text("".join(line + "\n" for line in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.local / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a dependency, but a stripped install should still train
            self.tb = None

    def write(self, metrics: dict) -> None:
        if self.run_dir is None:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()
        if self.staging:  # every file is small (metrics, event files): the whole folder each time
            upload_dir(self.local, self.run_dir)

    def samples(self, samples, step: int) -> None:
        if self.run_dir is not None:
            save_grid(samples, self.run_dir / "samples" / f"step_{step:07d}.png")

    def close(self):
        if self.tb:
            self.tb.close()
        if self.staging:
            upload_dir(self.local, self.run_dir)
            self.staging.cleanup()


def _run_dir(cfg_run_dir: str) -> Loc | None:
    return loc(cfg_run_dir) if cfg_run_dir else None


# ---------------------------------------------------------------- the loop


def _maybe_crash(rank: int, world: int, run_dir: Loc | None) -> None:
    marker = (run_dir or loc(tempfile.gettempdir())) / ".fault_injected"
    if rank == min(1, world - 1) and not marker.exists():
        marker.write_text("")  # once: the restarted attempt must get past this step
        raise RuntimeError(f"injected fault: rank {rank} crashed")


def _quiet_report_log() -> None:
    """Train V2 logs every report (the whole metrics dict) at INFO on a logger named after
    its source file, outside the "ray.train" tree that LoggingConfig sets; the progress
    line says the same in one line."""
    import importlib.util

    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> dict:
    import ray.train
    import ray.train.torch

    cfg = C.from_dict(loop_config["config"])
    run_dir = _run_dir(loop_config.get("run_dir", ""))
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.threads_per_worker or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    nets = build_nets(cfg, device)
    step, epoch = 0, 0
    # [2] Restore: Ray hands back the latest checkpoint after a worker failure, or
    # when the same run (storage + name) is started again.
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_state(d)
    elif loop_config.get("init_from"):  # a run that starts from another run's checkpoint (PBT exploit)
        state = load_state(loop_config["init_from"])
    if state is not None:
        restore(nets, state, cfg)
        step, epoch = state["step"], state["epoch"]
    torch.manual_seed(cfg.train.seed + 7919 * rank + step)  # ranks draw different z and augmentations
    # [3] Wrap G and D each in its own DDP. D gets broadcast_buffers=False: with the
    # default, DDP re-broadcasts BatchNorm buffers in place at every forward, and D's
    # two forwards (real, then fake) before one backward fail with "modified by an
    # inplace operation" (pytorch/pytorch#65907). BatchNorm trains on batch statistics,
    # so per-rank running stats change nothing in training; rank 0's are checkpointed
    # (and `distgan embed` re-estimates them on real images anyway).
    nets.G = ray.train.torch.prepare_model(nets.G)
    nets.D = ray.train.torch.prepare_model(nets.D, parallel_strategy_kwargs={"broadcast_buffers": False})
    nets.G_ema.to(device)

    log = RunLog(run_dir, step) if rank == 0 else RunLog(None, step)
    # Optional quality metrics (evaluate.py), built on rank 0 only; a factory so
    # this module need not import the evaluation stack.
    make_eval = loop_config.get("evaluator")
    evaluator = make_eval(cfg) if (make_eval and rank == 0 and cfg.eval.every) else None
    fixed_z = sample_z(cfg.train.num_samples, cfg.model.z_dim, "cpu", torch.Generator().manual_seed(1234)).to(device)
    # [1] This worker's shard of the dataset, streamed from Parquet by Ray Data.
    shard = ray.train.get_dataset_shard("train")
    m = cfg.model
    bs = cfg.data.batch_size

    def batches():
        """Endless (bs, H, W, C) uint8 batches. The first epoch streams from Ray Data;
        a shard that fits in data.worker_cache_mb is then kept and reshuffled locally,
        because restarting a streaming split costs seconds per epoch on small sets."""
        nonlocal epoch
        cache, cached_bytes = [], 0
        limit = cfg.data.worker_cache_mb * 2**20
        rng = np.random.default_rng(cfg.train.seed + rank)
        while True:
            if cache and epoch > 0:
                pool = cache[0] if len(cache) == 1 else np.concatenate(cache)
                cache = [pool]
                order = rng.permutation(len(pool))
                for i in range(0, len(order) - bs + 1, bs):
                    yield pool[order[i : i + bs]]
                epoch += 1
                continue
            got = False
            # Seeded like the z draws: with one read block per worker (the digits demo) the
            # whole run repeats exactly; with many blocks their arrival order still varies.
            for batch in shard.iter_batches(batch_size=bs, drop_last=True, batch_format="numpy",
                                            local_shuffle_buffer_size=4 * bs,
                                            local_shuffle_seed=cfg.train.seed + 7919 * rank + epoch):
                got = True
                images = decode_images(batch["image"], m.resolution, m.channels)
                if limit and cached_bytes + images.nbytes <= limit:
                    cache.append(images)
                    cached_bytes += images.nbytes
                else:
                    limit = 0  # too big: stream every epoch
                    cache.clear()
                yield images
            if not got:
                raise UserError(f"a worker's shard holds fewer than data.batch_size={bs} images; lower the batch size or use fewer workers")
            epoch += 1

    if state is not None and step >= cfg.train.steps:
        # Restored at the final step (a rerun, or a Tune trial resumed after it finished
        # training): report the saved metrics once, so callers see the run's end state.
        ray.train.report({**state.get("metrics", {}), "step": step, "epoch": epoch})
    stream = batches()
    started = time.monotonic()  # for train.minutes: this attempt's own clock
    d_step, g_step = steps_for(cfg)  # the objective's D and G updates (objectives.py); g_step None: no G step
    window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
    acc: dict[str, list] = {}
    diverged = None
    reported, last_eval = False, {}
    while step < cfg.train.steps:
        for _ in range(cfg.optim.n_critic):
            t = time.perf_counter()
            images = next(stream)
            window["wait"] += time.perf_counter() - t
            real = to_device(images, device, cfg.train.channels_last)  # (bs, C, H, W) in [-1, 1]
            if fault_at(step + 1) == "nan":
                real = real * float("nan")
            out = d_step(nets, real, cfg, step + 1)
        if g_step is not None:
            out |= g_step(nets, bs, device, cfg, step + 1)
        ema_update(nets.G_ema, nets.G, cfg.optim.ema_decay)
        step += 1
        window["steps"] += 1
        slow_down()
        for k, v in out.items():
            acc.setdefault(k, []).append(v.detach())
        # Evaluate every eval.every steps, at the end, and at an attempt's first report, so
        # every report can carry eval/* metrics (Tune's schedulers compare them at each rung).
        at_log = step % cfg.train.log_every == 0
        if at_log and cfg.train.minutes and _time_is_up(started, cfg.train.minutes, device):
            cfg = replace(cfg, train=replace(cfg.train, steps=step))  # this report is the last, with a checkpoint
        eval_now = bool(cfg.eval.every) and (step % cfg.eval.every == 0 or step == cfg.train.steps or not reported)
        if at_log or step == cfg.train.steps or step % cfg.train.checkpoint_every == 0 or eval_now:
            try:
                # The one host read of the steps' health per report, before anything is written:
                # a NaN stops every rank here, at the same report, with no checkpoint of it.
                nets.guard.check()
            except NonFiniteError as e:
                diverged = str(e)
                break
            elapsed = time.perf_counter() - window["t0"]
            metrics = {"step": step, "epoch": epoch}
            if not reported and state is not None:
                metrics["resumed_at"] = state["step"]  # this attempt's first report: where it restarted from
            # one stack and one device->host copy for every metric of the window
            names = sorted(acc)
            means = torch.stack([torch.stack(acc[k]).float().nanmean() for k in names]).tolist()
            metrics |= dict(zip(names, means))
            metrics["img_per_s"] = window["steps"] * cfg.optim.n_critic * bs * world / elapsed
            metrics["data_wait_frac"] = window["wait"] / elapsed
            acc.clear()
            if eval_now and evaluator is not None:
                last_eval = evaluator(nets.G_ema, nets.D, step)
            metrics |= last_eval
            reported = True
            window.update(t0=time.perf_counter(), wait=0.0, steps=0)
            ckpt_now = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
            _report(metrics, nets, cfg, step, epoch, fixed_z, rank, log, ckpt_now)
        if fault_at(step) == "crash":
            _maybe_crash(rank, world, run_dir)
    log.close()
    return {"diverged": diverged, "step": step, "workers": _replica_report(nets, rank)}


def _time_is_up(started: float, minutes: float, device) -> bool:
    """Whether any rank has used up train.minutes: one all-reduce (MAX) per log step, so every
    rank stops after the same step."""
    import torch.distributed as dist

    up = torch.tensor([float(time.monotonic() - started >= 60 * minutes)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(up, op=dist.ReduceOp.MAX)
    return bool(up.item())


def _replica_report(nets: Nets, rank: int) -> list[dict]:
    """Every rank's node and a float64 fingerprint of its G and D parameters, gathered
    on all ranks: DDP replicas that drifted apart show different fingerprints."""
    import ray
    import torch.distributed as dist

    def fingerprint(module):
        return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in module.parameters()))

    me = {"rank": rank, "node": ray.get_runtime_context().get_node_id(),
          "G": fingerprint(unwrap(nets.G)), "D": fingerprint(unwrap(nets.D))}
    if not (dist.is_available() and dist.is_initialized()):
        return [me]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return everyone


def _report(metrics, nets, cfg, step, epoch, fixed_z, rank, log: RunLog, with_checkpoint: bool) -> None:
    import ray.train

    if rank == 0:
        log.write(metrics)
        # To the process's own stdout: Train V2 patches print() to tee into its logger as
        # well, which put every progress line on the driver's console twice.
        shown = " ".join(f"{k} {metrics[k]:.3f}" for k in ("loss/d", "loss/g", "loss/nt_xent", "loss/rec") if k in metrics)
        if "d/real" in metrics:
            shown += f" D(real) {metrics['d/real']:+.2f} D(fake) {metrics['d/fake']:+.2f}"
        print(f"[distgan] step {step}/{cfg.train.steps} epoch {epoch} {shown} {metrics['img_per_s']:.0f} img/s",
              file=sys.__stdout__, flush=True)
    if not with_checkpoint:
        ray.train.report(metrics)  # [4] every worker reports the same number of times
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            if not (_all_finite(unwrap(nets.G)) and _all_finite(unwrap(nets.D))):
                raise NonFiniteError(f"non-finite weights at step {step}; checkpoint not written")
            torch.save(state_dict(nets, cfg, step, epoch, metrics), Path(tmp) / STATE_FILE)
            with torch.no_grad():
                samples = to_uint8(nets.G_ema(fixed_z))
            grid = Path(tmp) / "samples.png"
            save_grid(samples, grid)
            log.samples(samples, step)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:07d}")


# ---------------------------------------------------------------- driver


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    checkpoint: str | None
    step: int
    metrics: dict
    workers: list  # per rank: node id and parameter fingerprints (replicas must agree)


def resolve_data(cfg: Config) -> Config:
    """Fill model.resolution/channels from the prepared dataset's manifest."""
    if not cfg.data.path:
        raise UserError("no training data: pass --data DIR (a folder from `distgan prepare`)")
    manifest = read_manifest(cfg.data.path)
    model = replace(cfg.model, resolution=manifest["resolution"], channels=manifest["channels"])
    data = replace(cfg.data, path=loc(cfg.data.path).uri)  # absolute, or the URI as given
    cfg = C.validate(replace(cfg, model=model, data=data))
    C.validate_for_data(cfg)
    return cfg


def train_bundles(cfg: Config) -> list[dict]:
    """What one training run holds at once: its workers (CPU, GPU) and one CPU for Ray Data's reads."""
    w = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    return [w] * cfg.train.num_workers + [{"CPU": 1}]


def build_trainer(cfg: Config, storage: str, name: str, callbacks=None, evaluator=None, init_from: str | None = None):
    """[5] The TorchTrainer for one run; `fit()` it, or run it inside a Tune trial."""
    import ray.train
    from ray.train.torch import TorchTrainer

    where = loc(storage)
    # Ray Data's per-operator bars would flood the console next to distgan's progress line (also
    # in a Tune trial's driver_fn, a worker that init_ray never ran in).
    ray_data_console()
    dataset = open_dataset(cfg.data.path, cfg.data.split, seed=cfg.train.seed)
    run_dir = (where / name).uri
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": C.to_dict(cfg), "run_dir": run_dir, "evaluator": evaluator, "init_from": init_from},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            # Ray Train's own storage filesystem: checkpoints go straight to the store.
            storage_path=where.path, storage_filesystem=where.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env=faults.runtime_env(),
            callbacks=callbacks,
            # Ray Train's per-report INFO lines would drown distgan's own progress line.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
    )


def run_training(cfg: Config, storage: str = "runs", name: str = "distgan", evaluator=None) -> TrainResult:
    """Train (or resume: same storage and name) and return where things landed.
    `evaluator`: a factory cfg -> callable(G_ema, D, step) -> metrics, e.g. evaluate.make_evaluator."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    from .capacity import wait_for

    cfg = resolve_data(cfg)
    check_access(loc(storage), write=True)
    wait_for(train_bundles(cfg), "training")  # a cluster scaled to zero grows first; a cluster too small says so
    trainer = build_trainer(cfg, storage, name, evaluator=evaluator)
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise RuntimeError(f"training failed: {e}") from e
    ret = result.return_value or {}
    ckpt = in_fs(result.checkpoint.filesystem, result.checkpoint.path, loc(storage)).uri if result.checkpoint else None
    if ret.get("diverged"):
        raise TrainingDiverged(
            f"training diverged: {ret['diverged']}; last good checkpoint: {ckpt or 'none'} "
            "(lower the learning rates, try loss.name=hinge, or disable train.amp)"
        )
    return TrainResult(run_dir=(loc(storage) / name).uri, checkpoint=ckpt, step=int(ret.get("step", 0)),
                       metrics=dict(result.metrics or {}), workers=ret.get("workers", []))
