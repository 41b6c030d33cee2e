"""Reference gradient-norm penalties on a per-sample gradient tensor g = d critic / d input:

    WGAN-GP (Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017):
        weight * mean_i (||g_i||_2 - target)^2                       target given (1.0 in the paper)
    R1 (Mescheder et al., "Which Training Methods for GANs do actually Converge?", ICML 2018):
        weight * mean_i ||g_i||_2^2 with weight = gamma / 2           target None

||g_i|| is the 2-norm over all of sample i's elements. Computed in float32 (float64 for float64 g). A sample
whose gradient is exactly zero gets the norm's subgradient 0 (eager torch.norm's backward gives NaN there).
"""
from __future__ import annotations

from typing import Optional

import torch


def gradient_penalty(grad: torch.Tensor, weight: float, target: Optional[float]) -> torch.Tensor:
    g = grad.to(torch.promote_types(grad.dtype, torch.float32)).reshape(grad.shape[0], -1)
    sq = g.square().sum(dim=1)
    if target is None:
        return weight * sq.mean()
    # ||g_i|| with the subgradient 0 at g_i = 0 (sqrt's derivative there is infinite: eager gives NaN)
    nonzero = sq > 0
    norm = torch.where(nonzero, torch.where(nonzero, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    return weight * (norm - target).square().mean()
