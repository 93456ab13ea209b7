"""Ray Tune sweeps over GAN architectures, losses and optimiser settings.

Current Ray pattern (Train V2): `Tuner(driver)` runs one driver function per
trial; the driver runs a `TorchTrainer` named after the trial id, and
`TuneReportCallback` forwards every rank-0 report to Tune. ASHA and FIFO use
that directly. PBT needs checkpoints Tune can hand from trial to trial, so under
PBT the driver trains in segments of `perturbation_interval` steps and reports
each segment's checkpoint itself; a restored trial starts a fresh run from that
checkpoint, and `train.restore` re-applies the (possibly mutated) learning rates.

A space file maps dotted config keys to distributions:
    model.arch: {choice: [dcgan, resnet]}
    optim.lr_d: {loguniform: [1.0e-5, 1.0e-3]}
    optim.n_critic: {randint: [1, 5]}        # high end exclusive, as in Ray
    loss.name: {grid: [ns, hinge]}            # every value, times num samples
"""
from __future__ import annotations

import difflib
import hashlib
import math
import io
from pathlib import Path
from typing import Any

from . import config as C
from .config import Config, UserError
from .capacity import driver_resources
from .storage import Loc, check_access, in_fs, loc

KINDS = ("choice", "uniform", "loguniform", "randint", "grid")
TRAIN_METRICS = ("loss/d", "loss/g", "d/real", "d/fake", "grad_norm/d", "grad_norm/g", "img_per_s", "data_wait_frac")
DRIVER_CPU = 0.01  # a trial driver only waits on its TorchTrainer


# ---------------------------------------------------------------- the space


def load_space(path: str | Path, base: Config | None = None) -> dict[str, dict]:
    """Read and check a space file: every key a config key, every distribution well formed,
    and every combination it can sample of the keys validate() relates (arch, resolution,
    spectral norm, loss) valid on top of `base`, so no trial fails for a combination."""
    import yaml

    p = loc(path)
    if not p.is_file():
        raise UserError(f"space file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{p}: a space maps dotted config keys to distributions, e.g. 'optim.lr_d: {{loguniform: [1e-5, 1e-3]}}'")
    keys = C.all_keys()
    space = {}
    for key, dist in raw.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            raise UserError(f"space key '{key}' is not a config key" + (f"; close: {', '.join(close)}" if close else ""))
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
            raise UserError(f"space key '{key}': give exactly one of {', '.join(KINDS)}, e.g. {{choice: [a, b]}}")
        kind, args = next(iter(dist.items()))
        _check_distribution(key, kind, args)
        space[key] = {kind: args}
    check_combinations(space, base or Config(), p)
    return space


def check_combinations(space: dict[str, dict], base: Config, where: str | Path = "space") -> None:
    import itertools

    keys = [k for k in C.COMBINATION_KEYS if k in space and next(iter(space[k])) in ("choice", "grid")]
    if not keys:
        return
    for values in itertools.product(*(next(iter(space[k].values())) for k in keys)):
        sample = dict(zip(keys, values))
        try:
            C.apply_overrides(base, sample)
        except UserError as e:
            combo = ", ".join(f"{k}={v}" for k, v in sample.items())
            raise UserError(f"{where} can sample {combo}, which is not valid: {e}") from None


def _check_distribution(key: str, kind: str, args: Any) -> None:
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise UserError(f"space key '{key}': {kind} needs a non-empty list of values")
        for v in args:  # every value must be valid for the key (type and allowed names)
            C.apply_overrides(Config(), {key: v}, combinations=False)
        return
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)):
        raise UserError(f"space key '{key}': {kind} needs [low, high], got {args!r}")
    lo, hi = args
    if not lo < hi:
        raise UserError(f"space key '{key}': {kind} bounds must satisfy low < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise UserError(f"space key '{key}': loguniform needs low > 0, got {lo}")
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise UserError(f"space key '{key}': randint needs integer bounds, got [{lo}, {hi}]")
    C.apply_overrides(Config(), {key: lo if kind != "randint" else int(lo)}, combinations=False)


def to_tune(space: dict[str, dict]) -> dict:
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {key: make[kind](args) for key, d in space.items() for kind, args in d.items()}


# ---------------------------------------------------------------- metrics and resources


LABEL_FREE = ["eval/stability", "eval/silhouette", "eval/davies_bouldin"]  # cluster/criteria.py
LABELLED = ["eval/nmi", "eval/probe_acc"]


def available_metrics(cfg: Config, labelled: bool) -> list[str]:
    out = list(TRAIN_METRICS)
    if cfg.eval.every:
        if cfg.eval.classifier or cfg.eval.inception_weights:
            out += ["eval/fid", "eval/kid"]
        out += LABEL_FREE
        if labelled:
            out += LABELLED
    return out


def wait_for_trial(cfg: Config) -> dict:
    """The cluster's resources once one trial fits (an autoscaling cluster is asked to grow)."""
    from .capacity import wait_for
    from .train import train_bundles

    try:
        return wait_for(train_bundles(cfg), "one trial")
    except UserError as e:
        raise UserError(f"{e} (lower --workers-per-trial)") from None


def check_resources(cfg: Config, resources: dict) -> int:
    """Trials that fit at once on this cluster; a one-line error when not even one does."""
    w, cpw = cfg.train.num_workers, cfg.train.cpus_per_worker
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    need_gpu = w if cfg.train.use_gpu else 0
    if w * cpw + 1 > cpus or need_gpu > gpus:
        raise UserError(
            f"one trial needs {w} worker(s) x {cpw} CPU + 1 CPU for data" + (f" + {need_gpu} GPU" if need_gpu else "")
            + f" but the cluster has {cpus:g} CPU and {gpus:g} GPU; lower --workers-per-trial or add nodes"
        )
    # Per trial: its workers, one CPU for Ray Data's read tasks, and the driver's
    # sliver (0.01 CPU). Trials that cannot all get their data tasks scheduled
    # deadlock, so this count is a ceiling, not a hint.
    fit = int(cpus // (w * cpw + 1 + DRIVER_CPU))
    if need_gpu:
        fit = min(fit, int(gpus // need_gpu))
    return max(1, fit)


# ---------------------------------------------------------------- the trial driver


def trial_driver(config: dict, meta: dict) -> None:
    """One Tune trial: base config (`meta`) + this trial's sampled overrides -> a TorchTrainer run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import TrainingDiverged, build_trainer

    cfg = C.apply_overrides(C.from_dict(meta["base"]), dict(config))
    trial_id = tune.get_context().get_trial_id()
    evaluator = None
    if cfg.eval.every:
        from .evaluate import make_evaluator

        evaluator = make_evaluator
    if meta["scheduler"] != "pbt":
        trainer = build_trainer(cfg, meta["storage"], trial_id, callbacks=[TuneReportCallback()], evaluator=evaluator)
        _finish(trainer.fit(), TrainingDiverged)
        return
    # PBT: segments ending at checkpoints Tune can copy between trials.
    name, init_from, lineage = trial_id, None, {}
    storage = loc(meta["storage"])
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # exploited (another trial's weights) or restored: a fresh run from it
        # Its location in the sweep's storage, never a copy on this node's disk: the training
        # workers that load it may run on other nodes.
        where = in_fs(ckpt.filesystem, ckpt.path, storage)
        init_from = where.uri
        name = f"{trial_id}-{hashlib.sha1(init_from.encode()).hexdigest()[:8]}"
        # tune_step.json travels inside the checkpoint: the step it ends at, the trial that wrote it
        # (another trial's id after an exploit, this trial's own after a pause) and the metrics it
        # reported with it, its lineage (pbt/*) among them.
        saved = (where / "tune_step.json").read_json()
        if saved["trial"] == trial_id:  # paused and resumed: its own weights, its earlier lineage
            lineage = {k: v for k, v in saved["metrics"].items() if k.startswith("pbt/")}
        else:
            lineage = {"pbt/restored_from": saved["trial"], "pbt/restored_at": saved["step"]}
        step = saved["step"]
    else:
        step = 0
    interval, total = meta["perturbation_interval"], cfg.train.steps
    if step >= total:
        # Paused or exploited at the last perturbation: nothing is left to train. The trial's last result must
        # be the one that belongs to these weights -- the donor's after an exploit, not its own earlier one.
        tune.report({**saved["metrics"], **lineage})
        return
    while step < total:
        seg = C.apply_overrides(cfg, {"train.steps": min(step + interval, total)})
        result = _finish(build_trainer(seg, meta["storage"], name, evaluator=evaluator, init_from=init_from).fit(),
                         TrainingDiverged)
        step = seg.train.steps
        written = in_fs(result.checkpoint.filesystem, result.checkpoint.path, storage)
        metrics = {**result.metrics, **lineage, "step": step, "checkpoint_path": written.uri}
        (written / "tune_step.json").write_json({"step": step, "trial": trial_id, "metrics": metrics}, default=float)
        tune.report(metrics, checkpoint=result.checkpoint)  # Tune copies it store-to-store into the trial's folder


def _finish(result, diverged_error):
    ret = result.return_value or {}
    if result.error:
        raise result.error
    if ret.get("diverged"):
        ckpt = result.checkpoint.path if result.checkpoint else "none"
        raise diverged_error(f"trial diverged: {ret['diverged']}; last good checkpoint: {ckpt}")
    return result


# ---------------------------------------------------------------- the sweep


def run_tune(base: Config, space: dict[str, dict], trials: int, scheduler: str = "asha", metric: str = "loss/g",
             mode: str = "min", max_concurrent: int = 0, storage: str = "runs", name: str = "tune",
             progress: bool = True) -> dict:
    """Run (or resume) a sweep and write results.csv, results.md, best.yaml, best.json and objective.png."""
    from ray import tune

    from .data import read_manifest
    from .train import resolve_data

    base = resolve_data(base)
    labelled = bool(read_manifest(base.data.path)["class_names"])
    valid = available_metrics(base, labelled)
    if metric in LABELLED and not labelled:
        raise UserError(f"--metric {metric} needs labels and {base.data.path} has none; "
                        f"the label-free metrics are {', '.join(LABEL_FREE)} (--mode max, davies_bouldin --mode min)"
                        + ("" if base.eval.every else "; they need --set eval.every=N"))
    if metric not in valid:
        raise UserError(f"no trial reports metric '{metric}' with this config; choose one of: {', '.join(valid)}"
                        + ("" if base.eval.every else " (eval/* metrics need --set eval.every=N)"))
    if scheduler not in C.SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(C.SCHEDULERS)}, got '{scheduler}'")
    where = loc(storage)
    check_access(where, write=True)
    fit = check_resources(base, wait_for_trial(base))
    concurrent = max_concurrent or fit
    exp_dir = where / name
    interval = max(base.train.log_every, min(base.train.checkpoint_every, base.train.steps // 4 or 1))
    meta = {"base": C.to_dict(base), "storage": (exp_dir / "runs").uri, "scheduler": scheduler,
            "perturbation_interval": interval}
    param_space = to_tune(space)
    # The fixed part travels with the trainable (not the searched config, so Tune's table stays readable).
    trainable = tune.with_resources(tune.with_parameters(trial_driver, meta=meta), driver_resources())
    if tune.Tuner.can_restore(exp_dir.path, storage_filesystem=exp_dir.fs):
        print(f"resuming the interrupted sweep in {exp_dir}")
        tuner = tune.Tuner.restore(exp_dir.path, storage_filesystem=exp_dir.fs, trainable=trainable, param_space=param_space,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        sched = _scheduler(scheduler, metric, mode, base.train.steps, base.train.log_every, interval, space)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=trials, scheduler=sched,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=where.path, storage_filesystem=where.fs,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=1 if progress else 0),
        )
    grid = tuner.fit()
    return write_results(grid, exp_dir, base, space, metric, mode)


def _scheduler(name: str, metric: str, mode: str, steps: int, log_every: int, interval: int, space: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if name == "asha":
        # Rungs in training steps; a trial reports every log_every steps.
        return ASHAScheduler(time_attr="step", max_t=steps, grace_period=max(log_every, steps // 8), reduction_factor=2)
    if name == "pbt":
        # Only keys that keep the weights loadable: a mutated model.* would not fit the donor's checkpoint.
        mutations = {k: _mutation(d) for k, d in space.items() if next(iter(d)) != "grid" and not k.startswith("model.")}
        # Synchronous: every trial reaches the boundary before any is ranked. Asynchronous PBT checkpoints a
        # trial only if it ranked in the upper half at its own boundary, so in a small population whose
        # first reporter had nobody to rank against, the weaker trial can train to the end unexploited
        # (seen with two trials in CI).
        return PopulationBasedTraining(time_attr="step", perturbation_interval=interval,
                                       hyperparam_mutations=mutations or None, quantile_fraction=0.5, synch=True)
    return FIFOScheduler()


def _mutation(dist: dict):
    from ray import tune

    kind, args = next(iter(dist.items()))
    return {"choice": lambda a: a, "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}[kind](args)


# ---------------------------------------------------------------- results


def write_results(grid, exp_dir: Loc, base: Config, space: dict, metric: str, mode: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curves = [], {}
    for res in grid:
        cfg_over = dict(res.config or {})
        m = res.metrics or {}
        status = "ERROR" if res.error else "TERMINATED"
        df = res.metrics_dataframe
        if df is not None and metric in df and "step" in df:
            curves[m.get("trial_id", "?")] = (df["step"].tolist(), df[metric].tolist())
        rows.append({
            "trial": m.get("trial_id") or res.path.rstrip("/").rsplit("/", 1)[-1], "status": status,
            **{k: cfg_over.get(k) for k in space}, metric: m.get(metric), "steps": m.get("step", 0),
            "checkpoint": m.get("checkpoint_path", ""), "error": _error_line(res.error),
            "restored from": m.get("pbt/restored_from", ""),  # PBT: the donor of this trial's weights
        })
    ok = [r for r in rows if r["status"] == "TERMINATED" and isinstance(r[metric], (int, float)) and math.isfinite(r[metric])]
    best = (min if mode == "min" else max)(ok, key=lambda r: r[metric]) if ok else None
    import pandas as pd

    (exp_dir / "results.csv").write_text(pd.DataFrame(rows).to_csv(index=False))
    cols = ["trial", *space.keys(), metric, "steps", "status"] + (["restored from"] if any(r["restored from"] for r in rows) else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    (exp_dir / "results.md").write_text("\n".join(lines) + "\n")
    summary = {"trials": len(rows), "errored": sum(r["status"] == "ERROR" for r in rows), "metric": metric, "mode": mode}
    if best:
        overrides = {k: best[k] for k in space}
        cfg = C.apply_overrides(base, {k: v for k, v in overrides.items() if v is not None})
        C.save_yaml(cfg, exp_dir / "best.yaml")
        summary |= {"best_trial": best["trial"], "best_objective": best[metric], "best_checkpoint": best["checkpoint"],
                    "best_overrides": overrides}
        (exp_dir / "best.json").write_json(summary, default=str)
    fig, ax = plt.subplots(figsize=(7, 4))
    for trial, (steps, vals) in curves.items():
        ax.plot(steps, vals, marker=".", label=trial)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial ({mode} is better)")
    if curves:
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    (exp_dir / "objective.png").write_bytes(buf.getvalue())
    return summary


def _error_line(err) -> str:
    """The exception's own line (Ray wraps it in a traceback of its actors)."""
    if not err:
        return ""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    return next((l for l in reversed(lines) if "Error" in l.split(":")[0]), lines[-1] if lines else "")[:300]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
