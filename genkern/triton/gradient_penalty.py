"""gradient_penalty in Triton. Maths in csrc/gradient_penalty.h; reference in genkern/reference.

Forward: a program sums the squares of one BLOCK-sized chunk of one sample (the sample's elements are one
contiguous block in the elementwise layout); the [N, chunks] partials and the loss are tiny torch ops.
Backward: dg = scale_i g in one pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import elementwise_strides, to_strides

BLOCK = 4096


@triton.jit
def _sumsq(g_ptr, part_ptr, per, n_chunks, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(g_ptr + i * per + k, mask=k < per, other=0.0).to(tl.float32)
    tl.store(part_ptr + i * n_chunks + tl.program_id(1), tl.sum(v * v, axis=0))


@triton.jit
def _scale(g_ptr, s_ptr, out_ptr, per, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = k < per
    v = tl.load(g_ptr + i * per + k, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + i * per + k, (v * tl.load(s_ptr + i)).to(out_ptr.dtype.element_ty), mask=m)


def forward(grad: torch.Tensor, weight: float, target):
    g = to_strides(grad, elementwise_strides(grad))
    N = g.shape[0]
    per = g.numel() // N
    chunks = max(1, triton.cdiv(per, BLOCK))
    part = torch.zeros((N, chunks), dtype=torch.float32, device=g.device)
    if per:
        _sumsq[(N, chunks)](g, part, per, chunks, BLOCK=BLOCK)
    norms = part.double().sum(1).sqrt()
    per_sample = norms.square() if target is None else (norms - target).square()
    return (weight * per_sample.mean()).float(), norms.float()


def backward(grad_loss: torch.Tensor, grad: torch.Tensor, norms: torch.Tensor, weight: float, target):
    from ..ops.gradient_penalty import penalty_scale
    strides = elementwise_strides(grad)
    g = to_strides(grad, strides)
    out = torch.empty_strided(g.shape, strides, dtype=g.dtype, device=g.device)
    N = g.shape[0]
    per = g.numel() // N
    if per:
        _scale[(N, triton.cdiv(per, BLOCK))](g, penalty_scale(grad_loss, norms, weight, target), out, per, BLOCK=BLOCK)
    return out
