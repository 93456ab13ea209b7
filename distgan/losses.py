"""GAN losses: one signature per side, a dict registry.

d_loss(real_logits (N,), fake_logits (N,)) -> scalar
g_loss(fake_logits (N,)) -> scalar
Penalties that need D and images (WGAN-GP, R1) are separate functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import UserError


# Non-saturating (Goodfellow et al.): softplus(-x) = -log sigmoid(x), written so it
# cannot overflow for large |x| (log(sigmoid) of a big negative logit is -inf in fp32).
def d_ns(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_ns(fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake).mean()


def d_hinge(real, fake):
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def g_hinge(fake):
    return -fake.mean()


def d_wgan(real, fake):
    return fake.mean() - real.mean()


def g_wgan(fake):
    return -fake.mean()


# Least squares (Mao et al.), a-b-c = 0-1-1 coding.
def d_lsgan(real, fake):
    return 0.5 * ((real - 1.0) ** 2).mean() + 0.5 * (fake**2).mean()


def g_lsgan(fake):
    return 0.5 * ((fake - 1.0) ** 2).mean()


LOSSES = {
    "ns": (d_ns, g_ns),
    "hinge": (d_hinge, g_hinge),
    "wgan-gp": (d_wgan, g_wgan),
    "lsgan": (d_lsgan, g_lsgan),
}


def get_loss(name: str):
    if name not in LOSSES:
        raise UserError(f"unknown loss '{name}'; valid: {', '.join(LOSSES)}")
    return LOSSES[name]


def gradient_penalty(d, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al.): E[(||grad D(x_hat)||_2 - 1)^2], x_hat on real-fake lines."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = d(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al.): E[||grad D(x)||^2] on real x; `real` must require grad."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.flatten(1).pow(2).sum(dim=1).mean()
