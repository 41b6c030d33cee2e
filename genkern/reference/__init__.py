"""Plain-PyTorch implementations of every genkern op: readable, differentiable to any order, and the
numerical oracle the fused kernels are tested against. One module per op, named as the op."""
from .ddpm_step import add_noise, ddpm_step
from .group_norm_silu import group_norm_silu
from .philox import philox_normal

__all__ = ["add_noise", "ddpm_step", "group_norm_silu", "philox_normal"]
