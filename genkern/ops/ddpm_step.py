"""genkern.ddpm_step / genkern.add_noise: the sampling update and the forward process of a diffusion
model, each one pass over memory.

ddpm_step turns (x_t, model output) into x_{t-1} for DDPM (Ho et al. 2020) or DDIM (Song et al. 2021):
x0 from the model output by prediction type, optional clamp, the posterior mean, the noise term (from a
given tensor, or drawn inside the kernel from the Philox stream (seed, offset): no noise tensor is ever
written or read), classifier-free guidance over the (unconditional, conditional) halves of the model
output, and RePaint-style inpainting, all in the same pass. Host code here turns alpha_bar_t and
alpha_bar_{t-1} into the step's scalars (step_coefficients), so no device value is read per step.

Registered ops: genkern::ddpm_step and genkern::add_noise (C++ schemas in csrc/ops.cpp, CPU + CUDA
kernels) and their Triton twins genkern::ddpm_step_triton / add_noise_triton (custom ops). Their
backward is the reference formula's, differentiated (the step is linear in everything but the clamp);
the mask gets no gradient.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import _backend, _extension
from ._call import call_kernel, register_autograd
from ._checks import check_same_device
from .._layout import elementwise_strides, to_strides
from .. import reference as _reference

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
METHODS = ("ddpm", "ddim")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class StepCoefficients(NamedTuple):
    """The scalars of one step: x_prev = coef_x0 x0 + coef_eps eps + coef_sample x_t + sigma z,
    known region known_coef * known + known_noise_coef * z."""
    sqrt_alpha_prod: float
    sqrt_one_minus_alpha_prod: float
    coef_x0: float
    coef_eps: float
    coef_sample: float
    sigma: float
    known_coef: float
    known_noise_coef: float


def _check_alpha(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        v = v.item()  # a CPU scalar (schedulers keep their tables on the host: no device sync)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v <= 1.0):
        raise ValueError(f"ddpm_step: {name} must be a number in (0, 1], got {v!r}")
    return float(v)


def step_coefficients(alpha_prod_t: float, alpha_prod_t_prev: float, *, method: str = "ddpm",
                      variance_type: str = "fixed_small", eta: float = 0.0,
                      last_step: bool = False) -> StepCoefficients:
    """Per-step scalars from alpha_bar_t and alpha_bar_{t-1}, in float64 on the host.

    DDPM (Ho et al. 2020, eq. 7): posterior mean coefficients
      coef_x0 = sqrt(abar_prev) beta_t / (1 - abar_t),  coef_sample = sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t)
    with beta_t = 1 - abar_t / abar_prev, and sigma^2 = beta~_t = (1 - abar_prev) / (1 - abar_t) beta_t
    ("fixed_small", floored at 1e-20 as diffusers does) or beta_t ("fixed_large"). diffusers' "fixed_small_log"
    takes exp(log(beta~_t) / 2) for the same sigma: accepted as "fixed_small" (configs carry it).
    DDIM (Song et al. 2021, eq. 12): sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)),
      coef_x0 = sqrt(abar_prev), coef_eps = sqrt(1 - abar_prev - sigma^2).
    last_step: no noise (sigma = 0, and the known region of inpainting is not re-noised).
    """
    a_t = _check_alpha("alpha_prod_t", alpha_prod_t)
    a_p = _check_alpha("alpha_prod_t_prev", alpha_prod_t_prev)
    if a_t >= 1.0:
        raise ValueError(f"ddpm_step: alpha_prod_t must be < 1 (x_t must hold some noise), got {a_t!r}")
    if method not in METHODS:
        raise ValueError(f"ddpm_step: method must be one of {METHODS}, got {method!r}")
    if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"ddpm_step: eta must be a finite number >= 0, got {eta!r}")
    sa, s1 = math.sqrt(a_t), math.sqrt(1.0 - a_t)
    beta_t = 1.0 - a_t / a_p
    if method == "ddpm":
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"ddpm_step: variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        coef_x0 = math.sqrt(a_p) * beta_t / (1.0 - a_t)
        coef_sample = math.sqrt(a_t / a_p) * (1.0 - a_p) / (1.0 - a_t)
        coef_eps = 0.0
        var = beta_t if variance_type == "fixed_large" else max((1.0 - a_p) / (1.0 - a_t) * beta_t, 1e-20)
        sigma = 0.0 if last_step else math.sqrt(max(var, 0.0))
    else:
        sigma = 0.0 if last_step else eta * math.sqrt(max((1.0 - a_p) / (1.0 - a_t) * beta_t, 0.0))
        coef_x0 = math.sqrt(a_p)
        coef_eps = math.sqrt(max(1.0 - a_p - sigma * sigma, 0.0))
        coef_sample = 0.0
    known_noise = 0.0 if last_step else math.sqrt(1.0 - a_p)
    return StepCoefficients(sa, s1, coef_x0, coef_eps, coef_sample, sigma, math.sqrt(a_p), known_noise)


def _prepare_like(t: torch.Tensor, sample: torch.Tensor, name: str, broadcast: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ddpm_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_same_device("ddpm_step", name, t, "sample", sample)
    if t.shape != sample.shape:
        if not broadcast:
            raise ValueError(f"ddpm_step: {name} must have sample's shape {tuple(sample.shape)}, got {tuple(t.shape)}")
        try:
            t = t.expand(sample.shape)
        except RuntimeError:
            raise ValueError(f"ddpm_step: {name} of shape {tuple(t.shape)} does not broadcast to sample's "
                             f"shape {tuple(sample.shape)}") from None
    if t.dtype != sample.dtype:
        t = t.to(sample.dtype)
    return t


def prepare_inpainting(mask: torch.Tensor, known: torch.Tensor, sample: torch.Tensor):
    """mask and known expanded to the sample's shape, dtype and layout: samplers call this once so that
    every step reads them as they are (mask 1 = keep the known image, 0 = generate)."""
    mask = _prepare_like(mask, sample, "mask", broadcast=True)
    known = _prepare_like(known, sample, "known", broadcast=True)
    strides = elementwise_strides(sample)
    return to_strides(mask, strides), to_strides(known, strides)


def random_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 63-bit seed for the in-kernel noise from a CPU torch.Generator (default: torch's global one)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())


def ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: float, alpha_prod_t_prev: float, *,
              method: str = "ddpm", prediction_type: str = "epsilon", variance_type: str = "fixed_small",
              eta: float = 0.0, clip_sample_range: Optional[float] = None, use_clipped_model_output: bool = False,
              guidance_scale: Optional[float] = None, noise: Optional[torch.Tensor] = None,
              seed: Optional[int] = None, offset: int = 0, mask: Optional[torch.Tensor] = None,
              known: Optional[torch.Tensor] = None, last_step: bool = False) -> torch.Tensor:
    """One fused reverse-diffusion step: returns x_{t-1} from x_t = ``sample`` and ``model_output``.

    ``alpha_prod_t``, ``alpha_prod_t_prev``: alpha_bar at the current and the previous timestep (host
    floats). ``method`` "ddpm" (ancestral, Ho et al. 2020; ``variance_type`` "fixed_small" = beta~_t or
    "fixed_large" = beta_t) or "ddim" (Song et al. 2021, with ``eta``). ``prediction_type``: "epsilon",
    "sample" (x0) or "v_prediction". ``clip_sample_range`` r: clamp x0 to [-r, r] (None: no clamp);
    ``use_clipped_model_output``: DDIM's eps re-derived from the clamped x0, as in diffusers.

    ``guidance_scale`` w: classifier-free guidance (Ho & Salimans 2022). model_output is then [2B, ...],
    the unconditional half first, as diffusers' pipelines build it, and the guided prediction is
    m_u + w (m_c - m_u). (The paper writes (1 + w) eps_c - w eps_u: the same with w shifted by one.)

    Noise: ``noise`` (a tensor like sample; results match the eager formula and diffusers), or
    ``seed`` (+ ``offset``, e.g. the timestep): standard normals drawn inside the kernel by
    Philox4x32-10 + Box-Muller, the same on every backend (genkern/reference/philox.py). Neither: a
    seed is drawn from torch's global CPU generator. ``last_step``: no noise is added.

    ``mask``, ``known``: inpainting (RePaint, Lugmayr et al. 2022): where mask is 1 the result is the
    known image noised to t-1, sqrt(abar_prev) known + sqrt(1 - abar_prev) z (the same z; binary masks
    make that exact), elsewhere the generated x_{t-1}. Both broadcast to sample.

    fp32/fp16/bf16 (float32 maths), any shape, contiguous or channels_last; the result keeps sample's
    dtype and layout. float64 runs on the reference backend.
    """
    if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
        raise TypeError(f"ddpm_step: sample must be a floating-point torch.Tensor, got "
                        f"{type(sample).__name__ if not isinstance(sample, torch.Tensor) else sample.dtype}")
    if sample.dim() < 1:
        raise ValueError("ddpm_step: sample must have a batch dimension, got a 0-d tensor")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"ddpm_step: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"ddpm_step: guidance_scale must be a finite number or None, got {guidance_scale!r}")
        guidance_scale = float(guidance_scale)
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"ddpm_step: model_output must be a torch.Tensor, got {type(model_output).__name__}")
    want = (2 * sample.shape[0],) + tuple(sample.shape[1:]) if guidance_scale is not None else tuple(sample.shape)
    if tuple(model_output.shape) != want:
        if guidance_scale is not None:
            raise ValueError(f"ddpm_step: with guidance_scale, model_output must be [2B, ...] = {want} (unconditional "
                             f"then conditional halves) for sample {tuple(sample.shape)}, got {tuple(model_output.shape)}")
        raise ValueError(f"ddpm_step: model_output must have sample's shape {want}, got {tuple(model_output.shape)}")
    check_same_device("ddpm_step", "model_output", model_output, "sample", sample)
    if clip_sample_range is not None and (not isinstance(clip_sample_range, (int, float))
                                          or not clip_sample_range > 0):
        raise ValueError(f"ddpm_step: clip_sample_range must be a number > 0 or None, got {clip_sample_range!r}")
    if noise is not None and seed is not None:
        raise ValueError("ddpm_step: pass noise or seed, not both")
    if (mask is None) != (known is None):
        raise ValueError("ddpm_step: mask and known must be given together")
    k = step_coefficients(alpha_prod_t, alpha_prod_t_prev, method=method, variance_type=variance_type,
                          eta=eta, last_step=last_step)
    if model_output.dtype != sample.dtype:
        model_output = model_output.to(sample.dtype)
    if noise is not None:
        noise = _prepare_like(noise, sample, "noise")
    if mask is not None:
        mask, known = prepare_inpainting(mask, known, sample)
    needs_noise = k.sigma != 0.0 or (mask is not None and k.known_noise_coef != 0.0)
    if needs_noise and noise is None and seed is None:
        seed = random_seed()
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"ddpm_step: seed must be an int, got {type(seed).__name__}")
        seed = _as_int64(seed)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"ddpm_step: offset must be an int, got {type(offset).__name__}")
    clip = None if clip_sample_range is None else float(clip_sample_range)
    args = (noise, mask, known, prediction_type, k.sqrt_alpha_prod, k.sqrt_one_minus_alpha_prod, clip,
            bool(use_clipped_model_output), k.coef_x0, k.coef_eps, k.coef_sample, k.sigma, k.known_coef,
            k.known_noise_coef, guidance_scale, seed, _as_int64(offset))
    backend = _backend.select_for(sample)
    if backend == "reference" or sample.dtype not in _KERNEL_DTYPES:
        return _reference.ddpm_step(model_output, sample, *args)
    return call_kernel("ddpm_step", backend, model_output, sample, *args)


def _as_int64(v: int) -> int:
    """v modulo 2^64 as a signed int64 (the schema's int): the kernels read the same 64 bits back."""
    v &= 2**64 - 1
    return v - 2**64 if v >= 2**63 else v


def add_noise(original_samples: torch.Tensor, noise: torch.Tensor, sqrt_alpha_prod: torch.Tensor,
              sqrt_one_minus_alpha_prod: torch.Tensor) -> torch.Tensor:
    """Fused forward process q(x_t | x_0) (Ho et al. 2020, eq. 4):
    ``sqrt_alpha_prod[b] * original_samples[b] + sqrt_one_minus_alpha_prod[b] * noise[b]``.
    The coefficients are per-sample tensors of shape [N] (or scalars / 0-d tensors, broadcast);
    schedulers gather them from alpha_bar at the training timesteps (DDPMScheduler.add_noise)."""
    for name, t in (("original_samples", original_samples), ("noise", noise)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"add_noise: {name} must be a floating-point torch.Tensor")
    if original_samples.dim() < 1:
        raise ValueError("add_noise: original_samples must have a batch dimension, got a 0-d tensor")
    check_same_device("add_noise", "noise", noise, "original_samples", original_samples)
    if noise.shape != original_samples.shape:
        raise ValueError(f"add_noise: noise must match original_samples in shape, got {tuple(noise.shape)} vs "
                         f"{tuple(original_samples.shape)}")
    n = original_samples.shape[0]
    coefs = []
    for name, c in (("sqrt_alpha_prod", sqrt_alpha_prod), ("sqrt_one_minus_alpha_prod", sqrt_one_minus_alpha_prod)):
        c = torch.as_tensor(c, dtype=torch.float32, device=original_samples.device)
        if c.numel() == 1:
            c = c.reshape(1).expand(n)
        if c.dim() != 1 or c.shape[0] != n:
            raise ValueError(f"add_noise: {name} must have one value per sample ({n}) or be a scalar, "
                             f"got shape {tuple(c.shape)}")
        coefs.append(c.contiguous())
    noise = noise.to(original_samples.dtype)
    backend = _backend.select_for(original_samples)
    if backend == "reference" or original_samples.dtype not in _KERNEL_DTYPES:
        return _reference.add_noise(original_samples, noise, *coefs)
    return call_kernel("add_noise", backend, original_samples, noise, *coefs)


# --------------------------------------------------------------------------------------------------
# Dispatcher registration: fake kernels and autograd, shared by the C++ and the Triton ops.

def _fake_ddpm_step(model_output, sample, *args):
    return torch.empty_strided(sample.shape, elementwise_strides(sample), dtype=sample.dtype, device=sample.device)


def _fake_add_noise(original_samples, noise, sqrt_alpha_prod, sqrt_one_minus_alpha_prod):
    return torch.empty_strided(original_samples.shape, elementwise_strides(original_samples),
                               dtype=original_samples.dtype, device=original_samples.device)


def _setup_ddpm_step(ctx, inputs, output):
    model_output, sample, noise, mask, known, *scalars = inputs
    ctx.save_for_backward(model_output, sample, mask, known)
    ctx.scalars = scalars
    ctx.has_noise = noise is not None


def _backward_ddpm_step(ctx, grad):
    model_output, sample, mask, known = ctx.saved_tensors
    (pred, sa, s1, clip, recompute, c_x0, c_eps, c_xt, sigma, k_x0, k_z, w, _seed, _offset) = ctx.scalars
    dt = torch.promote_types(sample.dtype, torch.float32)
    g = grad.to(dt)
    # Everything but the clamp is linear: differentiate the reference formula with the noise (an
    # additive term, whatever its source) left out.
    with torch.enable_grad():
        m = model_output.detach().to(dt).requires_grad_()
        x = sample.detach().to(dt).requires_grad_()
        kn = known.detach().to(dt).requires_grad_() if known is not None else None
        y = _reference.ddpm_step(m, x, None, mask, kn, pred, sa, s1, clip, recompute, c_x0, c_eps, c_xt, 0.0,
                                 k_x0, 0.0, w, None, 0)
        grads = torch.autograd.grad(y, [m, x] + ([kn] if kn is not None else []), g, allow_unused=True)
    d_noise = None
    if ctx.has_noise and ctx.needs_input_grad[2]:
        scale = sigma if mask is None else sigma + mask.to(dt) * (k_z - sigma)
        d_noise = (g * scale).to(sample.dtype)
    d_known = grads[2].to(known.dtype) if kn is not None else None
    return (grads[0].to(model_output.dtype), grads[1].to(sample.dtype), d_noise, None, d_known) + (None,) * 14


def _setup_add_noise(ctx, inputs, output):
    original_samples, noise, sa, s1 = inputs
    ctx.save_for_backward(original_samples, noise, sa, s1)


def _backward_add_noise(ctx, grad):
    x0, noise, sa, s1 = ctx.saved_tensors
    view = (-1,) + (1,) * (x0.dim() - 1)
    g = grad.float()
    dims = tuple(range(1, x0.dim()))
    d_sa = (g * x0.float()).sum(dims) if ctx.needs_input_grad[2] else None
    d_s1 = (g * noise.float()).sum(dims) if ctx.needs_input_grad[3] else None
    return ((g * sa.view(view)).to(x0.dtype), (g * s1.view(view)).to(noise.dtype), d_sa, d_s1)


def _register(step_name: str, noise_name: str) -> None:
    torch.library.register_fake(step_name)(_fake_ddpm_step)
    register_autograd(step_name, _backward_ddpm_step, setup_context=_setup_ddpm_step)
    torch.library.register_fake(noise_name)(_fake_add_noise)
    register_autograd(noise_name, _backward_add_noise, setup_context=_setup_add_noise)


@torch.library.custom_op("genkern::ddpm_step_triton", mutates_args=())
def _ddpm_step_triton(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor], known: Optional[torch.Tensor], prediction_type: str,
                      sqrt_alpha_prod: float, sqrt_one_minus_alpha_prod: float, clip_range: Optional[float],
                      recompute_eps: bool, coef_x0: float, coef_eps: float, coef_sample: float, sigma: float,
                      known_coef: float, known_noise_coef: float, guidance_scale: Optional[float],
                      seed: Optional[int], offset: int) -> torch.Tensor:
    _check_raw(model_output, sample, noise, mask, known, prediction_type, sqrt_alpha_prod,
               sqrt_one_minus_alpha_prod, clip_range, guidance_scale, seed)
    from ..triton import ddpm_step as kernels
    return kernels.ddpm_step(model_output, sample, noise, mask, known, prediction_type, sqrt_alpha_prod,
                             sqrt_one_minus_alpha_prod, clip_range, recompute_eps, coef_x0, coef_eps, coef_sample,
                             sigma, known_coef, known_noise_coef, guidance_scale, seed, offset)


@torch.library.custom_op("genkern::add_noise_triton", mutates_args=())
def _add_noise_triton(original_samples: torch.Tensor, noise: torch.Tensor, sqrt_alpha_prod: torch.Tensor,
                      sqrt_one_minus_alpha_prod: torch.Tensor) -> torch.Tensor:
    if original_samples.dtype not in _KERNEL_DTYPES or noise.dtype != original_samples.dtype \
            or noise.shape != original_samples.shape:
        raise ValueError("add_noise: original_samples and noise must be float32/float16/bfloat16 tensors of "
                         "the same shape and dtype")
    n = original_samples.shape[0] if original_samples.dim() else -1
    for t in (sqrt_alpha_prod, sqrt_one_minus_alpha_prod):
        if t.dtype != torch.float32 or tuple(t.shape) != (n,):
            raise ValueError(f"add_noise: the coefficients must be float32 of shape [{n}]")
    from ..triton import ddpm_step as kernels
    return kernels.add_noise(original_samples, noise, sqrt_alpha_prod, sqrt_one_minus_alpha_prod)


def _check_raw(model_output, sample, noise, mask, known, prediction_type, sa, s1, clip_range, guidance_scale, seed):
    """The checks the C++ ops make (csrc/ddpm_step.h), for direct torch.ops callers of the Triton op."""
    if sample.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"ddpm_step: sample must be float32, float16 or bfloat16, got {sample.dtype}")
    if sample.dim() < 1:
        raise ValueError("ddpm_step: sample must have a batch dimension, got a 0-d tensor")
    want = list(sample.shape)
    if guidance_scale is not None:
        want[0] *= 2
        if not math.isfinite(guidance_scale):
            raise ValueError(f"ddpm_step: guidance_scale must be finite, got {guidance_scale}")
    for name, t, shape in (("model_output", model_output, want), ("noise", noise, list(sample.shape)),
                           ("mask", mask, list(sample.shape)), ("known", known, list(sample.shape))):
        if t is None:
            continue
        if t.dtype != sample.dtype or t.device != sample.device or list(t.shape) != shape:
            raise ValueError(f"ddpm_step: {name} must be {sample.dtype} of shape {shape} on {sample.device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"ddpm_step: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not (sa > 0 and s1 > 0 and math.isfinite(sa) and math.isfinite(s1)):
        raise ValueError("ddpm_step: sqrt_alpha_prod and sqrt_one_minus_alpha_prod must be finite and > 0")
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"ddpm_step: clip_range must be > 0 or None, got {clip_range}")
    if noise is not None and seed is not None:
        raise ValueError("ddpm_step: pass noise or seed, not both")
    if (mask is None) != (known is None):
        raise ValueError("ddpm_step: mask and known must be given together")


_register("genkern::ddpm_step_triton", "genkern::add_noise_triton")
if _extension.LOADED:
    _register("genkern::ddpm_step", "genkern::add_noise")


def bytes_moved(sample: torch.Tensor, *, cfg: bool = False, noise_tensor: bool = False, masked: bool = False) -> int:
    """The least memory traffic of one fused step: read x_t and the model output (twice as much under
    guidance), read the noise only when it is given as a tensor, read mask and known when inpainting,
    write x_{t-1}. In-kernel noise costs no traffic. (The eager step also writes and re-reads every
    intermediate, and writes the noise tensor.)"""
    t = sample.numel() * sample.element_size()
    reads = 1 + (2 if cfg else 1) + (1 if noise_tensor else 0) + (2 if masked else 0)
    return (reads + 1) * t


def add_noise_bytes_moved(original_samples: torch.Tensor) -> int:
    """add_noise reads x0 and the noise and writes x_t."""
    return 3 * original_samples.numel() * original_samples.element_size()
