"""One reverse-diffusion step x_t -> x_{t-1}, in plain PyTorch: the readable form of the fused
ddpm_step kernels (csrc/cpu/ddpm_step.cpp, csrc/cuda/ddpm_step.cu, genkern/triton/ddpm_step.py) with
the same arguments as the op genkern::ddpm_step. The per-step scalars (coef_x0, coef_eps, coef_sample,
sigma, ...) are computed on the host by genkern.ops.ddpm_step.step_coefficients.

DDPM: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (eqs. 6-7, 15).
DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021 (eq. 12).
v-prediction: Salimans & Ho, "Progressive Distillation", ICLR 2022. Classifier-free guidance:
Ho & Salimans 2022, in diffusers' convention eps = eps_u + w (eps_c - eps_u). Inpainting:
Lugmayr et al., "RePaint", CVPR 2022 (Algorithm 1, lines 5 and 8, sharing z as diffusers does).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._layout import elementwise_strides
from .philox import philox_normal


def ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
              mask: Optional[torch.Tensor], known: Optional[torch.Tensor], prediction_type: str,
              sqrt_alpha_prod: float, sqrt_one_minus_alpha_prod: float, clip_range: Optional[float],
              recompute_eps: bool, coef_x0: float, coef_eps: float, coef_sample: float, sigma: float,
              known_coef: float, known_noise_coef: float, guidance_scale: Optional[float],
              seed: Optional[int], offset: int) -> torch.Tensor:
    dt = torch.promote_types(sample.dtype, torch.float32)   # 16-bit inputs compute in float32
    x = sample.to(dt)
    m = model_output.to(dt)
    if guidance_scale is not None:                           # (uncond, cond) halves of the batch
        m_u, m_c = m.chunk(2)
        m = m_u + guidance_scale * (m_c - m_u)
    sa, s1 = sqrt_alpha_prod, sqrt_one_minus_alpha_prod      # sqrt(abar_t), sqrt(1 - abar_t)
    if prediction_type == "epsilon":
        x0, eps = (x - s1 * m) / sa, m
    elif prediction_type == "sample":
        x0, eps = m, (x - sa * m) / s1
    elif prediction_type == "v_prediction":
        x0, eps = sa * x - s1 * m, sa * m + s1 * x
    else:
        raise ValueError(f"ddpm_step: prediction_type must be 'epsilon', 'sample' or 'v_prediction', "
                         f"got {prediction_type!r}")
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
        if recompute_eps:
            eps = (x - sa * x0) / s1
    if noise is not None:
        z = noise.to(dt)
    elif seed is not None:
        z = philox_normal(sample.shape, seed, offset, dtype=dt, device=sample.device,
                          strides=elementwise_strides(sample))
    else:
        z = torch.zeros_like(x)
    x_prev = coef_x0 * x0 + coef_eps * eps + coef_sample * x + sigma * z
    if mask is not None:
        known_prev = known_coef * known.to(dt) + known_noise_coef * z   # the known image noised to t-1
        x_prev = x_prev + mask.to(dt) * (known_prev - x_prev)
    return x_prev.to(sample.dtype)


def add_noise(original_samples: torch.Tensor, noise: torch.Tensor, sqrt_alpha_prod: torch.Tensor,
              sqrt_one_minus_alpha_prod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) sampled: sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, per-sample coefficients [N]
    (Ho et al. 2020, eq. 4)."""
    dt = torch.promote_types(original_samples.dtype, torch.float32)
    view = (-1,) + (1,) * (original_samples.dim() - 1)
    out = (sqrt_alpha_prod.to(dt).view(view) * original_samples.to(dt)
           + sqrt_one_minus_alpha_prod.to(dt).view(view) * noise.to(dt))
    return out.to(original_samples.dtype)
