"""Reference GroupNorm + activation: the formula, written out in plain PyTorch.

GroupNorm (Wu & He, ECCV 2018) over `num_groups` groups of C/num_groups channels and all positions:
    mu, var = mean and biased variance of x over each (sample, group)
    u       = (x - mu) / sqrt(var + eps) * weight[c] + bias[c]
then y = act(u) with act one of
    "silu": u * sigmoid(u)                     (Elfwing et al. 2018; the DDPM/VAE ResBlock activation)
    "gelu": u * Phi(u), exact erf form         (Hendrycks & Gimpel 2016)
    "none": u
float16/bfloat16 inputs are computed in float32 and rounded once at the end, like the kernels.
Unlike F.group_norm this accepts a batch of one 1x1 image (each group still has C/G values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "none": lambda u: u}


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    activation: str = "silu") -> torch.Tensor:
    N, C = x.shape[:2]
    compute = torch.promote_types(x.dtype, torch.float32)
    xg = x.to(compute).reshape(N, num_groups, -1)
    var, mu = torch.var_mean(xg, dim=-1, correction=0, keepdim=True)
    u = ((xg - mu) * torch.rsqrt(var + eps)).reshape(x.shape)
    per_channel = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        u = u * weight.to(compute).reshape(per_channel)
    if bias is not None:
        u = u + bias.to(compute).reshape(per_channel)
    # same dtype and memory format as x (empty_like keeps the strides of a dense x)
    return torch.empty_like(x).copy_(ACTIVATIONS[activation](u))
