"""Reference GroupNorm + activation, exactly what eager PyTorch users write.

GroupNorm (Wu & He, 2018) over `num_groups` groups of C/num_groups channels and all spatial positions:
    mu, var = mean and biased variance of x over each (n, group)
    u       = (x - mu) / sqrt(var + eps) * weight[c] + bias[c]
then y = act(u) with act one of
    "silu": u * sigmoid(u)                     (Elfwing et al. 2018; the DDPM/VAE ResBlock activation)
    "gelu": u * Phi(u), exact erf form         (Hendrycks & Gimpel 2016)
    "none": u
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "none": lambda u: u}


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    activation: str = "silu") -> torch.Tensor:
    return ACTIVATIONS[activation](F.group_norm(x, num_groups, weight, bias, eps))
