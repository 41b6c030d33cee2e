"""Calling a registered op from the public functions, and registering its autograd formula."""
from __future__ import annotations

from typing import Callable, Optional

import torch

# op's .default overload -> Function.apply running the op with the formula given to register_autograd
_EAGER_AUTOGRAD: dict = {}


def register_autograd(op_name: str, backward: Callable, setup_context: Callable,
                      eager_backward: Optional[Callable] = None) -> None:
    """``torch.library.register_autograd(op_name, backward, setup_context=setup_context)``, which is what
    torch.compile, opcheck and direct ``torch.ops.genkern.*`` calls see, plus the same two functions as a
    plain ``torch.autograd.Function`` that call_kernel uses in eager mode. register_autograd's wrapper costs
    ~60 us per forward+backward on the CPU here (schema default filling, keyset redispatch in Python):
    more than the kernels at small shapes, where eager PyTorch's C++ autograd costs a few us.
    ``eager_backward`` replaces ``backward`` in that Function only: for a shortcut that reads a value on the
    host, which a traced backward cannot."""
    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
    namespace, name = op_name.split("::")
    op = getattr(getattr(torch.ops, namespace), name)

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        setup_context(ctx, args, out)
        return out

    fn = type(f"{name}_eager_autograd", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(eager_backward or backward)})
    _EAGER_AUTOGRAD[op.default] = fn.apply


# (name, triton?) -> the op's .default overload: calling the packet resolves the overload on every call,
# and torch.ops' attribute walk costs a few us when its code is cold between two big kernels
_KERNELS: dict = {}


def kernel_op(name: str, backend: str):
    """The registered op that runs `name` on `backend`: genkern::<name> (the C++ kernels, cpu and cuda)
    or genkern::<name>_triton, as its .default overload."""
    key = (name, backend == "triton")
    op = _KERNELS.get(key)
    if op is None:
        op = _KERNELS[key] = getattr(torch.ops.genkern, name + "_triton" if key[1] else name).default
    return op


# Looked up once: between two big kernels this code runs cold, and each attribute walk through torch.*
# costs ~1-2 us there (the guard's class alone ~5 us).
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad
_BelowAutograd = torch._C._AutoDispatchBelowAutograd


def records_autograd(*args) -> bool:
    """Whether autograd records an eager call with these arguments: grad mode on and a tensor argument
    requiring grad. _any_requires_grad is the test register_autograd's own wrapper makes, in C++: a Python
    loop over the arguments cost ~4 us here."""
    return _grad_enabled() and _any_requires_grad(*args)


def call_kernel(name: str, backend: str, *args):
    """kernel_op(name, backend)(*args). When autograd has nothing to record (grad mode off, or no tensor
    argument requiring grad) the op runs below the Autograd dispatch key; when it has, through the op's
    formula as a plain autograd.Function (register_autograd above). Under torch.compile the call is left
    to the compiler."""
    op = kernel_op(name, backend)
    if _is_compiling():
        return op(*args)
    if records_autograd(*args):
        return _EAGER_AUTOGRAD[op](*args)
    with _BelowAutograd():
        return op(*args)
