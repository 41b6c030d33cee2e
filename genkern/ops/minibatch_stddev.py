"""genkern.minibatch_stddev: StyleGAN2's minibatch standard deviation layer, output written in one pass.

Ops: genkern::minibatch_stddev / _backward (C++ schemas, CPU + CUDA kernels) and the Triton twins
genkern::minibatch_stddev_triton / _backward. The backward recomputes the group statistics from x.
Double backward through the reference (genkern/ops/_double_backward.py).
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _extension
from ._call import call_kernel, register_autograd
from ._checks import check_same_device
from .. import reference as _reference
from ._double_backward import differentiable_backward

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, group_size, num_channels, eps):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"minibatch_stddev: x must be a floating-point torch.Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"minibatch_stddev: x must be a non-empty (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    for name, v in (("group_size", group_size), ("num_channels", num_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"minibatch_stddev: {name} must be an int >= 1, got {v!r}")
    N, C = x.shape[:2]
    G = min(group_size, N)
    if N % G:
        raise ValueError(f"minibatch_stddev: the batch size N={N} must be divisible by the group size "
                         f"G=min(group_size={group_size}, N)={G}")
    if C % num_channels:
        raise ValueError(f"minibatch_stddev: the channels C={C} must be divisible by num_channels={num_channels}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"minibatch_stddev: eps must be a finite number >= 0, got {eps!r}")


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Minibatch standard deviation (ProGAN, Karras et al. 2018, sec. 3; StyleGAN2's exact form, 2020):
    x [N, C, H, W] -> [N, C + num_channels, H, W], the extra channels holding the mean over
    (C/num_channels channels, H, W) of the std over groups of G = min(group_size, N) samples (biased, eps
    inside the sqrt; sample i in the group of i % (N/G), as x.reshape(G, -1, ...) groups them).
    N must divide by G and C by num_channels. Differentiable twice."""
    _check(x, group_size, num_channels, eps)
    backend = _backend.select_for(x)
    if backend == "reference" or x.dtype not in _KERNEL_DTYPES:
        return _reference.minibatch_stddev(x, group_size, num_channels, eps)
    return call_kernel("minibatch_stddev", backend, x, group_size, num_channels, float(eps))


def _format(x):
    return torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) \
        else torch.contiguous_format


def _fake(x, group_size, num_channels, eps):
    N, C, H, W = x.shape
    return torch.empty((N, C + num_channels, H, W), dtype=x.dtype, device=x.device, memory_format=_format(x))


def _fake_backward(grad_out, x, group_size, num_channels, eps):
    return torch.empty_like(x, memory_format=_format(x))


def _register(fwd: str, bwd: str) -> None:
    backward_op = getattr(torch.ops.genkern, bwd.split("::")[1])
    torch.library.register_fake(fwd)(_fake)
    torch.library.register_fake(bwd)(_fake_backward)

    def setup(ctx, inputs, output):
        x, ctx.group_size, ctx.num_channels, ctx.eps = inputs
        ctx.save_for_backward(x)

    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        G, F, eps = ctx.group_size, ctx.num_channels, ctx.eps
        (dx,) = differentiable_backward(lambda g, x: (backward_op(g, x, G, F, eps),),
                                        lambda x: _reference.minibatch_stddev(x, G, F, eps), (grad_out,), (x,))
        return dx, None, None, None

    register_autograd(fwd, backward, setup_context=setup)


@torch.library.custom_op("genkern::minibatch_stddev_triton", mutates_args=())
def _minibatch_stddev_triton(x: torch.Tensor, group_size: int, num_channels: int, eps: float) -> torch.Tensor:
    _check(x, group_size, num_channels, eps)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"minibatch_stddev: x must be float32, float16 or bfloat16 for the kernels, got {x.dtype}")
    from ..triton import minibatch_stddev as kernels
    return kernels.forward(x, group_size, num_channels, eps)


@torch.library.custom_op("genkern::minibatch_stddev_triton_backward", mutates_args=())
def _minibatch_stddev_triton_backward(grad_out: torch.Tensor, x: torch.Tensor, group_size: int, num_channels: int,
                                      eps: float) -> torch.Tensor:
    _check(x, group_size, num_channels, eps)
    check_same_device("minibatch_stddev_backward", "grad_out", grad_out, "x", x)
    N, C, H, W = x.shape
    if tuple(grad_out.shape) != (N, C + num_channels, H, W) or grad_out.dtype != x.dtype:
        raise ValueError(f"minibatch_stddev_backward: grad_out must be {(N, C + num_channels, H, W)} of x's dtype, "
                         f"got {tuple(grad_out.shape)} {grad_out.dtype}")
    from ..triton import minibatch_stddev as kernels
    return kernels.backward(grad_out, x, group_size, num_channels, eps)


_register("genkern::minibatch_stddev_triton", "genkern::minibatch_stddev_triton_backward")
if _extension.LOADED:
    _register("genkern::minibatch_stddev", "genkern::minibatch_stddev_backward")


def bytes_moved(x: torch.Tensor, num_channels: int = 1, backward: bool = False) -> int:
    """Forward reads x and writes [x, stats] (C + F channels); backward reads dout and x, writes dx."""
    N, C, H, W = x.shape
    e = x.element_size()
    if backward:
        return (N * (C + num_channels) * H * W + 2 * N * C * H * W) * e
    return (N * C * H * W + N * (C + num_channels) * H * W) * e
