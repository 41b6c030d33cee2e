"""Plain-PyTorch implementations of every genkern op: readable, differentiable to any order, and the
numerical oracle the fused kernels are tested against. One module per op, named as the op."""
from .group_norm_silu import group_norm_silu

__all__ = ["group_norm_silu"]
