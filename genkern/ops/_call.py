"""Calling a registered op from the public functions."""
from __future__ import annotations

import torch


def call_op(op, *args):
    """op(*args). When autograd has nothing to record (grad mode off, or no tensor argument requiring
    grad) the op runs below the Autograd dispatch key: the Python autograd layer that
    torch.library.register_autograd installs costs ~10 us per call even then, as much as a small
    kernel. Under torch.compile the call is left to the compiler as it is."""
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
