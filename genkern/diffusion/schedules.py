"""Noise schedules: beta_t for t = 0 .. T-1, computed exactly as diffusers does (float32), so that a
scheduler built from the same config has the same alpha_bar table, bit for bit.

linear:             Ho et al. 2020 (beta 1e-4 .. 0.02 over T = 1000)
scaled_linear:      linear in sqrt(beta) (latent diffusion / Stable Diffusion)
squaredcos_cap_v2:  Nichol & Dhariwal 2021, alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi / 2), s = 0.008,
                    beta capped at 0.999 ("cosine" is accepted as an alias)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps),
                             max_beta) for i in range(num_train_timesteps)], dtype=torch.float32)


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas: Optional[Sequence[float]] = None) -> torch.Tensor:
    if trained_betas is not None:
        betas = torch.tensor(list(trained_betas), dtype=torch.float32)
        if betas.dim() != 1 or betas.numel() != num_train_timesteps:
            raise ValueError(f"trained_betas must hold num_train_timesteps={num_train_timesteps} values, "
                             f"got {betas.numel()}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule in ("squaredcos_cap_v2", "cosine"):
        betas = cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("every beta must lie in (0, 1)")
    return betas


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str,
                     steps_offset: int) -> list[int]:
    """The inference timesteps, descending, laid out as diffusers' set_timesteps does (numpy rounding,
    half to even; see Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
    Table 2, for the three spacings)."""
    T, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {timestep_spacing!r}")
    return [int(t) for t in ts]
