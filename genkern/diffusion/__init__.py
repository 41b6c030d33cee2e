"""Diffusion sampling with fused steps: diffusers-compatible DDPM/DDIM schedulers (their step() and
add_noise() are single genkern kernels), noise schedules, and sampling loops with classifier-free
guidance, inpainting, progress bar and callbacks.

    sched = genkern.diffusion.DDIMScheduler()                 # diffusers' keywords and defaults
    sched.set_timesteps(50)
    x = genkern.diffusion.sample(unet, sched, (8, 3, 32, 32), seed=0, eta=0.0)
"""
from .sampling import DDIMSampler, DDPMSampler, sample
from .schedulers import DDIMScheduler, DDPMScheduler, FrozenConfig, SchedulerOutput
from .schedules import make_betas, spaced_timesteps
from ..ops.ddpm_step import step_coefficients

__all__ = ["DDPMScheduler", "DDIMScheduler", "DDPMSampler", "DDIMSampler", "sample", "SchedulerOutput",
           "FrozenConfig", "make_betas", "spaced_timesteps", "step_coefficients"]
