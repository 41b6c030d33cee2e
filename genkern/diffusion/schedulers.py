"""DDPMScheduler and DDIMScheduler: diffusers-compatible schedulers whose step is one fused kernel.

Constructor keywords, defaults, timestep layouts and the alpha_bar table follow diffusers'
DDPMScheduler / DDIMScheduler, and from_config() takes a diffusers scheduler config, so a diffusers
user swaps the class and gets the same samples from the same noise (to float rounding: genkern works
the step's scalars out in float64, diffusers in float32). What differs, on purpose:

* step() is genkern.ddpm_step: one pass, classifier-free guidance (guidance_scale, model_output =
  [uncond; cond]) and inpainting (mask, known) in the same pass, and noise drawn inside the kernel
  from (seed, offset) when no tensor or torch.Generator is given, so nothing is read back from the
  device per step. A timestep passed as a device tensor is not read: the scheduler's own step counter
  says which timestep it is (pipelines consume `timesteps` in order).
* No noise at the final step (prev_timestep < 0), for DDIM too. diffusers' DDPMScheduler adds noise
  whenever t > 0, which differs only when steps_offset > 0 makes the final timestep positive.
* Not supported (a clear error): learned variances, dynamic thresholding, zero-terminal-SNR rescaling
  (alpha_bar_T = 0 leaves nothing to divide by in the fused x0 formula).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..ops.ddpm_step import (PREDICTION_TYPES, VARIANCE_TYPES, add_noise as _add_noise, ddpm_step,
                             random_seed)
from .schedules import make_betas, spaced_timesteps


@dataclass
class SchedulerOutput:
    """Like diffusers' DDPMSchedulerOutput: ``.prev_sample``, and tuple-style ``out[0]``."""
    prev_sample: torch.Tensor

    def __getitem__(self, i):
        return (self.prev_sample,)[i]


class FrozenConfig(dict):
    """The constructor's arguments, readable as ``config.beta_end`` or ``config["beta_end"]``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Scheduler:
    _method = "ddpm"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, **kwargs):
        name = type(self).__name__
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"{name}: num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{name}: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if thresholding:
            raise NotImplementedError(f"{name}: dynamic thresholding (thresholding=True) is not supported by the "
                                      "fused step; use clip_sample")
        if rescale_betas_zero_snr:
            raise NotImplementedError(f"{name}: rescale_betas_zero_snr=True gives alpha_bar_T = 0, which the fused "
                                      "step cannot divide by")
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"{name}: clip_sample_range must be > 0, got {clip_sample_range!r}")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"{name}: timestep_spacing must be 'leading', 'trailing' or 'linspace', "
                             f"got {timestep_spacing!r}")
        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)          # float32, as diffusers
        self._abar = self.alphas_cumprod.double().tolist()                # host copy: no device reads
        self._tables: dict = {}                                           # device copies for add_noise
        self.config = FrozenConfig(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr, **kwargs)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: Optional[int] = None
        self._set_host_timesteps(list(range(num_train_timesteps))[::-1], custom=False)

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a diffusers scheduler config (a dict, a FrozenDict, or anything with ``.config``);
        keys this scheduler has no use for (``_class_name``, another scheduler's options) are ignored."""
        if hasattr(config, "config") and not isinstance(config, dict):
            config = config.config
        config = dict(config, **overrides)
        params = set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(_Scheduler.__init__).parameters)
        params -= {"self", "kwargs"}
        return cls(**{k: v for k, v in config.items() if k in params})

    def _set_host_timesteps(self, ts: list[int], custom: bool, device=None):
        self._host_timesteps = ts
        self._index = {t: i for i, t in enumerate(ts)}
        self._custom = custom
        self.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[Sequence[int]] = None):
        """Lay out the inference timesteps (descending) as diffusers does; or use custom ``timesteps``."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(ts, ts[1:])) or not ts or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"set_timesteps: timesteps must be strictly descending within [0, {T}), got {ts}")
            self.num_inference_steps = len(ts)
            self._set_host_timesteps(ts, custom=True, device=device)
            return
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or not 1 <= num_inference_steps <= T:
            raise ValueError(f"set_timesteps: num_inference_steps must be an int in [1, {T}], "
                             f"got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(T, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset)
        if ts[0] >= T or ts[-1] < 0:
            raise ValueError(f"set_timesteps: steps_offset={self.config.steps_offset} puts timesteps outside [0, {T})")
        self._set_host_timesteps(ts, custom=False, device=device)

    def _timestep_int(self, timestep) -> int:
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"step: timestep must be a single value, got shape {tuple(timestep.shape)}")
            if timestep.device.type != "cpu":
                # reading it would synchronise the device: trust the order the loop consumes timesteps in
                t = self._host_timesteps[min(self._step_index, len(self._host_timesteps) - 1)]
                return t
            timestep = timestep.item()
        if isinstance(timestep, float) and timestep.is_integer():
            timestep = int(timestep)
        try:
            t = int(timestep)
        except (TypeError, ValueError):
            raise TypeError(f"step: timestep must be an int or a one-element tensor, got {timestep!r}") from None
        if t != timestep:
            raise TypeError(f"step: timestep must be an integer, got {timestep!r}")
        T = self.config.num_train_timesteps
        if not 0 <= t < T:
            raise ValueError(f"step: timestep must lie in [0, {T}), got {t}")
        return t

    def alpha_prod(self, t: int) -> float:
        return self._abar[t]

    def _check_eta(self, eta):
        return 0.0

    # ---------------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor, *,
             noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
             seed: Optional[int] = None, offset: Optional[int] = None, eta: Optional[float] = None,
             guidance_scale: Optional[float] = None, use_clipped_model_output: bool = False,
             mask: Optional[torch.Tensor] = None, known: Optional[torch.Tensor] = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True):
        """x_{t-1} from ``model_output`` at ``timestep`` and x_t = ``sample``, fused (genkern.ddpm_step).

        Noise, first that applies: ``noise`` (or diffusers' name ``variance_noise``), a tensor like sample;
        ``generator``: torch.randn(sample.shape, generator=generator) exactly as diffusers draws it;
        ``seed`` (+ ``offset``, default the timestep): drawn inside the kernel; none of these: a seed
        from torch's global CPU generator, then drawn inside the kernel.
        ``guidance_scale``: model_output is [2B, ...] = (unconditional, conditional), guided in the kernel.
        ``mask``, ``known``: inpainting (1 = keep the known image). Returns a SchedulerOutput
        (``.prev_sample``), or the tuple ``(prev_sample,)`` with return_dict=False.
        """
        if self.num_inference_steps is None and self._method == "ddim":
            raise ValueError("step: call set_timesteps(num_inference_steps) first")
        if variance_noise is not None:
            if noise is not None:
                raise ValueError("step: pass noise or variance_noise, not both")
            noise = variance_noise
        given = [n for n, v in (("noise", noise), ("generator", generator), ("seed", seed)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"step: pass at most one of noise, generator and seed, got {' and '.join(given)}")
        t = self._timestep_int(timestep)
        prev_t = self.previous_timestep(t)
        a_t = self._abar[t]
        a_prev = self._abar[prev_t] if prev_t >= 0 else self._final_alpha_prod()
        eta = self._check_eta(eta)
        last = prev_t < 0
        if generator is not None:
            stochastic = not last and (self._method == "ddpm" or eta > 0 or mask is not None)
            if stochastic:
                shape = sample.shape
                noise = torch.randn(shape, generator=generator, device=generator.device, dtype=sample.dtype)
                noise = noise.to(sample.device)
        elif noise is None and seed is None:
            seed = random_seed()
        cfg = self.config
        out = ddpm_step(model_output, sample, a_t, a_prev, method=self._method, prediction_type=cfg.prediction_type,
                        variance_type=cfg.get("variance_type", "fixed_small"), eta=eta,
                        clip_sample_range=cfg.clip_sample_range if cfg.clip_sample else None,
                        use_clipped_model_output=use_clipped_model_output, guidance_scale=guidance_scale,
                        noise=noise, seed=seed, offset=t if offset is None else offset, mask=mask, known=known,
                        last_step=last)
        self._step_index = self._index.get(t, self._step_index) + 1
        return SchedulerOutput(out) if return_dict else (out,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: Union[int, torch.Tensor]) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise for per-sample ``timesteps`` (the training forward
        process), fused. The coefficients are gathered on the samples' device: nothing is read back."""
        dev = original_samples.device
        if dev not in self._tables:
            a = self.alphas_cumprod.double()
            self._tables[dev] = (a.sqrt().float().to(dev), (1 - a).sqrt().float().to(dev))
        sa, s1 = self._tables[dev]
        T = self.config.num_train_timesteps
        if isinstance(timesteps, torch.Tensor):
            if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
                raise TypeError(f"add_noise: timesteps must be an integer tensor, got {timesteps.dtype}")
            if timesteps.device.type == "cpu" and timesteps.numel() and not bool(
                    ((timesteps >= 0) & (timesteps < T)).all()):
                raise ValueError(f"add_noise: timesteps must lie in [0, {T})")
            idx = timesteps.to(dev).reshape(-1)
        else:
            t = int(timesteps)
            if not 0 <= t < T:
                raise ValueError(f"add_noise: timesteps must lie in [0, {T}), got {t}")
            idx = torch.full((1,), t, dtype=torch.int64, device=dev)
        # out-of-range indices on a device would fault inside index_select; clamp keeps them in the table
        idx = idx.clamp(0, T - 1)
        return _add_noise(original_samples, noise, sa.index_select(0, idx), s1.index_select(0, idx))

    def __len__(self):
        return self.config.num_train_timesteps


class DDPMScheduler(_Scheduler):
    """Ancestral sampling of Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (2020), with the
    keywords and defaults of diffusers.DDPMScheduler (variance_type "fixed_small" = beta~_t, or its
    "fixed_small_log" form, the same sigma; "fixed_large" = beta_t)."""
    _method = "ddpm"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 variance_type: str = "fixed_small", clip_sample: bool = True, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"DDPMScheduler: variance_type must be one of {VARIANCE_TYPES} (learned variances "
                             f"are not supported), got {variance_type!r}")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, clip_sample,
                         prediction_type, thresholding, dynamic_thresholding_ratio, clip_sample_range,
                         sample_max_value, timestep_spacing, steps_offset, rescale_betas_zero_snr,
                         variance_type=variance_type)
        self.variance_type = variance_type

    def previous_timestep(self, t: int) -> int:
        if self._custom or self.num_inference_steps:
            i = self._index.get(t)
            if i is None:
                raise ValueError(f"step: timestep {t} is not one of the scheduler's timesteps")
            return self._host_timesteps[i + 1] if i + 1 < len(self._host_timesteps) else -1
        return t - 1

    def _final_alpha_prod(self) -> float:
        return 1.0

    def _check_eta(self, eta):
        if eta not in (None, 0, 0.0):
            raise ValueError(f"DDPMScheduler.step: eta applies to DDIM only, got {eta!r}")
        return 0.0


class DDIMScheduler(_Scheduler):
    """Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (ICLR 2021), with the keywords and
    defaults of diffusers.DDIMScheduler; ``eta`` 0 is deterministic DDIM, 1 matches DDPM's variance."""
    _method = "ddim"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, clip_sample,
                         prediction_type, thresholding, dynamic_thresholding_ratio, clip_sample_range,
                         sample_max_value, timestep_spacing, steps_offset, rescale_betas_zero_snr,
                         set_alpha_to_one=set_alpha_to_one)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else self._abar[0]
        self.num_inference_steps = None

    def previous_timestep(self, t: int) -> int:
        if self._custom:
            i = self._index.get(t)
            if i is None:
                raise ValueError(f"step: timestep {t} is not one of the scheduler's timesteps")
            return self._host_timesteps[i + 1] if i + 1 < len(self._host_timesteps) else -1
        return t - self.config.num_train_timesteps // self.num_inference_steps

    def _final_alpha_prod(self) -> float:
        return self.final_alpha_cumprod

    def _check_eta(self, eta):
        eta = 0.0 if eta is None else eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"DDIMScheduler.step: eta must be a finite number >= 0, got {eta!r}")
        return float(eta)
