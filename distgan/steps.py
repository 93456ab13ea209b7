"""One D step, one G step, the EMA update. Plain PyTorch, no Ray: the same
functions run in a single process, under DDP, or in a unit test.

G and D may be DDP-wrapped. The G step calls D's *inner* module with D's
parameters frozen, so D's DDP reducer never sees a backward it did not
prepare for, and no D gradients are computed or all-reduced for nothing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .losses import get_loss, gradient_penalty, r1_penalty
from .models import unwrap


class NonFiniteError(RuntimeError):
    """A loss or gradient went NaN/Inf; raised before the optimizer step, so weights stay finite."""


@dataclass
class Nets:
    G: torch.nn.Module  # possibly DDP-wrapped
    D: torch.nn.Module  # possibly DDP-wrapped
    G_ema: torch.nn.Module  # plain module, never trained directly
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


# ---------------------------------------------------------------- DiffAugment
# Zhao et al. 2020: the same random, differentiable augmentation on every image
# D sees (real and fake, in both steps), so D cannot overfit a small dataset.


def _color(x):
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    if x.shape[1] > 1:  # saturation only means something with colour channels
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


def _autocast(x: torch.Tensor, enabled: bool):
    return torch.autocast(x.device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())


def _check_finite(step_name: str, *values: torch.Tensor) -> None:
    # The gradient norm is taken after DDP's all-reduce, so a NaN on any rank is
    # seen by every rank and they all stop together instead of deadlocking.
    for v in values:
        if not torch.isfinite(v):
            raise NonFiniteError(f"non-finite {step_name} ({v.item()})")


def sample_z(n: int, z_dim: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(n, z_dim, device=device, generator=generator)


def d_step(nets: Nets, real: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """(1) Update D: maximise log D(x) + log(1 - D(G(z))) (or the chosen loss).
    real: (N, C, H, W) in [-1, 1] on D's device."""
    d_loss_fn, _ = get_loss(cfg.loss.name)
    G, D = nets.G, nets.D
    z = sample_z(real.shape[0], cfg.model.z_dim, real.device)
    with torch.no_grad(), _autocast(real, cfg.train.amp):
        fake = G(z).float()  # no graph into G: D's loss must not train G
    policy = cfg.optim.diffaugment
    real_in = diff_augment(real, policy)
    fake_in = diff_augment(fake, policy)
    if cfg.loss.r1_gamma > 0:
        real_in = real_in.detach().requires_grad_(True)
    with _autocast(real, cfg.train.amp):
        # Two forwards of the same DDP-wrapped D before one backward: D is wrapped
        # with broadcast_buffers=False (see train.py), else BatchNorm breaks it.
        real_logits = D(real_in).float()
        fake_logits = D(fake_in).float()
    loss = d_loss_fn(real_logits, fake_logits)
    # Penalties in fp32 outside autocast: bf16 gradient norms are what turns WGAN-GP into NaN.
    if cfg.loss.name == "wgan-gp":
        loss = loss + cfg.loss.gp_weight * gradient_penalty(D, real_in.detach(), fake_in.detach())
    if cfg.loss.r1_gamma > 0:
        loss = loss + 0.5 * cfg.loss.r1_gamma * r1_penalty(real_logits, real_in)
    nets.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    norm = grad_norm(D)
    _check_finite("D loss or gradient", loss.detach(), norm)
    nets.opt_d.step()
    return {"loss/d": loss.detach(), "d/real": real_logits.detach().mean(), "d/fake": fake_logits.detach().mean(), "grad_norm/d": norm}


def g_step(nets: Nets, batch_size: int, device, cfg: Config) -> dict[str, torch.Tensor]:
    """(2) Update G: make D call G(z) real."""
    _, g_loss_fn = get_loss(cfg.loss.name)
    D_inner = unwrap(nets.D)
    D_inner.requires_grad_(False)  # gradient flows through D to G, not into D
    try:
        z = sample_z(batch_size, cfg.model.z_dim, device)
        with _autocast(z, cfg.train.amp):
            fake = nets.G(z)
            logits = D_inner(diff_augment(fake.float(), cfg.optim.diffaugment)).float()
        loss = g_loss_fn(logits)
        nets.opt_g.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        D_inner.requires_grad_(True)
    norm = grad_norm(nets.G)
    _check_finite("G loss or gradient", loss.detach(), norm)
    nets.opt_g.step()
    return {"loss/g": loss.detach(), "grad_norm/g": norm}


@torch.no_grad()
def ema_update(G_ema: torch.nn.Module, G: torch.nn.Module, decay: float) -> None:
    """G_ema <- decay * G_ema + (1 - decay) * G; buffers (BatchNorm stats) copied."""
    G = unwrap(G)
    for pe, p in zip(G_ema.parameters(), G.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(G_ema.buffers(), G.buffers()):
        be.copy_(b)
