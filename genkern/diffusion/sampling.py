"""The reverse loop: sample(model, scheduler, shape, ...) and the DDPMSampler / DDIMSampler wrappers.

Each step is one network call (on the doubled batch under classifier-free guidance) and one fused
scheduler step. Nothing is read back from the device inside the loop: timesteps are host ints, the
per-step scalars are host floats, and the noise is drawn inside the kernel from (seed, timestep).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..ops.ddpm_step import prepare_inpainting, random_seed
from .schedulers import DDIMScheduler, DDPMScheduler


def sample(model: Callable, scheduler, shape: Sequence[int], *, num_inference_steps: Optional[int] = None,
           class_labels: Optional[torch.Tensor] = None, guidance_scale: Optional[float] = None,
           null_label: Optional[int] = None, eta: float = 0.0, generator: Optional[torch.Generator] = None,
           seed: Optional[int] = None, latents: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
           known: Optional[torch.Tensor] = None, device=None, dtype: torch.dtype = torch.float32,
           memory_format: torch.memory_format = torch.contiguous_format, progress: bool = True,
           callback: Optional[Callable] = None) -> torch.Tensor:
    """Draw samples of ``shape`` = (B, C, H, W) by running ``scheduler`` from pure noise to t = 0.

    ``model(x, t)`` (or ``model(x, t, class_labels)`` when labels are given) returns the prediction the
    scheduler's prediction_type names, for x of shape [b, ...] and t a [b] int64 tensor.
    ``guidance_scale`` w: classifier-free guidance; the model sees [x; x] with labels
    [null_label; class_labels] (the unconditional half first) and the step guides as
    eps_u + w (eps_c - eps_u). ``null_label`` is the label the model was trained with for "no label".
    ``num_inference_steps``: set on the scheduler first (default: keep its timesteps).
    Reproducibility: ``seed`` fixes the start noise and every step's in-kernel noise, on every backend;
    ``generator`` draws both from a torch.Generator as diffusers does (a noise tensor per step).
    ``mask``/``known``: inpainting, 1 = keep ``known``. ``callback(i, t, x)`` runs after each step.
    ``memory_format``: the layout of x through the loop (what the model sees and what is returned), e.g.
    ``torch.channels_last`` for a model converted with ``.to(memory_format=torch.channels_last)``, whose
    convolutions then take no layout conversions. The start noise is drawn as for NCHW and then laid
    out; the in-kernel noise fills memory in order (as ``randn_like`` does), so a seed's samples in
    channels_last differ from its NCHW samples, equally distributed.
    """
    if guidance_scale is not None:
        if class_labels is None or null_label is None:
            raise ValueError("sample: guidance_scale needs class_labels and the model's null_label")
    if seed is not None and generator is not None:
        raise ValueError("sample: pass seed or generator, not both")
    if not isinstance(memory_format, torch.memory_format):
        raise TypeError(f"sample: memory_format must be a torch.memory_format, got {memory_format!r}")
    device = torch.device(device) if device is not None else (
        latents.device if latents is not None else torch.device("cpu"))
    shape = tuple(int(s) for s in shape)
    rank = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(memory_format)
    if rank is not None and len(shape) != rank:
        raise ValueError(f"sample: memory_format={memory_format} needs a {rank}-d shape, got {shape}")
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    elif isinstance(scheduler, DDIMScheduler) and scheduler.num_inference_steps is None:
        raise ValueError("sample: DDIM needs num_inference_steps")
    if seed is None and generator is None:
        seed = random_seed()
    if latents is None:
        g = generator if generator is not None else torch.Generator().manual_seed(seed)
        latents = torch.randn(shape, generator=g, device=g.device, dtype=dtype).to(device)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"sample: latents must have shape {shape}, got {tuple(latents.shape)}")
    x = (latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma).contiguous(memory_format=memory_format)
    if mask is not None or known is not None:
        if mask is None or known is None:
            raise ValueError("sample: mask and known must be given together")
        mask, known = prepare_inpainting(mask.to(device), known.to(device), x)
    labels = None
    if class_labels is not None:
        labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        if labels.shape[0] != shape[0]:
            raise ValueError(f"sample: class_labels must hold one label per sample ({shape[0]}), got {labels.shape[0]}")
        if guidance_scale is not None:
            labels = torch.cat([torch.full_like(labels, null_label), labels])
    timesteps = list(scheduler._host_timesteps)
    step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    from tqdm.auto import tqdm
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
        x_in = torch.cat([x, x]) if guidance_scale is not None else x
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.int64, device=device)
        out = model(x_in, t_in) if labels is None else model(x_in, t_in, labels)
        x = scheduler.step(out, t, x, generator=generator, seed=seed, guidance_scale=guidance_scale,
                           mask=mask, known=known, return_dict=False, **step_kwargs)[0]
        if callback is not None:
            callback(i, t, x)
    return x


class _Sampler:
    scheduler_cls = DDPMScheduler

    def __init__(self, model: Callable, scheduler=None, **scheduler_kwargs):
        self.model = model
        self.scheduler = scheduler if scheduler is not None else self.scheduler_cls(**scheduler_kwargs)

    @torch.no_grad()
    def __call__(self, shape: Sequence[int], **kwargs) -> torch.Tensor:
        return sample(self.model, self.scheduler, shape, **kwargs)


class DDPMSampler(_Sampler):
    """``DDPMSampler(model, **DDPMScheduler kwargs)(shape, num_inference_steps=..., seed=...)``."""
    scheduler_cls = DDPMScheduler


class DDIMSampler(_Sampler):
    """``DDIMSampler(model, **DDIMScheduler kwargs)(shape, num_inference_steps=50, eta=0.0, ...)``."""
    scheduler_cls = DDIMScheduler
