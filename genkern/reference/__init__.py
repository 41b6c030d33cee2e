"""Plain-PyTorch implementations of every genkern op: readable, differentiable to any order, and the
numerical oracle the fused kernels are tested against. One module per op, named as the op."""
from .ddpm_step import add_noise, ddpm_step
from .gradient_penalty import gradient_penalty
from .group_norm_silu import group_norm_silu
from .minibatch_stddev import minibatch_stddev
from .philox import philox_normal
from .pixel_norm import pixel_norm

__all__ = ["add_noise", "ddpm_step", "gradient_penalty", "group_norm_silu", "minibatch_stddev", "philox_normal",
           "pixel_norm"]
