"""genkern.group_norm_silu: y = act(GroupNorm(x)) in one fused kernel, forward and backward.

Registered with the PyTorch dispatcher so that autograd, torch.compile (no graph break) and
torch.library.opcheck all see real ops:
  genkern::group_norm_silu / group_norm_silu_backward   C++ schemas (csrc/ops.cpp), CPU + CUDA kernels
  genkern::group_norm_silu_triton / ..._triton_backward  Python custom ops running the Triton kernels
Both forward ops return (y, mean, rstd) with float32 statistics of shape [N, num_groups]; backward
recomputes the pre-activation from x and those statistics, so nothing else is saved.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend, _extension
from ._call import call_kernel, register_autograd
from ._checks import check_same_device
from .._layout import is_channels_last_dense
from .. import reference as _reference
from ._double_backward import differentiable_backward

_ACTIVATIONS = ("silu", "gelu", "none")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _activation_name(activation) -> str:
    name = "none" if activation is None else activation
    if name not in _ACTIVATIONS:
        raise ValueError(f"group_norm_silu: activation must be 'silu', 'gelu' or None, got {activation!r}")
    return name


def _check_args(x, num_groups, weight, bias, eps) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm_silu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must have shape (N, C, *), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"group_norm_silu: x must be a floating-point tensor, got {x.dtype}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"group_norm_silu: num_groups must be a positive int dividing the {C} channels "
                         f"of x, got {num_groups!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"group_norm_silu: {name} must be a floating-point tensor or None")
        if tuple(p.shape) != (C,):
            raise ValueError(f"group_norm_silu: {name} must have shape ({C},) to match x's channels, "
                             f"got {tuple(p.shape)}")
        check_same_device("group_norm_silu", name, p, "x", x)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"group_norm_silu: eps must be a finite number >= 0, got {eps!r}")


def _check_kernel_dtype(x) -> None:
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"group_norm_silu: x must be float32, float16 or bfloat16 for the kernels, got {x.dtype}")


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                    activation: Optional[str] = "silu") -> torch.Tensor:
    """Fused ``act(group_norm(x, num_groups, weight, bias, eps))``.

    GroupNorm: Wu & He, "Group Normalization", ECCV 2018. SiLU: Elfwing et al. 2018; the
    GroupNorm(32)+SiLU pair is the normalisation of every ResBlock in DDPM (Ho et al. 2020) U-Nets
    and Stable-Diffusion-style VAEs. ``activation`` is "silu", "gelu" (exact erf form) or None.

    x is (N, C, *) in float32, float16 or bfloat16 (float32 statistics and arithmetic), NCHW or
    channels_last; y keeps x's dtype and memory format. float64 runs on the reference backend.
    Under torch.autocast the op follows nn.GroupNorm's policy: float32 on CUDA, input dtype on CPU.
    An empty x gives an empty y.
    """
    act = _activation_name(activation)
    if not isinstance(x, torch.Tensor) or type(num_groups) is not int:
        _check_args(x, num_groups, weight, bias, eps)  # raises
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        # group_norm is on CUDA autocast's float32 list (on CPU autocast leaves it alone); so is this op.
        x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
    backend = _backend.select_for(x)
    if backend == "cuda" and torch.are_deterministic_algorithms_enabled() and _backend.current_backend() is None \
            and _needs_grad(x, weight, bias):
        backend = _deterministic_cuda_backend()
    if backend == "reference" or x.dtype not in _KERNEL_DTYPES:
        _check_args(x, num_groups, weight, bias, eps)
        return _reference.group_norm_silu(x, num_groups, weight, bias, eps, act)
    # The kernel ops check every argument themselves, so the Python checks run only when a call fails,
    # to name the bad argument in plainer words: run on every call they cost ~20 us of a 0.4 ms
    # 16x256x16x16 forward, this code being cold in the instruction caches between two big kernels.
    try:
        return call_kernel("group_norm_silu", backend, x, weight, bias, num_groups, float(eps), act)[0]
    except (TypeError, ValueError, RuntimeError) as e:
        error = e
    _check_args(x, num_groups, weight, bias, eps)
    raise error


def _needs_grad(x, weight, bias) -> bool:
    # _call.records_autograd asks the same through torch._C._any_requires_grad, which torch.compile
    # cannot trace (its callers run it outside compiled code only); this runs when traced too
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))


@torch.compiler.assume_constant_result  # read once when traced, as _backend.select is
def _deterministic_cuda_backend() -> str:
    """Under torch.use_deterministic_algorithms(True), where a gradient will be taken: the CUDA C++
    backward adds its dweight/dbias partial sums (and, channels-last on the two-pass path, dx's) with
    shared-memory atomics, in whatever order the warps arrive, so their last bits vary from run to run;
    the Triton backward sums in a fixed order and the reference is ATen's. A backend the user forced is
    kept (the CUDA op then raises, or warns under warn_only, as ATen's nondeterministic ops do)."""
    return "triton" if _backend.unavailable_reason("triton", "cuda") is None else "reference"


# --------------------------------------------------------------------------------------------------
# Dispatcher registration: fake (meta) kernels and autograd, shared by the C++ and the Triton op.

def _kernel_layout_empty(x):
    """An empty tensor laid out as the kernels write their outputs: like x when x is dense NCHW or
    channels-last, else NCHW-contiguous (csrc/group_norm_silu.h: to_kernel_layout)."""
    if x.is_contiguous() or is_channels_last_dense(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_forward(x, weight, bias, num_groups, eps, activation):
    # also what a call with a meta weight or bias reaches (the dispatcher picks the Meta kernel), so it
    # checks the arguments as the kernels do
    _check_args(x, num_groups, weight, bias, eps)
    mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _kernel_layout_empty(x), mean, torch.empty_like(mean)


def _fake_backward(grad_y, x, weight, bias, mean, rstd, num_groups, activation):
    C = x.shape[1]
    return (_kernel_layout_empty(x),
            x.new_empty((C,), dtype=x.dtype if weight is None else weight.dtype),
            x.new_empty((C,), dtype=x.dtype if bias is None else bias.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and rstd (two fill kernels on a GPU)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.activation, ctx.eps = num_groups, activation, eps


def _autograd_backward(backward_op):
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        if grad_y is None:  # y's gradient undefined (grads are not materialized): nothing flows back
            return None, None, None, None, None, None
        x, weight, bias, mean, rstd = ctx.saved_tensors
        G, act, eps = ctx.num_groups, ctx.activation, ctx.eps
        # fused first-order gradients; differentiable again (through the reference) under create_graph
        dx, dw, db = differentiable_backward(
            lambda gy, x, w, b: backward_op(gy, x, w, b, mean, rstd, G, act),
            lambda x, w, b: _reference.group_norm_silu(x, G, w, b, eps, act), (grad_y,), (x, weight, bias))
        return (dx if ctx.needs_input_grad[0] else None,
                dw if weight is not None and ctx.needs_input_grad[1] else None,
                db if bias is not None and ctx.needs_input_grad[2] else None, None, None, None)
    return backward


def _register(forward_name: str, backward_name: str) -> None:
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(backward_name)(_fake_backward)
    backward_op = getattr(torch.ops.genkern, backward_name.split("::")[1])
    register_autograd(forward_name, _autograd_backward(backward_op), setup_context=_setup_context)


# The Triton ops are defined here (not in C++) so that they exist whether or not genkern._C is built;
# the Triton module itself is imported on first use, so `import genkern` never touches Triton.
@torch.library.custom_op("genkern::group_norm_silu_triton", mutates_args=())
def _group_norm_silu_triton(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            num_groups: int, eps: float, activation: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_args(x, num_groups, weight, bias, eps)  # for direct torch.ops callers, as the C++ ops do
    _check_kernel_dtype(x)
    from ..triton import group_norm_silu as kernels
    return kernels.forward(x, weight, bias, num_groups, eps, _activation_name(activation))


@torch.library.custom_op("genkern::group_norm_silu_triton_backward", mutates_args=())
def _group_norm_silu_triton_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                     bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                                     num_groups: int, activation: str
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_args(x, num_groups, weight, bias, 0.0)
    _check_kernel_dtype(x)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype:
        raise ValueError(f"group_norm_silu_backward: grad_y must match x in shape and dtype, got "
                         f"{tuple(grad_y.shape)} {grad_y.dtype} vs {tuple(x.shape)} {x.dtype}")
    check_same_device("group_norm_silu_backward", "grad_y", grad_y, "x", x)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.dtype != torch.float32 or t.numel() != x.shape[0] * num_groups:
            raise ValueError(f"group_norm_silu_backward: mean and rstd must be float32 with "
                             f"N*num_groups={x.shape[0] * num_groups} elements, got {t.dtype} with {t.numel()}")
        check_same_device("group_norm_silu_backward", name, t, "x", x)
    from ..triton import group_norm_silu as kernels
    return kernels.backward(grad_y, x, weight, bias, mean, rstd, num_groups, _activation_name(activation))


_register("genkern::group_norm_silu_triton", "genkern::group_norm_silu_triton_backward")
if _extension.LOADED:
    _register("genkern::group_norm_silu", "genkern::group_norm_silu_backward")


def bytes_moved(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, backward: bool = False) -> int:
    """The least memory traffic the op can have, the roofline its kernels are measured against:
    forward reads x and writes y; backward reads x and dy and writes dx and the parameter gradients.
    (Parameters and the [N, G] float32 statistics are counted; caches are not.)"""
    tensor = x.numel() * x.element_size()
    params = sum(p.numel() * p.element_size() for p in (weight, bias) if p is not None)
    stats = 2 * x.shape[0] * num_groups * 4
    if backward:
        return 3 * tensor + 2 * params + stats
    return 2 * tensor + params + stats
