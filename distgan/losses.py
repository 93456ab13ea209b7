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


# ---------------------------------------------------------------- representation losses (objectives.py)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR): a, b (N, P) L2-normalised projections of two views of the same N images.
    Each of the 2N rows has its other view as the positive and the remaining 2N - 2 as negatives;
    the loss is the mean cross-entropy of picking the positive from cosine similarities / temperature."""
    n = a.shape[0]
    z = torch.cat([a, b]).float()  # (2N, P)
    sim = (z @ z.t()) / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # never itself
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positive)


def supcon_fake(real1: torch.Tensor, real2: torch.Tensor, fake: torch.Tensor, temperature: float) -> torch.Tensor:
    """ContraD's supervised-contrastive loss for fakes: each fake (N, P) is pulled towards the
    other N - 1 fakes and away from the 2N real views (all L2-normalised); the mean over fakes of
    -mean log-softmax probability of its positives."""
    n = fake.shape[0]
    z = torch.cat([real1, real2, fake]).float()  # (3N, P)
    sim = (fake.float() @ z.t()) / temperature  # (N, 3N): each fake against everything
    self_mask = torch.zeros_like(sim, dtype=torch.bool)
    self_mask[:, 2 * n :] = torch.eye(n, dtype=torch.bool, device=z.device)
    logp = F.log_softmax(sim.masked_fill(self_mask, float("-inf")), dim=1)
    positives = logp[:, 2 * n :].masked_fill(self_mask[:, 2 * n :], 0.0)  # (N, N), own column zeroed
    return -(positives.sum(dim=1) / (n - 1)).mean()
