"""group_norm_silu in Triton. Maths in csrc/group_norm_silu.h; reference in genkern/reference.

x is addressed as [N, HW, C] through strides, so NCHW (sP = 1, sC = HW) and channels-last
(sP = C, sC = 1) share every kernel and Triton coalesces along whichever stride is 1. Each program
owns one (sample, group) and a chunk of pixels, so small batches and num_groups = 1 still fill the GPU:
  forward:  _stats (partial shifted sums per chunk) -> _apply (combines them, writes y, mean, rstd)
  backward: _grad_sums (per-channel partials) -> tiny [N, C] reductions in torch -> _grad_apply (dx)
x is read twice and y written once; the backward reads x and dy twice and writes dx once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import is_channels_last_dense
from ._common import ACTIVATION_CODES, activation, activation_grad, next_pow2


@triton.jit
def _tile(base, p0, d0, HW, D, sP, sC, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    p = p0 + tl.arange(0, BLOCK_P)
    d = d0 + tl.arange(0, BLOCK_D)
    mask = (p[:, None] < HW) & (d[None, :] < D)
    offs = base + p[:, None].to(tl.int64) * sP + d[None, :].to(tl.int64) * sC
    return offs, mask


@triton.jit
def _channel_affine(w_ptr, b_ptr, g, d0, D, rstd, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Channels d0 .. d0+BLOCK_D of group g: (d, mask, a = rstd * w, b) so that u = (x - mean) * a + b."""
    d = d0 + tl.arange(0, BLOCK_D)
    dm = d < D
    c = g * D + d
    a = tl.full((BLOCK_D,), 1.0, tl.float32) * rstd
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=dm, other=0.0).to(tl.float32)
    b = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=dm, other=0.0).to(tl.float32)
    return c, dm, a, b


@triton.jit
def _program_chunk(HW, D, G, chunk_p, sN, sC):
    """This program's (sample, group) ng = (n, g), its pixel chunk k = [p_lo, p_hi), and the int64
    offset of the group's first element."""
    ng = tl.program_id(0)
    k = tl.program_id(1)
    n = ng // G
    g = ng % G
    base = n.to(tl.int64) * sN + (g * D).to(tl.int64) * sC
    p_lo = k * chunk_p
    return ng, k, n, g, base, p_lo, tl.minimum(p_lo + chunk_p, HW)


@triton.jit
def _stats(x_ptr, part_ptr, HW, C, D, G, n_chunks, chunk_p, sN, sP, sC,
           BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    ng, k, n, g, base, p_lo, p_hi = _program_chunk(HW, D, G, chunk_p, sN, sC)
    pivot = tl.load(x_ptr + base).to(tl.float32)
    s1 = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    s2 = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        for d0 in range(0, D, BLOCK_D):
            offs, mask = _tile(base, p0, d0, p_hi, D, sP, sC, BLOCK_P, BLOCK_D)
            v = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - pivot, 0.0)
            s1 += v
            s2 += v * v
    out = part_ptr + (ng * n_chunks + k) * 2
    tl.store(out, tl.sum(tl.sum(s1, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(s2, 1), 0))


@triton.jit
def _apply(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, mean_ptr, rstd_ptr, HW, C, D, G, n_chunks, chunk_p,
           sN, sP, sC, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    ng, k, n, g, base, p_lo, p_hi = _program_chunk(HW, D, G, chunk_p, sN, sC)
    # combine the chunks' partial sums (every program of the group does the same few loads)
    t1 = tl.zeros((BLOCK_K,), tl.float32)
    t2 = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < n_chunks
        t1 += tl.load(part_ptr + (ng * n_chunks + kk) * 2, mask=km, other=0.0)
        t2 += tl.load(part_ptr + (ng * n_chunks + kk) * 2 + 1, mask=km, other=0.0)
    count = HW * 1.0 * D  # HW and D may arrive as Python ints (Triton specialises 1s)
    m = tl.sum(t1, 0) / count
    var = tl.maximum(tl.sum(t2, 0) / count - m * m, 0.0)
    mean = tl.load(x_ptr + base).to(tl.float32) + m
    rstd = 1.0 / tl.sqrt(var + eps)
    if k == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)
    for d0 in range(0, D, BLOCK_D):
        c, dm, a, b = _channel_affine(w_ptr, b_ptr, g, d0, D, rstd, HAS_W, HAS_B, BLOCK_D)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs, mask = _tile(base, p0, d0, p_hi, D, sP, sC, BLOCK_P, BLOCK_D)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = activation((x - mean) * a[None, :] + b[None, :], ACT)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, HW, C, D, G, n_chunks, chunk_p,
               sN, sP, sC, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # part[n, k, c, 0] = sum_p du * (x - mean),  part[n, k, c, 1] = sum_p du  over chunk k
    ng, k, n, g, base, p_lo, p_hi = _program_chunk(HW, D, G, chunk_p, sN, sC)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    for d0 in range(0, D, BLOCK_D):
        c, dm, a, b = _channel_affine(w_ptr, b_ptr, g, d0, D, rstd, HAS_W, HAS_B, BLOCK_D)
        acc_sc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
        acc_b = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs, mask = _tile(base, p0, d0, p_hi, D, sP, sC, BLOCK_P, BLOCK_D)
            xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            du = tl.where(mask, dy * activation_grad(xc * a[None, :] + b[None, :], ACT), 0.0)
            acc_sc += du * xc
            acc_b += du
        out = part_ptr + ((n.to(tl.int64) * n_chunks + k) * C + c) * 2
        tl.store(out, tl.sum(acc_sc, 0), mask=dm)
        tl.store(out + 1, tl.sum(acc_b, 0), mask=dm)


@triton.jit
def _grad_apply(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, coef_ptr, HW, C, D, G, chunk_p,
                sN, sP, sC, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # dx = k1 * du + k2 * (x - mean) + k3 with coef[n, c] = (k1, k2, k3)
    ng, k, n, g, base, p_lo, p_hi = _program_chunk(HW, D, G, chunk_p, sN, sC)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    for d0 in range(0, D, BLOCK_D):
        c, dm, a, b = _channel_affine(w_ptr, b_ptr, g, d0, D, rstd, HAS_W, HAS_B, BLOCK_D)
        cp = coef_ptr + (n.to(tl.int64) * C + c) * 3
        k1 = tl.load(cp, mask=dm, other=0.0)
        k2 = tl.load(cp + 1, mask=dm, other=0.0)
        k3 = tl.load(cp + 2, mask=dm, other=0.0)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs, mask = _tile(base, p0, d0, p_hi, D, sP, sC, BLOCK_P, BLOCK_D)
            xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            du = dy * activation_grad(xc * a[None, :] + b[None, :], ACT)
            dx = k1[None, :] * du + k2[None, :] * xc + k3[None, :]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Host side.

def _layout(x: torch.Tensor):
    """(x, N, C, HW, sN, sP, sC) with x dense as NCHW or channels-last (copied if neither)."""
    N, C = x.shape[:2]
    HW = x.numel() // max(N * C, 1)
    if is_channels_last_dense(x):
        return x, N, C, HW, HW * C, C, 1
    x = x.contiguous()  # dense already, or a strided view: copied to NCHW (as the C++ kernels do)
    return x, N, C, HW, C * HW, 1, HW


def _launch(N, G, D, HW):
    """Block sizes and the pixel chunk each program owns."""
    block_d = min(next_pow2(D), 64)
    block_p = max(1, min(next_pow2(HW), 4096 // block_d))
    chunk_p = max(block_p, (16384 // max(D, 1)) // block_p * block_p)
    return block_p, block_d, chunk_p, triton.cdiv(HW, chunk_p)


def forward(x, weight, bias, num_groups, eps, activation):
    x, N, C, HW, sN, sP, sC = _layout(x)
    G = num_groups
    D = C // G
    y = torch.empty_like(x)
    mean = torch.empty((N, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    block_p, block_d, chunk_p, n_chunks = _launch(N, G, D, HW)
    part = torch.empty((N * G, n_chunks, 2), device=x.device, dtype=torch.float32)
    grid = (N * G, n_chunks)
    _stats[grid](x, part, HW, C, D, G, n_chunks, chunk_p, sN, sP, sC, BLOCK_P=block_p, BLOCK_D=block_d)
    _apply[grid](x, y, weight, bias, part, mean, rstd, HW, C, D, G, n_chunks, chunk_p, sN, sP, sC, eps,
                 HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATION_CODES[activation],
                 BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_K=min(next_pow2(n_chunks), 128))
    return y, mean, rstd


def backward(grad_y, x, weight, bias, mean, rstd, num_groups, activation):
    x, N, C, HW, sN, sP, sC = _layout(x)
    G = num_groups
    D = C // G
    dy = grad_y if grad_y.stride() == x.stride() else torch.empty_like(x).copy_(grad_y)
    dx = torch.empty_like(x)
    wdt = x.dtype if weight is None else weight.dtype
    bdt = x.dtype if bias is None else bias.dtype
    if x.numel() == 0:
        return dx, x.new_zeros((C,), dtype=wdt), x.new_zeros((C,), dtype=bdt)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    block_p, block_d, chunk_p, n_chunks = _launch(N, G, D, HW)
    part = torch.empty((N, n_chunks, C, 2), device=x.device, dtype=torch.float32)
    grid = (N * G, n_chunks)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATION_CODES[activation],
                 BLOCK_P=block_p, BLOCK_D=block_d)
    _grad_sums[grid](dy, x, weight, bias, mean, rstd, part, HW, C, D, G, n_chunks, chunk_p, sN, sP, sC, **flags)
    sums = part.sum(1)                                     # [N, C, 2]
    dsc, dbs = sums[..., 0], sums[..., 1]
    r = rstd.repeat_interleave(D, dim=1)                   # [N, C]
    w = torch.ones(C, device=x.device) if weight is None else weight.float()
    M = D * HW
    A = (w * dbs).view(N, G, D).sum(-1, keepdim=True) / M            # mean_g(w * du)
    B = (w * r * dsc).view(N, G, D).sum(-1, keepdim=True) / M        # mean_g(w * du * xhat)
    rg = rstd.unsqueeze(-1)
    coef = torch.stack([(r * w).view(N, G, D), (-rg * rg * B).expand(N, G, D), (-rg * A).expand(N, G, D)],
                       dim=-1).reshape(N, C, 3).contiguous()
    _grad_apply[grid](dy, x, dx, weight, bias, mean, rstd, coef, HW, C, D, G, chunk_p, sN, sP, sC, **flags)
    return dx, (r * dsc).sum(0).to(wdt), dbs.sum(0).to(bdt)
