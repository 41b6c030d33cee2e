"""Public fused ops: argument checks, backend routing, dispatcher (fake + autograd) registration.
One module per op; the kernels live in csrc/{cpu,cuda}/<op> and genkern/triton/<op>.py."""
from .ddpm_step import add_noise, ddpm_step
from .gradient_penalty import gradient_norm_penalty, gradient_penalty, r1_penalty
from .group_norm_silu import group_norm_silu
from .minibatch_stddev import minibatch_stddev
from .pixel_norm import pixel_norm

__all__ = ["add_noise", "ddpm_step", "gradient_norm_penalty", "gradient_penalty", "group_norm_silu", "minibatch_stddev",
           "pixel_norm", "r1_penalty"]
