"""Public fused ops: argument checks, backend routing, dispatcher (fake + autograd) registration.
One module per op; the kernels live in csrc/{cpu,cuda}/<op> and genkern/triton/<op>.py."""
from .ddpm_step import add_noise, ddpm_step
from .group_norm_silu import group_norm_silu

__all__ = ["add_noise", "ddpm_step", "group_norm_silu"]
