"""Generators and discriminators. Every D has `forward(x) -> logits (N,)`,
`trunk(x) -> h (N, F)` (what its heads read) and `embed(x, features, readout) -> (N, E)`.

Embeddings read D's hidden blocks (`features`: the last block, or every block) through a
read-out (`readout`, READOUTS below):
  gap        : each block averaged over H x W (C_i values), concatenated as they are
  gridG-max  : each block max-pooled to a G x G grid (C_i * G * G values), L2-normalised per
  gridG-avg    block before concatenation so no block dominates (average-pooled for -avg)
  proj       : a contrastive D only: its projection head's output (the NT-Xent space, 128
               values), L2-normalised; `features` does not apply
  gridG-max+proj : both, the projection as one more unit-length block after the pooled ones
Block maps of the DCGAN D at 32 px: w x 16 x 16, 2w x 8 x 8, 4w x 4 x 4; of the ResNet D:
2w x 16 x 16, 2w x 8 x 8, 2w x 8 x 8, 2w x 8 x 8. E.g. dcgan, w = 32, multi, grid4-max: 7 * 32 * 16 = 3584.

The representation objectives (objectives.py) use RepresentationD below: the same blocks,
with heads on the trunk features instead of (or beside) the GAN head.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

import torch
from torch import nn
import torch.nn.functional as F

from .config import HEAD_READOUT, HEAD_SUFFIX, ModelConfig, UserError, parse_readout, reads_head  # noqa: F401  (parse_readout re-exported)

STATE_FILE = "state.pt"  # the one file of a checkpoint directory


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(mode: str, device) -> str:
    """train.amp (or embed --amp) -> off | bf16 | fp16 for this device. `auto`: bf16 where the GPU
    computes it natively (compute capability >= 8.0), fp16 (with loss scaling in training) on
    older GPUs, off on CPUs."""
    device = torch.device(device)
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def autocast(device, amp: str):
    """Autocast to the resolved amp dtype on `device`, or nothing for "off"."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _sn(module: nn.Module, on: bool) -> nn.Module:
    return nn.utils.spectral_norm(module) if on else module


# ---------------------------------------------------------------- read-outs

DEFAULT_READOUT = "grid4-max"  # measured in benchmarks/quality.py (README, Embedding quality)
DEFAULT_DIM = 256  # wider read-outs are stored projected to this many dimensions (embed.py)


def readout(feats: list[torch.Tensor], spec: str) -> torch.Tensor:
    """Blocks (N, C_i, H_i, W_i) -> (N, E): each pooled to a G x G grid, flattened, normalised."""
    grid, pool, norm = parse_readout(spec)
    if reads_head(spec):  # RepresentationD.embed answers it; a D without the head cannot
        raise UserError(f"read-out {spec} needs a contrastive D's projection head; this D has none")
    outs = []
    for f in feats:
        if grid == 1 and pool == "avg":
            v = f.mean(dim=(2, 3))  # (N, C_i)
        else:
            pooled = F.adaptive_max_pool2d(f, grid) if pool == "max" else F.adaptive_avg_pool2d(f, grid)
            v = pooled.flatten(1)  # (N, C_i * G * G)
        outs.append(F.normalize(v.float(), dim=1).to(v.dtype) if norm else v)
    return torch.cat(outs, dim=1)


def _blocks(feats: list[torch.Tensor], features: str) -> list[torch.Tensor]:
    return feats[-1:] if features == "last" else feats


def embedding_dim(D: nn.Module, features: str, readout_spec: str, resolution: int, channels: int) -> int:
    """E for this D, block choice and read-out; a grid larger than a block's map is a UserError."""
    grid, _, _ = parse_readout(readout_spec)
    if features not in ("last", "multi"):
        raise UserError(f"features must be last or multi, got '{features}'")
    head_dim = 0
    if reads_head(readout_spec):
        head = getattr(unwrap(D), "proj", None)
        if head is None:
            raise UserError(f"read-out {readout_spec} reads a contrastive D's projection head and this D has none "
                            f"(trained with objective {getattr(unwrap(D), 'objective', 'gan')}); use gap or gridG-max")
        head_dim = int(head[-1].out_features)
        if readout_spec == HEAD_READOUT:
            return head_dim
    was = D.training
    D.eval()
    with torch.no_grad():
        feats = _blocks(unwrap(D).features(torch.zeros(1, channels, resolution, resolution)), features)
    D.train(was)
    small = min(min(f.shape[2:]) for f in feats)
    if grid > small:
        raise UserError(f"read-out {readout_spec} asks for a {grid}x{grid} grid but a D block's map is {small}x{small} "
                        f"at {resolution} px; use a grid of at most {small} (e.g. grid{small}-max) or features=last")
    return int(sum(f.shape[1] * grid * grid for f in feats)) + head_dim


# ---------------------------------------------------------------- DCGAN


class DCGANGenerator(nn.Module):
    """z (N, z_dim) -> image (N, C, R, R) in [-1, 1]; R = 32 or 64."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.width
        n_up = int(math.log2(cfg.resolution)) - 2  # 4x4 -> R: 3 ups for 32, 4 for 64
        chans = [w * 2 ** (n_up - 1 - i) for i in range(n_up)]  # [4w, 2w, w] for 32, mirror of D
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.z_dim, chans[0], 4, 1, 0, bias=False),  # (N, 4w, 4, 4)
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(True),
        ]
        for c_in, c in zip(chans[:-1], chans[1:]):  # each doubles H, W
            layers += [nn.ConvTranspose2d(c_in, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(chans[-1], cfg.channels, 4, 2, 1), nn.Tanh()]  # (N, C, R, R)
        self.net = nn.Sequential(*layers)
        self.z_dim = cfg.z_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """image (N, C, R, R) -> logits (N,). LeakyReLU(0.2); BatchNorm after the first
    block unless spectral norm is on (SN replaces BN, as in SNGAN's DCGAN-D)."""

    def __init__(self, cfg: ModelConfig, gan_head: bool = True):
        super().__init__()
        w, sn = cfg.width, cfg.spectral_norm
        n_down = int(math.log2(cfg.resolution)) - 2  # R -> 4x4
        self.blocks = nn.ModuleList()
        c_in = cfg.channels
        for i in range(n_down):
            c = w * 2**i  # w, 2w, 4w (, 8w)
            layers: list[nn.Module] = [_sn(nn.Conv2d(c_in, c, 4, 2, 1, bias=(i == 0 or sn)), sn)]
            if i > 0 and not sn:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2, inplace=False))
            self.blocks.append(nn.Sequential(*layers))
            c_in = c
        # The 4x4 conv head is a linear map of the flattened last block: trunk_dim inputs.
        self.head = _sn(nn.Conv2d(c_in, 1, 4, 1, 0), sn) if gan_head else None  # (N, 1, 1, 1)
        self.trunk_dim = c_in * 16

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1]).flatten()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_of(self.features(x))

    def trunk_of(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return feats[-1].flatten(1)  # (N, 4w * 4 * 4)

    def embed(self, x: torch.Tensor, features: str = "last", readout_spec: str = "gap") -> torch.Tensor:
        return readout(_blocks(self.features(x), features), readout_spec)


# ---------------------------------------------------------------- ResNet (SNGAN, 32 px)


class GBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.c1, self.c2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.sc = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2)
        h = self.c2(F.relu(self.bn2(self.c1(h))))
        return h + self.sc(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, sn: bool, down: bool, first: bool):
        super().__init__()
        self.c1, self.c2 = _sn(nn.Conv2d(c_in, c_out, 3, 1, 1), sn), _sn(nn.Conv2d(c_out, c_out, 3, 1, 1), sn)
        self.sc = _sn(nn.Conv2d(c_in, c_out, 1), sn) if (c_in != c_out or down) else None
        self.down, self.first = down, first

    def forward(self, x):
        h = x if self.first else F.relu(x)  # the first block sees the image, no pre-activation
        h = self.c2(F.relu(self.c1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.sc is not None:
            s = self.sc(s)
            if self.down:
                s = F.avg_pool2d(s, 2)
        return h + s


class ResNetGenerator(nn.Module):
    """SNGAN CIFAR G: z -> (N, 2w, 4, 4) -> 3 up-blocks -> (N, C, 32, 32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.width * 2
        self.c = c
        self.fc = nn.Linear(cfg.z_dim, 4 * 4 * c)
        self.blocks = nn.Sequential(GBlock(c, c), GBlock(c, c), GBlock(c, c))
        self.out = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, cfg.channels, 3, 1, 1), nn.Tanh())
        self.z_dim = cfg.z_dim

    def forward(self, z):
        return self.out(self.blocks(self.fc(z).view(-1, self.c, 4, 4)))


class ResNetDiscriminator(nn.Module):
    """SNGAN CIFAR D: 32 -> 16 -> 8 -> 8 -> 8, ReLU, global sum pool, linear."""

    def __init__(self, cfg: ModelConfig, gan_head: bool = True):
        super().__init__()
        c, sn = cfg.width * 2, cfg.spectral_norm
        self.blocks = nn.ModuleList(
            [DBlock(cfg.channels, c, sn, True, True), DBlock(c, c, sn, True, False),
             DBlock(c, c, sn, False, False), DBlock(c, c, sn, False, False)]
        )
        self.fc = _sn(nn.Linear(c, 1), sn) if gan_head else None
        self.trunk_dim = c

    def features(self, x):
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        feats[-1] = F.relu(feats[-1])
        return feats

    def forward(self, x):
        return self.fc(self.trunk(x)).flatten()

    def trunk(self, x):
        return self.trunk_of(self.features(x))

    def trunk_of(self, feats):
        return feats[-1].sum(dim=(2, 3))  # (N, 2w): global sum pool, as SNGAN's head reads it

    def embed(self, x, features: str = "last", readout_spec: str = "gap"):
        return readout(_blocks(self.features(x), features), readout_spec)


# ---------------------------------------------------------------- representation objectives


def _mlp(d_in: int, d_out: int, hidden: int = 512) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, d_out))


class RepresentationD(nn.Module):
    """The blocks of a GAN D (`net`) with the heads an objective trains (objectives.py):

      contrastive (ContraD): proj (NT-Xent between two views of reals), proj_fake (supervised
        contrastive: fakes against reals), dis (real/fake, an MLP on *detached* trunk features:
        the trunk learns from the contrastive losses only); net has no GAN head.
      rotation (SS-GAN): net keeps its GAN head; rot predicts which of 4 rotations an image had.
      autoencoder: net is the encoder; code maps the trunk to a z_dim code that G decodes.

    forward(x) is what G's loss reads (real/fake logits (N,); the code (N, z_dim) for the
    autoencoder); forward(x, train=True) returns every head's output of the D step, so DDP sees
    one forward per batch in which every head takes part."""

    def __init__(self, cfg: ModelConfig, objective: str, proj_dim: int = 128):
        super().__init__()
        self.objective = objective
        self.net = _lookup(DISCRIMINATORS, cfg.arch, "architecture")(cfg, gan_head=objective == "rotation")
        f = self.net.trunk_dim
        if objective == "contrastive":
            self.proj, self.proj_fake, self.dis = _mlp(f, proj_dim), _mlp(f, proj_dim), _mlp(f, 1)
        elif objective == "rotation":
            self.rot = nn.Linear(f, 4)
        elif objective == "autoencoder":
            self.code = nn.Linear(f, cfg.z_dim)
        else:
            raise UserError(f"unknown objective '{objective}'; valid: {', '.join(OBJECTIVES)}")

    def features(self, x):
        return self.net.features(x)

    def embed(self, x, features: str = "last", readout_spec: str = "gap"):
        if readout_spec == HEAD_READOUT:  # (N, P): where NT-Xent compares views, unit length as it does
            return F.normalize(self.proj(self.net.trunk(x)).float(), dim=1)
        if readout_spec.endswith(HEAD_SUFFIX):  # (N, E + P): the pooled blocks, then the projection as one more block
            parse_readout(readout_spec)
            feats = self.net.features(x)
            pooled = readout(_blocks(feats, features), readout_spec[: -len(HEAD_SUFFIX)])
            head = F.normalize(self.proj(self.net.trunk_of(feats)).float(), dim=1).to(pooled.dtype)
            return torch.cat([pooled, head], dim=1)
        return self.net.embed(x, features, readout_spec)

    def forward(self, x, train: bool = False):
        if self.objective == "rotation":
            return (self.net(x), self.rot(self.net.trunk(x))) if train else self.net(x)  # (N,), (N, 4)
        h = self.net.trunk(x)  # (N, F)
        if self.objective == "autoencoder":
            return self.code(h)  # (N, z_dim)
        logits = self.dis(h.detach() if train else h).flatten()  # G's gradient flows through the trunk
        return (logits, self.proj(h), self.proj_fake(h)) if train else logits  # (N,), (N, P), (N, P)


OBJECTIVES = ("gan", "contrastive", "rotation", "autoencoder")


GENERATORS = {"dcgan": DCGANGenerator, "resnet": ResNetGenerator}
DISCRIMINATORS = {"dcgan": DCGANDiscriminator, "resnet": ResNetDiscriminator}


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise UserError(f"unknown {what} '{name}'; valid: {', '.join(registry)}")
    return registry[name]


def _init_weights(m: nn.Module) -> None:
    # DCGAN's N(0, 0.02) init; BatchNorm gamma ~ N(1, 0.02).
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        weight = getattr(m, "weight_orig", m.weight)
        nn.init.normal_(weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build_generator(cfg: ModelConfig) -> nn.Module:
    g = _lookup(GENERATORS, cfg.arch, "architecture")(cfg)
    if cfg.arch == "dcgan":
        g.apply(_init_weights)
    return g


def build_discriminator(cfg: ModelConfig, objective: str = "gan") -> nn.Module:
    """The GAN D, or a RepresentationD (the same blocks with the objective's heads)."""
    d = _lookup(DISCRIMINATORS, cfg.arch, "architecture")(cfg) if objective == "gan" else RepresentationD(cfg, objective)
    if cfg.arch == "dcgan":
        d.apply(_init_weights)
    return d


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def recalibrate_batchnorm(D, images_u8: np.ndarray, batch_size: int = 256):
    """Re-estimate BatchNorm running statistics on real images, then eval mode.

    During training D's running stats average real and fake batches; embedding
    real images with them shifts every feature. A cumulative average (momentum
    None) over real batches gives the statistics of the data being embedded.
    Runs on D's own device (a GPU during training), batches moved as uint8."""
    from .data import to_device

    bns = [m for m in D.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        device = next(D.parameters()).device
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        D.train()
        with torch.no_grad():
            for i in range(0, len(images_u8), batch_size):
                D(to_device(images_u8[i : i + batch_size], device))
    return D.eval()


# ---------------------------------------------------------------- checkpoints


def find_checkpoint(path):
    """A checkpoint folder, its state.pt, or a run folder (its latest checkpoint_*); a local
    path or a URI."""
    from .storage import check_access, loc

    p = loc(path)
    check_access(p)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if p.is_dir() and not (p / STATE_FILE).exists():
        ckpts = [c for c in p.glob("checkpoint_*") if (c / STATE_FILE).is_file()]
        if ckpts:
            return ckpts[-1]
    return p


def load_state(path) -> dict:
    """Read a checkpoint (a directory holding state.pt, the file, or a run folder; local or a
    URI) with torch.load(weights_only=True): tensors and plain data only, never objects."""
    import io

    p = find_checkpoint(path)
    f = p / STATE_FILE if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"{path} is not a distgan checkpoint: no {STATE_FILE} (use a checkpoint_* folder of a run)")
    try:
        state = torch.load(io.BytesIO(f.read_bytes()), map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # corrupt file, or one holding pickled objects
        raise UserError(f"{f} cannot be loaded as a distgan checkpoint: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != "distgan-checkpoint-v1":
        raise UserError(f"{f} is not a distgan checkpoint (no distgan format tag)")
    return state


def check_data_fits(manifest: dict, mcfg: ModelConfig, data) -> None:
    """A dataset's images must have the resolution and channels the checkpoint's D was built for."""
    if (manifest["resolution"], manifest["channels"]) != (mcfg.resolution, mcfg.channels):
        raise UserError(
            f"dataset {data} is {manifest['resolution']}px x {manifest['channels']}ch but the checkpoint's D expects "
            f"{mcfg.resolution}px x {mcfg.channels}ch; prepare the data at the training resolution"
        )


def discriminator_from_checkpoint(state: dict) -> tuple[nn.Module, ModelConfig]:
    """Rebuild D from a checkpoint's own config (the dict saved beside the weights)."""
    from . import config as C

    full = C.from_dict(state["config"])
    d = build_discriminator(full.model, full.objective.name)
    d.load_state_dict(state["D"])
    return d, full.model
