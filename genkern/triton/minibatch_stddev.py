"""minibatch_stddev in Triton. Maths in csrc/minibatch_stddev.h; reference in genkern/reference.

A program owns one (column m, slice f) and a block of the slice's (channel, pixel) positions: it loads
the G samples of the column there (twice: mean, then variance, without cancellation), writes their
copies into out and leaves one partial sum of sqrt(var + eps). The partial sums, the [N, F, H, W]
statistic channels and the backward's per-(m, f) coefficient are tiny torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _offsets(j, c, P, f, sC, sP, CL: tl.constexpr):
    # position j of slice f is (channel cc, pixel p): pixel-major in channels-last memory (cc fastest),
    # channel-major in NCHW (p fastest), so that neighbouring lanes touch neighbouring addresses
    if CL:
        p = j // c
        cc = j - p * c
    else:
        cc = j // P
        p = j - cc * P
    return (f * c + cc).to(tl.int64) * sC + p.to(tl.int64) * sP


@triton.jit
def _column(F, c, P, BLOCK: tl.constexpr):
    """This program's (column m, slice f), its block of positions j and their mask."""
    mf = tl.program_id(0)
    m = mf // F
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return mf, m, mf - m * F, j, j < c * P


@triton.jit
def _variance(x_ptr, xo, sxN, M, m, G, mean, valid, BLOCK: tl.constexpr):
    """Biased variance over the group's G samples (second walk, around a known mean)."""
    var = tl.zeros((BLOCK,), tl.float32)
    for g in range(0, G):
        i = (g * M + m).to(tl.int64)
        d = tl.load(x_ptr + i * sxN + xo, mask=valid, other=0.0).to(tl.float32) - mean
        var += d * d
    return var / G


@triton.jit
def _forward(x_ptr, out_ptr, part_ptr, M, F, c, P, G, sxN, sxC, sxP, soN, soC, soP, eps, n_blocks,
             BLOCK: tl.constexpr, CL: tl.constexpr):
    mf, m, f, j, valid = _column(F, c, P, BLOCK)
    xo = _offsets(j, c, P, f, sxC, sxP, CL)
    oo = _offsets(j, c, P, f, soC, soP, CL)
    mean = tl.zeros((BLOCK,), tl.float32)
    for g in range(0, G):  # first walk: the copy into out, and the mean
        i = (g * M + m).to(tl.int64)
        v = tl.load(x_ptr + i * sxN + xo, mask=valid, other=0.0)
        tl.store(out_ptr + i * soN + oo, v, mask=valid)
        mean += v.to(tl.float32)
    var = _variance(x_ptr, xo, sxN, M, m, G, mean / G, valid, BLOCK)
    s = tl.where(valid, tl.sqrt(var + eps), 0.0)
    tl.store(part_ptr + mf * n_blocks + tl.program_id(1), tl.sum(s, axis=0))


@triton.jit
def _backward(go_ptr, x_ptr, k_ptr, dx_ptr, M, F, c, P, G, sxN, sxC, sxP, sgN, sgC, sgP, eps, BLOCK: tl.constexpr,
              CL: tl.constexpr):
    mf, m, f, j, valid = _column(F, c, P, BLOCK)
    xo = _offsets(j, c, P, f, sxC, sxP, CL)
    go = _offsets(j, c, P, f, sgC, sgP, CL)
    mean = tl.zeros((BLOCK,), tl.float32)
    for g in range(0, G):
        i = (g * M + m).to(tl.int64)
        mean += tl.load(x_ptr + i * sxN + xo, mask=valid, other=0.0).to(tl.float32)
    mean = mean / G
    scale = tl.load(k_ptr + mf) / tl.sqrt(_variance(x_ptr, xo, sxN, M, m, G, mean, valid, BLOCK) + eps)
    for g in range(0, G):
        i = (g * M + m).to(tl.int64)
        v = tl.load(x_ptr + i * sxN + xo, mask=valid, other=0.0).to(tl.float32)
        d = tl.load(go_ptr + i * sgN + go, mask=valid, other=0.0).to(tl.float32)
        tl.store(dx_ptr + i * sxN + xo, (d + scale * (v - mean)).to(dx_ptr.dtype.element_ty), mask=valid)


def _fmt(x):
    return torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) \
        else torch.contiguous_format


def _strides(t):
    """(sN, sC, sP) with sP the stride of a flattened pixel index (dense NCHW or channels-last)."""
    return t.stride(0), t.stride(1), t.stride(3)


def _dims(x, group_size, num_channels):
    N, C, H, W = x.shape
    G = min(group_size, N)
    return N, C, H * W, G, N // G, num_channels, C // num_channels


def forward(x: torch.Tensor, group_size: int, num_channels: int, eps: float) -> torch.Tensor:
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    N, C, P, G, M, F, c = _dims(x, group_size, num_channels)
    out = torch.empty((N, C + F, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device, memory_format=fmt)
    n_blocks = triton.cdiv(c * P, BLOCK)
    part = torch.empty((M * F, n_blocks), dtype=torch.float32, device=x.device)
    _forward[(M * F, n_blocks)](x, out, part, M, F, c, P, G, *_strides(x), *_strides(out), float(eps), n_blocks,
                                BLOCK=BLOCK, CL=fmt == torch.channels_last)
    stat = part.double().sum(1).div(c * P).float().view(M, F)
    out[:, C:].copy_(stat.repeat(G, 1).to(x.dtype).view(N, F, 1, 1).expand(N, F, x.shape[2], x.shape[3]))
    return out


def backward(grad_out: torch.Tensor, x: torch.Tensor, group_size: int, num_channels: int, eps: float) -> torch.Tensor:
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    grad_out = grad_out.contiguous(memory_format=fmt)
    N, C, P, G, M, F, c = _dims(x, group_size, num_channels)
    k = grad_out[:, C:].sum(dim=(2, 3), dtype=torch.float32).view(G, M, F).sum(0).div(G * c * P).contiguous()
    dx = torch.empty_like(x)
    _backward[(M * F, triton.cdiv(c * P, BLOCK))](grad_out, x, k, dx, M, F, c, P, G, *_strides(x),
                                                  *_strides(grad_out), float(eps), BLOCK=BLOCK,
                                                  CL=fmt == torch.channels_last)
    return dx
