"""Configuration: frozen dataclasses with defaults in code, YAML files as diffs.

`to_dict(cfg)` is Ray's `train_loop_config`, the base of a Tune space and
`checkpoint["config"]`; `from_dict` rebuilds the exact same object. Unknown keys
and wrong types fail loudly, naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake the user can fix: the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # prepared dataset folder (`distgan prepare`); set by --data
    split: str = "train"  # split the GAN trains on: train | test | all
    batch_size: int = 64  # per worker; the global batch is batch_size * num_workers
    worker_cache_mb: int = 1024  # keep a worker's shard in memory after epoch 1 if it fits; 0 = stream every epoch


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "dcgan"  # dcgan | resnet
    z_dim: int = 128  # latent size
    width: int = 64  # channel multiplier: the widest D/G layer has 8*width (dcgan) or 2*width (resnet)
    spectral_norm: bool = False  # spectral norm on every D layer (instead of BatchNorm for dcgan)
    resolution: int = 32  # filled from dataset.json at train time
    channels: int = 1  # filled from dataset.json at train time


@dataclass(frozen=True)
class LossConfig:
    name: str = "ns"  # ns | hinge | wgan-gp | lsgan
    gp_weight: float = 10.0  # lambda of the wgan-gp gradient penalty
    r1_gamma: float = 0.0  # R1 penalty on real images, any loss; 0 = off


@dataclass(frozen=True)
class ObjectiveConfig:
    # What D learns besides real/fake (objectives.py): gan (real/fake only) | contrastive (ContraD:
    # NT-Xent on two views of reals + fakes against reals; real/fake head on detached features) |
    # rotation (SS-GAN: D also predicts a real image's rotation) | autoencoder (D's blocks encode,
    # G decodes; no adversarial loss)
    name: str = "gan"
    temperature: float = 0.1  # NT-Xent / supervised-contrastive temperature
    fake_weight: float = 1.0  # weight of the fakes-vs-reals supervised-contrastive loss (ContraD's lambda)
    rotation_weight: float = 1.0  # D's rotation loss on reals (SS-GAN's beta)
    rotation_g_weight: float = 0.2  # G's rotation loss on fakes (SS-GAN's alpha)
    augment: str = "auto"  # the contrastive views: comma list of crop,rotate,flip,color,gray,intensity,translation,cutout; auto = by channels
    crop_scale: float = 0.4  # smallest area a crop keeps, as a fraction of the image (SimCLR: 0.08; ContraD: 0.2 on CIFAR)


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5  # DCGAN's choice: 0.9 makes GAN training oscillate
    beta2: float = 0.999
    n_critic: int = 1  # D steps per G step
    ema_decay: float = 0.999  # G_ema <- decay * G_ema + (1 - decay) * G
    diffaugment: str = ""  # comma list of translation,cutout,color; "" = off


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # G steps
    minutes: float = 0.0  # wall-clock budget: stop at the first report after this many minutes of training; 0 = off
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1  # Ray CPUs reserved per worker (data loading, threads)
    amp: str = "off"  # off | bf16 | fp16 (GradScaler) | auto: bf16 on GPUs with capability >= 8.0, fp16 older, off on CPU
    channels_last: bool = False  # NHWC memory format for G, D and batches (faster convolutions on tensor cores)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    max_failures: int = 0  # worker crashes to survive by restoring the last checkpoint
    seed: int = 0
    num_samples: int = 64  # images in the fixed-noise sample grid
    threads_per_worker: int = 0  # torch threads per worker; 0 = cores / workers


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # steps between evaluations during training; 0 = off
    num_images: int = 1000  # real and generated images per FID/KID estimate
    classifier: str = ""  # weights file from `distgan evaluator train`; "" = no FID/KID
    inception_weights: str = ""  # local Inception weights for the standard FID


@dataclass(frozen=True)
class ClusterConfig:
    k: int = 10
    preprocess: str = "pca"  # none | l2 | pca (PCA, then L2) | pca-whiten (DeepCluster: whitened PCA, then L2)
    pca_dim: int = 64
    niter: int = 20
    nredo: int = 0  # k-means restarts, the lowest objective kept; 0 = auto (cluster/fit.py restarts())
    spherical: bool = False
    sample: int = 0  # train k-means on this many points; 0 = all
    seed: int = 0
    features: str = "multi"  # last | multi: which D layers the embedding reads
    readout: str = "grid4-max"  # gap (global average, as before) | gridG-max | gridG-avg | proj | gridG-max+proj (models.py)
    embed_dim: int = 256  # embed stores wider read-outs projected to this many dimensions; 0: whole (embed.py)
    manifold: str = "none"  # none | umap: UMAP fitted on a sample before k-means (cluster/manifold.py)
    manifold_dim: int = 10  # UMAP output dimensions
    method: str = "kmeans"  # kmeans | gmm: a full-covariance Gaussian mixture on the manifold map | balanced:
    # k-means held to equal cluster sizes (cluster/fit.py)


@dataclass(frozen=True)
class TuneConfig:
    metric: str = "loss/g"
    mode: str = "min"
    scheduler: str = "asha"  # asha | pbt | fifo
    trials: int = 4
    max_concurrent: int = 0  # 0 = as many as the cluster fits


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# ---------------------------------------------------------------- dict <-> config


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(valid)}")


def _check_value(key: str, value: Any, typ: type) -> Any:
    # bool is a subclass of int: reject it where a number is expected, and accept
    # ints where floats are expected (YAML reads `1` as int).
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise UserError(
        f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} ({value!r})"
    )


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'root'}' must be a mapping, got {type(data).__name__}")
    types = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in types:
            raise _unknown(dotted, sorted(types))
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, dotted + ".")
        else:
            kwargs[key] = _check_value(dotted, value, typ)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Strict inverse of `to_dict`; missing keys take their defaults."""
    return _build(Config, _upgrade(data), "")


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Configs saved by older distgan (checkpoints, best.yaml): train.amp was a bool (bf16 on/off)."""
    amp = data.get("train", {}).get("amp") if isinstance(data.get("train"), dict) else None
    if isinstance(amp, bool):
        data = {**data, "train": {**data["train"], "amp": "bf16" if amp else "off"}}
    return data


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key, e.g. 'optim.lr_d'."""
    keys = []
    for name, typ in _fields(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b` in a nested dict; the key is checked against the schema."""
    if key not in all_keys():
        raise _unknown(key, all_keys())
    section, leaf = key.split(".")
    data.setdefault(section, {})[leaf] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["optim.lr_d=1e-4", "model.arch=resnet"]` -> {"optim.lr_d": 1e-4, ...} (YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got '{pair}' (e.g. --set optim.lr_d=1e-4)")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(value, str) and any(c in value for c in ".eE"):
            value = _as_float(value)
        out[key.strip()] = value
    return out


def _as_float(text: str) -> float | str:
    """YAML 1.1 reads "1e-4" as a string; users mean a number. Anything else stays text."""
    try:
        return float(text)
    except ValueError:
        return text


def apply_overrides(cfg: Config, overrides: dict[str, Any], combinations: bool = True) -> Config:
    data = to_dict(cfg)
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return validate(from_dict(data), combinations=combinations)


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file (only what differs) <- dotted overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path:
        from .storage import check_access, loc

        p = loc(path)
        check_access(p)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = from_dict(data)
    return apply_overrides(cfg, overrides or {})


def save_yaml(cfg: Config, path: str | Path) -> None:
    import yaml

    from .storage import loc

    loc(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------- validation

ARCHS = ("dcgan", "resnet")
LOSSES = ("ns", "hinge", "wgan-gp", "lsgan")
AUGMENTS = ("translation", "cutout", "color")
PREPROCESS = ("none", "l2", "pca", "pca-whiten")
OBJECTIVES = ("gan", "contrastive", "rotation", "autoencoder")
VIEW_AUGMENTS = ("crop", "rotate", "flip", "color", "gray", "intensity", "translation", "cutout")
COLOUR_AUGMENTS = ("color", "gray")  # mean nothing on one channel
MANIFOLDS = ("none", "umap")
CLUSTER_METHODS = ("kmeans", "gmm", "balanced")  # cluster/fit.py
FEATURES = ("last", "multi")
AMP = ("off", "bf16", "fp16", "auto")
SCHEDULERS = ("asha", "pbt", "fifo")


HEAD_READOUT = "proj"  # the contrastive D's projection head, not a pooling of D's blocks (models.py)
HEAD_SUFFIX = "+" + HEAD_READOUT  # e.g. grid4-max+proj: a pooled read-out with the projection beside it


def reads_head(spec: str) -> bool:
    """Whether a read-out needs the contrastive D's projection head (proj, or X+proj)."""
    return spec == HEAD_READOUT or spec.endswith(HEAD_SUFFIX)


def parse_readout(spec: str) -> tuple[int, str, bool]:
    """A read-out name (models.readout): 'gap' -> (1, 'avg', no per-block norm);
    'grid4-max' -> (4, 'max', L2 per block); 'proj' -> (0, 'proj', L2): no grid;
    'grid4-max+proj' -> its pooled part's, (4, 'max', L2 per block)."""
    if spec == "gap":
        return 1, "avg", False
    if spec == HEAD_READOUT:
        return 0, HEAD_READOUT, True
    base = spec[: -len(HEAD_SUFFIX)]
    if spec.endswith(HEAD_SUFFIX) and base.startswith("grid") and "+" not in base:
        return parse_readout(base)
    head, _, pool = spec.partition("-")
    if head.startswith("grid") and head[4:].isdigit() and int(head[4:]) >= 1 and pool in ("avg", "max"):
        return int(head[4:]), pool, True
    raise UserError(f"unknown read-out '{spec}'; valid: gap, gridG-max, gridG-avg (G = grid size, e.g. grid4-max), "
                    f"{HEAD_READOUT} (a contrastive D's projection head), gridG-max{HEAD_SUFFIX} (both)")


def parse_ks(spec: str | int) -> list[int]:
    """`--k`: '10' -> [10]; '5,10,20' -> [5, 10, 20]; '4:40:4' -> [4, 8, ..., 40] (start:stop[:step],
    stop included). Sorted, without repeats; each k >= 2 (the sample bound is checked later)."""
    text = str(spec).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            ks = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
        else:
            ks = [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"--k must be a number, a list (5,10,20) or a range (start:stop[:step]), got '{text}'") from None
    if not ks:
        raise UserError(f"--k range '{text}' is empty")
    if min(ks) < 2:
        raise UserError(f"--k values must be >= 2, got {min(ks)}")
    return sorted(set(ks))


def has_batchnorm_d(m: ModelConfig) -> bool:
    """The DCGAN D puts BatchNorm after its hidden convolutions unless spectral norm replaces it."""
    return m.arch == "dcgan" and not m.spectral_norm


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"{key}='{value}' is not valid; choose one of: {', '.join(valid)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# The keys the cross-field checks below read: a Tune space that samples them is checked
# combination by combination before any trial starts (tune.check_space).
COMBINATION_KEYS = ("model.arch", "model.resolution", "model.spectral_norm", "loss.name", "loss.r1_gamma",
                    "objective.name")


def validate(cfg: Config, combinations: bool = True) -> Config:
    """Every value in range; with `combinations`, also the few constraints between keys
    (every arch pairs with every loss, except WGAN-GP with a BatchNorm D)."""
    m, o, t, c = cfg.model, cfg.optim, cfg.train, cfg.cluster
    _choice("model.arch", m.arch, ARCHS)
    _choice("loss.name", cfg.loss.name, LOSSES)
    _choice("data.split", cfg.data.split, ("train", "test", "all"))
    _choice("cluster.preprocess", c.preprocess, PREPROCESS)
    _choice("cluster.features", c.features, FEATURES)
    _choice("cluster.manifold", c.manifold, MANIFOLDS)
    _choice("cluster.method", c.method, CLUSTER_METHODS)
    if c.method == "gmm" and c.manifold != "umap":
        raise UserError("cluster.method gmm fits full covariances on the manifold map: set cluster.manifold: umap")
    _choice("objective.name", cfg.objective.name, OBJECTIVES)
    parse_readout(c.readout)
    if reads_head(c.readout) and cfg.objective.name != "contrastive":
        raise UserError(f"cluster.readout {c.readout} reads the contrastive D's projection head: "
                        f"set objective.name: contrastive (got {cfg.objective.name}) or a read-out of D's blocks (e.g. grid4-max)")
    if not 0.0 < cfg.objective.crop_scale <= 1.0:
        raise UserError(f"objective.crop_scale must be in (0, 1], got {cfg.objective.crop_scale}")
    if cfg.objective.augment != "auto":
        for aug in filter(None, cfg.objective.augment.split(",")):
            _choice("objective.augment", aug.strip(), VIEW_AUGMENTS)
    _choice("tune.scheduler", cfg.tune.scheduler, SCHEDULERS)
    _choice("tune.mode", cfg.tune.mode, ("min", "max"))
    _choice("train.amp", t.amp, AMP)
    for aug in filter(None, o.diffaugment.split(",")):
        _choice("optim.diffaugment", aug.strip(), AUGMENTS)
    if m.resolution not in (8, 16, 32, 64, 128, 256):
        raise UserError(f"model.resolution must be a power of two from 8 to 256, got {m.resolution}")
    if combinations:
        validate_combinations(cfg)
    for key, value in [
        ("data.batch_size", cfg.data.batch_size), ("model.z_dim", m.z_dim), ("model.width", m.width),
        ("model.channels", m.channels), ("optim.lr_g", o.lr_g), ("optim.lr_d", o.lr_d),
        ("optim.n_critic", o.n_critic), ("train.steps", t.steps), ("train.num_workers", t.num_workers), ("train.cpus_per_worker", t.cpus_per_worker),
        ("train.checkpoint_every", t.checkpoint_every), ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.log_every", t.log_every), ("train.num_samples", t.num_samples),
        ("cluster.k", c.k), ("cluster.pca_dim", c.pca_dim), ("cluster.manifold_dim", c.manifold_dim),
        ("objective.temperature", cfg.objective.temperature), ("cluster.niter", c.niter),
        ("tune.trials", cfg.tune.trials),
    ]:
        _positive(key, value)
    for key, value in [
        ("loss.gp_weight", cfg.loss.gp_weight), ("loss.r1_gamma", cfg.loss.r1_gamma),
        ("data.worker_cache_mb", cfg.data.worker_cache_mb), ("train.max_failures", t.max_failures), ("train.threads_per_worker", t.threads_per_worker),
        ("eval.every", cfg.eval.every), ("cluster.sample", c.sample), ("cluster.nredo", c.nredo), ("cluster.embed_dim", c.embed_dim), ("train.minutes", t.minutes), ("objective.fake_weight", cfg.objective.fake_weight),
        ("objective.rotation_weight", cfg.objective.rotation_weight), ("objective.rotation_g_weight", cfg.objective.rotation_g_weight), ("tune.max_concurrent", cfg.tune.max_concurrent),
    ]:
        _positive(key, value, allow_zero=True)
    if not (0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0):
        raise UserError(f"optim.beta1 and optim.beta2 must lie in [0, 1), got {o.beta1}, {o.beta2}")
    if not (0.0 <= o.ema_decay < 1.0):
        raise UserError(f"optim.ema_decay must lie in [0, 1), got {o.ema_decay}")
    if c.k < 2:
        raise UserError(f"cluster.k must be at least 2, got {c.k}")
    return cfg


def validate_combinations(cfg: Config) -> None:
    """The constraints between keys (each reads only COMBINATION_KEYS)."""
    m = cfg.model
    if m.arch == "dcgan" and m.resolution not in (32, 64):
        raise UserError(f"model.arch=dcgan supports resolution 32 or 64, got {m.resolution}; prepare the data with --resolution 32")
    if m.arch == "resnet" and m.resolution != 32:
        raise UserError(f"model.arch=resnet supports resolution 32, got {m.resolution}; prepare the data with --resolution 32")
    if cfg.loss.name == "wgan-gp" and has_batchnorm_d(m):
        # The penalty constrains each sample's gradient ||grad_x D(x)||, but BatchNorm makes D(x)
        # depend on the whole batch, so that per-sample gradient is not the one being penalised
        # (Gulrajani et al. 2017, section 4).
        raise UserError("loss.name=wgan-gp needs a D without BatchNorm (its penalty is per sample): "
                        "set model.spectral_norm=true, or use model.arch=resnet")
    obj = cfg.objective
    if obj.name in ("contrastive", "autoencoder") and (cfg.loss.name == "wgan-gp" or cfg.loss.r1_gamma > 0):
        # Both penalties are gradients of D's real/fake output w.r.t. the image through the whole
        # D; ContraD's real/fake head reads detached trunk features, an autoencoder has no such output.
        raise UserError(f"objective.name={obj.name} does not take a gradient penalty (loss.name=wgan-gp or "
                        "loss.r1_gamma > 0): use loss.name=ns, hinge or lsgan with r1_gamma=0")


def validate_for_data(cfg: Config) -> None:
    """What only the prepared data decides (model.channels comes from dataset.json at train time)."""
    m, obj = cfg.model, cfg.objective
    colour = [a for a in view_augments(obj.augment, m.channels) if a in COLOUR_AUGMENTS]
    if obj.name == "contrastive" and colour and m.channels != 3:
        raise UserError(f"objective.augment has {', '.join(colour)} but the data has {m.channels} channel(s); "
                        "colour augmentations need RGB data (use crop,intensity,translation,cutout on grayscale)")


def view_augments(spec: str, channels: int) -> list[str]:
    """The contrastive views' augmentations; `auto`: crops and cutout on grayscale (no flips:
    digits are not symmetric), plus flips, colour jitter and grayscale on RGB (SimCLR's set)."""
    if spec == "auto":
        return ["crop", "flip", "color", "gray"] if channels == 3 else ["crop", "cutout"]
    return [a.strip() for a in spec.split(",") if a.strip()]
