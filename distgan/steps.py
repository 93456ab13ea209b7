"""One D step, one G step, the EMA update. Plain PyTorch, no Ray: the same
functions run in a single process, under DDP, or in a unit test.

G and D may be DDP-wrapped. The G step calls D's *inner* module with D's
parameters frozen, so D's DDP reducer never sees a backward it did not
prepare for, and no D gradients are computed or all-reduced for nothing.

No step reads a value back to the host: on a GPU every `.item()` or `if tensor`
stalls the CPU until the queue drains. A non-finite loss or gradient is noted in
a device tensor (`FiniteGuard`) and the fused Adam skips that update on the
device (its `found_inf` input, the mechanism GradScaler uses), so weights stay
finite; the training loop reads the guard once per report, before anything is
written.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .losses import get_loss, gradient_penalty, r1_penalty
from .models import autocast, unwrap


class NonFiniteError(RuntimeError):
    """A loss or gradient went NaN/Inf; raised before the optimizer step, so weights stay finite."""


@dataclass
class Nets:
    G: torch.nn.Module  # possibly DDP-wrapped
    D: torch.nn.Module  # possibly DDP-wrapped
    G_ema: torch.nn.Module  # plain module, never trained directly
    opt_g: torch.optim.Optimizer  # fused Adam: skips a non-finite update on the device
    opt_d: torch.optim.Optimizer
    amp: str = "off"  # resolved train.amp: off | bf16 | fp16
    # One GradScaler per optimizer (fp16 only; disabled ones pass losses through unchanged).
    scaler_g: torch.amp.GradScaler | None = None
    scaler_d: torch.amp.GradScaler | None = None
    guard: "FiniteGuard | None" = None


# ---------------------------------------------------------------- DiffAugment
# Zhao et al. 2020: the same random, differentiable augmentation on every image
# D sees (real and fake, in both steps), so D cannot overfit a small dataset.


def _color(x, saturation: bool = True):
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    if saturation and x.shape[1] > 1:  # saturation only means something with colour channels
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean  # contrast


def _translation(x, ratio: float = 0.125):
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    tx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy[None] + ty + 1, 0, h + 1)  # (N, H, W) indices into the zero-padded image
    gx = torch.clamp(gx[None] + tx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])  # (N, C, H+2, W+2)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, gy, gx].permute(0, 3, 1, 2)


def _cutout(x, ratio: float = 0.5):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    ry = gy[None] - (oy - ch // 2)  # (N, H, W) row offset inside the square
    rx = gx[None] - (ox - cw // 2)
    inside = (ry >= 0) & (ry < ch) & (rx >= 0) & (rx < cw)  # an (ch x cw) square, clipped at the border
    return x * (~inside)[:, None].to(x.dtype)


AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    for name in filter(None, policy.split(",")):
        x = AUGMENTS[name.strip()](x)
    return x


# ---------------------------------------------------------------- steps


def grad_norm(*modules: torch.nn.Module) -> torch.Tensor:
    """Total L2 norm of the modules' gradients (foreach kernels, one result on the device)."""
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class FiniteGuard:
    """The first step at which a D or G loss or gradient went NaN/Inf, kept on the device.

    `observe` is asynchronous (no host sync); `check` reads it once, all-reduced
    (MIN) across DDP ranks so every rank stops at the same report together."""

    NONE = 2**62  # "no bad step yet": larger than any step, so MIN picks the earliest bad one

    def __init__(self, device):
        self.first_bad = torch.full((2,), self.NONE, dtype=torch.int64, device=device)  # (D, G)

    def observe(self, which: int, step: int, bad: torch.Tensor) -> None:
        # step+1: the G step being computed; `bad` is a 0-d bool on the device
        hit = bad & (self.first_bad[which] == self.NONE)
        self.first_bad[which] = torch.where(hit, step, self.first_bad[which])

    def check(self) -> None:
        """Raise NonFiniteError naming the first bad step; the one host read per report."""
        import torch.distributed as dist

        first = self.first_bad.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        d_bad, g_bad = first.tolist()
        if min(d_bad, g_bad) < self.NONE:
            which = "D" if d_bad <= g_bad else "G"
            raise NonFiniteError(f"non-finite {which} loss or gradient at step {min(d_bad, g_bad)}")


def _optimizer_step(nets: Nets, which: int, loss: torch.Tensor, module: torch.nn.Module, opt, scaler,
                    step: int, also: list = ()) -> torch.Tensor:
    """backward -> (unscale) -> norm -> guard -> fused step that skips non-finite updates on the device.
    `also`: further (module, optimizer) pairs the same loss trains (the autoencoder's decoder).
    Returns the gradient norm (a device tensor)."""
    pairs = [(module, opt), *also]
    for _, o in pairs:
        o.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        # fp16: overflowing gradients are routine (GradScaler lowers the scale and skips that
        # update), so only a non-finite *loss* counts as divergence.
        scaler.scale(loss).backward()
        for _, o in pairs:
            scaler.unscale_(o)
        norm = grad_norm(*(m for m, _ in pairs))
        if nets.guard is not None:
            nets.guard.observe(which, step, ~torch.isfinite(loss))
        for _, o in pairs:
            scaler.step(o)  # fused Adam: found_inf handed over on the device, no host sync
        scaler.update()
        return norm
    loss.backward()
    norm = grad_norm(*(m for m, _ in pairs))  # after DDP's all-reduce: every rank sees the same value
    bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
    if nets.guard is not None:
        nets.guard.observe(which, step, bad)
    for _, o in pairs:
        o.found_inf = bad.float()  # read by the fused kernel: a bad update is skipped on the device
    try:
        for _, o in pairs:
            o.step()
    finally:
        for _, o in pairs:
            del o.found_inf
    return norm


def sample_z(n: int, z_dim: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(n, z_dim, device=device, generator=generator)


def d_step(nets: Nets, real: torch.Tensor, cfg: Config, step: int = 0, extra=None) -> dict[str, torch.Tensor]:
    """(1) Update D: maximise log D(x) + log(1 - D(G(z))) (or the chosen loss).
    real: (N, C, H, W) in [-1, 1] on D's device; `step`: the G step this D step belongs to;
    `extra(D, real_in, amp)`: a further loss term of the objective (objectives.py)."""
    d_loss_fn, _ = get_loss(cfg.loss.name)
    G, D = nets.G, nets.D
    z = sample_z(real.shape[0], cfg.model.z_dim, real.device)
    with torch.no_grad(), autocast(real.device, nets.amp):
        fake = G(z).float()  # no graph into G: D's loss must not train G
    policy = cfg.optim.diffaugment
    real_in = diff_augment(real, policy)
    fake_in = diff_augment(fake, policy)
    r1 = cfg.loss.r1_gamma > 0
    if r1:
        real_in = real_in.detach().requires_grad_(True)
    # Two forwards of the same DDP-wrapped D before one backward: D is wrapped
    # with broadcast_buffers=False (see train.py), else BatchNorm breaks it.
    # Under R1 the real forward stays fp32 (outside autocast): the penalty is the
    # gradient of these logits, and a bf16/fp16 graph would round it.
    with autocast(real.device, "off" if r1 else nets.amp):
        real_logits = D(real_in).float()  # (N,)
    with autocast(real.device, nets.amp):
        fake_logits = D(fake_in).float()  # (N,)
    loss = d_loss_fn(real_logits, fake_logits)
    # Penalties in fp32 outside autocast: low-precision gradient norms are what turn WGAN-GP into NaN.
    if cfg.loss.name == "wgan-gp":
        loss = loss + cfg.loss.gp_weight * gradient_penalty(D, real_in.detach(), fake_in.detach())
    if r1:
        loss = loss + 0.5 * cfg.loss.r1_gamma * r1_penalty(real_logits, real_in)
    out = {}
    if extra is not None:
        term = extra(D, real_in.detach(), nets.amp)
        loss, out["loss/d_extra"] = loss + term, term.detach()
    norm = _optimizer_step(nets, 0, loss, D, nets.opt_d, nets.scaler_d, step)
    return out | {"loss/d": loss.detach(), "d/real": real_logits.detach().mean(), "d/fake": fake_logits.detach().mean(),
                  "grad_norm/d": norm}


def g_step(nets: Nets, batch_size: int, device, cfg: Config, step: int = 0, augment=None,
           extra=None) -> dict[str, torch.Tensor]:
    """(2) Update G: make D call G(z) real. `augment(x)`: what D sees of G(z) (default: DiffAugment
    with optim.diffaugment); `extra(D, fake, amp)`: a further loss term of the objective."""
    _, g_loss_fn = get_loss(cfg.loss.name)
    augment = augment or (lambda x: diff_augment(x, cfg.optim.diffaugment))
    D_inner = unwrap(nets.D)
    D_inner.requires_grad_(False)  # gradient flows through D to G, not into D
    try:
        z = sample_z(batch_size, cfg.model.z_dim, device)
        with autocast(z.device, nets.amp):
            fake = nets.G(z)
            logits = D_inner(augment(fake.float())).float()
        loss = g_loss_fn(logits)
        if extra is not None:
            loss = loss + extra(D_inner, fake.float(), nets.amp)
        norm = _optimizer_step(nets, 1, loss, nets.G, nets.opt_g, nets.scaler_g, step)
    finally:
        D_inner.requires_grad_(True)
    return {"loss/g": loss.detach(), "grad_norm/g": norm}


@torch.no_grad()
def ema_update(G_ema: torch.nn.Module, G: torch.nn.Module, decay: float) -> None:
    """G_ema <- decay * G_ema + (1 - decay) * G; buffers (BatchNorm stats) copied."""
    G = unwrap(G)
    # one foreach kernel per list instead of a Python loop over ~20-60 tensors
    torch._foreach_lerp_(list(G_ema.parameters()), [p.detach() for p in G.parameters()], 1.0 - decay)
    torch._foreach_copy_(list(G_ema.buffers()), list(G.buffers()))
