"""genkern.pixel_norm: y = x / sqrt(mean_c(x^2) + eps) in one read and one write (Karras et al. 2018).

Ops: genkern::pixel_norm / pixel_norm_backward (C++ schemas, CPU + CUDA kernels) and their Triton twins
genkern::pixel_norm_triton / _backward. Forward returns (y, rstd) with rstd float32 [N, prod(spatial)];
backward: dx = rstd (dy - x rstd^2 mean_c(dy x)). Double backward through the reference
(genkern/ops/_double_backward.py), for critics trained with gradient penalties.
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _extension
from ._call import call_kernel, register_autograd
from ._checks import check_same_device
from .. import reference as _reference
from .._layout import is_channels_last_dense
from ._double_backward import differentiable_backward

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, eps):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"pixel_norm: x must be a floating-point torch.Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"pixel_norm: x must have shape (N, C, *), got {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"pixel_norm: eps must be a finite number >= 0, got {eps!r}")


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pixel-wise feature vector normalisation of ProGAN/StyleGAN (Karras et al., ICLR 2018, sec. 4.2):
    ``x / sqrt(mean(x**2, dim=1, keepdim=True) + eps)`` for latents [N, C] and feature maps [N, C, *].
    fp32/fp16/bf16 (float32 maths), NCHW or channels_last (kept); float64 runs on the reference.
    Differentiable twice (gradient penalties)."""
    _check(x, eps)
    backend = _backend.select_for(x)
    if backend == "reference" or x.dtype not in _KERNEL_DTYPES:
        return _reference.pixel_norm(x, eps)
    return call_kernel("pixel_norm", backend, x, float(eps))[0]


def _empty_like_kernel(x):
    if x.is_contiguous() or is_channels_last_dense(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake(x, eps):
    return _empty_like_kernel(x), x.new_empty((x.shape[0], math.prod(x.shape[2:])), dtype=torch.float32)


def _fake_backward(grad_y, x, rstd):
    return _empty_like_kernel(x)


def _register(fwd: str, bwd: str) -> None:
    backward_op = getattr(torch.ops.genkern, bwd.split("::")[1])
    torch.library.register_fake(fwd)(_fake)
    torch.library.register_fake(bwd)(_fake_backward)

    def setup(ctx, inputs, output):
        x, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for rstd (a fill kernel on a GPU)
        ctx.save_for_backward(x, output[1])
        ctx.eps = eps

    def backward(ctx, grad_y, _grad_rstd):
        if grad_y is None:  # y's gradient undefined (grads are not materialized): nothing flows back
            return None, None
        x, rstd = ctx.saved_tensors
        (dx,) = differentiable_backward(lambda g, x: (backward_op(g, x, rstd),),
                                        lambda x: _reference.pixel_norm(x, ctx.eps), (grad_y,), (x,))
        return dx, None

    register_autograd(fwd, backward, setup_context=setup)


@torch.library.custom_op("genkern::pixel_norm_triton", mutates_args=())
def _pixel_norm_triton(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, eps)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"pixel_norm: x must be float32, float16 or bfloat16 for the kernels, got {x.dtype}")
    from ..triton import pixel_norm as kernels
    return kernels.forward(x, eps)


@torch.library.custom_op("genkern::pixel_norm_triton_backward", mutates_args=())
def _pixel_norm_triton_backward(grad_y: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    _check(x, 0.0)
    check_same_device("pixel_norm_backward", "grad_y", grad_y, "x", x)
    check_same_device("pixel_norm_backward", "rstd", rstd, "x", x)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype or x.dtype not in _KERNEL_DTYPES:
        raise ValueError("pixel_norm_backward: grad_y must match x (float32/float16/bfloat16) in shape and dtype")
    if rstd.dtype != torch.float32 or rstd.numel() != x.shape[0] * math.prod(x.shape[2:]):
        raise ValueError("pixel_norm_backward: rstd must be float32 with N*prod(spatial) elements")
    from ..triton import pixel_norm as kernels
    return kernels.backward(grad_y, x, rstd)


_register("genkern::pixel_norm_triton", "genkern::pixel_norm_triton_backward")
if _extension.LOADED:
    _register("genkern::pixel_norm", "genkern::pixel_norm_backward")


def bytes_moved(x: torch.Tensor, backward: bool = False) -> int:
    """Forward reads x, writes y (+ the float32 rstd); backward reads dy, x, rstd and writes dx."""
    t = x.numel() * x.element_size()
    r = x.shape[0] * math.prod(x.shape[2:]) * 4
    return 3 * t + r if backward else 2 * t + r
