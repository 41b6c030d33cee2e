"""Layers the GAN and VAE models share: the eager versions of genkern's GAN ops (what `fused=False`
builds, as ProGAN and StyleGAN2 wrote them), equalized-learning-rate layers, and a switch that
picks the fused or the eager module."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import genkern.nn


def eager_pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """ProGAN's pixel norm as written (Karras et al. 2018, sec. 4.2)."""
    return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + eps)


def eager_minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1,
                           eps: float = 1e-8) -> torch.Tensor:
    """StyleGAN2's MinibatchStdLayer.forward as written."""
    N, C, H, W = x.shape
    G = min(group_size, N)
    y = x.reshape(G, -1, num_channels, C // num_channels, H, W)
    y = y - y.mean(dim=0)
    y = (y.square().mean(dim=0) + eps).sqrt()
    y = y.mean(dim=[2, 3, 4]).reshape(-1, num_channels, 1, 1).repeat(G, 1, H, W)
    return torch.cat([x, y], dim=1)


def eager_gradient_penalty(critic, real, fake, weight: float = 10.0, target: float = 1.0, *, generator=None):
    """WGAN-GP (Gulrajani et al. 2017, eq. 3) in eager PyTorch: what genkern.gradient_penalty fuses."""
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator,
                     device=generator.device if generator is not None else real.device).to(real)
    x = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    g, = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return weight * ((g.reshape(g.shape[0], -1).norm(2, dim=1) - target) ** 2).mean()


class EagerPixelNorm(nn.Module):
    def forward(self, x):
        return eager_pixel_norm(x)


class EagerMinibatchStdDev(nn.Module):
    def __init__(self, group_size: int = 4, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x):
        return eager_minibatch_stddev(x, self.group_size, self.num_channels)


def pixel_norm(fused: bool) -> nn.Module:
    return genkern.nn.PixelNorm() if fused else EagerPixelNorm()


def minibatch_stddev(fused: bool, group_size: int = 4) -> nn.Module:
    return genkern.nn.MinibatchStdDev(group_size) if fused else EagerMinibatchStdDev(group_size)


def group_norm_silu(fused: bool, groups: int, channels: int) -> nn.Module:
    """GroupNorm + SiLU; the parameters live in module [0] either way, so state_dicts match."""
    if fused:
        return nn.Sequential(genkern.nn.GroupNormSiLU(groups, channels), nn.Identity())
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU())


class EqualizedConv2d(nn.Module):
    """Conv with weights ~ N(0, 1) scaled by He's constant sqrt(2 / fan_in) at run time, so Adam's
    per-parameter step sizes are the same for every layer (ProGAN's equalized learning rate)."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, gain: float = 2 ** 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin * kernel * kernel)
        self.padding = padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    def __init__(self, cin: int, cout: int, gain: float = 2 ** 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latent vectors a and b (rows), t in [0, 1] (White 2016): the
    path a Gaussian latent's norm stays typical along, unlike the straight line."""
    a2, b2 = a.flatten(1), b.flatten(1)
    cos = (F.normalize(a2, dim=1) * F.normalize(b2, dim=1)).sum(1, keepdim=True).clamp(-1, 1)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    t = t.reshape(-1, 1).to(a2)
    small = so.abs() < 1e-6  # (anti)parallel: fall back to the straight line
    wa = torch.where(small, 1 - t, torch.sin((1 - t) * omega) / so.where(~small, torch.ones_like(so)))
    wb = torch.where(small, t, torch.sin(t * omega) / so.where(~small, torch.ones_like(so)))
    return (wa * a2 + wb * b2).reshape((-1,) + a.shape[1:])


def slerp_strip(ends: torch.Tensor, n: int) -> torch.Tensor:
    """n latents evenly spaced in t on the slerp path from ends[0] to ends[1] (the sample grids' last row)."""
    rest = ends.shape[1:]
    return slerp(ends[:1].expand(n, *rest), ends[1:2].expand(n, *rest), torch.linspace(0, 1, n))
