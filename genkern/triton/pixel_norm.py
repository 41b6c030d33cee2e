"""pixel_norm in Triton. Maths in csrc/pixel_norm.h; reference in genkern/reference.

x is addressed as [N, C, P] through strides (NCHW: sC = P, sP = 1; channels-last: sC = 1, sP = C), so
both layouts share the kernels. A program owns BLOCK_P positions of one sample and walks the channels
twice in BLOCK_C slices: sums first, then the scaled write.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._layout import is_channels_last_dense
from ._common import next_pow2


@triton.jit
def _positions(P, sN, sP, BLOCK_P: tl.constexpr):
    """This program's sample n, its BLOCK_P positions (mask pm) and their base offsets."""
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, p, p < P, n * sN + p.to(tl.int64)[None, :] * sP


@triton.jit
def _slice(c0, C, base, sC, pm, BLOCK_C: tl.constexpr):
    """Offsets and mask of channels [c0, c0 + BLOCK_C) at the program's positions."""
    c = c0 + tl.arange(0, BLOCK_C)
    return base + c.to(tl.int64)[:, None] * sC, (c < C)[:, None] & pm[None, :]


@triton.jit
def _forward(x_ptr, y_ptr, r_ptr, C, P, sN, sC, sP, eps, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n, p, pm, base = _positions(P, sN, sP, BLOCK_P)
    acc = tl.zeros((BLOCK_P,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, m = _slice(c0, C, base, sC, pm, BLOCK_C)
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=0)
    r = 1.0 / tl.sqrt(acc / C + eps)
    tl.store(r_ptr + n * P + p, r, mask=pm)
    for c0 in range(0, C, BLOCK_C):
        offs, m = _slice(c0, C, base, sC, pm, BLOCK_C)
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (v * r[None, :]).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _backward(g_ptr, x_ptr, r_ptr, dx_ptr, C, P, sN, sC, sP, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n, p, pm, base = _positions(P, sN, sP, BLOCK_P)
    dot = tl.zeros((BLOCK_P,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, m = _slice(c0, C, base, sC, pm, BLOCK_C)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(g * v, axis=0)
    r = tl.load(r_ptr + n * P + p, mask=pm, other=0.0)
    k = r * r * r * dot / C
    for c0 in range(0, C, BLOCK_C):
        offs, m = _slice(c0, C, base, sC, pm, BLOCK_C)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (r[None, :] * g - k[None, :] * v).to(dx_ptr.dtype.element_ty), mask=m)


def _layout(x):
    """(x in a kernel layout, C, P, sN, sC, sP)."""
    if not (x.is_contiguous() or is_channels_last_dense(x)):
        x = x.contiguous()
    N, C = x.shape[:2]
    P = math.prod(x.shape[2:])
    if is_channels_last_dense(x):
        return x, C, P, x.stride(0), 1, C
    return x, C, P, x.stride(0) if N > 1 else C * P, P, 1


def _blocks(C, P):
    block_p = min(64, next_pow2(P))
    block_c = max(1, min(next_pow2(C), 4096 // block_p))
    return block_c, block_p


def forward(x: torch.Tensor, eps: float):
    x, C, P, sN, sC, sP = _layout(x)
    y = torch.empty_like(x)
    r = torch.empty((x.shape[0], P), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, r
    bc, bp = _blocks(C, P)
    _forward[(x.shape[0], triton.cdiv(P, bp))](x, y, r, C, P, sN, sC, sP, float(eps), BLOCK_C=bc, BLOCK_P=bp)
    return y, r


def backward(grad_y: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor):
    x, C, P, sN, sC, sP = _layout(x)
    g = grad_y if grad_y.stride() == x.stride() else torch.empty_like(x).copy_(grad_y)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    bc, bp = _blocks(C, P)
    _backward[(x.shape[0], triton.cdiv(P, bp))](g, x, rstd.contiguous(), dx, C, P, sN, sC, sP, BLOCK_C=bc, BLOCK_P=bp)
    return dx
