"""Gradient penalties: the fused norm-penalty kernel and the WGAN-GP / R1 conveniences around it.

Ops: genkern::gradient_penalty / _backward (C++ schemas, CPU + CUDA kernels) and the Triton twins
genkern::gradient_penalty_triton / _backward: one pass over the per-sample gradient for the norms, one
pass for the backward (dg = scale_i g). On the CPU, genkern::gradient_penalty_and_grad does both in the
forward when a backward will follow (_backward_follows). The penalty's gradient flows on through the create_graph
gradient into the critic's parameters.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .. import _backend, _extension
from ._call import _is_compiling, call_kernel, records_autograd, register_autograd
from ._checks import check_same_device
from .. import reference as _reference
from .._layout import elementwise_strides
from ._double_backward import differentiable_backward

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(grad, weight, target):
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
        raise TypeError(f"gradient_norm_penalty: grad must be a floating-point torch.Tensor, got "
                        f"{grad.dtype if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    if grad.dim() < 1 or grad.shape[0] < 1:
        raise ValueError(f"gradient_norm_penalty: grad must be [N, ...] with N >= 1, got {tuple(grad.shape)}")
    for name, v in (("weight", weight), ("target", target)):
        if v is None and name == "target":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"gradient_norm_penalty: {name} must be a finite number, got {v!r}")


def gradient_norm_penalty(grad: torch.Tensor, weight: float = 10.0, target: Optional[float] = 1.0) -> torch.Tensor:
    """``weight * mean_i (||g_i||_2 - target)**2`` (WGAN-GP, Gulrajani et al. 2017), or with target=None
    ``weight * mean_i ||g_i||_2**2`` (R1, Mescheder et al. 2018, with weight = gamma / 2), fused: g is
    read once forward and once backward. Returns a 0-d float32 tensor (float64 for float64 grad)."""
    _check(grad, weight, target)
    backend = _backend.select_for(grad)
    target = None if target is None else float(target)
    if backend == "reference" or grad.dtype not in _KERNEL_DTYPES:
        return _reference.gradient_penalty(grad, float(weight), target)
    if backend == "cpu" and _backward_follows(grad):
        return call_kernel("gradient_penalty_and_grad", backend, grad, float(weight), target)[0]
    return call_kernel("gradient_penalty", backend, grad, float(weight), target)[0]


def _backward_follows(grad: torch.Tensor) -> bool:
    """Whether autograd records this call in eager mode, where a backward usually follows (a penalty is
    computed to be trained on). Then the CPU computes the gradient in the forward (genkern::
    gradient_penalty_and_grad): each sample is read once, for its norm and, from L1/L2, for dg, and a
    backward with d loss = 1 (``loss.backward()``) hands that dg over instead of reading g again (64x3x64x64
    forward+backward, 2 threads: 0.28-0.31 -> 0.24 ms). Any other d loss, create_graph, or a second backward
    over a retained graph runs the backward kernel, as without it. The cost: one write of dg in the forward
    when no backward comes, and dg kept from forward to backward. Not on GPUs: there the backward's pass
    costs what the forward's extra write would, and reading d loss on the host would wait for the device.
    Under torch.compile the compiler sees the two plain ops."""
    return not _is_compiling() and records_autograd(grad)


def gradient_penalty(critic: Callable, real: torch.Tensor, fake: torch.Tensor, weight: float = 10.0,
                     target: float = 1.0, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The WGAN-GP penalty of Gulrajani et al. (2017), eq. 3: x^ = eps real + (1 - eps) fake with
    eps ~ U[0, 1] per sample (one torch.lerp pass), g = d critic(x^) / d x^ with create_graph=True, and
    ``weight * mean_i (||g_i|| - target)**2`` by the fused kernel. real and fake are detached (the
    penalty trains the critic); ``loss.backward()`` reaches the critic's parameters through g.
    ``generator`` draws eps reproducibly."""
    if not isinstance(real, torch.Tensor) or not isinstance(fake, torch.Tensor):
        raise TypeError("gradient_penalty: real and fake must be torch.Tensors")
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real and fake must have the same shape, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    if real.dim() < 1 or real.shape[0] < 1:
        raise ValueError(f"gradient_penalty: real must be [N, ...] with N >= 1, got {tuple(real.shape)}")
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    gen_device = generator.device if generator is not None else real.device
    eps = torch.rand(shape, generator=generator, device=gen_device, dtype=real.dtype).to(real.device)
    x_hat = torch.lerp(fake.detach(), real.detach(), eps).requires_grad_(True)
    out = critic(x_hat)
    (g,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return gradient_norm_penalty(g, weight, target)


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor, gamma: float) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): ``gamma / 2 * mean_i ||d D(x_i) / d x_i||**2`` at the real images, which
    must have requires_grad=True when the critic ran on them. The gradient is taken with create_graph=True
    and reduced by the fused kernel."""
    if not isinstance(real_images, torch.Tensor) or not real_images.requires_grad:
        raise ValueError("r1_penalty: real_images must be the tensor the critic ran on, with requires_grad=True")
    (g,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return gradient_norm_penalty(g, gamma / 2, None)


# --------------------------------------------------------------------------------------------------

def _fake(grad, weight, target):
    return grad.new_empty((), dtype=torch.float32), grad.new_empty((grad.shape[0],), dtype=torch.float32)


def _fake_backward(grad_loss, grad, norms, weight, target):
    return torch.empty_strided(grad.shape, elementwise_strides(grad), dtype=grad.dtype, device=grad.device)


def _penalty_backward(backward_op, grad_loss, g, norms, w, t):
    """dg by the backward kernel; under create_graph differentiable again through the reference. No
    gradient for the loss (only the norms were used; grads are not materialised): none for g."""
    if grad_loss is None:
        return None, None, None
    (dg,) = differentiable_backward(lambda gl, g: (backward_op(gl, g, norms, w, t),),
                                    lambda g: _reference.gradient_penalty(g, w, t), (grad_loss,), (g,))
    return dg, None, None


def _register(fwd: str, bwd: str) -> None:
    backward_op = getattr(torch.ops.genkern, bwd.split("::")[1])
    torch.library.register_fake(fwd)(_fake)
    torch.library.register_fake(bwd)(_fake_backward)

    def setup(ctx, inputs, output):
        g, ctx.weight, ctx.target = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero gradient for the norms (a fill kernel on a GPU)
        ctx.save_for_backward(g, output[1])

    def backward(ctx, grad_loss, _grad_norms):
        g, norms = ctx.saved_tensors
        return _penalty_backward(backward_op, grad_loss, g, norms, ctx.weight, ctx.target)

    register_autograd(fwd, backward, setup_context=setup)


def _register_and_grad(name: str, bwd: str) -> None:
    """genkern::gradient_penalty_and_grad (see _backward_follows): the loss, the norms and dg for d loss = 1."""
    backward_op = getattr(torch.ops.genkern, bwd.split("::")[1])

    @torch.library.register_fake(name)
    def _fake_and_grad(grad, weight, target):
        return (*_fake(grad, weight, target), _fake_backward(None, grad, None, weight, target))

    def setup(ctx, inputs, output):
        g, ctx.weight, ctx.target = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for dg, as large as g
        ctx.save_for_backward(g, output[1], output[2])

    def backward(ctx, grad_loss, _grad_norms, _grad_dg):
        g, norms, _ = ctx.saved_tensors
        return _penalty_backward(backward_op, grad_loss, g, norms, ctx.weight, ctx.target)

    def eager_backward(ctx, grad_loss, _grad_norms, _grad_dg):
        # dg is handed over as it is: autograd lets go of the saved copy before it stores x.grad, so it
        # keeps the tensor rather than copying it (with retain_graph it copies, and dg stays intact)
        if grad_loss is not None and not torch.is_grad_enabled() and grad_loss.item() == 1.0:
            return ctx.saved_tensors[2], None, None
        return backward(ctx, grad_loss, _grad_norms, _grad_dg)

    register_autograd(name, backward, setup_context=setup, eager_backward=eager_backward)


@torch.library.custom_op("genkern::gradient_penalty_triton", mutates_args=())
def _gradient_penalty_triton(grad: torch.Tensor, weight: float, target: Optional[float]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(grad, weight, target)
    if grad.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"gradient_penalty: grad must be float32, float16 or bfloat16 for the kernels, got {grad.dtype}")
    from ..triton import gradient_penalty as kernels
    return kernels.forward(grad, weight, target)


@torch.library.custom_op("genkern::gradient_penalty_triton_backward", mutates_args=())
def _gradient_penalty_triton_backward(grad_loss: torch.Tensor, grad: torch.Tensor, norms: torch.Tensor,
                                      weight: float, target: Optional[float]) -> torch.Tensor:
    _check(grad, weight, target)
    check_same_device("gradient_penalty_backward", "norms", norms, "grad", grad)
    if norms.dtype != torch.float32 or tuple(norms.shape) != (grad.shape[0],) or grad_loss.numel() != 1:
        raise ValueError(f"gradient_penalty_backward: norms must be float32 [{grad.shape[0]}] and grad_loss one value")
    from ..triton import gradient_penalty as kernels
    return kernels.backward(grad_loss, grad, norms, weight, target)


_register("genkern::gradient_penalty_triton", "genkern::gradient_penalty_triton_backward")
if _extension.LOADED:
    _register("genkern::gradient_penalty", "genkern::gradient_penalty_backward")
    _register_and_grad("genkern::gradient_penalty_and_grad", "genkern::gradient_penalty_backward")


def penalty_scale(grad_loss: torch.Tensor, norms: torch.Tensor, weight: float, target: Optional[float]) -> torch.Tensor:
    """Per-sample factor of the backward, dg_i = scale_i g_i (as csrc/gradient_penalty.h)."""
    a = torch.ones_like(norms) if target is None else torch.where(norms > 0, 1.0 - target / norms,
                                                                   torch.zeros_like(norms))
    return (a * grad_loss.float() * (2.0 * weight / norms.shape[0])).contiguous()


def bytes_moved(grad: torch.Tensor, backward: bool = False) -> int:
    """Forward reads g; backward reads g and writes dg. Forward and backward together need no more than the
    backward alone: g read once for its norms and dg (what gradient_penalty_and_grad moves on the CPU)."""
    t = grad.numel() * grad.element_size()
    return 2 * t if backward else t
