"""Representation objectives for D (objective.name), as step functions beside the plain GAN's.

  gan          steps.d_step / steps.g_step (real/fake only)
  contrastive  ContraD (Jeong & Shin, ICLR 2021): D's trunk learns from NT-Xent between two
               augmented views of each real image (head `proj`) plus a supervised-contrastive
               loss pulling fakes together and away from reals (head `proj_fake`); the real/fake
               loss trains the `dis` MLP on detached trunk features. G learns through
               D(augment(G(z))), gradient through the trunk.
  rotation     SS-GAN (Chen et al., CVPR 2019): the GAN losses plus D predicting which of four
               rotations a real image had (weight rotation_weight) and G being asked to make
               fakes whose rotation D can tell (rotation_g_weight).
  autoencoder  D's blocks encode an image to a z_dim code, G decodes it; mean squared error
               trains both; no adversarial loss. The same loop, checkpoint and embedding path.

Views are augmented on the device, per image, differentiably (G's gradient passes through them).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from .config import Config, ObjectiveConfig, view_augments
from .losses import get_loss, nt_xent, supcon_fake
from .models import autocast
from .steps import AUGMENTS as DIFF_AUGMENTS
from .steps import Nets, _optimizer_step, d_step, g_step, sample_z

# ---------------------------------------------------------------- views


def _crop(x: torch.Tensor, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Random resized crop (SimCLR's): a box of `scale` of the area and `ratio` aspect, resampled
    to the full size with a per-image affine grid (bilinear, so differentiable in x)."""
    n, dev = x.shape[0], x.device
    area = torch.empty(n, device=dev).uniform_(*scale)
    r = torch.exp(torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    sw, sh = torch.sqrt(area * r).clamp(max=1.0), torch.sqrt(area / r).clamp(max=1.0)  # box size, fraction of W, H
    tx, ty = (torch.rand(n, device=dev) * 2 - 1) * (1 - sw), (torch.rand(n, device=dev) * 2 - 1) * (1 - sh)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)  # (N, 2, 3): output grid -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, tx, sh, ty
    return _warp(x, theta, "reflection")


def _warp(x: torch.Tensor, theta: torch.Tensor, padding: str) -> torch.Tensor:
    """Resample each image of x (N, C, H, W) through its own affine map theta (N, 2, 3), bilinear,
    so differentiable in x; what falls outside the image reads `padding`."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _rotate(x: torch.Tensor, degrees=(-15.0, 15.0)) -> torch.Tensor:
    """A small random rotation per image (digits keep their class under a slant; 90 degrees
    would not), resampled bilinearly about the centre; corners read the border pixels (the
    background on MNIST-like data). Positive angles turn the content counter-clockwise (row 0 on top)."""
    n, dev = x.shape[0], x.device
    a = torch.empty(n, device=dev, dtype=x.dtype).uniform_(*degrees) * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)  # (N, 2, 3): output grid -> input coordinates
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return _warp(x, theta, "border")


def _flip(x: torch.Tensor) -> torch.Tensor:
    keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(keep, x, x.flip(3))


def _gray(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    luma = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)[None, :, None, None]).sum(1, keepdim=True)
    pick = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p
    return torch.where(pick, luma.expand_as(x), x)


# intensity: DiffAugment's brightness and contrast without saturation, the part of colour jitter
# that means something on one channel (SimCLR's colour distortion stops a view matching its
# partner by histogram alone; on grayscale the histogram is the intensities).
VIEW_AUGMENTS = {"crop": _crop, "rotate": _rotate, "flip": _flip, "gray": _gray, "intensity": partial(DIFF_AUGMENTS["color"], saturation=False),
                 **DIFF_AUGMENTS}


def augment_views(x: torch.Tensor, names: list[str], crop_scale: float = ObjectiveConfig.crop_scale) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> the same shape, each image its own random draw of every op."""
    for name in names:
        x = _crop(x, scale=(crop_scale, 1.0)) if name == "crop" else VIEW_AUGMENTS[name](x)
    return x


# ---------------------------------------------------------------- D steps


def contrastive_d_step(nets: Nets, real: torch.Tensor, cfg: Config, step: int = 0) -> dict[str, torch.Tensor]:
    """(1) ContraD's D update on real (N, C, H, W): two views of each real and one of each fake
    go through D once (3N images), so DDP sees every head in one forward."""
    d_loss_fn, _ = get_loss(cfg.loss.name)
    obj, n = cfg.objective, real.shape[0]
    with torch.no_grad(), autocast(real.device, nets.amp):
        fake = nets.G(sample_z(n, cfg.model.z_dim, real.device)).float()
    views = augment_views(torch.cat([real, real, fake]), view_augments(obj.augment, real.shape[1]), obj.crop_scale)  # (3N, C, H, W)
    with autocast(real.device, nets.amp):
        logits, proj, proj_fake = nets.D(views, train=True)  # (3N,), (3N, P), (3N, P)
    logits = logits.float()
    p, q = F.normalize(proj.float(), dim=1), F.normalize(proj_fake.float(), dim=1)
    simclr = nt_xent(p[:n], p[n : 2 * n], obj.temperature)
    sup = supcon_fake(q[:n], q[n : 2 * n], q[2 * n :], obj.temperature)
    gan = d_loss_fn(logits[:n], logits[2 * n :])
    loss = simclr + obj.fake_weight * sup + gan
    norm = _optimizer_step(nets, 0, loss, nets.D, nets.opt_d, nets.scaler_d, step)
    return {"loss/d": loss.detach(), "loss/d_gan": gan.detach(), "loss/nt_xent": simclr.detach(),
            "loss/supcon_fake": sup.detach(), "d/real": logits[:n].detach().mean(),
            "d/fake": logits[2 * n :].detach().mean(), "grad_norm/d": norm}


def _rotated(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image turned by a random multiple of 90 degrees: (N, C, H, W), and the turns (N,)."""
    turns = torch.randint(0, 4, (x.shape[0],), device=x.device)
    every = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])  # (4, N, C, H, W)
    return every[turns, torch.arange(x.shape[0], device=x.device)], turns


def _rotation_loss(D, x: torch.Tensor, amp: str) -> torch.Tensor:
    xr, turns = _rotated(x)
    with autocast(x.device, amp):
        _, rot_logits = D(xr, train=True)  # (N, 4)
    return F.cross_entropy(rot_logits.float(), turns)


def autoencoder_step(nets: Nets, real: torch.Tensor, cfg: Config, step: int = 0) -> dict[str, torch.Tensor]:
    """Encoder (D's blocks + code) and decoder (G) on one reconstruction loss, one backward."""
    with autocast(real.device, nets.amp):
        recon = nets.G(nets.D(real))  # (N, C, H, W)
    loss = F.mse_loss(recon.float(), real)
    norm = _optimizer_step(nets, 0, loss, nets.D, nets.opt_d, nets.scaler_d, step, also=[(nets.G, nets.opt_g)])
    return {"loss/rec": loss.detach(), "grad_norm/d": norm}


def _contrastive_g_augment(cfg: Config, x: torch.Tensor) -> torch.Tensor:
    return augment_views(x, view_augments(cfg.objective.augment, x.shape[1]), cfg.objective.crop_scale)


def steps_for(cfg: Config):
    """(d_step, g_step or None) for cfg.objective.name; both take (nets, ..., cfg, step)."""
    name, obj = cfg.objective.name, cfg.objective
    if name == "contrastive":
        return contrastive_d_step, partial(g_step, augment=partial(_contrastive_g_augment, cfg))
    if name == "rotation":
        d_extra = lambda D, real, amp: obj.rotation_weight * _rotation_loss(D, real, amp)  # noqa: E731
        g_extra = lambda D, fake, amp: obj.rotation_g_weight * _rotation_loss(D, fake, amp)  # noqa: E731
        return partial(d_step, extra=d_extra), partial(g_step, extra=g_extra)
    if name == "autoencoder":
        return autoencoder_step, None
    return d_step, g_step
