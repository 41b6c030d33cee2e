"""ddpm_step and add_noise in Triton. Maths in csrc/ddpm_step.h; reference in genkern/reference.

Elementwise over memory (all operands share the sample's dense layout, see genkern/_layout.py).
A program owns BLOCK Philox groups = 4 * BLOCK consecutive elements: one Philox call per group gives
the 4 normals of its elements, interleaved back into element order with join + reshape, so the noise
is generated in registers and never written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import elementwise_strides, to_strides
from ._common import philox_normal4, split_u64

_PRED = {"epsilon": 0, "sample": 1, "v_prediction": 2}


@triton.jit
def _ddpm_step_kernel(m_ptr, x_ptr, noise_ptr, mask_ptr, known_ptr, out_ptr, n,
                      x0_x, x0_m, eps_x, eps_m, clip_range, sa, inv_s1,
                      c_x0, c_eps, c_xt, sigma, k_x0, k_z, w,
                      seed_lo, seed_hi, off_lo, off_hi,
                      CFG: tl.constexpr, CLIP: tl.constexpr, RECOMPUTE: tl.constexpr,
                      NOISE: tl.constexpr, PHILOX: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    valid = offs < n
    m = tl.load(m_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if CFG:
        m_c = tl.load(m_ptr + n + offs, mask=valid, other=0.0).to(tl.float32)
        m = m + w * (m_c - m)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if PHILOX:
        g = pid * BLOCK + tl.arange(0, BLOCK)
        z0, z1, z2, z3 = philox_normal4(seed_lo, seed_hi, off_lo, off_hi, g)
        # [BLOCK, 2, 2] with [j, p, q] = z_{2p+q}: flattened, element 4j + lane holds z_lane
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (4 * BLOCK,))
    elif NOISE:
        z = tl.load(noise_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        z = tl.zeros_like(x)
    x0 = x0_x * x + x0_m * m
    eps = eps_x * x + eps_m * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
        if RECOMPUTE:
            eps = (x - sa * x0) * inv_s1
    y = c_x0 * x0 + c_eps * eps + c_xt * x + sigma * z
    if MASKED:
        a = tl.load(mask_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        kn = tl.load(known_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        y = y + a * (k_x0 * kn + k_z * z - y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _add_noise_kernel(x_ptr, z_ptr, sa_ptr, s1_ptr, out_ptr, n, per_sample, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    b = offs // per_sample
    a = tl.load(sa_ptr + b, mask=valid, other=0.0)
    c = tl.load(s1_ptr + b, mask=valid, other=0.0)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (a * x + c * z).to(out_ptr.dtype.element_ty), mask=valid)


def linear_form(prediction_type: str, sa: float, s1: float) -> tuple[float, float, float, float]:
    """(x0_x, x0_m, eps_x, eps_m) with x0 = x0_x x + x0_m m and eps = eps_x x + eps_m m."""
    if prediction_type == "epsilon":
        return 1.0 / sa, -s1 / sa, 0.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, 1.0 / s1, -sa / s1
    return sa, -s1, s1, sa


def ddpm_step(model_output, sample, noise, mask, known, prediction_type, sqrt_alpha_prod,
              sqrt_one_minus_alpha_prod, clip_range, recompute_eps, coef_x0, coef_eps, coef_sample, sigma,
              known_coef, known_noise_coef, guidance_scale, seed, offset):
    strides = elementwise_strides(sample)
    x = to_strides(sample, strides)
    m = to_strides(model_output, strides)
    masked = mask is not None
    noise_t = to_strides(noise, strides) if noise is not None else None
    mask_t = to_strides(mask, strides) if masked else None
    known_t = to_strides(known, strides) if masked else None
    out = torch.empty_strided(sample.shape, strides, dtype=sample.dtype, device=sample.device)
    n = x.numel()
    if n == 0:
        return out
    sa, s1 = float(sqrt_alpha_prod), float(sqrt_one_minus_alpha_prod)
    # float32 coefficients, as the C++ kernels use (ddpm_step.h: prepare_ddpm_step)
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    sa32, s132 = f32(sa), f32(s1)
    x0_x, x0_m, eps_x, eps_m = (f32(v) for v in linear_form(prediction_type, sa32, s132))
    k_z = float(known_noise_coef) if masked else 0.0
    needs_z = (sigma != 0.0 or k_z != 0.0) and (noise is not None or seed is not None)
    philox = needs_z and seed is not None
    seed_lo, seed_hi = split_u64(seed if seed is not None else 0)
    off_lo, off_hi = split_u64(offset)
    BLOCK = 256
    grid = (triton.cdiv(n, 4 * BLOCK),)
    dummy = x
    _ddpm_step_kernel[grid](
        m, x, noise_t if noise_t is not None else dummy, mask_t if masked else dummy,
        known_t if masked else dummy, out, n,
        x0_x, x0_m, eps_x, eps_m, float(clip_range or 0.0), sa32, f32(1.0 / s132),
        float(coef_x0), float(coef_eps), float(coef_sample), float(sigma), float(known_coef), k_z,
        float(guidance_scale or 0.0), seed_lo, seed_hi, off_lo, off_hi,
        CFG=guidance_scale is not None, CLIP=clip_range is not None, RECOMPUTE=bool(recompute_eps),
        NOISE=needs_z and not philox, PHILOX=philox, MASKED=masked, BLOCK=BLOCK)
    return out


def add_noise(original_samples, noise, sqrt_alpha_prod, sqrt_one_minus_alpha_prod):
    strides = elementwise_strides(original_samples)
    x = to_strides(original_samples, strides)
    z = to_strides(noise, strides)
    out = torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    BLOCK = 1024
    _add_noise_kernel[(triton.cdiv(n, BLOCK),)](x, z, sqrt_alpha_prod.contiguous(),
                                                sqrt_one_minus_alpha_prod.contiguous(), out, n,
                                                n // x.shape[0], BLOCK=BLOCK)
    return out
