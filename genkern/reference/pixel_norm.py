"""Reference pixel norm (Karras et al., "Progressive Growing of GANs", ICLR 2018, sec. 4.2):

    y = x / sqrt(mean_c(x^2) + eps)

normalising each feature vector (each pixel, or each row of an [N, C] latent) to unit RMS over the
channels. float16/bfloat16 inputs are computed in float32, like the kernels.
"""
from __future__ import annotations

import torch


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xc * torch.rsqrt(xc.square().mean(dim=1, keepdim=True) + eps)
    return torch.empty_like(x).copy_(y)
