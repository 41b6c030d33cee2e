"""Double backward for the fused ops.

WGAN-GP and R1 differentiate through a gradient (``autograd.grad(..., create_graph=True)``), so every
op inside a critic needs a backward that autograd can differentiate again. Here the first-order
gradients always come from the op's fused backward kernel; when autograd is recording the backward
(create_graph=True) the call is wrapped so that the gradient *of those gradients* is taken through the
op's reference implementation (genkern/reference), which is differentiable to any order. The critic's
forward and its create_graph gradient stay fused; only the second-order pass runs eager PyTorch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


class _FusedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fused: Callable, reference: Callable, n_grad_outputs: int, *tensors):
        ctx.reference, ctx.n = reference, n_grad_outputs
        ctx.save_for_backward(*tensors)
        return tuple(fused(*tensors))

    @staticmethod
    def backward(ctx, *grad_grads):
        tensors = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors]
            grad_outputs, inputs = leaves[:ctx.n], leaves[ctx.n:]
            outputs = ctx.reference(*inputs)
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            diff_inputs = [t for t in inputs if t is not None and t.requires_grad]
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
            firsts = torch.autograd.grad([o for o, _ in pairs], diff_inputs, [g for _, g in pairs],
                                         create_graph=True, allow_unused=True)
            # the fused backward returns one gradient per input tensor; match them to grad_grads
            used = [(f, gg) for f, gg in zip(firsts, grad_grads) if f is not None and gg is not None
                    and f.requires_grad]
            wrt = [t for t in leaves if t is not None and t.requires_grad]
            if not used:
                seconds = [None] * len(wrt)
            else:
                seconds = torch.autograd.grad([f for f, _ in used], wrt, [gg for _, gg in used],
                                              allow_unused=True, create_graph=create_graph)
        it = iter(seconds)
        grads = [next(it) if t is not None and t.requires_grad else None for t in leaves]
        grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, tensors)]
        return (None, None, None, *grads)


def differentiable_backward(fused: Callable, reference: Callable, grad_outputs: Sequence[Optional[torch.Tensor]],
                            inputs: Sequence[Optional[torch.Tensor]]) -> tuple:
    """``fused(*grad_outputs, *inputs)`` -> one gradient per entry of ``inputs`` (None where the input is
    None), computed by the fused kernel. Under create_graph the result is itself differentiable, by
    ``reference(*inputs)`` (the op's outputs, recomputed in eager PyTorch)."""
    if not torch.is_grad_enabled():
        return tuple(fused(*grad_outputs, *inputs))
    present = [i for i, t in enumerate(inputs) if t is not None]
    outs = _FusedGrad.apply(lambda *ts: [fused(*ts)[i] for i in present], reference, len(grad_outputs),
                            *grad_outputs, *inputs)
    result = [None] * len(inputs)
    for i, o in zip(present, outs):
        result[i] = o
    return tuple(result)
